"""Stage 4: fine-tune in a child process and track it in MLflow.

pt and sft train in tasks/train_worker.py (our own loop); rm, dpo, orpo, simpo, kto and ppo
in tasks/trl_worker.py (TRL's trainers). The task streams the worker's loss into the Prefect
log and the stage's MLflow run as it trains. A failed attempt leaves its checkpoints in the
stage's partial directory, and the next attempt with the same cache key resumes from the newest.

A stage of a chain starts from an earlier stage's model (`start`). What a stage made is
described in its manifest's `info.weights`: a model directory and the LoRA adapters to put
on it in order (earlier stages' adapters are merged in, the last is this stage's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.child_process import run_worker
from tasks.jsonl import read_jsonl
from tasks.materialize_model import base_model_path
from tasks.prefect_artifacts import TrainingProgress, publish_loss_curve
from tasks.spec_sections import ADAPTER_METHODS, TrainSpec
from tasks.stage_infos import ModelInfo, TokenizeInfo, TrainInfo
from tasks.stage_output import (
    Manifest,
    StageContext,
    StageResult,
    code_version,
    point_link,
    published_dir,
    run_stage,
    stage_id,
)
from tasks.tracking import StageRun
from tasks.train_nodes import announce_training, torchrun_arguments
from tasks.worker_configs import TrainJob, Weights

HERE = Path(__file__).resolve().parent
# Settings that name or pace the run but do not change what is learned stay out of the cache key.
BOOKKEEPING = {"checkpoint_name", "logging_steps", "save_steps", "save_total_limit", "rendezvous"}


OWN_LOOP_STAGES = ("pt", "sft")


def start_weights(base: Manifest, start: Manifest | None) -> Weights:
    """The model a stage starts from: the base, or what an earlier stage of the chain made."""
    if start is None:
        return Weights(model_dir=str(base_model_path(base)))
    return TrainInfo.of(start).weights


def worker_config(
    config: TrainSpec, base: Manifest, tokenized: Manifest, start: Manifest | None, reward: Manifest | None, out: Path
) -> TrainJob:
    model_config = json.loads((base_model_path(base) / "config.json").read_text())
    pad = model_config.get("pad_token_id")
    return TrainJob(
        **config.model_dump(),
        start=start_weights(base, start),
        tokenizer_path=str(base_model_path(base)),
        reward_model_dir=TrainInfo.of(reward).reward_model_dir if reward else None,
        dataset_dir=str(tokenized.path),
        cutoff_len=TokenizeInfo.of(tokenized).cutoff_len,
        output_dir=str(out),
        pad_token_id=pad if pad is not None else model_config.get("eos_token_id", 0),
        trust_remote_code=ModelInfo.of(base).trust_remote_code,
        deepspeed_resolved=config.deepspeed_settings(),
    )


class TrainingEvents:
    """What the train task does with its worker's events: MLflow metrics and params, the Prefect
    log and progress artifact; `summary` keeps what the stage's result is made of."""

    def __init__(self, run: StageRun) -> None:
        self.run, self.logger, self.progress = run, get_run_logger(), TrainingProgress()
        self.summary: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.pop("type")
        handler = {"log": self.log, "start": self.start, "resumed": self.resumed, "done": self.summary.update}.get(kind)
        if handler is None:
            self.logger.debug("%s: %s", kind, event)
        else:
            handler(event)

    def log(self, event: dict[str, Any]) -> None:
        step = event.pop("step")
        self.run.log_metrics(event, step=step)
        self.progress.update(step, event["loss"])
        self.logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in event.items()))

    def start(self, event: dict[str, Any]) -> None:
        self.summary.update(event)
        self.progress.start(event["total_steps"], event["first_step"])
        self.run.log_params(
            {
                "trainable_params": event["trainable_params"],
                "total_params": event["total_params"],
                "resolved_compute_type": event["compute_type"],
                "device": event["device"],
                # what "auto" (None) became on this machine, next to the spec's own setting
                **{f"resolved_{k}": event[k] for k in ("attention", "packing", "torch_compile") if k in event},
            }
        )
        self.logger.info(
            "training %d steps on %s (%s), %d of %d parameters trainable",
            event["total_steps"],
            event["device"],
            event["compute_type"],
            event["trainable_params"],
            event["total_params"],
        )

    def resumed(self, event: dict[str, Any]) -> None:
        self.summary["resumed_from_step"] = event["step"]
        self.run.set_tags({"resumed_from": event["checkpoint"]})
        self.logger.info("resuming from %s", event["checkpoint"])


