"""The fine-tuning pipeline as a Prefect flow: the list of stages, top to bottom.

    materialize base model -> template dataset -> tokenize -> train -> evaluate -> merge & export

A spec with several training stages (`then:`, e.g. sft -> rm -> ppo) templates, tokenizes
and trains each in turn, each starting from an earlier stage's model; the last stage that
makes a language model is evaluated and exported (an rm-only pipeline ends with its reward model).

Run it with `tunefactory run deployments/self_cognition.yaml`, or call `finetune(spec)`.
(No `from __future__ import annotations` here: Prefect reads the flow's parameter types at run
time to validate a deployment's parameters, and they must be real classes, not strings.)

Each stage is a task that returns a manifest (tasks/runtime/stage_output.py) and logs a child run
under this pipeline run's MLflow parent run.
"""

from pathlib import Path
from typing import Any

from prefect import Task, flow
from prefect.runtime import flow_run

from flows.spec import PipelineSpec, PlannedStage, StageRetry
from tasks.contracts.spec_sections import STAGE_DATA
from tasks.contracts.stage_infos import ModelInfo
from tasks.runtime.lineage import dataset_inputs
from tasks.runtime.stage_output import Manifest, StageContext, stage_id
from tasks.runtime.tracking import (
    Tracking,
    end_pipeline_run,
    log_pipeline_datasets,
    start_pipeline_run,
    tag_pipeline_run,
)
from tasks.stages.evaluate import evaluate_model
from tasks.stages.export import merge_and_export
from tasks.stages.materialize_model import materialize_base_model
from tasks.stages.template_dataset import template_dataset
from tasks.stages.tokenize_dataset import tokenize_dataset
from tasks.stages.train import train_model


def retrying(stage: Task, retry: StageRetry) -> Task:
    return stage.with_options(retries=retry.retries, retry_delay_seconds=retry.delay_seconds)


def prepare_data(
    spec: PipelineSpec, plan: PlannedStage, base: Manifest, ctx: StageContext, stages: dict[str, Manifest]
) -> Manifest:
    """Template and tokenize one training stage's data; the tokenized manifest."""
    retry = spec.retries
    templated = retrying(template_dataset, retry.template)(
        ctx=ctx,
        config=spec.data_for(plan.config),
        kind=STAGE_DATA[plan.config.stage],
        for_stage=plan.name,
        num_proc=spec.tokenize.num_proc,
    )
    tokenized = retrying(tokenize_dataset, retry.tokenize)(
        ctx=ctx, config=spec.tokenize, templated=templated, base_model=base, for_stage=plan.name
    )
    log_pipeline_datasets(ctx.tracking, dataset_inputs(templated, tokenized, plan.name))
    stages[stage_id("template", plan.name)], stages[stage_id("tokenize", plan.name)] = templated, tokenized
    return tokenized


def train_chain(spec: PipelineSpec, base: Manifest, ctx: StageContext, stages: dict[str, Manifest]) -> str:
    """Template, tokenize and train each training stage in order; the name of the last that made a language model."""
    policy = ""
    for plan in spec.training_plan():
        tokenized = prepare_data(spec, plan, base, ctx, stages)
        stages[stage_id("train", plan.name)] = retrying(train_model, spec.retries.train)(
            ctx=ctx,
            config=plan.config,
            tokenized=tokenized,
            base_model=base,
            for_stage=plan.name,
            start=stages[stage_id("train", plan.start)] if plan.start else None,
            reward=stages[stage_id("train", plan.reward)] if plan.reward else None,
        )
        policy = policy if plan.config.stage == "rm" else plan.name
    return policy


def start_run(spec: PipelineSpec, labels: dict[str, str] | None) -> Tracking:
    """The pipeline's MLflow parent run, tagged with the Prefect flow run and the spec."""
    return start_pipeline_run(
        spec.name,
        Path(spec.workspace).resolve(),
        spec.model_dump(mode="json"),
        tags={
            "prefect_flow_run_id": str(flow_run.id),
            "prefect_flow_run_url": str(flow_run.ui_url),
            "flow_run_name": str(flow_run.name),
            "spec_digest": spec.digest(),
            **(labels or {}),
        },
    )


def materialize(spec: PipelineSpec, ctx: StageContext) -> Manifest:
    base = retrying(materialize_base_model, spec.retries.model)(
        ctx=ctx,
        name_or_path=spec.model.name_or_path,
        trust_remote_code=spec.model.trust_remote_code,
        chat_template=spec.model.template_text(),
    )
    tag_pipeline_run(
        ctx.tracking, {"base_model": spec.model.name_or_path, "base_model_digest": ModelInfo.of(base).source_digest}
    )
    return base


@flow(name="prepare-data", flow_run_name="{spec.name}: data")
def prepare(spec: PipelineSpec) -> dict[str, Any]:
    """The pipeline's first stages alone: base model, then each training stage's templated and
    tokenized data, built once and reused by a later `tunefactory run` of the same spec."""
    tracking = start_run(spec, {"prepare_only": "true"})
    ctx = StageContext(workspace=Path(spec.workspace).resolve(), tracking=tracking)
    stages: dict[str, Manifest] = {}
    try:
        stages["model"] = base = materialize(spec, ctx)
        for plan in spec.training_plan():
            prepare_data(spec, plan, base, ctx, stages)
    except BaseException:
        end_pipeline_run(tracking, succeeded=False)
        raise
    end_pipeline_run(tracking, succeeded=True)
    return {
        "flow_run_id": str(flow_run.id),
        "tracking": tracking.model_dump(),
        "stages": {k: v.model_dump() for k, v in stages.items()},
    }


@flow(name="finetune", flow_run_name="{spec.name}")
def finetune(spec: PipelineSpec, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and export a model as the spec describes.

    `labels` become tags of the pipeline's MLflow run (a sweep marks its variants with them).
    """
    tracking = start_run(spec, labels)
    ctx = StageContext(workspace=Path(spec.workspace).resolve(), tracking=tracking)
    stages, retry = {}, spec.retries
    try:
        stages["model"] = base = materialize(spec, ctx)
        policy = train_chain(spec, base, ctx, stages)
        if policy:  # evaluate and export the final language model
            trained = stages[stage_id("train", policy)]
            stages["evaluate"] = evaluated = retrying(evaluate_model, retry.evaluate)(
                ctx=ctx,
                config=spec.evaluate,
                registry=spec.dataset.registry,
                template_vars=spec.dataset.template_vars,
                compute_type=spec.train.compute_type,
                trained=trained,
                tokenized=stages["tokenize"],
                base_model=base,
            )
            stages["export"] = retrying(merge_and_export, retry.export)(
                ctx=ctx,
                config=spec.export,
                name=spec.name,
                spec_digest=spec.digest(),
                trained=trained,
                evaluated=evaluated,
                templated=[m for name, m in stages.items() if name.startswith("template")],
                base_model=base,
            )
    except BaseException:
        end_pipeline_run(tracking, succeeded=False)
        raise
    end_pipeline_run(tracking, succeeded=True, metrics=stages["evaluate"].metrics if policy else None)
    return {
        "flow_run_id": str(flow_run.id),
        "tracking": tracking.model_dump(),
        "stages": {k: v.model_dump() for k, v in stages.items()},
    }
