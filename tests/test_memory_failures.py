"""Running out of memory in training: the plan keeps headroom, an out-of-memory error is named as
such with the plan's estimate and budget, the stage retries once with each batch split twice as
much, and the memory settings a user changes after such a failure keep the stage's checkpoints.

Select them with `pytest tests/test_memory_failures.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tiny_pipeline import tiny_spec

from flows.pipeline import finetune
from tasks.components.memory_plan import HEADROOM, StepShape, plan_memory, step_bytes
from tasks.contracts import child_process
from tasks.contracts.child_process import ProbablyOutOfMemory, WorkerError, run_worker

TESTS = Path(__file__).resolve().parent


def test_the_plan_keeps_a_tenth_of_the_budget_free():
    shape = StepShape(layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152, weight_bytes=540_000_000,
                      trainable=4_900_000, compute_bytes=4, rows=8, width=512, tokens=8 * 512, supervised=2400,
                      device="cpu", attention_probs=True)  # fmt: skip
    whole = step_bytes(shape, 1, False)
    assert plan_memory(shape, whole, False).split == 2, "a step estimated at the whole budget is split"
    assert plan_memory(shape, whole / (1 - HEADROOM), False).split == 1
    assert plan_memory(shape, whole / (1 - HEADROOM), False, least_split=4).split == 4, "a retry's floor"


@pytest.mark.parametrize("oom_killer_ran", [True, False])
def test_a_worker_killed_while_the_kernel_killed_for_memory_is_named_probably_out_of_memory(
    tmp_path: Path, monkeypatch, oom_killer_ran: bool
):
    counter = tmp_path / "vmstat"
    counter.write_text("oom_kill 7\n")
    monkeypatch.setattr(child_process, "VMSTAT", counter)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    argument = counter if oom_killer_ran else tmp_path / "quiet"
    (tmp_path / "quiet").write_text("quiet\n")

    with pytest.raises(WorkerError) as failed:
        run_worker("killed_by_the_kernel", None, argument)

    message = str(failed.value)
    assert "killed by signal 9" in message
    if oom_killer_ran:
        assert isinstance(failed.value, ProbablyOutOfMemory)
        assert "probably out of memory: the kernel's out-of-memory killer killed 1 process(es)" in message
    else:
        assert not isinstance(failed.value, ProbablyOutOfMemory) and "memory" not in message


def test_out_of_memory_is_named_retried_with_twice_the_split_and_a_new_max_memory_resumes(
    prefect_harness, tiny_model: Path, tmp_path: Path, monkeypatch
):
    """Step 4 (4 examples) runs out of memory (injected: torch.OutOfMemoryError) after checkpoint-3.

    First with any micro-batch: the stage retries once, from checkpoint-3 with each batch in 2
    micro-batches, fails again and says so with the plan's figures. Then the user sets
    train.max_memory and gradient checkpointing, and step 4 fits only micro-batches of 2 examples:
    the run resumes from checkpoint-3, not step 0, runs out of memory once, and its retry finishes.
    """
    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    spec.retries.train.retries = 0  # the memory retry is the stage's own
    monkeypatch.setenv("TUNEFACTORY_FAULT_OOM_AT_STEP", "4")
    monkeypatch.setenv("TUNEFACTORY_FAULT_OOM_ROWS", "0")

    with pytest.raises(Exception, match="ran out of memory") as failed:
        finetune(spec)

    message = str(failed.value)
    assert "ran out of memory at step 4 on cpu (fault injection: 2 examples at step 4)" in message
    assert "micro-batches of 2 examples (each batch in 2)" in message, "the retry split each batch in 2"
    assert "the memory plan estimated" in message and "within a budget of" in message
    assert "lower train.max_memory" in message and "resumes from its newest checkpoint" in message

    spec.train.max_memory = "16GB"  # still room for the whole batch of 4, after the headroom
    spec.train.gradient_checkpointing = True
    monkeypatch.setenv("TUNEFACTORY_FAULT_OOM_ROWS", "2")
    result = finetune(spec)

    train = result.stages["train"]
    assert train.info["resumed_from_step"] == 3, "the new memory settings kept the checkpoints"
    client = MlflowClient(result.tracking.uri)
    splits = client.get_metric_history(train.mlflow_run_id, "micro_batch_split")
    assert [(m.step, m.value) for m in sorted(splits, key=lambda m: m.timestamp)][-2:] == [(3, 1), (3, 2)]
    steps = int(train.metrics["steps"])
    losses = client.get_metric_history(train.mlflow_run_id, "loss")
    assert sorted({m.step for m in losses}) == list(range(1, steps + 1)) and steps > 4, "one curve, to the end"
