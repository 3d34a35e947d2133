"""What every training worker leaves behind and reports at the end, written in one place.

Both loops (tasks/workers/train.py for pt and sft, tasks/workers/trl.py for TRL's stages) end
the same way: the loss history as JSON Lines, its plot, and a `done` event for the train task.
"""

from __future__ import annotations

from pathlib import Path

from tasks.contracts.child_process import emit
from tasks.contracts.stage_infos import RankSummary
from tasks.contracts.worker_configs import TrainJob
from tasks.contracts.worker_events import TrainingDone
from tasks.dataset.jsonl import write_jsonl

CHECKPOINTS = "checkpoints"  # where both loops keep their checkpoints, inside the stage's output


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
    config: TrainJob, history: list[dict], step: int, metrics: dict[str, float], ranks: list[RankSummary] | None = None
) -> None:
    """Write loss_history.jsonl and loss_curve.png into the output; tell the task the stage is done."""
    output = Path(config.output_dir)
    write_jsonl(output / "loss_history.jsonl", history)
    title = f"{config.stage} ({config.finetuning_type}), lr={config.learning_rate}"
    plot_loss(history, output / "loss_curve.png", title)
    final = history[-1]["loss"] if history else float("nan")
    emit(TrainingDone(step=step, final_loss=final, metrics=metrics, ranks=ranks))
