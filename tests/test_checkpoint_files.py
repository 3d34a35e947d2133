"""Checkpoint files are read as tensors and plain values only: a file that names code is refused.
(FSDP's and DeepSpeed's files, which their loaders unpickle in full, are checked against the record
of their sha256 instead: tests/test_distributed_training.py plants one in their checkpoints.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tasks.components.training_outputs import read_checkpoint_file
from tasks.contracts.spec_sections import LR_SCHEDULERS
from tasks.contracts.worker_configs import TrainJob
from tasks.workers.train import make_scheduler


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_what_the_training_loop_saves_reads_back(tmp_path: Path, name: str):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # make_scheduler reads only these two fields of the job
    scheduler = make_scheduler(TrainJob.model_construct(lr_scheduler=name, warmup_ratio=0.1), optimizer, 10)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step(*([0.5] if name == "reduce_lr_on_plateau" else []))
    state = {  # what tasks/workers/train.py save_checkpoint writes
        "step": 1,
        "scheduler": scheduler.state_dict(),
        "history": [{"step": 1, "loss": 2.5, "lr": 1e-3}],
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    torch.save(state, tmp_path / "trainer_state.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    read = read_checkpoint_file(tmp_path / "trainer_state.pt")
    assert read["scheduler"] == state["scheduler"] and read["history"] == state["history"]
    assert torch.equal(read["rng"]["torch"], state["rng"]["torch"]) and read["rng"]["python"] == random.getstate()
    optimizer.load_state_dict(read_checkpoint_file(tmp_path / "optimizer.pt"))


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_file_that_names_code_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    torch.save({"step": 4, "scheduler": RunsCode(marker)}, checkpoint / "trainer_state.pt")
    with pytest.raises(RuntimeError, match=r"trainer_state.pt: holds more than tensors and plain values") as error:
        read_checkpoint_file(checkpoint / "trainer_state.pt")
    assert f"delete {checkpoint}" in str(error.value)
    assert not marker.exists(), "the file's code did not run"


def test_a_trl_resume_passes_over_a_checkpoint_cut_off_mid_save(tmp_path: Path):
    from tasks.workers.trl import HISTORY, last_complete_checkpoint

    def checkpoint(step: int, *files: str) -> Path:
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        for name in ("model.safetensors", *files):
            (directory / name).write_text("{}")
        return directory

    assert last_complete_checkpoint(tmp_path / "absent") is None
    complete = checkpoint(2, "trainer_state.json", HISTORY)
    checkpoint(4, "trainer_state.json")  # killed before this worker's loss history was written
    checkpoint(6)  # killed while transformers wrote its files
    (tmp_path / "checkpoint-8.tmp").mkdir()
    assert last_complete_checkpoint(tmp_path) == complete
    later = checkpoint(10, "trainer_state.json", HISTORY)
    assert last_complete_checkpoint(tmp_path) == later, "by step number"
