"""What every training worker leaves behind and reports at the end, written in one place.

Both loops (tasks/workers/train.py for pt and sft, tasks/workers/trl.py for TRL's stages) end
the same way: the loss history as JSON Lines, its plot, and a `done` event for the train task.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from tasks.contracts.child_process import WorkerError, emit
from tasks.contracts.file_digests import sha256_file
from tasks.contracts.stage_infos import RankSummary
from tasks.contracts.worker_configs import TrainJob
from tasks.contracts.worker_events import TrainingDone, TrainingMetrics
from tasks.dataset.jsonl import write_jsonl

CHECKPOINTS = "checkpoints"  # where both loops keep their checkpoints, inside the stage's output
CHECKPOINT_RECORD = "checkpoint_files.json"  # what a checkpoint holds, written last by the process that saved it


def newest_complete_checkpoint(root: Path, *last_written: str) -> Path | None:
    """The newest `checkpoint-N` under `root` holding every file in `last_written`, or None.

    Each loop names the files it writes last into a checkpoint; one without them was cut off
    mid-save and is passed over (transformers' get_last_checkpoint takes the highest N, whole or not).
    """
    found = [
        path
        for path in (root.glob("checkpoint-*") if root.is_dir() else [])
        if path.is_dir() and path.name.split("-")[-1].isdigit() and all((path / f).is_file() for f in last_written)
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def read_checkpoint_file(path: Path):
    """A `.pt` file of a checkpoint: tensors and plain values only.

    Checkpoints sit in a workspace others may write to, and a full unpickle runs whatever code
    the file names; `weights_only` refuses anything but tensors, numbers, text and containers,
    which is all the loops save (optimizer and scheduler state, step, loss history, RNG state).
    """
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        raise RuntimeError(
            f"{path}: holds more than tensors and plain values, so it is not loaded ({reason}); "
            f"delete {path.parent} to train from the checkpoint before it"
        ) from None


class CheckpointFiles(BaseModel):
    """A checkpoint's files and their sha256, as the training that saved them wrote them."""

    files: dict[str, str]  # path inside the checkpoint -> sha256


def checkpoint_digests(checkpoint: Path) -> dict[str, str]:
    return {
        str(path.relative_to(checkpoint)): sha256_file(path)
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_RECORD
    }


def record_checkpoint_files(checkpoint: Path) -> None:
    """Write the record of every file in `checkpoint`, atomically, once all of them are written."""
    temporary = checkpoint / f".{CHECKPOINT_RECORD}.partial"
    temporary.write_text(CheckpointFiles(files=checkpoint_digests(checkpoint)).model_dump_json(indent=1))
    os.replace(temporary, checkpoint / CHECKPOINT_RECORD)


def verify_checkpoint_files(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files are not those its record names, before any of them is read.

    DeepSpeed's loader and torch's distributed checkpoint unpickle their files in full (code
    included), so a file planted in a shared workspace, or one changed there, would run on the
    next resume; the record is JSON, read without pickle, and written after the files by the
    process that saved them.
    """
    record_path = checkpoint / CHECKPOINT_RECORD
    try:
        recorded = CheckpointFiles.model_validate_json(record_path.read_bytes()).files
    except (OSError, ValidationError) as exc:
        reason = str(exc).splitlines()[0]
        raise WorkerError(
            f"{record_path}: not a record of this checkpoint's files ({reason}), so nothing in {checkpoint.name} "
            f"is loaded; delete {checkpoint} to resume from the checkpoint before it"
        ) from None
    found = checkpoint_digests(checkpoint)
    planted = [checkpoint / name for name in found if name not in recorded]
    changed = [checkpoint / name for name in found if name in recorded and found[name] != recorded[name]]
    missing = [checkpoint / name for name in recorded if name not in found]
    problems = [f"{path}: not written by this training" for path in planted]
    problems += [f"{path}: changed since this training wrote it (its sha256 differs from {record_path})"
                 for path in changed]  # fmt: skip
    problems += [f"{path}: missing" for path in missing]
    if problems:
        raise WorkerError(
            "; ".join(problems) + f". Nothing in {checkpoint.name} is loaded: delete {checkpoint} to resume from "
            "the checkpoint before it"
        )


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


def finish_training(
    config: TrainJob, history: list[dict], step: int, metrics: TrainingMetrics, ranks: list[RankSummary] | None = None
) -> None:
    """Write loss_history.jsonl and loss_curve.png into the output; tell the task the stage is done."""
    output = Path(config.output_dir)
    write_jsonl(output / "loss_history.jsonl", history)
    title = f"{config.stage} ({config.finetuning_type}), lr={config.learning_rate}"
    plot_loss(history, output / "loss_curve.png", title)
    final = history[-1]["loss"] if history else float("nan")
    emit(TrainingDone(step=step, final_loss=final, metrics=metrics, ranks=ranks))
