"""After the export: the new version becomes @champion only if it passes the gate (`export.promote`).

Not a stage with an output: it reads the registry as it is when the run ends, every run (a
reused export is judged again, against whoever is champion now), and writes only the alias and
the verdict (tasks/runtime/model_registry.py:promote_run). A refusal is not a failure of the run:
the champion stays, and the reasons are in the run's log, a Prefect artifact, the MLflow
pipeline run's tags and the new version's tags.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from tasks.contracts.manifest import Manifest
from tasks.contracts.spec_sections import ExportSpec
from tasks.contracts.stage_infos import ExportInfo, ModelInfo
from tasks.runtime.model_registry import promote_run
from tasks.runtime.prefect_artifacts import artifact_key
from tasks.runtime.stage_output import StageContext
from tasks.runtime.tracking import patiently, tag_pipeline_run


class Promotion(BaseModel):
    """What the end of a run did to the champion alias."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: str
    promoted: bool
    reasons: list[str]

    def summary(self) -> str:
        verdict = "promoted to @champion" if self.promoted else "not promoted; the champion stays"
        return f"{self.model} version {self.version} {verdict}: " + "; ".join(self.reasons)


@task(name="promote", task_run_name="promote if better")
def promote_if_better(
    ctx: StageContext, config: ExportSpec, exported: Manifest, evaluated: Manifest, base_model: Manifest
) -> Promotion:
    """The exported version through the gate against the champion; the verdict recorded everywhere it is looked for."""
    info = ExportInfo.of(exported)
    tracking = ctx.tracking
    promoted, reasons = patiently(
        tracking.uri,
        f"promoting {info.registered_model} version {info.version}",
        lambda: promote_run(
            tracking.client(), info.registered_model, info.version, ModelInfo.of(base_model).base_version,
            evaluated.metrics, config.promotion_improve,
        ),
    )  # fmt: skip
    promotion = Promotion(model=info.registered_model, version=info.version, promoted=promoted, reasons=reasons)
    logger = get_run_logger()
    (logger.info if promoted else logger.warning)("%s", promotion.summary())
    tag_pipeline_run(tracking, {"promotion": promotion.summary()[:5000]})
    lines = "\n".join(f"- {reason}" for reason in reasons)
    create_markdown_artifact(
        f"**{promotion.summary().split(':', 1)[0]}**\n\n{lines}",
        key=artifact_key("promotion"),
        description="Whether the new version replaced the champion, and why",
    )
    return promotion
