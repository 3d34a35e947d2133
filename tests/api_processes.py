"""`tunefactory api` as its own process, as a user starts it: started, waited for, stopped (the API tests share it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import httpx
from loopback import free_port, wait_for

KEY = "sk-tunefactory-test"
RUN_CLI = "import sys\nfrom flows.cli import main\nsys.exit(main(sys.argv[1:]))"


class Server(NamedTuple):
    url: str
    process: subprocess.Popen
    scratch: Path  # its TMPDIR, where the copy it serves lives
    log: Path


def start_api(model: Path, directory: Path, *options: str, prelude: str = "") -> Server:
    """`tunefactory api MODEL OPTIONS` in its own process, its temporary files in `directory`/tmp."""
    port, scratch, log = free_port(), directory / "tmp", directory / "server.log"
    scratch.mkdir(exist_ok=True)
    command = [sys.executable, "-c", f"{prelude}\n{RUN_CLI}", "api", str(model), "--port", str(port), *options]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=directory, env=server_environment(scratch), stdout=output, stderr=subprocess.STDOUT
        )
    return Server(f"http://127.0.0.1:{port}", process, scratch, log)


def server_environment(scratch: Path) -> dict[str, str]:
    """This process's environment, its temporary files in `scratch`, and MLflow left to the workspace
    (a test before may have set MLFLOW_TRACKING_URI here, which the server would follow)."""
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def serving(server: Server) -> Server:
    def healthy() -> bool:
        assert server.process.poll() is None, f"the API server exited: {server.log.read_text()[-2000:]}"
        return answers(f"{server.url}/health")

    wait_for(healthy, 180, "the API server to answer")
    return server


def stop(server: Server) -> None:
    server.process.terminate()
    assert server.process.wait(timeout=60) == 0, server.log.read_text()[-2000:]
