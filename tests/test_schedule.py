"""The servers of `make ui`, scheduled runs on them, and their UIs in a real browser.

One Prefect server and one MLflow server are started the way `make ui` starts them, on free
loopback ports, for a workspace of their own. On them: `tunefactory serve` runs the tiny
pipeline on an interval schedule; `prefect deploy` of deployments/prefect.yaml hands a run
to a process worker; headless Chromium opens both UIs; `make ui-stop`'s command stops both.

Select them with `pytest -k "schedule or serve or browser or ui"`. Screenshots go to
workspace/screenshots/ (or $TUNEFACTORY_SCREENSHOTS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from headless_chromium import Browser
from loopback import prefect_csrf_headers
from mlflow.tracking import MlflowClient
from tiny_pipeline import STAGE_TASK_RUNS, tiny_spec

from tasks.runtime import local_servers
from tasks.runtime.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = {"dataset-preview", "token-stats", "training-progress", "loss-curve", "evaluation", "answers", "export"}
STAGES = {"model", "template", "tokenize", "train", "evaluate", "export"}
SCREENSHOTS = Path(os.environ.get("TUNEFACTORY_SCREENSHOTS", ROOT / "workspace" / "screenshots"))


def prefect_api(method: str, url: str, **kwargs) -> httpx.Response:
    """A request to the Prefect server, with the CSRF token its writes need, repeated while it
    answers 503: on SQLite it does when a write meets another one (`database is locked`) while
    `serve` schedules runs every 15 s."""
    api = url[: url.index("/api") + len("/api")]
    headers = prefect_csrf_headers(api) if method != "GET" else {}
    deadline = time.time() + 60
    while True:
        response = httpx.request(method, url, headers=headers, **kwargs)
        if response.status_code != 503 or time.time() > deadline:
            return response
        time.sleep(1)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no server chosen by anyone but the workspace."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def tunefactory(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "tunefactory"), *args],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def write_spec(tiny_model: Path, workspace: Path, name: str, directory: Path) -> tuple[Path, dict]:
    spec = tiny_spec(tiny_model, workspace)
    spec.name = name
    data = spec.model_dump(mode="json")
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def flow_runs_of(api: str, deployment_name: str) -> list[dict]:
    deployments = prefect_api("POST", f"{api}/deployments/filter", json={}).json()
    ids = [d["id"] for d in deployments if d["name"] == deployment_name]
    if not ids:
        return []
    return prefect_api("POST", f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": ids}}}).json()


def wait_for_completed_run(
    api: str, deployment_name: str, timeout: float, log: Path, states: tuple[str, ...] = ("COMPLETED",)
) -> dict:
    """The first run of the deployment found in one of `states` (a failed one fails the test)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = flow_runs_of(api, deployment_name)
        failed = [r for r in runs if r["state"]["type"] in ("FAILED", "CRASHED")]
        assert not failed, f"a run of {deployment_name} failed: {failed[0]['state']}\n{log.read_text()[-3000:]}"
        done = [r for r in runs if r["state"]["type"] in states]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError(f"no run of {deployment_name} in {states} within {timeout} s\n{log.read_text()[-3000:]}")


def assert_every_stage_and_artifact(api: str, flow_run: dict) -> None:
    query = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    task_runs = prefect_api("POST", f"{api}/task_runs/filter", json=query).json()
    assert {run["name"] for run in task_runs} == STAGE_TASK_RUNS
    assert all(run["state"]["type"] == "COMPLETED" for run in task_runs)
    artifacts = prefect_api("POST", f"{api}/artifacts/filter", json=query).json()
    keys = {artifact["key"] for artifact in artifacts}
    assert {f"{flow_run['name']}-{what}" for what in ARTIFACTS} <= keys, keys
    progress = [a for a in artifacts if a["key"].endswith("training-progress")]
    assert progress[0]["data"] == 100.0


def assert_pipeline_run_in_mlflow(mlflow_url: str, flow_run: dict) -> None:
    """The run reported to the MLflow server: a parent run for the flow run, a child run per stage."""
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(flow_run["name"])
    assert experiment is not None, f"no MLflow experiment {flow_run['name']} on {mlflow_url}"
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.prefect_flow_run_id = '{flow_run['id']}'", max_results=5
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'", max_results=50
    )
    assert {run.data.tags["stage"] for run in children} == STAGES


def wait_for_flow_process_exit(flow_run_id: str, timeout: float = 90) -> None:
    """Until no process runs the flow run (the runner marks it by environment variable).

    Stopping a runner whose just-finished flow process is still exiting makes Prefect mark
    the completed run Cancelled ("Runner is shutting down."); a user stopping `serve` by hand
    seconds after a run would see the same.
    """
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = False
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                alive = alive or marker in environ.read_bytes().split(b"\0")
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"the process of flow run {flow_run_id} did not exit within {timeout} s")