def _launch(config: TrainSpec, worker: TrainJob, out: Path, events: TrainingEvents, workspace: Path) -> None:
    """Write the worker's config and run it (announced to the other nodes first, with several)."""
    config_path = out / "train_config.json"
    config_path.write_text(worker.model_dump_json(indent=2))
    if config.nnodes > 1:  # what `tunefactory train-node` waits for, announced once its config is whole
        announce_training(workspace, config_path, config.num_processes, config.nnodes, config.rendezvous)
        events.logger.info("waiting for %d more nodes to join at %s", config.nnodes - 1, config.rendezvous)
    run_worker(
        "tasks.train_worker" if config.stage in OWN_LOOP_STAGES else "tasks.trl_worker",
        None,  # written above
        config_path,
        events,
        on_output=events.logger.info,
        torchrun=torchrun_arguments(config.num_processes, config.nnodes, config.rendezvous, node_rank=0),
    )


def _build(config: TrainSpec, worker: TrainJob, out: Path, run: StageRun, workspace: Path) -> StageResult:
    events = TrainingEvents(run)
    started = time.time()
    _launch(config, worker, out, events, workspace)
    run.log_artifact(out / "loss_curve.png")
    publish_loss_curve(out / "loss_curve.png", read_jsonl(out / "loss_history.jsonl"))
    summary = events.summary
    metrics = {
        "final_loss": summary.get("final_loss", float("nan")),
        "train_seconds": time.time() - started,
        "steps": summary.get("step", 0),
        **summary.get("metrics", {}),
    }
    final = published_dir(out)
    if config.finetuning_type in ADAPTER_METHODS:
        weights = Weights(model_dir=worker.start.model_dir, adapters=[*worker.start.adapters, str(final / "adapter")])
    else:
        weights = Weights(model_dir=str(final / "model"))
    info = TrainInfo(
        checkpoint_name=config.checkpoint_name or time.strftime("%Y%m%d-%H%M%S"),
        stage=config.stage,
        finetuning_type=config.finetuning_type,
        weights=weights,
        trainable_params=summary.get("trainable_params"),
        total_params=summary.get("total_params"),
        resumed_from_step=summary.get("resumed_from_step"),
        # with several processes: each one's steps, examples and a digest of its final weights
        ranks=summary.get("ranks"),
        reward_model_dir=str(final / "reward_model") if config.stage == "rm" else None,
    )
    return StageResult(metrics=metrics, info=info)


def train_run_name() -> str:
    """'train (sft, lora)' for the first training stage, 'train reward (rm, lora)' for a later one."""
    from prefect.runtime import task_run

    params = task_run.parameters
    config, name = params["config"], params.get("for_stage", "train")
    label = "train" if name == "train" else f"train {name}"
    return f"{label} ({config.stage}, {config.finetuning_type})"


@task(name="train", task_run_name=train_run_name)
def train_model(
    ctx: StageContext,
    config: TrainSpec,
    tokenized: Manifest,
    base_model: Manifest,
    for_stage: str = "train",
    start: Manifest | None = None,
    reward: Manifest | None = None,
) -> Manifest:
    """Train the stage from `start` (default: the base model); what it made is in info.weights."""
    upstream = [m for m in (tokenized, base_model, start, reward) if m is not None]
    sources = ("train_worker.py", "trl_worker.py", "finetuning_methods.py", "modeling.py", "distributed_engines.py")
    # what DeepSpeed's file says shapes the training as much as the spec does
    settings = config.model_dump(mode="json", exclude=BOOKKEEPING)
    if config.distributed == "deepspeed":
        settings["deepspeed_settings"] = config.deepspeed_settings()
    manifest = run_stage(
        stage_id("train", for_stage),
        settings,
        upstream,
        code_version(__file__, *(str(HERE / name) for name in sources)),
        ctx,
        lambda out, run: _build(
            config, worker_config(config, base_model, tokenized, start, reward, out), out, run, ctx.workspace
        ),
        resumable=True,
    )
    # <workspace>/checkpoints/<checkpoint_name> names the training output for people
    point_link(ctx.workspace / "checkpoints" / TrainInfo.of(manifest).checkpoint_name, manifest.path)
    return manifest
