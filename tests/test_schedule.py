"""Scheduled runs on a real Prefect server: `tunefactory serve` and `prefect deploy` with a worker.

Select them with `pytest -k "schedule or serve"`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import STAGE_TASK_RUNS, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = {"dataset-preview", "token-stats", "training-progress", "loss-curve", "evaluation", "answers", "export"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """`prefect server start` on a free loopback port with its own database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        raise AssertionError("the Prefect server did not start: " + (home / "server.log").read_text()[-2000:])
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def flow_runs(url: str, deployment_id: str) -> list[dict]:
    query = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{url}/flow_runs/filter", json=query).json()


def wait_for_completed_run(url: str, deployment_name: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        deployments = httpx.post(f"{url}/deployments/filter", json={}).json()
        for deployment in deployments:
            if deployment["name"] == deployment_name:
                done = [r for r in flow_runs(url, deployment["id"]) if r["state"]["type"] == "COMPLETED"]
                failed = [r for r in flow_runs(url, deployment["id"]) if r["state"]["type"] in ("FAILED", "CRASHED")]
                assert not failed, f"a scheduled run failed: {failed[0]['state']}"
                if done:
                    return done[0]
        time.sleep(2)
    raise AssertionError(f"no completed run of {deployment_name} within {timeout} s")


def assert_every_stage_and_artifact(url: str, flow_run: dict) -> None:
    query = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    task_runs = httpx.post(f"{url}/task_runs/filter", json=query).json()
    assert {run["name"] for run in task_runs} == STAGE_TASK_RUNS
    assert all(run["state"]["type"] == "COMPLETED" for run in task_runs)
    artifacts = httpx.post(f"{url}/artifacts/filter", json=query).json()
    keys = {artifact["key"] for artifact in artifacts}
    assert {f"{flow_run['name']}-{what}" for what in ARTIFACTS} <= keys, keys
    progress = [a for a in artifacts if a["key"].endswith("training-progress")]
    assert progress[0]["data"] == 100.0


def test_serve_runs_the_pipeline_on_its_schedule(prefect_server, tiny_model, tmp_path):
    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    spec.name = "served-tiny"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = tmp_path / "serve.log"
    command = [str(BIN / "tunefactory"), "serve", str(path), "--interval", "15"]
    with log.open("w") as out:
        serve = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        flow_run = wait_for_completed_run(prefect_server, "served-tiny", timeout=420)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{log.read_text()[-3000:]}") from None
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    assert flow_run["name"] == "served-tiny"
    assert flow_run["parameters"]["spec"]["name"] == "served-tiny"
    assert_every_stage_and_artifact(prefect_server, flow_run)
    deployment = httpx.get(f"{prefect_server}/deployments/{flow_run['deployment_id']}").json()
    assert deployment["schedules"][0]["schedule"]["interval"] == 15
    schema = deployment["parameter_openapi_schema"]
    assert "spec" in schema["properties"], "the spec is the flow's parameter, rendered as a form"
    assert "learning_rate" in str(schema["definitions"]["TrainSpec"]["properties"])
