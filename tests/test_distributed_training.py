"""Training with several processes: torchrun on this machine, DDP on the gloo backend (CPU).

Select them with `pytest -k "ddp or distributed or torchrun"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_spec
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows.pipeline import finetune


def adapter(result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["stages"]["train"]["output_dir"]) / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_and_two_processes(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same training as 1 process x 4 examples per step and as 2 processes x 2 (torchrun, DDP)."""
    workspace = tmp_path_factory.mktemp("ddp") / "workspace"
    one = finetune(tiny_spec(tiny_model, workspace, {"train": {"batch_size": 4}}))
    two = finetune(tiny_spec(tiny_model, workspace, {"train": {"batch_size": 2, "num_processes": 2}}))
    return one, two


def test_ddp_two_torchrun_processes_train_in_lockstep_and_match_one_process(one_and_two_processes):
    one, two = one_and_two_processes
    assert two["stages"]["tokenize"]["reused"], "only the train stage differs"
    train = two["stages"]["train"]
    ranks = train["info"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert (
        ranks[0]["steps"]
        == ranks[1]["steps"]
        == train["metrics"]["steps"]
        == one["stages"]["train"]["metrics"]["steps"]
    )
    assert ranks[0]["weights"] == ranks[1]["weights"], "both processes ended with the same weights"
    examples = two["stages"]["template"]["metrics"]["train_rows"] * 2  # 2 epochs
    assert ranks[0]["examples"] + ranks[1]["examples"] == examples, "each example trained once per epoch, on one rank"
    assert min(r["examples"] for r in ranks) >= examples // 2 - 2, "the work was shared"

    # exactly one MLflow run received the 2-process training's metrics
    client = MlflowClient(two["tracking"]["uri"])
    runs = client.search_runs([two["tracking"]["experiment_id"]], "metrics.world_size = 2")
    assert [r.info.run_id for r in runs] == [train["mlflow_run_id"]]
    losses = client.get_metric_history(train["mlflow_run_id"], "loss")
    assert sorted(m.step for m in losses) == list(range(1, int(train["metrics"]["steps"]) + 1))

    # same examples per step, same order: the same training as one process, to float rounding
    single = {m.step: m.value for m in MlflowClient(one["tracking"]["uri"]).get_metric_history(
        one["stages"]["train"]["mlflow_run_id"], "loss")}  # fmt: skip
    for m in losses:
        assert m.value == pytest.approx(single[m.step], rel=1e-3), f"step {m.step}"
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3)
    assert any(t.abs().max() > 0 for n, t in b.items() if "lora_B" in n), "it trained"


def test_ddp_a_killed_rank_fails_the_stage_and_the_retry_resumes(prefect_harness, tiny_model, tmp_path, monkeypatch):
    spec = tiny_spec(tiny_model, tmp_path / "workspace", {"train": {"batch_size": 2, "num_processes": 2}})
    spec.train.save_steps = 2
    spec.retries.train.delay_seconds = 0
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_AT_STEP", "4")  # rank 1 SIGKILLs itself after step 4
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_RANK", "1")

    result = finetune(spec)

    train = result["stages"]["train"]
    assert train["info"]["resumed_from_step"] == 4
    ranks = train["info"]["ranks"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == train["metrics"]["steps"] > 4
    assert ranks[0]["weights"] == ranks[1]["weights"]
    client = MlflowClient(result["tracking"]["uri"])
    history = client.get_metric_history(train["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, int(train["metrics"]["steps"]) + 1)), "one curve"
    assert client.get_run(train["mlflow_run_id"]).data.tags["resumed_from"] == "checkpoint-4"
