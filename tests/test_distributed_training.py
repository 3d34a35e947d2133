"""Training with several processes through torchrun, on the gloo backend (CPU): DDP, FSDP2,
DeepSpeed ZeRO-3, and two "nodes" on this machine joined by `tunefactory train-node`.

Select them with `pytest -k "ddp or distributed or torchrun"`.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loopback import free_port
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_checkpoint_files import RunsCode
from tiny_pipeline import tiny_spec

from flows.pipeline import finetune
from flows.results import PipelineResult
from tasks.components.training_outputs import CHECKPOINTS
from tasks.contracts.child_process import WorkerError, run_worker
from tasks.contracts.worker_configs import TrainJob

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "deployments" / "deepspeed" / "zero3.json")
# two processes with 2 examples each take the same steps as one process with 4
TWO_PROCESSES = {
    "ddp": {"batch_size": 2, "num_processes": 2},
    "fsdp": {"batch_size": 2, "num_processes": 2, "distributed": "fsdp"},
    "deepspeed": {"batch_size": 2, "num_processes": 2, "distributed": "deepspeed", "deepspeed_config": ZERO3},
}


def adapter(result: PipelineResult) -> dict[str, torch.Tensor]:
    return load_file(Path(result.stages["train"].output_dir) / "adapter" / "adapter_model.safetensors")


def loss_curve(result: PipelineResult) -> dict[int, float]:
    run_id = result.stages["train"].mlflow_run_id
    return {m.step: m.value for m in MlflowClient(result.tracking.uri).get_metric_history(run_id, "loss")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed") / "workspace"


@pytest.fixture(scope="module")
def one_process(prefect_harness, tiny_model: Path, workspace: Path) -> PipelineResult:
    return finetune(tiny_spec(tiny_model, workspace, {"train": {"batch_size": 4}}))


def assert_same_training(one: PipelineResult, two: PipelineResult) -> None:
    """`two` (2 processes x 2 examples) trained as `one` (1 process x 4) did, to float rounding."""
    single, double = loss_curve(one), loss_curve(two)
    assert sorted(double) == list(range(1, int(two.stages["train"].metrics["steps"]) + 1))
    for step, value in double.items():
        assert value == pytest.approx(single[step], rel=1e-3), f"step {step}"
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3)
    assert any(t.abs().max() > 0 for n, t in b.items() if "lora_B" in n), "it trained"


def assert_two_ranks_shared_the_work(one: PipelineResult, two: PipelineResult, mode: str) -> None:
    assert two.stages["tokenize"].reused, "only the train stage differs"
    train = two.stages["train"]
    ranks = train.info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == train.metrics["steps"] == one.stages["train"].metrics[
        "steps"]  # fmt: skip
    if mode == "ddp":  # every process holds the whole model; FSDP and ZeRO-3 hold parts
        assert ranks[0]["weights"] == ranks[1]["weights"], "both processes ended with the same weights"
    examples = two.stages["template"].metrics["train_rows"] * 2  # 2 epochs
    # a resumed run counts the examples it trained after its checkpoint: 2 ranks x batch_size per step before
    examples -= (train.info.get("resumed_from_step") or 0) * 2 * TWO_PROCESSES[mode]["batch_size"]
    assert ranks[0]["examples"] + ranks[1]["examples"] == examples, "each example trained once per epoch, on one rank"
    assert min(r["examples"] for r in ranks) >= examples // 2 - 2, "the work was shared"

    # exactly one MLflow run received the 2-process training's metrics: process 0's
    client = MlflowClient(two.tracking.uri)
    runs = client.search_runs(
        [two.tracking.experiment_id],
        f"metrics.world_size = 2 and params.distributed = '{mode}' and params.nnodes = '1'",
    )
    assert train.mlflow_run_id in [r.info.run_id for r in runs]
    assert_same_training(one, two)


def test_distributed_two_ddp_processes_train_in_lockstep_and_match_one_process(one_process, tiny_model, workspace):
    two = finetune(tiny_spec(tiny_model, workspace, {"train": TWO_PROCESSES["ddp"]}))
    assert_two_ranks_shared_the_work(one_process, two, "ddp")


# ddp keeps its state as one process does (the kill -9 test of tests/test_resume_and_retry.py resumes
# it); fsdp and deepspeed each write their own sharded checkpoint, so each is killed and resumed
# here, and the resumed training must still be the one process's training, step for step: the
# lockstep check and the resume check in one run (each costs two minutes of torchrun on 2 cores)
@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_distributed_a_killed_rank_resumes_and_still_trains_as_one_process(
    one_process, tiny_model, workspace, monkeypatch, mode
):
    spec = tiny_spec(tiny_model, workspace, {"train": TWO_PROCESSES[mode]})
    spec.train.save_steps = 2
    spec.retries.train.delay_seconds = 0
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_AT_STEP", "4")  # rank 1 SIGKILLs itself after step 4
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_RANK", "1")

    result = finetune(spec)

    train = result.stages["train"]
    assert train.info["resumed_from_step"] == 4
    assert train.metrics["steps"] > 4
    client = MlflowClient(result.tracking.uri)
    history = client.get_metric_history(train.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, int(train.metrics["steps"]) + 1)), "one curve"
    assert client.get_run(train.mlflow_run_id).data.tags["resumed_from"] == "checkpoint-4"
    assert_two_ranks_shared_the_work(one_process, result, mode)
    assert_a_planted_or_changed_file_is_refused_without_running(Path(train.output_dir), mode)


# what each engine's loader unpickles in full (torch's distributed checkpoint its metadata, DeepSpeed
# its .pt files): one file changed, and one planted beside it under a name the loader also reads
UNPICKLED = {
    "fsdp": ("sharded/.metadata", "sharded/__2_0.distcp"),
    "deepspeed": ("deepspeed/state/zero_pp_rank_0_mp_rank_00_model_states.pt",
                  "deepspeed/state/zero_pp_rank_0_mp_rank_01_model_states.pt"),  # mp_rank_*: globbed
}  # fmt: skip


def assert_a_planted_or_changed_file_is_refused_without_running(output: Path, mode: str) -> None:
    """Resume the finished training's newest checkpoint once more, with someone's pickles in it."""
    checkpoint = max((output / CHECKPOINTS).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    changed, planted = (checkpoint / name for name in UNPICKLED[mode])
    assert changed.is_file(), f"{mode} keeps its state in {changed.relative_to(checkpoint)}"
    ran_changed, ran_planted = output.parent / "ran-changed", output.parent / "ran-planted"
    changed.write_bytes(pickle.dumps(RunsCode(ran_changed)))  # what anyone who can write the workspace could do
    planted.write_bytes(pickle.dumps(RunsCode(ran_planted)))
    job = TrainJob.model_validate_json((output / "train_config.json").read_bytes())
    job = job.model_copy(update={"output_dir": str(output)})  # the config names the output before it was published

    with pytest.raises(WorkerError) as refused:  # one process: the check comes before its engine reads anything
        run_worker("tasks.workers.train", job, output.parent / "resume.json", on_output=lambda line: None,
                   torchrun=["--standalone", "--nproc-per-node", "1"])  # fmt: skip

    message = str(refused.value)
    assert f"{planted}: not written by this training" in message
    assert f"{changed}: changed since this training wrote it" in message
    assert f"delete {checkpoint} to resume from the checkpoint before it" in message
    assert not ran_changed.exists() and not ran_planted.exists(), "no code in either file ran"


def test_distributed_two_nodes_joined_by_train_node_train_as_one(one_process, tiny_model, workspace):
    """nnodes 2 on loopback: the train task is node 0, `tunefactory train-node` node 1."""
    changes = {"batch_size": 2, "nnodes": 2, "rendezvous": f"127.0.0.1:{free_port()}"}
    spec = tiny_spec(tiny_model, workspace, {"train": changes})
    node = subprocess.Popen(
        [Path(sys.executable).parent / "tunefactory", "train-node", "--workspace", str(workspace),
         "--node-rank", "1", "--timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        two = finetune(spec)
        output, _ = node.communicate(timeout=120)
    finally:
        node.kill()
    assert node.returncode == 0, output
    assert "node 1 of 2 joining at 127.0.0.1" in output
    ranks = two.stages["train"].info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert_same_training(one_process, two)
