"""The Prefect server and MLflow tracking server that `make ui` starts on loopback, and the
temporary Prefect server of one command.

Both keep their databases and logs in the workspace. While they answer, runs of that
workspace report to them; when they are stopped (or never started) runs fall back to
Prefect's local history and the workspace's SQLite file, so nothing depends on a service
that nothing started. `workspace/servers.json` records what was started, for `make ui-stop`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from tasks.contracts.child_process import die_with_parent

RECORD = "servers.json"
BIN = Path(sys.executable).parent


class Servers(BaseModel):
    prefect_url: str  # the UI; the API is under /api
    mlflow_url: str
    pids: dict[str, int]

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"


class ServerError(RuntimeError):
    """A server did not come up; the message names its log."""


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _healthy(servers: Servers) -> bool:
    return _answers(f"{servers.prefect_api_url}/health") and _answers(f"{servers.mlflow_url}/health")


def recorded(workspace: Path) -> Servers | None:
    record = Path(workspace) / RECORD
    if not record.exists():
        return None
    return Servers.model_validate_json(record.read_text())


def running(workspace: Path) -> Servers | None:
    """The workspace's servers if they were started and both answer now."""
    servers = recorded(workspace)
    return servers if servers is not None and _healthy(servers) else None


def _launch(command: list[str], log: Path, env: dict[str, str]) -> int:
    with log.open("a") as out:
        # a session of its own: the servers outlive `make ui`, and stop as one group
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process.pid


def _wait_until_up(name: str, url: str, log: Path, pid: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _answers(url):
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ServerError(f"the {name} server exited while starting; see {log}") from None
        time.sleep(1)
    raise ServerError(f"the {name} server did not answer at {url} within {timeout:.0f} s; see {log}")


def start(workspace: Path, prefect_port: int = 4200, mlflow_port: int = 5000) -> Servers:
    """Start both servers in the background (or return the ones already running)."""
    workspace = Path(workspace).resolve()
    already = running(workspace)
    if already is not None:
        return already
    stop(workspace)  # a stale record from servers that died
    logs = workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    host = "127.0.0.1"
    prefect_env = {
        **env,
        "PREFECT_HOME": str(workspace / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the UI's API address follows the settings, not --port; without this it calls :4200
        "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api",
    }
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)]
    mlflow_cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workspace / 'mlflow.db'}",
        "--default-artifact-root",
        (workspace / "mlartifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(mlflow_port),
        "--workers",
        "1",
    ]
    servers = Servers(
        prefect_url=f"http://{host}:{prefect_port}",
        mlflow_url=f"http://{host}:{mlflow_port}",
        pids={
            "prefect": _launch(prefect_cmd, logs / "prefect-server.log", prefect_env),
            "mlflow": _launch(mlflow_cmd, logs / "mlflow-server.log", {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}),
        },
    )
    (workspace / RECORD).write_text(servers.model_dump_json(indent=2))
    try:
        _wait_until_up(
            "Prefect", f"{servers.prefect_api_url}/health", logs / "prefect-server.log", servers.pids["prefect"]
        )
        _wait_until_up("MLflow", f"{servers.mlflow_url}/health", logs / "mlflow-server.log", servers.pids["mlflow"])
    except ServerError:
        stop(workspace)
        raise
    return servers


def _stop_group(pid: int, timeout: float = 30) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop(workspace: Path) -> Servers | None:
    """Stop the recorded servers and their children; returns what was stopped."""
    servers = recorded(workspace)
    if servers is None:
        return None
    for pid in servers.pids.values():
        _stop_group(pid)
    (Path(workspace) / RECORD).unlink(missing_ok=True)
    return servers


class TemporaryPrefectServer:
    """Prefect's temporary server for one command, launched before anything heavy is imported.

    Without a server to report to, Prefect starts a temporary one when the flow begins and
    waits about 10 s for it. Launched first thing instead, it boots on another core while the
    command imports its libraries and checks the spec and data. It is the server Prefect would
    start (same app, same local history), and it stops when the command exits, after
    Prefect's own exit handlers have sent their last logs to it.
    """

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent
        )
        atexit.register(self.stop)  # registered before Prefect's handlers, so it runs after them

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"Prefect's temporary server exited while starting: {self.process.stderr.read()[-2000:]}"
                )
            if _answers(f"{self.api_url}/health"):
                return
            time.sleep(0.1)
        raise ServerError(f"Prefect's temporary server did not answer at {self.api_url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
