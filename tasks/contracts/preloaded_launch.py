"""Workers forked from a preloaded parent (tasks/workers/preloaded.py) instead of started cold.

A worker's first 8-12 s on a small CPU are its imports (torch, transformers, peft, datasets),
paid again by every stage of every run. The flow process therefore starts one preloaded parent
when a pipeline run opens (or at its first worker, outside a pipeline), and launches each worker
from it once it is ready:
the same module, config, environment, working folder, CPU affinity, process group and exit
status as `python -m`, without the imports. The flow process still imports no torch.

A worker launched while the parent still imports (about 10 s on a small CPU) waits for it, unless
its job does not load those libraries (templating: datasets alone), which starts cold at once.

Where forking would not be the same process, the worker is started cold, as before:
- a qlora job, which needs bitsandbytes, which the parent leaves out (its import sets up kernels
  that only a 4-bit model uses);
- a launch through torchrun, whose ranks are started by torchrun itself;
- a machine with a GPU: a CUDA context does not survive a fork, and there the imports are small
  against the work;
- an environment that differs from the parent's in a variable a library may read at import
  (anything but the TUNEFACTORY_, PYTEST_, PREFECT_ and MLFLOW_ variables, read when used, and
  one that the flow process's own imports set);
- TUNEFACTORY_PRELOADED_WORKERS=0, which turns preloading off.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

SWITCH = "TUNEFACTORY_PRELOADED_WORKERS"
READ_WHEN_USED = ("TUNEFACTORY_", "PYTEST_", "PREFECT_", "MLFLOW_")
# set in the flow process by scikit-learn's import (through MLflow), after the parent started; it is
# read by Intel's OpenMP runtime, which torch's builds for Linux do not load
SET_BY_THE_FLOWS_IMPORTS = frozenset({"KMP_DUPLICATE_LIB_OK"})
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd")


def import_environment(env: dict[str, str]) -> frozenset[tuple[str, str]]:
    """The variables of `env` a library may read when it is imported: those the parent must share."""
    return frozenset(
        (key, value)
        for key, value in env.items()
        if not key.startswith(READ_WHEN_USED) and key not in SET_BY_THE_FLOWS_IMPORTS
    )


def preloading_allowed(env: dict[str, str]) -> bool:
    """Linux (descriptors passed over a Unix socket, PR_SET_PDEATHSIG), no accelerator, not switched off."""
    return (
        sys.platform.startswith("linux")
        and env.get(SWITCH, "1") != "0"
        and not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)
    )


class PreloadedWorker:
    """A worker forked by the preloaded parent, used as the `subprocess.Popen` of a cold one is."""

    def __init__(self, command: list[str], pid: int, stdout: IO[str], job: socket.socket, parent: PreloadedParent):
        self.args = command
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._job = job
        self._parent = parent

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        readable, _, _ = select.select([self._job], [], [], timeout)
        if not readable:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        try:
            message = self._job.recv(4096)
        except OSError:
            message = b""
        # no status: the parent died, and the worker with it (PR_SET_PDEATHSIG sends it SIGKILL)
        self.returncode = json.loads(message)["returncode"] if message else -signal.SIGKILL
        self._job.close()
        self._parent.finished()
        return self.returncode


class PreloadedParent:
    """The running tasks/workers/preloaded.py process, and the socket it takes jobs on."""

    def __init__(self, env: dict[str, str]):
        self.imports = import_environment(env)
        self.ready = threading.Event()
        self.settled = threading.Event()  # ready, or gone without getting there
        self.alive = True
        self.running = 0  # its workers not yet waited for
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tasks.workers.preloaded", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is the flow's to handle, as for a worker
                env=env,
            )
        threading.Thread(target=self._watch, name="preloaded-workers", daemon=True).start()

    def _watch(self) -> None:
        """Mark it ready when it says so, and gone when its socket closes (it failed, or idled out)."""
        while True:
            try:
                message = self._control.recv(4096)
            except OSError:
                message = b""
            if not message:
                break
            self.ready.set()
            self.settled.set()
        self.alive = False
        self.ready.clear()
        self.settled.set()
        self._process.wait()

    def start(self, command: list[str], module: str, env: dict[str, str]) -> PreloadedWorker | None:
        """Fork `python -m module ARGS` from it; None if it went away meanwhile."""
        job, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        read_end, write_end = os.pipe()
        request = {
            "executable": command[0],
            "argv": [module, *command[command.index(module) + 1 :]],
            "env": env,
            "cwd": os.getcwd(),
            "affinity": sorted(os.sched_getaffinity(0)),
        }
        try:
            socket.send_fds(self._control, [json.dumps(request).encode()], [theirs.fileno(), write_end, 2])
        except OSError:
            pass
        finally:  # before waiting: if the parent goes away, the job's socket then reads as closed
            theirs.close()
            os.close(write_end)
        try:
            message = job.recv(4096)
        except OSError:
            message = b""
        if not message:
            os.close(read_end)
            job.close()
            return None
        stdout = open(read_end, encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115 (the worker's)
        with _lock:
            self.running += 1
        return PreloadedWorker(command, json.loads(message)["pid"], stdout, job, self)

    def finished(self) -> None:
        with _lock:
            self.running -= 1

    def close(self) -> None:
        """Stop it (its workers with it): the end of its socket is the end of its life. Shut down before
        closed, which alone would neither wake the thread reading it nor tell the parent."""
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)
        self._control.close()


_parent: PreloadedParent | None = None
_lock = threading.RLock()


def launch(command: list[str], module: str, env: dict[str, str], wait: float = 0.0) -> PreloadedWorker | None:
    """`command` (`python -m module ...`) forked from the preloaded parent, or None: start it cold.

    The first call starts the parent. While it imports, a call waits up to `wait` seconds for it
    (a worker that would import the same libraries beside it, on the same cores, would only slow
    both down), and starts cold after that or with `wait` 0. A call whose environment differs from
    the parent's where imports could read it starts cold too, and replaces the parent with one of
    its own environment once the old one's workers have ended.
    """
    if not preloading_allowed(env):
        return None
    with _lock:
        parent = _current_parent(env)
    if parent is None or not parent.settled.wait(wait) or not parent.ready.is_set():
        return None
    return parent.start(command, module, env)


def warm_up(env: dict[str, str], wait: float = 0.0) -> bool:
    """Start the parent for `env` now if there is none; whether it is ready within `wait` seconds
    (0: do not wait; a caller that would rather wait than start its worker cold gives a time)."""
    if not preloading_allowed(env):
        return False
    with _lock:
        parent = _current_parent(env)
    return parent is not None and parent.ready.wait(wait)


def _current_parent(env: dict[str, str]) -> PreloadedParent | None:
    """The parent for `env`, started if need be; None while another's workers still run."""
    global _parent
    if _parent is not None and _parent.alive and _parent.imports == import_environment(env):
        return _parent
    if _parent is not None and _parent.alive:
        if _parent.running:
            return None
        _parent.close()
    _parent = PreloadedParent(env)
    return _parent
