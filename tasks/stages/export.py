"""Stage 6: merge the adapter, save sharded safetensors with a model card, register in MLflow.

The heavy part runs in tasks/workers/export.py. The model card records the lineage: base
model and its digest, dataset files and digests, template values, spec hash and the
evaluation metrics. `<workspace>/models/<spec name>` points at the newest export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.contracts.child_process import final, run_worker
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.spec_sections import ExportSpec
from tasks.contracts.stage_infos import EvaluateInfo, ExportInfo, ModelInfo, TemplateInfo, TrainInfo
from tasks.contracts.worker_configs import ExportJob
from tasks.contracts.worker_events import ExportChecked
from tasks.runtime.code_version import code_version
from tasks.runtime.intervals import interval_text, is_headline
from tasks.runtime.mlflow_model import write_mlmodel
from tasks.runtime.model_registry import GATE_MARGIN_TAG, GATE_METRICS_TAG, register_model
from tasks.runtime.prefect_artifacts import publish_export_summary
from tasks.runtime.stage_output import StageContext, point_link, run_stage
from tasks.runtime.tracking import StageRun, patiently

EXPORT_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "gguf", "mlflow")
PROMOTION_SETTINGS = {"promotion_metrics", "promotion_margin", "promote", "promotion_improve"}  # not the export's key


def model_card(name: str, lineage: dict[str, Any], metrics: dict[str, float]) -> str:
    sources = "\n".join(f"| {s['name']} | `{s['sha256'][:16]}` | {s['rows']} |" for s in lineage["datasets"])
    values = ", ".join(f"{k} = {v!r}" for k, v in lineage["template_vars"].items()) or "none"
    scores = "\n".join(f"| {k} | {v:.4g} | {interval_text(metrics, k)} |" for k, v in sorted(metrics.items())
                       if is_headline(k))  # fmt: skip
    return f"""# {name}

Fine-tuned with tunefactory ({lineage["finetuning_type"]}) from `{lineage["base_model"]}`.

## Lineage

- base model digest (sha256): `{lineage["base_model_digest"]}`
- spec hash: `{lineage["spec_digest"]}`
- template values: {values}
- training run (MLflow): `{lineage["train_run_id"]}`

| dataset | sha256 | rows |
|---|---|---|
{sources}

## Evaluation at export time

| metric | value | 95% interval (sample size) |
|---|---|---|
{scores}