def pause(api: str, deployment_id: str) -> None:
    """Pause the deployment's schedule; Prefect deletes the runs it had scheduled ahead."""
    prefect_api("PATCH", f"{api}/deployments/{deployment_id}", json={"paused": True}).raise_for_status()


def settle(api: str, deployment_id: str, timeout: float = 240) -> None:
    """Pause the schedule and let every started run finish and its process exit, so that
    stopping `serve` interrupts nothing (an interrupted run is rightly marked Cancelled)."""
    pause(api, deployment_id)
    query = {"deployments": {"id": {"any_": [deployment_id]}}}
    deadline = time.time() + timeout
    while True:
        runs = prefect_api("POST", f"{api}/flow_runs/filter", json=query).json()
        busy = [r for r in runs if r["state"]["type"] in ("PENDING", "RUNNING", "CANCELLING")]
        if not busy:
            break
        assert time.time() < deadline, f"runs still busy after {timeout} s: {[r['name'] for r in busy]}"
        time.sleep(1)
    for run in runs:
        wait_for_flow_process_exit(run["id"])
    time.sleep(2)  # the runner forgets a finished process a moment after it exits


@pytest.fixture(scope="module")
def served_run(ui_servers, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`tunefactory serve --interval 15` in a plain shell: it finds the servers through the workspace."""
    workspace, servers = ui_servers
    directory = tmp_path_factory.mktemp("served")
    path, _ = write_spec(tiny_model, workspace, "served-tiny", directory)
    log = directory / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [str(BIN / "tunefactory"), "serve", str(path), "--interval", "15"],
            cwd=ROOT,
            env=clean_env(PREFECT_RUNNER_POLL_FREQUENCY="2"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = servers.prefect_api_url
    try:
        started = wait_for_completed_run(api, "served-tiny", timeout=300, log=log, states=("RUNNING", "COMPLETED"))
        # the schedule has shown it runs: paused now, the runner starts no second run of the same
        # pipeline once this one ends (a minute of one core in the test run, for nothing)
        pause(api, started["deployment_id"])
        flow_run = wait_for_completed_run(api, "served-tiny", timeout=300, log=log)
        assert flow_run["id"] == started["id"]
        settle(api, flow_run["deployment_id"])
        return flow_run
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def test_serve_runs_the_pipeline_on_its_schedule_and_reports_to_the_ui_servers(ui_servers, served_run):
    _, servers = ui_servers
    api = servers.prefect_api_url
    assert served_run["name"] == "served-tiny"
    state = prefect_api("GET", f"{api}/flow_runs/{served_run['id']}").json()["state"]
    assert state["type"] == "COMPLETED", f"still completed after `serve` stopped: {state}"
    assert served_run["parameters"]["spec"]["name"] == "served-tiny"
    assert_every_stage_and_artifact(api, served_run)
    assert_pipeline_run_in_mlflow(servers.mlflow_url, served_run)
    deployment = prefect_api("GET", f"{api}/deployments/{served_run['deployment_id']}").json()
    assert deployment["schedules"][0]["schedule"]["interval"] == 15
    schema = deployment["parameter_openapi_schema"]
    assert "spec" in schema["properties"], "the spec is the flow's parameter, rendered as a form"
    train_fields = schema["definitions"]["TrainSpec"]["properties"]
    assert train_fields["learning_rate"]["description"] and "default" in train_fields["learning_rate"]


def test_schedule_from_prefect_yaml_runs_on_a_process_worker(ui_servers, tiny_model, tmp_path):
    """The README's commands: create the pool, `prefect deploy --all`, start a worker."""
    workspace, servers = ui_servers
    env = clean_env(PREFECT_API_URL=servers.prefect_api_url)

    def prefect(*args: str, timeout: float = 120) -> str:
        command = [str(BIN / "prefect"), "--no-prompt", *args]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    prefect("work-pool", "create", "tunefactory-process", "--type", "process")
    prefect("deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    deployments = prefect_api("POST", f"{servers.prefect_api_url}/deployments/filter", json={}).json()
    nightly = next(d for d in deployments if d["name"] == "self-cognition-nightly")
    assert nightly["work_pool_name"] == "tunefactory-process"
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["spec"]["name"] == "self-cognition"

    # tonight's run would train SmolLM2 for minutes; a run now with the tiny model proves the path
    _, spec = write_spec(tiny_model, workspace, "deployed-tiny", tmp_path)
    # another assistant name, so the stages run (and publish) instead of reusing the served run's
    spec["dataset"]["template_vars"]["name"] = "Orion"
    prefect("deployment", "run", "finetune/self-cognition-nightly", "--params", json.dumps({"spec": spec}))
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "tunefactory-process", "--run-once"],
            cwd=tmp_path,  # the deployment's pull step moves the run into the repository
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=420,
        )
    assert worker.returncode == 0, log.read_text()[-3000:]
    flow_run = wait_for_completed_run(servers.prefect_api_url, "self-cognition-nightly", timeout=30, log=log)
    assert flow_run["name"] == "deployed-tiny"
    assert_every_stage_and_artifact(servers.prefect_api_url, flow_run)
    assert_pipeline_run_in_mlflow(servers.mlflow_url, flow_run)


