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

from flows.spec import ADAPTER_METHODS, TrainSpec
from tasks.child_process import run_worker
from tasks.materialize_model import base_model_path
from tasks.prefect_artifacts import TrainingProgress, publish_loss_curve
from tasks.stage_output import Manifest, StageResult, code_version, point_link, published_dir, run_stage, stage_id
from tasks.tracking import StageRun, Tracking
from tasks.train_nodes import announce_training, torchrun_arguments

HERE = Path(__file__).resolve().parent
# Settings that name or pace the run but do not change what is learned stay out of the cache key.
BOOKKEEPING = {"checkpoint_name", "logging_steps", "save_steps", "save_total_limit", "rendezvous"}


OWN_LOOP_STAGES = ("pt", "sft")


def start_weights(base: Manifest, start: Manifest | None) -> dict[str, Any]:
    """The model a stage starts from: the base, or what an earlier stage of the chain made."""
    if start is None:
        return {"model_dir": str(base_model_path(base)), "adapters": []}
    return start.info["weights"]


def worker_config(
    config: TrainSpec, base: Manifest, tokenized: Manifest, start: Manifest | None, reward: Manifest | None, out: Path
) -> dict[str, Any]:
    model_config = json.loads((base_model_path(base) / "config.json").read_text())
    pad = model_config.get("pad_token_id")
    return {
        **config.model_dump(mode="json"),
        "start": start_weights(base, start),
        "tokenizer_path": str(base_model_path(base)),
        "reward_model_dir": reward.info["reward_model_dir"] if reward else None,
        "dataset_dir": str(tokenized.path),
        "cutoff_len": tokenized.info.get("cutoff_len", 1024),
        "output_dir": str(out),
        "pad_token_id": pad if pad is not None else model_config.get("eos_token_id", 0),
        "trust_remote_code": base.info.get("trust_remote_code", False),
        "deepspeed_settings": config.deepspeed_settings(),
    }


def _build(config: TrainSpec, worker: dict[str, Any], out: Path, run: StageRun, workspace: Path) -> StageResult:
    logger = get_run_logger()
    summary: dict[str, Any] = {}
    progress = TrainingProgress()

    def on_event(event: dict[str, Any]) -> None:
        kind = event.pop("type")
        if kind == "log":
            step = event.pop("step")
            run.log_metrics(event, step=step)
            progress.update(step, event["loss"])
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in event.items()))
        elif kind == "start":
            summary.update(event)
            progress.start(event["total_steps"], event["first_step"])
            run.log_params(
                {
                    "trainable_params": event["trainable_params"],
                    "total_params": event["total_params"],
                    "resolved_compute_type": event["compute_type"],
                    "device": event["device"],
                    # what "auto" (None) became on this machine, next to the spec's own setting
                    **{f"resolved_{k}": event[k] for k in ("attention", "packing", "torch_compile") if k in event},
                }
            )
            logger.info(
                "training %d steps on %s (%s), %d of %d parameters trainable",
                event["total_steps"],
                event["device"],
                event["compute_type"],
                event["trainable_params"],
                event["total_params"],
            )
        elif kind == "resumed":
            summary["resumed_from_step"] = event["step"]
            run.set_tags({"resumed_from": event["checkpoint"]})
            logger.info("resuming from %s", event["checkpoint"])
        elif kind == "done":
            summary.update(event)
        else:
            logger.debug("%s: %s", kind, event)

    started = time.time()
    config_path = out / "train_config.json"
    config_path.write_text(json.dumps(worker, indent=2))
    if config.nnodes > 1:  # what `tunefactory train-node` waits for, announced once its config is whole
        announce_training(workspace, config_path, config.num_processes, config.nnodes, config.rendezvous)
        logger.info("waiting for %d more nodes to join at %s", config.nnodes - 1, config.rendezvous)
    run_worker(
        "tasks.train_worker" if config.stage in OWN_LOOP_STAGES else "tasks.trl_worker",
        None,  # written above
        config_path,
        on_event,
        on_output=logger.info,
        torchrun=torchrun_arguments(config.num_processes, config.nnodes, config.rendezvous, node_rank=0),
    )
    run.log_artifact(out / "loss_curve.png")
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines() if line]
    publish_loss_curve(out / "loss_curve.png", history)
    metrics = {
        "final_loss": summary.get("final_loss", float("nan")),
        "train_seconds": time.time() - started,
        "steps": summary.get("step", 0),
        **summary.get("metrics", {}),
    }
    final = published_dir(out)
    if config.finetuning_type in ADAPTER_METHODS:
        start = worker["start"]
        weights = {"model_dir": start["model_dir"], "adapters": [*start["adapters"], str(final / "adapter")]}
    else:
        weights = {"model_dir": str(final / "model"), "adapters": []}
    info = {
        "checkpoint_name": config.checkpoint_name or time.strftime("%Y%m%d-%H%M%S"),
        "stage": config.stage,
        "finetuning_type": config.finetuning_type,
        "weights": weights,
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "resumed_from_step": summary.get("resumed_from_step"),
        # with several processes: each one's steps, examples and a digest of its final weights
        "ranks": summary.get("ranks"),
    }
    if config.stage == "rm":
        info["reward_model_dir"] = str(final / "reward_model")
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
    config: TrainSpec,
    tokenized: Manifest,
    base_model: Manifest,
    workspace: Path,
    tracking: Tracking,
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
        workspace,
        tracking,
        lambda out, run: _build(
            config, worker_config(config, base_model, tokenized, start, reward, out), out, run, workspace
        ),
        resumable=True,
    )
    # <workspace>/checkpoints/<checkpoint_name> names the training output for people
    point_link(workspace / "checkpoints" / manifest.info["checkpoint_name"], manifest.path)
    return manifest
