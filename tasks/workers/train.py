"""The training child process for pt and sft: `python -m tasks.workers.train OUTPUT/train_config.json`.

Launched by the train task (tasks/stages/train.py). It fine-tunes with the stage's method
(tasks/components/finetuning_methods.py) on token ids and label masks (sft) or packed text (pt), prints
a progress bar on stderr, streams `log` events (loss, learning rate, throughput) to the task,
writes a checkpoint every `save_steps` optimizer steps, and on start resumes from the newest
complete checkpoint in its output directory. Outputs: `adapter/` or `model/`,
`loss_history.jsonl`, `loss_curve.png`.

Where the time goes is chosen for throughput: no compute on logits that carry no label
(tasks/components/modeling.py:supervised_loss), no padding mask (right padding is invisible to causal
attention), batches of similar lengths, or packed rows where FlashAttention makes packing
free (tasks/components/packing.py); no gradient checkpointing unless asked; on a GPU, a bf16 frozen
base under LoRA, fused AdamW and compiled decoder layers. `python -m tasks.tools.bench_train`
measures it against TRL's SFTTrainer at its defaults.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.components.distributed_engines import (
    Engine,
    all_processes_sum,
    decoder_layers,
    fused_optimizer,
    make_engine,
    start_process_group,
)
from tasks.components.fault_injection import Faults
from tasks.components.finetuning_methods import quantized_modules, trainable_model
from tasks.components.memory_plan import HEADROOM, MemoryPlan, StepShape, plan_memory, step_bytes
from tasks.components.modeling import attention_implementation, causal_lm, compute_setup
from tasks.components.packing import packed_batch, padded_batch
from tasks.components.training_outputs import (
    CHECKPOINT_RECORD,
    CHECKPOINTS,
    finish_training,
    newest_complete_checkpoint,
    read_checkpoint_file,
    record_checkpoint_files,
    verify_checkpoint_files,
)
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.spec_sections import ADAPTER_METHODS, size_bytes
from tasks.contracts.stage_infos import RankSummary
from tasks.contracts.worker_configs import TrainJob
from tasks.contracts.worker_events import (
    Checkpointed,
    Note,
    RanOutOfMemory,
    Resumed,
    StepLogged,
    TrainingMetrics,
    TrainingStarted,
)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: less padding, same order for the same seed and epoch."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 16
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_free_bytes(device: torch.device) -> float:
    """What a training process may take: free GPU memory, or on a CPU the available RAM (its share
    of it when torchrun runs several processes on this machine) plus what this process holds."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_allocated(device))
    import psutil

    available = psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return float(available + psutil.Process().memory_info().rss)


