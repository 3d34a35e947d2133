"""Stage 4: fine-tune in a child process and track it in MLflow.

pt and sft train in tasks/workers/train.py (our own loop); rm, dpo, orpo, simpo, kto and ppo
in tasks/workers/trl.py (TRL's trainers). The task streams the worker's loss into the Prefect
log and the stage's MLflow run as it trains. A failed attempt leaves its checkpoints in the
stage's partial directory, and the next attempt with the same cache key resumes from the newest.

A stage of a chain starts from an earlier stage's model (`start`). What a stage made is
described in its manifest's `info.weights`: a model directory and the LoRA adapters to put
on it in order (earlier stages' adapters are merged in, the last is this stage's).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from tasks.contracts.child_process import ProbablyOutOfMemory, WorkerError, final, run_worker
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.spec_sections import ADAPTER_METHODS, TrainSpec
from tasks.contracts.stage_infos import ModelInfo, TokenizeInfo, TrainInfo
from tasks.contracts.worker_configs import MERGED_START, QuantizedBase, TrainJob, Weights
from tasks.contracts.worker_events import (
    MEMORY_REMEDY,
    RanOutOfMemory,
    Resumed,
    StepLogged,
    TrainingDone,
    TrainingStarted,
    WorkerEvent,
)
from tasks.dataset.jsonl import read_jsonl
from tasks.runtime.background_logging import BackgroundLog, TrackingUnavailable
from tasks.runtime.code_version import code_version
from tasks.runtime.prefect_artifacts import TrainingProgress, publish_loss_curve
from tasks.runtime.stage_output import (
    StageContext,
    point_link,
    published_dir,
    run_stage,
    stage_id,
)
from tasks.runtime.tracking import StageRun
from tasks.stages.train_nodes import announce_training, torchrun_arguments

# Settings that name or pace the run but do not change what is learned stay out of the cache key.
BOOKKEEPING = {"checkpoint_name", "logging_steps", "save_steps", "save_total_limit", "rendezvous"}
# So do the ways a step is fitted into memory (a split step's gradients add up to the same update;
# checkpointing recomputes what it dropped): a run retried with other values keeps its checkpoints.
MEMORY_SETTINGS = {"max_memory", "gradient_checkpointing"}


OWN_LOOP_STAGES = ("pt", "sft")


def start_weights(base: Manifest, start: Manifest | None) -> Weights:
    """The model a stage starts from: the base, or what an earlier stage of the chain made."""
    if start is None:
        return Weights(model_dir=str(ModelInfo.base_model_path(base)))
    return TrainInfo.of(start).weights


def worker_config(
    config: TrainSpec, base: Manifest, tokenized: Manifest, start: Manifest | None, reward: Manifest | None, out: Path
) -> TrainJob:
    model_config = json.loads((ModelInfo.base_model_path(base) / "config.json").read_text())
    pad = model_config.get("pad_token_id")
    return TrainJob(
        **config.model_dump(),
        start=start_weights(base, start),
        tokenizer_path=str(ModelInfo.base_model_path(base)),
        reward_model_dir=TrainInfo.of(reward).reward_model_dir if reward else None,
        dataset_dir=str(tokenized.path),
        cutoff_len=TokenizeInfo.of(tokenized).cutoff_len,
        output_dir=str(out),
        pad_token_id=pad if pad is not None else model_config.get("eos_token_id", 0),
        trust_remote_code=ModelInfo.of(base).trust_remote_code,
        deepspeed_resolved=config.deepspeed_settings(),
    )


class TrainingEvents:
    """What the train task does with its worker's events as they arrive: MLflow metrics and params,
    the Prefect log and progress artifact; what the stage's result is made of is kept."""

    def __init__(self, run: StageRun) -> None:
        self.run, self.logger, self.progress = run, get_run_logger(), TrainingProgress()
        # a stopped or locked MLflow must not stop training: what is logged goes out from a thread
        self.tracked = BackgroundLog(run, self.logger.warning)
        self.started: TrainingStarted | None = None
        self.resumed_from: Resumed | None = None
        self.out_of_memory: RanOutOfMemory | None = None

    def __call__(self, event: WorkerEvent) -> None:
        match event:
            case StepLogged():
                self.log(event)
            case TrainingStarted():
                self.start(event)
            case Resumed():
                self.resume(event)
            case RanOutOfMemory():
                self.out_of_memory = event
            case _:
                self.logger.debug("%s", event)

    def log(self, event: StepLogged) -> None:
        self.tracked.metrics(event.metrics, step=event.step)
        self.progress.update(event.step, event.loss)
        self.logger.info("step %d: %s", event.step, ", ".join(f"{k} {v:.4g}" for k, v in event.metrics.items()))

    def start(self, event: TrainingStarted) -> None:
        self.started = event
        self.progress.start(event.total_steps, event.first_step)
        # what "auto" (None) became on this machine, next to the spec's own setting
        resolved = event.model_dump(
            include={"attention", "packing", "torch_compile", "fused_optimizer", "frozen_dtype"}, exclude_none=True
        )
        self.tracked.params(
            {
                "trainable_params": event.trainable_params,
                "total_params": event.total_params,
                "quantized_modules": event.quantized_modules,
                "resolved_compute_type": event.compute_type,
                "device": event.device,
                **{f"resolved_{k}": v for k, v in resolved.items()},
            }
        )
        # the memory plan follows the memory free at each start, so a resumed run may plan anew:
        # metrics (re-logged per start), not params (which MLflow does not let change)
        plan = {"micro_batch_split": event.micro_batch_split,
                "resolved_gradient_checkpointing": int(bool(event.gradient_checkpointing)),
                "memory_estimate_mb": event.memory_estimate_mb, "memory_budget_mb": event.memory_budget_mb}  # fmt: skip
        self.tracked.metrics({k: v for k, v in plan.items() if v is not None}, step=event.first_step)
        self.logger.info(
            "training %d steps on %s (%s), %d of %d parameters trainable",
            event.total_steps,
            event.device,
            event.compute_type,
            event.trainable_params,
            event.total_params,
        )

    def resume(self, event: Resumed) -> None:
        self.resumed_from = event
        self.tracked.tags({"resumed_from": event.checkpoint})
        self.logger.info("resuming from %s", event.checkpoint)


