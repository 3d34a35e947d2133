"""Faults injected for real: a killed worker, a killed flow, Ctrl-C, a failing stage, a damaged output.

Select them with `pytest -k "resume or retry or kill or crash or corrupt or reuse"`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from loopback import wait_for
from mlflow.tracking import MlflowClient
from tiny_pipeline import tiny_spec

from flows.pipeline import finetune

ROOT = Path(__file__).resolve().parents[1]


def long_training(spec):
    """Enough steps that a test can catch training between two checkpoints: 90, about 13 s on one
    core after the first checkpoint at step 5 (the test polls every 0.1 s)."""
    spec.train.num_epochs = 15
    spec.train.save_steps = 5
    spec.train.logging_steps = 5
    return spec


def manifests(workspace: Path) -> dict[str, dict]:
    found = {}
    for path in (workspace / "stages").glob("*/*/manifest.json"):
        found[path.parent.parent.name] = json.loads(path.read_text())
    return found


def worker_processes(workspace: Path) -> list[int]:
    """Live processes whose command line names a worker config inside this workspace."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (proc / "status").read_text()
        except OSError:
            continue
        if "tasks.workers." in cmdline and str(workspace) in cmdline and "State:\tZ" not in status:
            pids.append(int(proc.name))
    return pids


def a_checkpoint_exists(workspace: Path) -> bool:
    return any((workspace / "stages" / "train").glob("*.partial/checkpoints/checkpoint-*/trainer_state.pt"))