def sharded_shares(config: TrainJob, world: int) -> tuple[float, float]:
    """The share of the weights and of the optimizer state one process holds: FSDP splits both
    over the processes, ZeRO the optimizer state (stage 3 the weights too); offloaded state is
    not on the device at all."""
    if world == 1 or config.distributed == "ddp":
        return 1.0, 1.0
    if config.distributed == "fsdp":
        return 1 / world, 1 / world
    zero = (config.deepspeed_resolved or {}).get("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    return (1 / world if zero.get("stage", 2) == 3 else 1.0), (0.0 if offloaded else 1 / world)


def compile_layers(model: torch.nn.Module) -> bool:
    """torch.compile each decoder layer: one graph, reused by every layer; False if none is found."""
    layers = decoder_layers(model)
    if layers is None:
        return False
    for layer in layers:
        layer.compile()
    return True


def make_scheduler(config: TrainJob, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = config.lr_scheduler
    kwargs = {}
    if name == "reduce_lr_on_plateau":
        kwargs = {"patience": 2, "factor": 0.5}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(total_steps * config.warmup_ratio),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs,
    )


def newest_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that was written completely (the record of its files is written last)."""
    return newest_complete_checkpoint(output / CHECKPOINTS, CHECKPOINT_RECORD)


def save_checkpoint(
    output: Path, step: int, engine: Engine, scheduler, history: list[dict], config: TrainJob, rank: int
) -> None:
    """Write checkpoint-<step> atomically (every process calls it), then drop the oldest beyond save_total_limit.

    The engine writes weights and optimizer state (process 0 alone, or every process its
    part); process 0 then adds the step, schedule, loss history and random state, and last the
    record of every file's sha256 that a resume checks them against; the directory gets its
    final name only when all of it is there.
    """
    root = output / CHECKPOINTS
    final = root / f"checkpoint-{step}"
    partial = root / f".checkpoint-{step}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(engine)
    engine.save_state(partial, rank)
    barrier(engine)
    if rank == 0:
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "history": history,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        torch.save(state, partial / "trainer_state.pt")
        record_checkpoint_files(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        complete = sorted(
            (p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in complete[: -config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(engine)  # no process runs ahead of a checkpoint being written


def barrier(engine: Engine) -> None:
    if engine.world > 1:
        dist.barrier()


def load_checkpoint(checkpoint: Path, engine: Engine, scheduler) -> dict:
    verify_checkpoint_files(checkpoint)  # every process, before its engine unpickles anything
    engine.load_state(checkpoint)
    state = read_checkpoint_file(checkpoint / "trainer_state.pt")
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


class TrainingLoop:
    """pt and sft training in named steps: set up (in the constructor), resume, one optimizer step,
    a log window, a checkpoint, the finish. `train` below orders them."""

    def __init__(self, config: TrainJob) -> None:
        self.config, self.output = config, Path(config.output_dir)
        self.setup = compute_setup(config.compute_type)
        self.cuda = self.setup.device.type == "cuda"
        self.rank, self.world = start_process_group(self.cuda, config.distributed)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self._load_data()
        self._build_model()
        self._plan_steps()
        self.step, self.history = 0, []
        self.examples_here = 0  # this process's real examples (for the per-rank summary)
        self.loop_tokens = 0  # every process's real tokens, padding not counted
        self.faults = Faults.from_environment()  # for tests

    def _load_data(self) -> None:
        from datasets import load_from_disk

        columns = load_from_disk(str(Path(self.config.dataset_dir) / "train")).to_dict()
        self.sequences, self.labels = columns["input_ids"], columns["labels"]
        self.lengths = [len(seq) for seq in self.sequences]

    def _build_model(self) -> None:
        config, setup = self.config, self.setup
        self.attention = attention_implementation(setup.device)
        self.packing = config.packing if config.packing is not None else self.attention == "flash_attention_2"
        # a bf16 frozen base under LoRA; FSDP and DeepSpeed cast weights themselves, from fp32
        sharded = self.world > 1 and config.distributed != "ddp"
        frozen = setup.autocast_dtype if setup.autocast_dtype == torch.bfloat16 and not sharded else torch.float32
        self.frozen_dtype = str(frozen).removeprefix("torch.") if config.finetuning_type == "lora" else None
        model = trainable_model(config, setup.device, attention=self.attention, frozen_dtype=frozen)
        model.train()
        self.memory = self._plan_memory(model)
        self.split, self.checkpointing = self.memory.split, self.memory.gradient_checkpointing
        if self.checkpointing:
            causal_lm(model).activation_checkpointing_enable({"use_reentrant": False})
        wanted = config.torch_compile if config.torch_compile is not None else self.cuda
        self.compiled = compile_layers(model) if wanted else False
        self.multiple = 64 if self.compiled else 1  # compiled layers see a few row widths, not one per step
        # counted before FSDP or ZeRO-3 split the weights across processes
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())
        self.quantized = quantized_modules(model)
        self.engine = make_engine(model, config, setup, self.world)
        ctx = torch.autocast(setup.device.type, dtype=setup.autocast_dtype) if setup.autocast_dtype else nullcontext()
        self.autocast = ctx

    def _plan_memory(self, model: torch.nn.Module) -> MemoryPlan:
        """Whether the widest step fits, and how it is split when it does not (memory_plan.py)."""
        config, setup = self.config, self.setup
        rows = config.batch_size  # this process's examples per micro-batch
        widest = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])[:rows]
        width = min(max(self.lengths, default=1), config.cutoff_len) if not self.packing else config.cutoff_len
        tokens = sum(self.lengths[i] for i in widest) if self.packing else rows * max(self.lengths, default=1)
        supervised = sum(sum(label != -100 for label in self.labels[i][1:]) for i in widest)
        lm = causal_lm(model).config
        weights_share, optimizer_share = sharded_shares(config, self.world)
        shape = StepShape(
            layers=lm.num_hidden_layers, hidden=lm.hidden_size,
            intermediate=getattr(lm, "intermediate_size", 4 * lm.hidden_size), heads=lm.num_attention_heads,
            vocab=lm.vocab_size,
            weight_bytes=int(weights_share * sum(p.numel() * p.element_size() for p in model.parameters())),
            trainable=int(optimizer_share * sum(p.numel() for p in model.parameters() if p.requires_grad)),
            compute_bytes=2 if setup.autocast_dtype is not None else 4, rows=rows, width=width, tokens=tokens,
            supervised=supervised, device=setup.device.type, attention_probs=setup.device.type == "cpu",
        )  # fmt: skip
        budget = size_bytes(config.max_memory) if config.max_memory else device_free_bytes(setup.device)
        plan = plan_memory(shape, budget, config.gradient_checkpointing, config.least_micro_batch_split)
        if plan is None:
            least = step_bytes(shape, rows, True)
            raise WorkerError(
                f"train: one step needs about {least / 1e9:.1f} GB even with one example per micro-batch and "
                f"gradient checkpointing, and {budget / 1e9:.1f} GB is available"
                f"{' (train.max_memory)' if config.max_memory else ''}, {1 - HEADROOM:.0%} of it planned for: "
                f"lower tokenize.cutoff_len (the longest "
                f"example has {max(self.lengths, default=0)} tokens), use lora or qlora, or a larger machine"
            )
        emit(Note(message=plan.describe()))
        return plan

    def _plan_steps(self) -> None:
        config = self.config
        self.accumulation = config.gradient_accumulation_steps
        # a step takes batch_size examples on each process: the same steps as one process with batch_size x world
        self.global_batch = config.batch_size * self.world
        self.batches_per_epoch = math.ceil(len(self.sequences) / self.global_batch)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulation)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * config.num_epochs))
        self.scheduler = make_scheduler(config, self.engine.schedulable_optimizer, self.total_steps)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in the output, if there is one."""
        checkpoint = newest_checkpoint(self.output)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.engine, self.scheduler)
            self.step, self.history = state["step"], state["history"]
            emit(Resumed(step=self.step, checkpoint=checkpoint.name))

    def announce(self) -> None:
        emit(
            TrainingStarted(
                total_steps=self.total_steps,
                first_step=self.step,
                trainable_params=self.trainable,
                total_params=self.total,
                quantized_modules=self.quantized,
                examples=len(self.sequences),
                compute_type=self.setup.name,
                device=str(self.setup.device),
                attention=self.attention,
                packing=self.packing,
                torch_compile=self.compiled,
                fused_optimizer=fused_optimizer(self.config, self.setup),
                frozen_dtype=self.frozen_dtype,
                gradient_checkpointing=self.checkpointing,
                micro_batch_split=self.split,
                memory_estimate_mb=round(self.memory.estimate_bytes / 2**20),
                memory_budget_mb=round(self.memory.budget_bytes / 2**20),
                world_size=self.world,
                engine=self.engine.kind,
            )
        )

    def run(self) -> None:
        """Every remaining optimizer step, logging, scheduling and checkpointing as the config says."""
        from tqdm import tqdm

        config = self.config
        self._open_window()
        self.loop_start = time.time()
        disabled = self.rank > 0
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=disabled)  # fmt: skip
        while self.step < self.total_steps:
            grad_norm = self.optimizer_step()
            self.step += 1
            progress.update(1)
            if self.step % config.logging_steps == 0 or self.step == self.total_steps:
                loss = self.log_window(grad_norm)
                progress.set_postfix(loss=f"{loss:.4f}")
                if config.lr_scheduler == "reduce_lr_on_plateau":
                    self.scheduler.step(loss)
            if config.lr_scheduler != "reduce_lr_on_plateau":
                self.scheduler.step()
            if self.step % config.save_steps == 0 and self.step < self.total_steps:
                self.checkpoint()
            faults = self.faults
            if faults.kill_at_step and self.step == faults.kill_at_step and self.rank == faults.kill_rank:
                os.kill(os.getpid(), 9)  # fault injection for the crash-resume tests
        progress.close()
        self.loop_seconds = time.time() - self.loop_start

    def optimizer_step(self) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; the gradient norm."""
        epoch, position = divmod(self.step * self.accumulation, self.batches_per_epoch)
        batches = epoch_batches(self.lengths, self.global_batch, self.config.seed, epoch)
        group = batches[position : position + self.accumulation]
        supervised = sum(sum(label != -100 for label in self.labels[i][1:]) for batch in group for i in batch)
        # a batch the memory plan splits is several micro-batches of one step: same examples, same loss
        pieces = [batch[i : i + -(-len(batch) // self.split)] for batch in group
                  for i in range(0, len(batch), -(-len(batch) // self.split))]  # fmt: skip
        for micro, piece in enumerate(pieces):
            self._micro_batch(piece, micro == len(pieces) - 1, supervised)
        self.window_tokens += supervised
        self.loop_tokens += sum(self.lengths[i] for batch in group for i in batch)
        return self.engine.step()

    def _micro_batch(self, batch: list[int], last: bool, supervised: int) -> None:
        engine, device, world = self.engine, self.setup.device, self.world
        # this process's share; one left without examples repeats one at zero weight, so that
        # every process runs the forward and backward the others wait for
        mine = batch[self.rank :: world]
        weight = 1.0 if mine else 0.0
        mine = mine or batch[:1]
        self.examples_here += len(mine) if weight else 0
        if self.step + 1 == self.faults.oom_at_step and len(mine) > self.faults.oom_rows:
            raise torch.OutOfMemoryError(f"fault injection: {len(mine)} examples at step {self.faults.oom_at_step}")
        seqs, labs = [self.sequences[i] for i in mine], [self.labels[i] for i in mine]
        if self.packing:
            ids, positions, target = packed_batch(seqs, labs, self.config.cutoff_len, self.config.pad_token_id,
                                                  self.multiple)  # fmt: skip
            positions = positions.to(device)
        else:
            (ids, target), positions = padded_batch(seqs, labs, self.config.pad_token_id, self.multiple), None
        ids, target = ids.to(device), target.to(device)
        # gradients are averaged over processes once per step, after its last micro-batch
        with engine.micro_batch(last=last):
            with self.autocast:
                loss_sum = engine.loss(ids, target, positions) * weight
            # averaged over processes, then times world: the gradient of the step's summed loss
            engine.backward(loss_sum * world / max(supervised, 1))
        self.window_loss += float(loss_sum.detach())
        self.window_seen += sum(self.lengths[i] for i in batch)

    def _open_window(self) -> None:
        self.window_loss, self.window_tokens, self.window_seen, self.window_start = 0.0, 0, 0, time.time()

    def log_window(self, grad_norm: float) -> float:
        """Report the loss and throughput since the last log (a `log` event and the history); the loss."""
        if self.world > 1:  # every process's share of the loss
            self.window_loss = all_processes_sum(self.window_loss, self.setup.device)
        loss = self.window_loss / max(self.window_tokens, 1)
        elapsed = time.time() - self.window_start
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 3),
            "loss": round(loss, 5),
            "learning_rate": self.engine.schedulable_optimizer.param_groups[0]["lr"],
            "grad_norm": round(grad_norm, 4),
            "tokens_per_second": round(self.window_seen / max(elapsed, 1e-9), 1),
            "tokens": self.window_seen,  # real tokens since the last log, padding not counted
        }
        self.history.append(record)
        emit(StepLogged(step=self.step, metrics={k: v for k, v in record.items() if k != "step"}))
        self._open_window()
        return loss

    def out_of_memory(self, error: torch.OutOfMemoryError) -> WorkerError:
        """Tell the task that a step did not fit, with what the plan had allowed it (from any process)."""
        detail = str(error).strip().splitlines()
        event = RanOutOfMemory(
            step=self.step + 1,
            device=str(self.setup.device),
            detail=detail[0] if detail else type(error).__name__,
            micro_batch_split=self.split,
            rows=-(-self.config.batch_size // self.split),
            memory_estimate_mb=round(self.memory.estimate_bytes / 2**20),
            memory_budget_mb=round(self.memory.budget_bytes / 2**20),
            max_memory=self.config.max_memory,
        )
        emit(event, every_rank=True)
        return WorkerError(f"train {event.explain()}")

    def checkpoint(self) -> None:
        save_checkpoint(self.output, self.step, self.engine, self.scheduler, self.history, self.config, self.rank)
        emit(Checkpointed(step=self.step))

    def finish(self) -> None:
        """Save the final weights; with several processes, check they ended together; process 0 reports."""
        method = self.config.finetuning_type
        self.engine.save_final(self.output / ("adapter" if method in ADAPTER_METHODS else "model"), self.rank)
        ranks = self._gather_ranks() if self.world > 1 else None
        if self.rank > 0:
            return  # only the first process writes outputs and reports
        metrics = TrainingMetrics(
            train_tokens=self.loop_tokens,
            train_loop_seconds=round(self.loop_seconds, 2),
            train_tokens_per_second=round(self.loop_tokens / max(self.loop_seconds, 1e-9), 1),
            peak_memory_mb=round(peak_memory_mb(self.setup.device), 1),
            world_size=self.world,
        )
        finish_training(self.config, self.history, self.step, metrics, ranks=ranks)

    def _gather_ranks(self) -> list[RankSummary]:
        """Every process's end: the same step, and the same weights where each holds them all."""
        ranks = [None] * self.world
        digest = self.engine.digest() if self.engine.replicated else None  # a part of the weights says little
        mine = {"rank": self.rank, "steps": self.step, "examples": self.examples_here, "weights": digest}
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
        if len({(r["steps"], r["weights"]) for r in ranks}) > 1:
            raise WorkerError(f"the training processes ended out of step: {ranks}")
        return [RankSummary(**rank) for rank in ranks]


def train(config: TrainJob) -> None:
    loop = TrainingLoop(config)
    try:
        loop.resume()
        loop.announce()
        loop.run()
        loop.finish()
    except torch.OutOfMemoryError as error:  # named, with the plan's figures, for the task to retry
        raise loop.out_of_memory(error) from None


if __name__ == "__main__":
    worker_entry(train, TrainJob)
