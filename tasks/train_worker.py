"""The training child process for pt and sft: `python -m tasks.train_worker OUTPUT/train_config.json`.

Launched by the train task (tasks/train.py). It fine-tunes with the stage's method
(tasks/finetuning_methods.py) on token ids and label masks (sft) or packed text (pt), prints
a progress bar on stderr, streams `log` events (loss, learning rate, throughput) to the task,
writes a checkpoint every `save_steps` optimizer steps, and on start resumes from the newest
complete checkpoint in its output directory. Outputs: `adapter/` or `model/`,
`loss_history.jsonl`, `loss_curve.png`.

Where the time goes is chosen for throughput: no compute on logits that carry no label
(tasks/modeling.py:supervised_loss), no padding mask (right padding is invisible to causal
attention), batches of similar lengths, or packed rows where FlashAttention makes packing
free (tasks/packing.py); no gradient checkpointing unless asked; on a GPU, a bf16 frozen
base under LoRA, fused AdamW and compiled decoder layers. `python -m tasks.bench_train`
measures it against TRL's SFTTrainer at its defaults.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flows.spec import ADAPTER_METHODS
from tasks.child_process import WorkerError, emit, worker_entry
from tasks.distributed_engines import Engine, all_processes_sum, decoder_layers, make_engine, start_process_group
from tasks.finetuning_methods import trainable_model
from tasks.modeling import attention_implementation, causal_lm, compute_setup
from tasks.packing import packed_batch, padded_batch

CHECKPOINTS = "checkpoints"


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


def compile_layers(model: torch.nn.Module) -> bool:
    """torch.compile each decoder layer: one graph, reused by every layer; False if none is found."""
    layers = decoder_layers(model)
    if layers is None:
        return False
    for layer in layers:
        layer.compile()
    return True


def make_scheduler(config: dict[str, Any], optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = config["lr_scheduler"]
    kwargs = {}
    if name == "reduce_lr_on_plateau":
        kwargs = {"patience": 2, "factor": 0.5}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(total_steps * config["warmup_ratio"]),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs,
    )


def newest_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that was written completely (it has its state file)."""
    found = [
        path
        for path in (output / CHECKPOINTS).glob("checkpoint-*")
        if path.is_dir() and (path / "trainer_state.pt").is_file() and path.name.split("-")[-1].isdigit()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def save_checkpoint(
    output: Path, step: int, engine: Engine, scheduler, history: list[dict], config: dict[str, Any], rank: int
) -> None:
    """Write checkpoint-<step> atomically (every process calls it), then drop the oldest beyond save_total_limit.

    The engine writes weights and optimizer state (process 0 alone, or every process its
    part); process 0 then adds the step, schedule, loss history and random state, and the
    directory gets its final name only when all of it is there.
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        complete = sorted(
            (p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in complete[: -config["save_total_limit"]]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(engine)  # no process runs ahead of a checkpoint being written


def barrier(engine: Engine) -> None:
    if engine.world > 1:
        dist.barrier()


def load_checkpoint(checkpoint: Path, engine: Engine, scheduler) -> dict:
    engine.load_state(checkpoint)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(config: dict[str, Any]) -> None:
    from datasets import load_from_disk
    from tqdm import tqdm

    output = Path(config["output_dir"])
    setup = compute_setup(config["compute_type"])
    cuda = setup.device.type == "cuda"
    rank, world = start_process_group(cuda)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])

    data = load_from_disk(str(Path(config["dataset_dir"]) / "train"))
    columns = data.to_dict()
    sequences, labels = columns["input_ids"], columns["labels"]
    lengths = [len(seq) for seq in sequences]
    pad_id = config["pad_token_id"]

    attention = attention_implementation(setup.device)
    packing = config["packing"] if config["packing"] is not None else attention == "flash_attention_2"
    # a bf16 frozen base under LoRA; FSDP and DeepSpeed cast weights themselves, from fp32
    sharded = world > 1 and config["distributed"] != "ddp"
    frozen = setup.autocast_dtype if setup.autocast_dtype == torch.bfloat16 and not sharded else torch.float32
    model = trainable_model(config, setup.device, attention=attention, frozen_dtype=frozen)
    model.train()
    if config["gradient_checkpointing"]:
        causal_lm(model).activation_checkpointing_enable({"use_reentrant": False})
    compiled = (
        compile_layers(model) if (config["torch_compile"] if config["torch_compile"] is not None else cuda) else False
    )
    # compiled layers see a few row widths, not one per step
    multiple = 64 if compiled else 1
    # counted before FSDP or ZeRO-3 split the weights across processes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    engine = make_engine(model, config, setup, world)
    accumulation = config["gradient_accumulation_steps"]
    # a step takes batch_size examples on each process: the same steps as one process with batch_size x world
    global_batch = config["batch_size"] * world
    batches_per_epoch = math.ceil(len(sequences) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = max(1, math.ceil(steps_per_epoch * config["num_epochs"]))
    scheduler = make_scheduler(config, engine.schedulable_optimizer, total_steps)

    step, history = 0, []
    checkpoint = newest_checkpoint(output)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, scheduler)
        step, history = state["step"], state["history"]
        emit({"type": "resumed", "step": step, "checkpoint": checkpoint.name})

    emit(
        {
            "type": "start",
            "total_steps": total_steps,
            "first_step": step,
            "trainable_params": trainable,
            "total_params": total,
            "examples": len(sequences),
            "compute_type": setup.name,
            "device": str(setup.device),
            "attention": attention,
            "packing": packing,
            "torch_compile": compiled,
            "gradient_checkpointing": config["gradient_checkpointing"],
            "world_size": world,
        }
    )

    autocast = torch.autocast(setup.device.type, dtype=setup.autocast_dtype) if setup.autocast_dtype else nullcontext()
    kill_at = int(os.environ.get("TUNEFACTORY_FAULT_KILL_AT_STEP", "0"))
    kill_rank = int(os.environ.get("TUNEFACTORY_FAULT_KILL_RANK", "0"))
    examples_here = 0
    window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.time()
    loop_start, loop_tokens = time.time(), 0
    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=rank > 0)
    while step < total_steps:
        epoch, position = divmod(step * accumulation, batches_per_epoch)
        batches = epoch_batches(lengths, global_batch, config["seed"], epoch)
        group = batches[position : position + accumulation]
        supervised = sum(sum(label != -100 for label in labels[i][1:]) for batch in group for i in batch)
        for micro, batch in enumerate(group):
            # this process's share; one left without examples repeats one at zero weight, so that
            # every process runs the forward and backward the others wait for
            mine = batch[rank::world]
            weight = 1.0 if mine else 0.0
            mine = mine or batch[:1]
            examples_here += len(mine) if weight else 0
            seqs, labs = [sequences[i] for i in mine], [labels[i] for i in mine]
            if packing:
                ids, positions, target = packed_batch(seqs, labs, config["cutoff_len"], pad_id, multiple)
                positions = positions.to(setup.device)
            else:
                (ids, target), positions = padded_batch(seqs, labs, pad_id, multiple), None
            ids, target = ids.to(setup.device), target.to(setup.device)
            # gradients are averaged over processes once per step, after its last micro-batch
            with engine.micro_batch(last=micro == len(group) - 1):
                with autocast:
                    loss_sum = engine.loss(ids, target, positions) * weight
                # averaged over processes, then times world: the gradient of the step's summed loss
                engine.backward(loss_sum * world / max(supervised, 1))
            window_loss += float(loss_sum.detach())
            window_seen += sum(lengths[i] for i in batch)
        window_tokens += supervised
        loop_tokens += sum(lengths[i] for batch in group for i in batch)
        grad_norm = engine.step()
        step += 1
        progress.update(1)
        if step % config["logging_steps"] == 0 or step == total_steps:
            if world > 1:  # every process's share of the loss
                window_loss = all_processes_sum(window_loss, setup.device)
            loss_value = window_loss / max(window_tokens, 1)
            elapsed = time.time() - window_start
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 3),
                "loss": round(loss_value, 5),
                "learning_rate": engine.schedulable_optimizer.param_groups[0]["lr"],
                "grad_norm": round(grad_norm, 4),
                "tokens_per_second": round(window_seen / max(elapsed, 1e-9), 1),
                "tokens": window_seen,  # real tokens since the last log, padding not counted
            }
            history.append(record)
            emit({"type": "log", **record})
            progress.set_postfix(loss=f"{loss_value:.4f}")
            window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.time()
            if config["lr_scheduler"] == "reduce_lr_on_plateau":
                scheduler.step(loss_value)
        if config["lr_scheduler"] != "reduce_lr_on_plateau":
            scheduler.step()
        if step % config["save_steps"] == 0 and step < total_steps:
            save_checkpoint(output, step, engine, scheduler, history, config, rank)
            emit({"type": "checkpoint", "step": step})
        if kill_at and step == kill_at and rank == kill_rank:  # fault injection for the crash-resume tests
            os.kill(os.getpid(), 9)
    progress.close()
    loop_seconds = time.time() - loop_start
    method = config["finetuning_type"]
    engine.save_final(output / ("adapter" if method in ADAPTER_METHODS else "model"), rank)
    ranks = None
    if world > 1:  # every process ended at the same step (with the same weights, where each holds them all)
        ranks = [None] * world
        digest = engine.digest() if engine.replicated else None  # a part of the weights says little
        mine = {"rank": rank, "steps": step, "examples": examples_here, "weights": digest}
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
        if len({(r["steps"], r["weights"]) for r in ranks}) > 1:
            raise WorkerError(f"the training processes ended out of step: {ranks}")
        if rank > 0:
            return  # only the first process writes outputs and reports

    with (output / "loss_history.jsonl").open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
    plot_loss(history, output / "loss_curve.png", f"{config['stage']} ({method}), lr={config['learning_rate']}")
    emit(
        {
            "type": "done",
            "step": step,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "metrics": {
                "train_tokens": loop_tokens,
                "train_loop_seconds": round(loop_seconds, 2),
                "train_tokens_per_second": round(loop_tokens / max(loop_seconds, 1e-9), 1),
                "peak_memory_mb": round(peak_memory_mb(setup.device), 1),
                "world_size": world,
            },
            "ranks": ranks,
        }
    )


if __name__ == "__main__":
    worker_entry(train)