def _launch(config: TrainSpec, worker: TrainJob, out: Path, events: TrainingEvents, workspace: Path) -> TrainingDone:
    """Write the worker's config and run it (announced to the other nodes first, with several); its end."""
    config_path = out / "train_config.json"
    if config.nnodes > 1:  # what `tunefactory train-node` waits for, announced once its config is whole
        config_path.write_text(worker.model_dump_json(indent=2))
        announce_training(workspace, config_path, config.num_processes, config.nnodes, config.rendezvous)
        events.logger.info("waiting for %d more nodes to join at %s", config.nnodes - 1, config.rendezvous)
    sent = run_worker(
        "tasks.workers.train" if config.stage in OWN_LOOP_STAGES else "tasks.workers.trl",
        worker,
        config_path,
        events,
        on_output=events.logger.info,
        torchrun=torchrun_arguments(
            config.num_processes, config.nnodes, config.rendezvous, node_rank=0, distributed=config.distributed
        ),
    )
    return final(sent, TrainingDone)


def memory_failure(error: WorkerError, events: TrainingEvents) -> str | None:
    """What a failed attempt says about memory, with what the plan allowed; None when it was not memory."""
    if events.out_of_memory is not None:  # torch's OutOfMemoryError, reported by the process it hit
        return f"train {events.out_of_memory.explain()}"
    if not isinstance(error, ProbablyOutOfMemory):
        return None
    plan = events.started
    if plan is None or plan.memory_estimate_mb is None:
        return f"{error}; {MEMORY_REMEDY}"
    gb = 2**20 / 1e9
    return (
        f"{error}; the memory plan estimated {plan.memory_estimate_mb * gb:.1f} GB for each batch in "
        f"{plan.micro_batch_split} micro-batches, within a budget of {plan.memory_budget_mb * gb:.1f} GB; "
        f"{MEMORY_REMEDY}"
    )


