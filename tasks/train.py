"""Stage 4: fine-tune in a child process (tasks/train_worker.py) and track it in MLflow.

The task streams the worker's loss into the Prefect log and the stage's MLflow run as it
trains. A failed attempt leaves its checkpoints in the stage's partial directory, and the
next attempt with the same cache key resumes from the newest one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from flows.spec import TrainSpec
from tasks.child_process import run_worker
from tasks.materialize_model import base_model_path
from tasks.prefect_artifacts import TrainingProgress, publish_loss_curve
from tasks.stage_output import Manifest, StageResult, code_version, point_link, run_stage
from tasks.tracking import StageRun, Tracking

HERE = Path(__file__).resolve().parent
# Settings that name or pace the run but do not change what is learned stay out of the cache key.
BOOKKEEPING = {"checkpoint_name", "logging_steps", "save_steps", "save_total_limit"}


def worker_config(config: TrainSpec, base: Manifest, tokenized: Manifest, out: Path) -> dict[str, Any]:
    model_config = json.loads((base_model_path(base) / "config.json").read_text())
    pad = model_config.get("pad_token_id")
    return {
        **config.model_dump(mode="json"),
        "model_path": str(base_model_path(base)),
        "dataset_dir": str(tokenized.path),
        "output_dir": str(out),
        "pad_token_id": pad if pad is not None else model_config.get("eos_token_id", 0),
        "trust_remote_code": base.info.get("trust_remote_code", False),
    }


def _build(config: TrainSpec, base: Manifest, tokenized: Manifest, out: Path, run: StageRun) -> StageResult:
    logger = get_run_logger()
    summary: dict[str, Any] = {}
    progress = TrainingProgress()

    def on_event(event: dict[str, Any]) -> None:
        kind = event.pop("type")
        if kind == "log":
            step = event.pop("step")
            run.log_metrics(event, step=step)
            progress.update(step, event["loss"])
            logger.info(
                "step %d: loss %.4f, lr %.2e, %.0f tokens/s",
                step,
                event["loss"],
                event["learning_rate"],
                event["tokens_per_second"],
            )
        elif kind == "start":
            summary.update(event)
            progress.start(event["total_steps"], event["first_step"])
            run.log_params(
                {
                    "trainable_params": event["trainable_params"],
                    "total_params": event["total_params"],
                    "resolved_compute_type": event["compute_type"],
                    "device": event["device"],
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
    run_worker(
        "tasks.train_worker",
        worker_config(config, base, tokenized, out),
        out / "train_config.json",
        on_event,
        on_output=logger.info,
    )
    run.log_artifact(out / "loss_curve.png")
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines() if line]
    publish_loss_curve(out / "loss_curve.png", history)
    metrics = {
        "final_loss": summary.get("final_loss", float("nan")),
        "train_seconds": time.time() - started,
        "steps": summary.get("step", 0),
    }
    checkpoint_name = config.checkpoint_name or time.strftime("%Y%m%d-%H%M%S")
    info = {
        "checkpoint_name": checkpoint_name,
        "finetuning_type": config.finetuning_type,
        "weights_dir": "adapter" if config.finetuning_type == "lora" else "model",
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "resumed_from_step": summary.get("resumed_from_step"),
    }
    return StageResult(metrics=metrics, info=info)


@task(name="train", task_run_name="train ({config.stage}, {config.finetuning_type})")
def train_model(
    config: TrainSpec, tokenized: Manifest, base_model: Manifest, workspace: Path, tracking: Tracking
) -> Manifest:
    """Fine-tune the base model on the tokenized data; the weights are in info.weights_dir."""
    manifest = run_stage(
        "train",
        config.model_dump(mode="json", exclude=BOOKKEEPING),
        [tokenized, base_model],
        code_version(__file__, str(HERE / "train_worker.py"), str(HERE / "modeling.py")),
        workspace,
        tracking,
        lambda out, run: _build(config, base_model, tokenized, out, run),
        resumable=True,
    )
    # <workspace>/checkpoints/<checkpoint_name> names the training output for people
    point_link(workspace / "checkpoints" / manifest.info["checkpoint_name"], manifest.path)
    return manifest
