"""The fine-tuning pipeline as a Prefect flow: the list of stages, top to bottom.

    materialize base model -> template dataset -> tokenize -> train -> evaluate -> merge & export

Run it with `tunefactory run deployments/self_cognition.yaml`, or call `finetune(spec)`.
(No `from __future__ import annotations` here: Prefect reads the flow's parameter types at run
time to validate a deployment's parameters, and they must be real classes, not strings.)

Each stage is a task that returns a manifest (tasks/stage_output.py) and logs a child run
under this pipeline run's MLflow parent run.
"""

from pathlib import Path
from typing import Any

from prefect import Task, flow
from prefect.runtime import flow_run

from flows.spec import PipelineSpec, StageRetry
from tasks.evaluate import evaluate_model
from tasks.export import merge_and_export
from tasks.lineage import dataset_inputs
from tasks.materialize_model import materialize_base_model
from tasks.template_dataset import template_dataset
from tasks.tokenize_dataset import tokenize_dataset
from tasks.tracking import end_pipeline_run, log_pipeline_datasets, start_pipeline_run, tag_pipeline_run
from tasks.train import train_model


def retrying(stage: Task, retry: StageRetry) -> Task:
    return stage.with_options(retries=retry.retries, retry_delay_seconds=retry.delay_seconds)


@flow(name="finetune", flow_run_name="{spec.name}")
def finetune(spec: PipelineSpec, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and export a model as the spec describes.

    `labels` become tags of the pipeline's MLflow run (a sweep marks its variants with them).
    """
    workspace = Path(spec.workspace).resolve()
    tracking = start_pipeline_run(
        spec.name,
        workspace,
        spec.model_dump(mode="json"),
        tags={
            "prefect_flow_run_id": str(flow_run.id),
            "prefect_flow_run_url": str(flow_run.ui_url),
            "flow_run_name": str(flow_run.name),
            "spec_digest": spec.digest(),
            **(labels or {}),
        },
    )
    stages, retry = {}, spec.retries
    try:
        stages["model"] = base = retrying(materialize_base_model, retry.model)(
            spec.model.name_or_path, spec.model.trust_remote_code, workspace, tracking
        )
        tag_pipeline_run(
            tracking, {"base_model": spec.model.name_or_path, "base_model_digest": base.info["source_digest"]}
        )
        stages["template"] = templated = retrying(template_dataset, retry.template)(spec.dataset, workspace, tracking)
        stages["tokenize"] = tokenized = retrying(tokenize_dataset, retry.tokenize)(
            spec.tokenize, templated, base, workspace, tracking
        )
        log_pipeline_datasets(tracking, dataset_inputs(templated, tokenized))
        stages["train"] = trained = retrying(train_model, retry.train)(spec.train, tokenized, base, workspace, tracking)
        stages["evaluate"] = evaluated = retrying(evaluate_model, retry.evaluate)(
            spec.evaluate,
            spec.dataset.registry,
            spec.dataset.template_vars,
            spec.train.compute_type,
            trained,
            tokenized,
            base,
            workspace,
            tracking,
        )
        stages["export"] = retrying(merge_and_export, retry.export)(
            spec.export, spec.name, spec.digest(), trained, evaluated, templated, base, workspace, tracking
        )
    except BaseException:
        end_pipeline_run(tracking, succeeded=False)
        raise
    end_pipeline_run(tracking, succeeded=True, metrics=evaluated.metrics)
    return {
        "flow_run_id": str(flow_run.id),
        "tracking": tracking.model_dump(),
        "stages": {k: v.model_dump() for k, v in stages.items()},
    }
