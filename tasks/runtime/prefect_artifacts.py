"""What a person reads in the Prefect UI: one artifact per thing worth looking at.

The dataset preview and token statistics (tables), a progress bar that moves while the model
trains (step, loss, time left), the loss curve, the evaluation before and after, and the
export summary with the way to the MLflow run. Keys are stable per pipeline name, so the
Prefect UI shows each artifact's history across runs.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.contracts.worker_events import Tokenized
from tasks.runtime.intervals import interval_text, is_headline
from tasks.runtime.redaction import redact_uri


def artifact_key(what: str) -> str:
    """`<pipeline name>-<what>`; Prefect keys allow lowercase letters, digits and dashes only."""
    from prefect.runtime import flow_run

    cleaned = "".join(c if c.isalnum() else "-" for c in f"{flow_run.name or 'pipeline'}-{what}".lower())
    return "-".join(part for part in cleaned.split("-") if part)


def publish_preview(rows: list[dict[str, str]], skipped: dict[str, int] | None = None) -> None:
    description = "The first training rows after templating"
    if skipped:
        description += "; skipped rows: " + ", ".join(f"{count} ({reason})" for reason, count in skipped.items())
    create_table_artifact(rows, key=artifact_key("dataset-preview"), description=description)


def publish_token_stats(tokenized: Tokenized) -> None:
    splits = {"train": tokenized.train, "val": tokenized.val}
    table = [{"split": split, **counts.counted()} for split, counts in splits.items()]
    create_table_artifact(table, key=artifact_key("token-stats"), description="Tokenization statistics")


class TrainingProgress:
    """A progress artifact updated as the training worker reports steps."""

    def __init__(self):
        self.artifact_id = None
        self.started = time.time()
        self.total = 1

    def start(self, total_steps: int, first_step: int = 0) -> None:
        self.total, self.first, self.started = max(total_steps, 1), first_step, time.time()
        self.artifact_id = create_progress_artifact(
            100.0 * first_step / self.total,
            key=artifact_key("training-progress"),
            description=f"step {first_step} of {self.total}",
        )

    def update(self, step: int, loss: float) -> None:
        if self.artifact_id is None:
            return
        done = step - self.first
        left = (time.time() - self.started) / max(done, 1) * (self.total - step)
        description = f"step {step} of {self.total}, loss {loss:.4f}, about {left / 60:.1f} min left"
        update_progress_artifact(self.artifact_id, 100.0 * step / self.total, description=description)


def publish_loss_curve(png: Path, history: list[dict[str, Any]]) -> None:
    image = base64.b64encode(png.read_bytes()).decode()
    rows = "\n".join(f"| {h['step']} | {h['loss']:.4f} | {h['learning_rate']:.2e} |" for h in history)
    markdown = (
        f"![training loss](data:image/png;base64,{image})\n\n| step | loss | learning rate |\n|---|---|---|\n{rows}\n"
    )
    create_markdown_artifact(markdown, key=artifact_key("loss-curve"), description="Training loss")


def evaluation_markdown(metrics: dict[str, float]) -> str:
    """Base and tuned side by side, each with its 95% interval and sample size where known."""
    names = sorted({k.split("_", 1)[1] for k in metrics if k.startswith(("base_", "tuned_")) and is_headline(k)})

    def cell(variant: str, name: str) -> str:
        key = f"{variant}_{name}"
        if key not in metrics:
            return "-"
        interval = interval_text(metrics, key)
        return f"{metrics[key]:.3f}" + (f" {interval}" if interval else "")

    lines = [f"| {n} | {cell('base', n)} | {cell('tuned', n)} |" for n in names]
    return "| metric | base [95% interval] | tuned [95% interval] |\n|---|---|---|\n" + "\n".join(lines)


def publish_evaluation(metrics: dict[str, float], answers: list[dict[str, object]]) -> None:
    create_markdown_artifact(
        evaluation_markdown(metrics),
        key=artifact_key("evaluation"),
        description="Evaluation of the base and the fine-tuned model",
    )
    create_table_artifact(answers, key=artifact_key("answers"), description="Answers, before and after")


def publish_export_summary(
    model_dir: Path, registered: str, version: str, alias: str, tracking_uri: str, experiment_id: str, run_id: str
) -> None:
    tracking_uri = redact_uri(tracking_uri)  # an artifact is shown to everyone who opens the UI
    if tracking_uri.startswith("http"):
        where = f"[the export run in MLflow]({tracking_uri}/#/experiments/{experiment_id}/runs/{run_id})"
    else:
        where = f"MLflow run `{run_id}` in `{tracking_uri}` (`mlflow ui --backend-store-uri {tracking_uri}`)"
    markdown = (
        f"**Exported model**: `{model_dir}`\n\n"
        f"**Model Registry**: `{registered}` version {version}, alias `@{alias}`\n\n"
        f"**Lineage and metrics**: {where}\n\n"
        f"Chat with it: `tunefactory chat {model_dir}`"
    )
    create_markdown_artifact(markdown, key=artifact_key("export"), description="Where the model is")


def publish_comparison(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    """The comparison table, and the loss curves and evaluation bars as a picture."""
    create_table_artifact(rows, key=artifact_key("comparison"), description=title)
    image = base64.b64encode(png.read_bytes()).decode()
    create_markdown_artifact(
        f"## {title}\n\n![loss curves and evaluation](data:image/png;base64,{image})\n\nFile: `{png}`",
        key=artifact_key("comparison-plot"),
        description=title,
    )
