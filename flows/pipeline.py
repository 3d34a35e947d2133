"""The fine-tuning pipeline as a Prefect flow: the list of stages, top to bottom.

    materialize base model -> template dataset -> tokenize -> train -> evaluate -> merge & export

A spec with several training stages (`then:`, e.g. sft -> rm -> ppo) templates, tokenizes
and trains each in turn, each starting from an earlier stage's model; the last stage that
makes a language model is evaluated and exported (an rm-only pipeline ends with its reward model).

Run it with `tunefactory run deployments/self_cognition.yaml`, or call `finetune(spec)`.
(No `from __future__ import annotations` here: Prefect reads the flow's parameter types at run
time to validate a deployment's parameters, and they must be real classes, not strings.)

Each stage is a task that returns a manifest (tasks/contracts/manifest.py) and logs a child run
under this pipeline run's MLflow parent run. The flows return a `PipelineResult` (flows/results.py).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import Task, flow
from prefect.runtime import flow_run

from flows.results import PipelineResult
from flows.spec import PipelineSpec, PlannedStage, StageRetry
from tasks.contracts.child_process import start_preloading
from tasks.contracts.manifest import Manifest
from tasks.contracts.spec_sections import STAGE_DATA
from tasks.contracts.stage_infos import ModelInfo
from tasks.runtime.lineage import dataset_inputs
from tasks.runtime.stage_output import StageContext, stage_id
from tasks.runtime.tracking import log_pipeline_datasets, log_pipeline_metrics, pipeline_run, tag_pipeline_run
from tasks.stages.evaluate import evaluate_model
from tasks.stages.export import merge_and_export
from tasks.stages.materialize_model import materialize_base_model
from tasks.stages.promotion import promote_if_better
from tasks.stages.template_dataset import template_dataset
from tasks.stages.tokenize_dataset import tokenize_dataset
from tasks.stages.train import train_model


def retrying(stage: Task, retry: StageRetry) -> Task:
    return stage.with_options(retries=retry.retries, retry_delay_seconds=retry.delay_seconds)


@contextmanager
def stage_context(spec: PipelineSpec, labels: dict[str, str] | None) -> Iterator[StageContext]:
    """Where the stages work, inside the pipeline's MLflow parent run (tagged with the Prefect flow
    run and the spec), which closes as finished or failed with the block."""
    start_preloading()  # the workers' libraries load while the run is set up and the data stages run
    workspace = Path(spec.workspace).resolve()
    tags = {
        "prefect_flow_run_id": str(flow_run.id),
        "prefect_flow_run_url": str(flow_run.ui_url),
        "flow_run_name": str(flow_run.name),
        "spec_digest": spec.digest(),
        **(labels or {}),
    }
    with pipeline_run(spec.name, workspace, spec.model_dump(mode="json"), tags) as tracking:
        yield StageContext(workspace=workspace, tracking=tracking)


def materialize(spec: PipelineSpec, ctx: StageContext) -> Manifest:
    base = retrying(materialize_base_model, spec.retries.model)(
        ctx=ctx,
        name_or_path=spec.model.name_or_path,
        trust_remote_code=spec.model.trust_remote_code,
        chat_template=spec.model.template_text(),
    )
    info = ModelInfo.of(base)
    tags = {"base_model": spec.model.name_or_path, "base_model_digest": info.source_digest}
    tag_pipeline_run(ctx.tracking, tags | ({"base_model_version": info.base_version} if info.base_version else {}))
    return base


def prepare_data(spec: PipelineSpec, plan: PlannedStage, base: Manifest, ctx: StageContext) -> dict[str, Manifest]:
    """Template and tokenize one training stage's data; the two manifests by stage id, templated first."""
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
    return {stage_id("template", plan.name): templated, stage_id("tokenize", plan.name): tokenized}


def train_chain(spec: PipelineSpec, base: Manifest, ctx: StageContext) -> tuple[dict[str, Manifest], str]:
    """Template, tokenize and train each training stage in order. Their manifests by stage id, and the
    name of the last stage that made a language model ("" when none did: an rm-only pipeline)."""
    stages: dict[str, Manifest] = {}
    last_model_stage = ""
    for plan in spec.training_plan():
        stages |= prepare_data(spec, plan, base, ctx)
        stages[stage_id("train", plan.name)] = retrying(train_model, spec.retries.train)(
            ctx=ctx,
            config=plan.config,
            tokenized=stages[stage_id("tokenize", plan.name)],
            base_model=base,
            for_stage=plan.name,
            start=stages[stage_id("train", plan.start)] if plan.start else None,
            reward=stages[stage_id("train", plan.reward)] if plan.reward else None,
        )
        if plan.config.stage != "rm":  # a reward model scores; it is not the model to ship
            last_model_stage = plan.name
    return stages, last_model_stage


def evaluate_and_export(
    spec: PipelineSpec, ctx: StageContext, stages: dict[str, Manifest], last_model_stage: str
) -> dict[str, Manifest]:
    """Evaluate the last language model against the base model, then merge and export it."""
    retry, base = spec.retries, stages["model"]
    trained = stages[stage_id("train", last_model_stage)]
    evaluated = retrying(evaluate_model, retry.evaluate)(
        ctx=ctx,
        config=spec.evaluate,
        registry=spec.dataset.registry,
        template_vars=spec.dataset.template_vars,
        compute_type=spec.train.compute_type,
        trained=trained,
        tokenized=stages["tokenize"],
        base_model=base,
    )
    exported = retrying(merge_and_export, retry.export)(
        ctx=ctx,
        config=spec.export,
        name=spec.name,
        spec_digest=spec.digest(),
        trained=trained,
        evaluated=evaluated,
        templated=[m for name, m in stages.items() if name.startswith("template")],
        base_model=base,
    )
    return {"evaluate": evaluated, "export": exported}


@flow(name="prepare-data", flow_run_name="{spec.name}: data")
def prepare(spec: PipelineSpec) -> PipelineResult:
    """The pipeline's first stages alone: base model, then each training stage's templated and
    tokenized data, built once and reused by a later `tunefactory run` of the same spec."""
    with stage_context(spec, {"prepare_only": "true"}) as ctx:
        base = materialize(spec, ctx)
        stages = {"model": base}
        for plan in spec.training_plan():
            stages |= prepare_data(spec, plan, base, ctx)
    return PipelineResult(flow_run_id=str(flow_run.id), tracking=ctx.tracking, stages=stages)


@flow(name="finetune", flow_run_name="{spec.name}")
def finetune(spec: PipelineSpec, labels: dict[str, str] | None = None) -> PipelineResult:
    """Fine-tune, evaluate and export a model as the spec describes.

    `labels` become tags of the pipeline's MLflow run (a sweep marks its variants with them).
    """
    with stage_context(spec, labels) as ctx:
        base = materialize(spec, ctx)
        stages = {"model": base}
        trained, last_model_stage = train_chain(spec, base, ctx)
        stages |= trained
        promotion = None
        if last_model_stage:
            stages |= evaluate_and_export(spec, ctx, stages, last_model_stage)
            log_pipeline_metrics(ctx.tracking, stages["evaluate"].metrics)
            if spec.export.promote:
                promotion = promote_if_better(ctx, spec.export, stages["export"], stages["evaluate"], base)
    return PipelineResult(flow_run_id=str(flow_run.id), tracking=ctx.tracking, stages=stages, promotion=promotion)
