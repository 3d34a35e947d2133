"""`make gpu-check` without a GPU says what it would run; the one-process FSDP2 and DeepSpeed
checks it runs on CUDA take a path that runs here too, on gloo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_fast_training import chat_examples

from tasks.components.chat_encoding import tokenize_examples
from tasks.contracts.child_process import final, run_worker
from tasks.contracts.spec_sections import TrainSpec
from tasks.contracts.worker_configs import TrainJob, Weights
from tasks.contracts.worker_events import StepLogged, TrainingDone, TrainingStarted
from tasks.tools.gpu_check import CHECKS, summary_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_names_every_check_and_says_cuda_is_missing():
    done = subprocess.run([sys.executable, "-m", "tasks.tools.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CUDA is missing" in done.stdout and "nothing was run" in done.stdout
    for number, (name, _) in enumerate(CHECKS, start=1):
        assert f"  {number}. {name}" in done.stdout
    assert "--bundle gpu-bundle" in done.stdout


def test_the_summary_table_shows_each_figure_or_a_dash():
    rows = [
        {"check": "qlora 1b", "result": "pass", "tokens_per_second": 41234.5, "mfu": 0.412, "peak_memory_mb": 9321,
         "seconds": 31.2, "note": "loss 10.9 -> 9.8"},
        {"check": "gpu tests", "result": "FAIL", "seconds": 12.0, "note": "1 failed"},
    ]  # fmt: skip
    table = summary_table(rows).splitlines()
    assert table[2] == "| qlora 1b | pass | 41,234 | 41.2% | 9,321 MB | 31 | loss 10.9 -> 9.8 |"
    assert table[3] == "| gpu tests | FAIL | - | - | - | 12 | 1 failed |"


@pytest.mark.parametrize("distributed", ["fsdp", "deepspeed"])
def test_one_process_under_torchrun_runs_the_engine_the_spec_names(distributed, tiny_model, tokenizer, tmp_path):
    from datasets import Dataset

    columns, _ = tokenize_examples(tokenizer, chat_examples(16), cutoff_len=128, train_on_prompt=False)
    Dataset.from_dict(columns).save_to_disk(str(tmp_path / "data" / "train"))
    spec = TrainSpec(finetuning_type="full", distributed=distributed, num_epochs=2, batch_size=4,
                     learning_rate=1e-3, logging_steps=1)  # fmt: skip
    config = TrainJob(**spec.model_dump(), start=Weights(model_dir=str(tiny_model)), tokenizer_path=str(tiny_model),
                      dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "train"), cutoff_len=128,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    lines: list[str] = []
    events = run_worker("tasks.workers.train", config, tmp_path / "config.json", on_output=lines.append,
                        torchrun=["--standalone", "--nproc-per-node", "1"])  # fmt: skip
    started = final(events, TrainingStarted)
    assert (started.world_size, started.engine) == (1, distributed)
    losses = [e.metrics["loss"] for e in events if isinstance(e, StepLogged)]
    assert len(losses) == 8 and losses[-1] < losses[0], "it learned"
    assert final(events, TrainingDone).metrics.peak_memory_mb > 0
    assert (tmp_path / "train" / "model" / "config.json").is_file(), "the gathered model was saved"
