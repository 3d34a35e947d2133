"""`tunefactory api` as a child process of a tool (make bench-recording, make loop-demo): started on a
free loopback port with its output in a log file, waited for until it answers, stopped with SIGTERM
(a recording server writes what it has queued before it exits)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# the command line through this interpreter: no reliance on the venv's bin/ being on PATH
RUN_CLI = "import sys\nfrom flows.cli import main\nsys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model: str, port: int, log: Path, *options: str) -> subprocess.Popen:
    """`tunefactory api MODEL --port PORT OPTIONS`, its output appended to `log`."""
    with log.open("ab") as output:
        command = [sys.executable, "-c", RUN_CLI, "api", model, "--port", str(port), *options]
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not answer within {timeout:.0f} s; see {log}")


def stop(process: subprocess.Popen, timeout: float = 120.0) -> None:
    if process.poll() is None:
        process.terminate()
    process.wait(timeout=timeout)
