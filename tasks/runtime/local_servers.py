"""The Prefect server and MLflow tracking server that `make ui` starts on loopback, and the
temporary Prefect server of one command.

Both keep their databases and logs in the workspace. While they answer, runs of that
workspace report to them; when they are stopped (or never started) runs fall back to
Prefect's local history and the workspace's SQLite file, so nothing depends on a service
that nothing started. `workspace/servers.json` records what was started, for `make ui-stop`.

A server is taken for this workspace's only while the process recorded for it is the one that
was started: same boot, same start time (a process id alone is reused after a reboot or once
the process is gone). So another workspace's servers answering on the same ports are never
reported to, and `ui stop` never signals a process it did not start.
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
from pydantic import BaseModel, Field, ValidationError

from tasks.contracts.child_process import die_with_parent
from tasks.runtime.browser_guard import MLFLOW_APP_NAME, guard_environment

RECORD = "servers.json"
BIN = Path(sys.executable).parent
GUARDED_PREFECT_APP = "tasks.runtime.browser_guard:prefect_app"


class Servers(BaseModel):
    prefect_url: str  # the UI; the API is under /api
    mlflow_url: str
    pids: dict[str, int]
    # each process's identity when it was started (process_identity); a record without one is
    # from an older tunefactory and is not trusted
    identities: dict[str, str | None] = Field(default_factory=dict)

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


def process_identity(pid: int) -> str | None:
    """'<boot id>/<start time>' of a live process on Linux, which no later process shares; None
    where /proc cannot tell (the process is gone, or another system)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name in parentheses may hold spaces; field 22 (start time) is the 20th after it
    return f"{boot}/{stat.rsplit(')', 1)[1].split()[19]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours
        return True
    return True


def is_ours(servers: Servers, name: str) -> bool:
    """Whether the process recorded for server `name` is still the one that was started."""
    pid, started = servers.pids.get(name), servers.identities.get(name, "unrecorded")
    if pid is None or started == "unrecorded" or not _alive(pid):
        return False
    return process_identity(pid) == started


def recorded(workspace: Path) -> Servers | None:
    record = Path(workspace) / RECORD
    if not record.exists():
        return None
    try:
        return Servers.model_validate_json(record.read_bytes())
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "the file"
        raise ServerError(
            f"{record}: not a record of this workspace's servers ({where}: {problem['msg']}); "
            "if no `tunefactory ui` of this workspace is running, delete the file"
        ) from None


def _write_record(workspace: Path, servers: Servers) -> None:
    record = Path(workspace) / RECORD
    partial = record.with_name(RECORD + ".partial")
    partial.write_text(servers.model_dump_json(indent=2))
    os.replace(partial, record)  # never half a record, even if `ui start` is killed while writing


def running(workspace: Path) -> Servers | None:
    """The workspace's servers if this workspace started them, they still run, and both answer now."""
    servers = recorded(workspace)
    if servers is None or not all(is_ours(servers, name) for name in ("prefect", "mlflow")):
        return None
    return servers if _healthy(servers) else None


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is not "taken"
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


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


def _server_commands(
    workspace: Path, host: str, prefect_port: int, mlflow_port: int
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The command line and environment of each server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    prefect_env = {
        **env,
        **guard_environment(prefect_port),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT__SERVER_FINAL": "1",
        # the UI's API address follows the settings, not --port; without this it calls :4200
        "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api",
    }
    # what `prefect server start` runs (its app, its services, its UI), with the browser guards
    prefect_cmd = [sys.executable, "-m", "uvicorn", "--factory", GUARDED_PREFECT_APP]
    prefect_cmd += ["--host", host, "--port", str(prefect_port)]
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
        "--app-name",  # MLflow's app behind tunefactory's browser guard
        MLFLOW_APP_NAME,
    ]
    mlflow_env = {**env, **guard_environment(mlflow_port), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return {"prefect": (prefect_cmd, prefect_env), "mlflow": (mlflow_cmd, mlflow_env)}


def start(workspace: Path, prefect_port: int = 4200, mlflow_port: int = 5000) -> Servers:
    """Start both servers in the background (or return the ones already running)."""
    workspace = Path(workspace).resolve()
    already = running(workspace)
    if already is not None:
        return already
    stop(workspace)  # a stale record from servers that died
    logs = workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    for name, port, option in (("Prefect", prefect_port, "--prefect-port"), ("MLflow", mlflow_port, "--mlflow-port")):
        if _port_taken(host, port):
            raise ServerError(
                f"port {port} on {host}, for the {name} server, is in use by a program this workspace did not start "
                f"(another workspace's servers?): stop it, or choose a free port with {option}"
            )
    pids = {
        name: _launch(command, logs / f"{name}-server.log", environment)
        for name, (command, environment) in _server_commands(workspace, host, prefect_port, mlflow_port).items()
    }
    servers = Servers(
        prefect_url=f"http://{host}:{prefect_port}",
        mlflow_url=f"http://{host}:{mlflow_port}",
        pids=pids,
        identities={name: process_identity(pid) for name, pid in pids.items()},
    )
    _write_record(workspace, servers)
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


def stop(workspace: Path) -> list[str] | None:
    """Stop the recorded servers that this workspace started, and their children: the names of
    those stopped (a recorded process that is gone, or is now another, is left alone), or None
    without a record."""
    servers = recorded(workspace)
    if servers is None:
        return None
    stopped = [name for name in servers.pids if is_ours(servers, name)]
    for name in stopped:
        _stop_group(servers.pids[name])
    (Path(workspace) / RECORD).unlink(missing_ok=True)
    return stopped


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
            **guard_environment(port),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", GUARDED_PREFECT_APP]
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