@pytest.fixture
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def start_cli(spec, tmp_path: Path, api_url: str, **extra_env: str) -> subprocess.Popen:
    """`tunefactory run` in its own process, reporting to the test's Prefect server."""
    path = tmp_path / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": api_url, **extra_env}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: a test runner started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_kill_9_of_training_worker_resumes_from_checkpoint_on_retry(prefect_harness, tiny_model, tmp_path, monkeypatch):
    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    spec.train.save_steps = 2
    spec.retries.train.delay_seconds = 0
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_AT_STEP", "4")  # the worker SIGKILLs itself after step 4

    result = finetune(spec)

    train = result.stages["train"]
    assert train.info["resumed_from_step"] == 4
    steps = int(train.metrics["steps"])
    assert steps > 4
    client = MlflowClient(result.tracking.uri)
    history = client.get_metric_history(train.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "one curve, continued past step 4"
    assert client.get_run(train.mlflow_run_id).data.tags["resumed_from"] == "checkpoint-4"
    assert (Path(train.output_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_crash_of_the_flow_process_then_rerun_reuses_stages_and_resumes_training(api_url, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    spec = long_training(tiny_spec(tiny_model, workspace))
    first = start_cli(spec, tmp_path, api_url)
    wait_for(lambda: a_checkpoint_exists(workspace), 300, "a training checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    wait_for(lambda: not worker_processes(workspace), 30, "the orphaned worker to die with its flow")
    before = manifests(workspace)
    assert {"template", "tokenize"} <= set(before) and "train" not in before

    second = start_cli(spec, tmp_path, api_url)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    after = manifests(workspace)
    for stage in ("model", "template", "tokenize"):
        assert after[stage]["created_at"] == before[stage]["created_at"], f"{stage} was redone"
    assert after["train"]["info"]["resumed_from_step"] >= 5
    assert "reused" in output


def test_prefect_flow_run_retry_continues_a_failed_run_at_the_failed_stage(api_url, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    spec = tiny_spec(tiny_model, workspace)
    spec.train.save_steps = 2
    spec.retries.train.retries = 0  # let the kill fail the whole run
    failed = start_cli(spec, tmp_path, api_url, TUNEFACTORY_FAULT_KILL_AT_STEP="4")
    output, _ = failed.communicate(timeout=600)
    assert failed.returncode == 1, output[-3000:]
    assert "killed by signal 9" in output and "Finished stages are kept" in output
    flow_run_id = re.search(r"prefect flow-run retry (\S+) --entrypoint", output).group(1)
    before = manifests(workspace)
    assert "train" not in before

    env = {**os.environ, "PREFECT_API_URL": api_url}
    prefect = Path(sys.executable).with_name("prefect")
    retried = subprocess.run(
        [str(prefect), "flow-run", "retry", flow_run_id, "--entrypoint", "flows/pipeline.py:finetune"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-2000:]
    after = manifests(workspace)
    for stage in ("model", "template", "tokenize"):
        assert after[stage]["created_at"] == before[stage]["created_at"], f"{stage} was redone"
    assert after["train"]["info"]["resumed_from_step"] == 4
    assert "export" in after
    state = httpx.get(f"{api_url}/flow_runs/{flow_run_id}").json()["state"]
    assert state["type"] == "COMPLETED"


def test_ctrl_c_during_training_kills_the_worker(api_url, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    spec = long_training(tiny_spec(tiny_model, workspace))
    run = start_cli(spec, tmp_path, api_url)
    wait_for(lambda: a_checkpoint_exists(workspace), 300, "training to be under way")
    assert worker_processes(workspace)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode != 0
    assert not worker_processes(workspace), "no training process may outlive Ctrl-C"
    assert "finished stages are kept" in output


def test_stage_that_raises_once_succeeds_on_its_prefect_retry(api_url, tiny_model, tmp_path):
    """The dataset file is missing on the first attempt and restored while Prefect waits to retry."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"late": {"file_name": "late.json"}}))
    rows = [{"instruction": f"What is {i} + {i}?", "output": f"It is {2 * i}."} for i in range(12)]
    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    spec.dataset.names = ["late"]
    spec.dataset.registry = str(data / "dataset_info.json")
    spec.evaluate.identity_prompts = spec.evaluate.control_prompts = None
    spec.retries.template.retries = 1
    spec.retries.template.delay_seconds = 3

    def restore_after_first_failure() -> None:
        query = {"task_runs": {"name": {"any_": ["template dataset"]}}}
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = httpx.post(f"{api_url}/task_runs/filter", json=query).json()
            if any(run["state"] and run["state"]["name"] == "AwaitingRetry" for run in runs):
                (data / "late.json").write_text(json.dumps(rows))
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=restore_after_first_failure)
    watcher.start()
    result = finetune(spec)
    watcher.join()

    assert result.stages["template"].metrics["rows"] == 12
    query = {"flow_runs": {"id": {"any_": [result.flow_run_id]}}}
    runs = httpx.post(f"{api_url}/task_runs/filter", json=query).json()
    (template_run,) = [run for run in runs if run["name"] == "template dataset"]
    assert template_run["run_count"] == 2 and template_run["state"]["type"] == "COMPLETED"


def test_corrupt_stage_output_is_rebuilt_and_unchanged_stages_reuse(prefect_harness, tiny_model, tmp_path):
    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    first = finetune(spec)
    tokenized = Path(first.stages["tokenize"].output_dir)
    (arrow,) = (tokenized / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])  # a truncated file in a finished output

    second = finetune(spec)
    ran = [name for name, manifest in second.stages.items() if not manifest.reused]
    assert ran == ["tokenize"], "only the damaged stage is rebuilt; its identical output keeps the rest reused"
    assert arrow.stat().st_size > 100

    # a change upstream reruns everything below it (a train-only change keeping the data stages:
    # the sweep's test, tests/test_sweep_compare_lineage.py)
    spec.dataset.template_vars = {"name": "Orion", "author": "Acme Labs"}
    third = finetune(spec)
    assert [name for name, m in third.stages.items() if m.reused] == ["model"]


def test_two_specs_at_once_in_one_workspace_reuse_shared_stages_safely(api_url, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    slow = tiny_spec(tiny_model, workspace)
    fast = tiny_spec(tiny_model, workspace)
    fast.name, fast.train.learning_rate = "tiny-other", 5e-4
    runs = [start_cli(slow, tmp_path, api_url), start_cli(fast, tmp_path, api_url)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs[0][-2000:] + outputs[1][-2000:]
    for stage in ("template", "tokenize"):
        assert len(list((workspace / "stages" / stage).glob("*/manifest.json"))) == 1, f"{stage} built once"
    assert len(list((workspace / "stages" / "train").glob("*/manifest.json"))) == 2
    assert len(list((workspace / "stages" / "export").glob("*/manifest.json"))) == 2
    assert (workspace / "models" / "tiny-test").is_dir() and (workspace / "models" / "tiny-other").is_dir()