Load it with `AutoModelForCausalLM.from_pretrained(<this directory>)` or
`mlflow.pyfunc.load_model(<this directory>)`, serve it with `tunefactory api <this directory>`,
or chat with `tunefactory chat <this directory>`.
"""


def _build(
    config: ExportSpec,
    job: ExportJob,
    name: str,
    lineage: dict[str, Any],
    eval_metrics: dict[str, float],
    out: Path,
    run: StageRun,
) -> StageResult:
    logger = get_run_logger()
    events = run_worker("tasks.workers.export", job, out / "export_config.json", on_output=logger.info)
    checked = final(events, ExportChecked)
    checks = checked.model_dump(exclude={"type", "gguf_file"}, exclude_none=True)
    (out / "model" / "README.md").write_text(model_card(name, lineage, eval_metrics), encoding="utf-8")
    (out / "model" / "lineage.json").write_text(json.dumps(lineage, indent=2))
    write_mlmodel(out / "model")  # the directory, and so the registry version, is an MLflow pyfunc model
    size = sum(p.stat().st_size for p in (out / "model").iterdir())
    if checked.quantized_kl_ratio is not None:
        logger.info(
            "against the adapter on the quantized base it trained on: %.3g nats (mean KL), top-1 agreement %.2f; "
            "%.2f times the %.3g nats between the quantized and the full-precision base (export.quantized_kl_ratio %g)",
            checked.quantized_trained_kl, checked.quantized_trained_top1, checked.quantized_kl_ratio,
            checked.quantized_base_kl, config.quantized_kl_ratio,
        )  # fmt: skip
    if checked.gguf_file:
        size -= (out / "model" / checked.gguf_file).stat().st_size  # model_size_mb: the safetensors export
        logger.info("GGUF %s: logits within %.1e of the merged model", checked.gguf_file, checked.gguf_logits_rel_diff)
    info = ExportInfo(model_dir="model", gguf_file=checked.gguf_file)
    return StageResult(metrics={**checks, "model_size_mb": size / 1e6}, info=info)


@task(name="merge-and-export", task_run_name="merge and export")
def merge_and_export(
    ctx: StageContext,
    config: ExportSpec,
    name: str,
    spec_digest: str,
    trained: Manifest,
    evaluated: Manifest | None,
    templated: list[Manifest],
    base_model: Manifest,
) -> Manifest:
    """Write the merged model to <stage>/model and register it; info.model_dir and version."""
    base, train, data = ModelInfo.of(base_model), TrainInfo.of(trained), [TemplateInfo.of(t) for t in templated]
    lineage = {
        "base_model": base.name_or_path,
        "base_model_digest": base.source_digest,
        "datasets": [source.model_dump(exclude_none=True) for info in data for source in info.sources],
        "template_vars": data[0].template_vars,
        "spec_digest": spec_digest,
        "finetuning_type": train.finetuning_type,
        "train_run_id": trained.mlflow_run_id,
    }
    # the worker's config; its output directory is the stage's, known once the stage runs
    job = dict(
        **config.model_dump(include={"max_shard_size", "logits_rtol", "quantized_kl_ratio", "formats", "gguf_type"}),
        gguf_name=name,
        model_path=str(ModelInfo.base_model_path(base_model)),
        weights=train.weights,
        quantized_base=train.quantized_base,
        trust_remote_code=base.trust_remote_code,
    )
    eval_metrics = evaluated.metrics if evaluated else {}
    manifest = run_stage(
        "export",
        # the gate is a tag on the version, set below, and promotion a step after this stage (flows/pipeline.py):
        # changing either makes nothing again
        {**config.model_dump(mode="json", exclude=PROMOTION_SETTINGS), "name": name},
        [trained, base_model],
        code_version(__name__, ("tasks.workers.export",), EXPORT_LIBRARIES),
        ctx,
        lambda out, run: _build(config, ExportJob(**job, output_dir=str(out)), name, lineage, eval_metrics, out, run),
    )
    model_dir = manifest.path / "model"
    point_link(ctx.workspace / "models" / name, model_dir)
    registered = config.registered_model_name or name
    tags = {
        "spec_digest": spec_digest,
        "base_model_digest": lineage["base_model_digest"],
        "eval_set_digest": EvaluateInfo.of(evaluated).eval_set_digest if evaluated else "",
        **{k: f"{v:.6g}" for k, v in eval_metrics.items() if k.startswith("tuned_")},
        GATE_METRICS_TAG: ",".join(config.promotion_metrics),
        GATE_MARGIN_TAG: f"{config.promotion_margin:g}",
    }
    tracking = ctx.tracking
    # register_model is idempotent (a version per export run), so it is sent again whole while MLflow is away
    version = patiently(
        tracking.uri,
        f"registering {registered} @{config.alias}",
        lambda: register_model(tracking.client(), manifest.mlflow_run_id, registered, config.alias, model_dir, tags),
    )
    get_run_logger().info("registered %s version %s as @%s", registered, version, config.alias)
    publish_export_summary(
        model_dir, registered, version, config.alias, tracking.uri, tracking.experiment_id, manifest.mlflow_run_id
    )
    info = ExportInfo.of(manifest).model_copy(update={"registered_model": registered, "version": version,
                                                     "alias": config.alias})  # fmt: skip
    return manifest.model_copy(update={"info": info.model_dump(mode="json")})