def test_schedule_on_kubernetes_gpu_pool_template_renders_a_one_gpu_job(ui_servers):
    """deployments/kubernetes-gpu-pool.json: accepted by the server, renders a job asking for one GPU."""
    from prefect.utilities.templating import apply_values

    _, servers = ui_servers
    template = json.loads((ROOT / "deployments" / "kubernetes-gpu-pool.json").read_text())
    created = prefect_api(
        "POST",
        f"{servers.prefect_api_url}/work_pools/",
        json={"name": "tunefactory-gpu", "type": "kubernetes", "base_job_template": template},
    )
    assert created.status_code == 201, created.text
    variables = template["variables"]["properties"]
    defaults = {name: field["default"] for name, field in variables.items() if "default" in field}
    # labels reach the pod too: a Service selects node 0 of a multi-node train stage by them
    labels = {"tunefactory/train-node": "0"}
    values = {**defaults, "name": "nightly", "command": "python -m x", "labels": labels}
    job = apply_values(template["job_configuration"], values)
    assert "{{" not in json.dumps(job), "every placeholder has a declared variable"
    assert job["job_manifest"]["spec"]["template"]["metadata"]["labels"] == labels
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["job_manifest"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]


def test_browser_prefect_ui_shows_the_flow_run_with_its_stage_task_runs(ui_servers, served_run):
    _, servers = ui_servers
    browser = Browser()
    try:
        browser.open(f"{servers.prefect_url}/runs/flow-run/{served_run['id']}")
        browser.wait_for_text("served-tiny", "Completed", "Task Runs")
        browser.click("Task Runs")
        browser.wait_for_text(
            *STAGE_TASK_RUNS, f"{len(STAGE_TASK_RUNS)} Task runs", f"({len(STAGE_TASK_RUNS)} Completed)"
        )
        shot = browser.screenshot(SCREENSHOTS / "prefect_flow_run.png")
        # a click while the tab bar is still settling can be lost (seen once in CI): click again
        for attempt in range(6):
            browser.click("Artifacts")
            try:
                artifacts = ("served-tiny-loss-curve", "served-tiny-evaluation", "served-tiny-export")
                browser.wait_for_text(*artifacts, timeout=10)
                break
            except AssertionError:
                if attempt == 5:
                    raise
        browser.screenshot(SCREENSHOTS / "prefect_artifacts.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 20_000, "a rendered page, not a blank one"


def test_browser_mlflow_ui_shows_the_pipeline_run_with_its_stage_runs(ui_servers, served_run):
    _, servers = ui_servers
    client = MlflowClient(tracking_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name("served-tiny")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{served_run['id']}'")
    browser = Browser()
    try:
        browser.open(f"{servers.mlflow_url}/#/experiments/{experiment.experiment_id}/runs")
        browser.wait_for_text("Run Name", "served-tiny")
        # stage runs are nested under the pipeline run; the row's "+" unfolds them. The table draws
        # the run's name before it knows the run has children: wait for the button, not the name
        browser.wait_for_script(
            "(() => { const b = document.querySelector('button[data-component-id*=runnamecellrenderer]');"
            " if (!b) return false; b.click(); return true; })()",
            "an expandable pipeline run with stage runs under it",
        )
        browser.wait_for_text(*(name for name in STAGES))
        shot = browser.screenshot(SCREENSHOTS / "mlflow_runs.png")
        browser.open(f"{servers.mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")

        def child_runs(text: str) -> str:
            start = text.find("Child runs")
            return text[start : text.find("Source", start)] if start >= 0 else ""

        # the run page fills in its child runs after a second request ("Child runs loading")
        browser.wait_until(
            lambda text: parent.info.run_id in text and all(stage in child_runs(text) for stage in STAGES),
            f"the child runs {sorted(STAGES)} of {parent.info.run_id}",
        )
    finally:
        browser.close()
    assert shot.stat().st_size > 20_000, "a rendered page, not a blank one"


def test_ui_stop_stops_both_servers_and_runs_fall_back_to_the_workspace(ui_servers):
    workspace, servers = ui_servers
    tunefactory("ui", "stop", "--workspace", str(workspace))
    for url in (f"{servers.prefect_api_url}/health", f"{servers.mlflow_url}/health"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=3)
    for pid in servers.pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not (workspace / local_servers.RECORD).exists()
    assert tracking_uri(workspace).startswith("sqlite:///"), "no run assumes a server that is gone"