def _launch_fitting_memory(
    config: TrainSpec, worker: TrainJob, out: Path, events: TrainingEvents, workspace: Path
) -> TrainingDone:
    """Run the worker; when it runs out of memory, once more from its newest checkpoint with each batch
    split into twice as many micro-batches (the estimate fell short: planning again the same way would not)."""
    try:
        return _launch(config, worker, out, events, workspace)
    except WorkerError as error:
        failure = memory_failure(error, events)
        if failure is None:
            raise
        split = failed_split(events, worker)
        if 2 * split > config.batch_size or config.nnodes > 1:  # nothing left to split, or the nodes are gone
            raise WorkerError(failure) from None
    events.logger.warning("%s. Retrying once with each batch in %d micro-batches", failure, 2 * split)
    events.out_of_memory = None
    try:
        return _launch(config, worker.model_copy(update={"least_micro_batch_split": 2 * split}), out, events, workspace)
    except WorkerError as error:
        failure = memory_failure(error, events)
        if failure is None:
            raise
        raise WorkerError(failure) from None


def failed_split(events: TrainingEvents, worker: TrainJob) -> int:
    """The micro-batches per batch of the attempt that ran out of memory."""
    if events.out_of_memory is not None:
        return events.out_of_memory.micro_batch_split
    return events.started.micro_batch_split if events.started else worker.least_micro_batch_split


def _build(config: TrainSpec, worker: TrainJob, out: Path, run: StageRun, workspace: Path) -> StageResult:
    events = TrainingEvents(run)
    started = time.time()
    try:
        done = _launch_fitting_memory(config, worker, out, events, workspace)
    except BaseException:
        with contextlib.suppress(TrackingUnavailable):  # the worker's own error is the one to show
            events.tracked.close(wait_s=10)
        raise
    events.tracked.close()
    run.log_artifact(out / "loss_curve.png")
    publish_loss_curve(out / "loss_curve.png", read_jsonl(out / "loss_history.jsonl"))
    metrics = {
        "final_loss": done.final_loss,
        "train_seconds": time.time() - started,
        "steps": done.step,
        **done.metrics.logged(),
    }
    published = published_dir(out)
    if config.finetuning_type in ADAPTER_METHODS:
        weights = Weights(
            model_dir=worker.start.model_dir, adapters=[*worker.start.adapters, str(published / "adapter")]
        )
    else:
        weights = Weights(model_dir=str(published / "model"))
    info = TrainInfo(
        checkpoint_name=config.checkpoint_name or time.strftime("%Y%m%d-%H%M%S"),
        stage=config.stage,
        finetuning_type=config.finetuning_type,
        weights=weights,
        quantized_base=quantized_base(config, worker, published),
        trainable_params=events.started.trainable_params if events.started else None,
        total_params=events.started.total_params if events.started else None,
        resumed_from_step=events.resumed_from.step if events.resumed_from else None,
        # with several processes: each one's steps, examples and a digest of its final weights
        ranks=done.ranks,
        reward_model_dir=str(published / "reward_model") if config.stage == "rm" else None,
    )
    return StageResult(metrics=metrics, info=info)


def quantized_base(config: TrainSpec, worker: TrainJob, published: Path) -> QuantizedBase | None:
    """qlora: the directory bitsandbytes quantized (the start model, earlier adapters merged in) and how."""
    if config.finetuning_type != "qlora":
        return None
    model_dir = str(published / MERGED_START) if worker.start.adapters else worker.start.model_dir
    settings = config.lora.model_dump(include={"quantization_bit", "quantization_type", "double_quantization"})
    return QuantizedBase(model_dir=model_dir, **settings)


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
    libraries = ("torch", "transformers", "peft", "trl", "accelerate")
    if config.distributed == "deepspeed":
        libraries += ("deepspeed",)
    # what DeepSpeed's file says shapes the training as much as the spec does
    settings = config.model_dump(mode="json", exclude=BOOKKEEPING | MEMORY_SETTINGS)
    if config.distributed == "deepspeed":
        settings["deepspeed_settings"] = config.deepspeed_settings()
    manifest = run_stage(
        stage_id("train", for_stage),
        settings,
        upstream,
        code_version(__name__, ("tasks.workers.train", "tasks.workers.trl"), libraries),
        ctx,
        lambda out, run: _build(
            config, worker_config(config, base_model, tokenized, start, reward, out), out, run, ctx.workspace
        ),
        resumable=True,
    )
    # <workspace>/checkpoints/<checkpoint_name> names the training output for people
    point_link(ctx.workspace / "checkpoints" / TrainInfo.of(manifest).checkpoint_name, manifest.path)
    return manifest
