"""From a registered model version back to its raw data: `tunefactory lineage MODEL@candidate`.

The chain is read from MLflow alone: the version's run is the export stage's run; its parent
is the pipeline run (spec, git commit, library versions); the parent's other child runs are
the stages. A stage that was reused points at the run that built it, which holds its params
and dataset inputs.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tasks.contracts.manifest import Manifest
from tasks.contracts.stage_infos import TemplateInfo, TokenizeInfo
from tasks.runtime.model_registry import resolve_version
from tasks.runtime.stage_output import stage_id
from tasks.runtime.tracking import PARENT_TAG, built_by


def dataset_inputs(templated: Manifest, tokenized: Manifest, for_stage: str = "train") -> list[dict[str, str]]:
    """A training stage's data at each step: every raw file, the templated set, the tokenized set."""
    raw = [
        {"name": s.name, "digest": s.sha256[:16], "source": s.file, "context": "raw"}
        for s in TemplateInfo.of(templated).sources
    ]
    return raw + [
        {
            "name": stage_id("templated", for_stage),
            "digest": TemplateInfo.of(templated).templated_digest[:16],
            "source": str(templated.path),
            "context": "templated",
        },
        {
            "name": stage_id("tokenized", for_stage),
            "digest": TokenizeInfo.of(tokenized).tokenized_digest[:16],
            "source": str(tokenized.path),
            "context": "tokenized",
        },
    ]


CHAIN = ("export", "evaluate", "train", "tokenize", "template", "model")


def chain_order(stages: dict[str, Any]) -> list[str]:
    """Stages from the model back to the base: export, evaluate, then each training stage's
    train/tokenize/template (the latest stage first; 'train-reward' belongs to stage 'reward'), model."""

    def key(stage: str) -> tuple[int, float, int]:
        base, _, for_stage = stage.partition("-")
        group = [s for s in stages if s.partition("-")[2] == for_stage and s.partition("-")[0] in CHAIN[2:5]]
        started = min((stages[s]["started"] for s in group), default=0)
        rank = {"export": 0, "evaluate": 1, "model": 3}.get(base, 2)
        return rank, -started, CHAIN.index(base)

    return sorted(stages, key=key)


def _datasets(run: Run) -> list[dict[str, str]]:
    found = []
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        source = item.dataset.source
        with contextlib.suppress(ValueError, AttributeError):
            where = json.loads(source)
            source = where.get("uri") or where.get("path") or source
        found.append({"name": item.dataset.name, "digest": item.dataset.digest, "source": source, "context": context})
    return found


def model_lineage(client: MlflowClient, reference: str) -> dict[str, Any]:
    """The registered version and every stage run behind it, as plain data."""
    version = resolve_version(client, reference)
    export_run = client.get_run(version.run_id)
    pipeline_id = export_run.data.tags.get(PARENT_TAG)
    pipeline = client.get_run(pipeline_id)
    children = client.search_runs(
        [pipeline.info.experiment_id], f"tags.`{PARENT_TAG}` = '{pipeline_id}'", max_results=100
    )
    stages: dict[str, Any] = {}
    for child in children:
        stage = child.data.tags.get("stage", "")
        if stage.partition("-")[0] not in CHAIN or stage in stages:
            continue
        producer = built_by(client, child)
        stages[stage] = {
            "started": child.info.start_time or 0,
            "run_id": producer.info.run_id,
            "reused": producer.info.run_id != child.info.run_id,
            "params": producer.data.params,
            "tags": {k: v for k, v in producer.data.tags.items() if not k.startswith("mlflow.")},
            "metrics": producer.data.metrics,
            "datasets": _datasets(producer),
        }
    tags = pipeline.data.tags
    return {
        "model": {
            "name": version.name,
            "version": version.version,
            "aliases": list(version.aliases),
            "source": version.source,
            "tags": dict(version.tags),
        },
        "pipeline": {
            "run_id": pipeline_id,
            "flow_run_id": tags.get("prefect_flow_run_id", ""),
            "spec_digest": tags.get("spec_digest", ""),
            "git_commit": tags.get("git_commit", ""),
            "git_dirty": tags.get("git_dirty", ""),
            "libraries": {k.removeprefix("library."): v for k, v in tags.items() if k.startswith("library.")},
            "base_model": tags.get("base_model", ""),
            "base_model_digest": tags.get("base_model_digest", ""),
            "base_model_version": tags.get("base_model_version", ""),
            "datasets": _datasets(pipeline),
            "template_vars": {
                k.removeprefix("dataset.template_vars."): v
                for k, v in pipeline.data.params.items()
                if k.startswith("dataset.template_vars.")
            },
        },
        "stages": stages,
    }


def format_lineage(lineage: dict[str, Any]) -> str:
    model, pipeline, stages = lineage["model"], lineage["pipeline"], lineage["stages"]
    aliases = " ".join(f"@{a}" for a in model["aliases"])
    lines = [f"{model['name']} version {model['version']} {aliases}".rstrip(), f"  files: {model['source']}"]
    metrics = {k: v for k, v in model["tags"].items() if k.startswith("tuned_")}
    if metrics:
        lines.append(
            "  evaluation: "
            + ", ".join(f"{k.removeprefix('tuned_')} {v}" for k, v in sorted(metrics.items()))
            + f" (eval set {model['tags'].get('eval_set_digest', '?')})"
        )
    dirty = " (uncommitted changes)" if pipeline["git_dirty"] == "True" else ""
    lines += [
        f"pipeline run {pipeline['run_id']}: Prefect flow run {pipeline['flow_run_id']}, "
        f"spec {pipeline['spec_digest']}, git {pipeline['git_commit'][:12]}{dirty}",
        "  libraries: " + ", ".join(f"{k} {v}" for k, v in pipeline["libraries"].items()),
    ]
    for stage in chain_order(stages):
        info = stages[stage]
        reused = " (reused)" if info["reused"] else ""
        lines.append(f"{stage:<9} run {info['run_id']}{reused}")
        params = info["params"]
        if stage.startswith("train"):
            keys = ("stage", "finetuning_type", "learning_rate", "num_epochs", "lr_scheduler", "lora.rank")
            lines.append("  " + ", ".join(f"{k}={params[k]}" for k in keys if k in params))
            if "final_loss" in info["metrics"]:
                lines.append(f"  final training loss {info['metrics']['final_loss']:.4f}")
        if stage == "template":
            values = ", ".join(f"{k}={v!r}" for k, v in pipeline["template_vars"].items()) or "none"
            lines.append(f"  template values: {values}")
        if stage == "model":
            version = f" (version {pipeline['base_model_version']})" if pipeline["base_model_version"] else ""
            lines.append(f"  base model {pipeline['base_model']}{version} digest {pipeline['base_model_digest']}")
        for dataset in info["datasets"]:
            lines.append(
                f"  {dataset['context']} dataset {dataset['name']}: digest {dataset['digest']}, {dataset['source']}"
            )
    return "\n".join(lines)
