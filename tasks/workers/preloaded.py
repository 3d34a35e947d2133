"""The preloaded parent of the workers: it imports torch, transformers, peft, datasets and the worker
modules once, then forks a worker for each job the flow process sends it.

A worker started as `python -m tasks.workers.<name>` spends 8-12 s of a small CPU importing those
libraries before it computes anything, in every stage, of every run. Forked from this process it
starts with them imported, and is otherwise the same worker: its own session and process group,
its stdout a pipe to the stage task, stderr the flow's, the flow's environment, working folder and
CPU affinity, `python -m tasks.workers.<name> CONFIG` as its command line, and its exit status
reported back as a child's would be. tasks/contracts/preloaded_launch.py starts this process and
decides which jobs it takes (tasks/contracts/child_process.py launches the rest as before).

It talks over one socket, one end of a SOCK_SEQPACKET pair whose descriptor number is its one
argument: a job is a JSON message carrying three descriptors (the job's own socket, the stdout
pipe, stderr); the pid, then the exit status, go back over the job's socket. When the flow
process closes its end, or dies, this process kills its workers' process groups and exits; a
worker dies with it (PR_SET_PDEATHSIG), so nothing outlives the flow process, as with workers it
launches itself.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time
import traceback

IDLE_EXIT_SECONDS = 600  # with no worker for this long it exits, giving its memory back; the next job starts another
REAP_INTERVAL = 0.05
# What the workers import, in the order they import it. bitsandbytes stays out: it is imported only
# by a qlora stage, which tasks/contracts/preloaded_launch.py launches as a process of its own.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "datasets",
    "trl",
    "matplotlib.pyplot",  # the loss curve; Agg, as the train worker asks for it
    "tasks.workers.data",
    "tasks.workers.train",
    "tasks.workers.trl",
    "tasks.workers.evaluate",
    "tasks.workers.export",
    "tasks.workers.gguf",
)


def preload() -> None:
    sys.modules.setdefault("bitsandbytes", None)  # as worker_entry does for every worker that is not qlora
    import matplotlib

    matplotlib.use("Agg")  # before pyplot, which would otherwise look for a display
    for name in PRELOAD:
        __import__(name)
    import torch

    # A fork copies only the thread that calls it: safe while no Python thread runs (one could hold a
    # lock the child then waits on forever) and no CUDA context exists. The native threads torch and
    # pyarrow's allocator start at import prepare for a fork themselves (pthread_atfork), as they must
    # for DataLoader workers and `datasets.map(num_proc=)`, which fork the same way.
    if torch.cuda.is_initialized() or threading.active_count() > 1:
        raise RuntimeError("importing the workers' libraries started a thread or CUDA: forking is not safe")


def serve(control: socket.socket) -> None:
    jobs: dict[int, socket.socket] = {}  # worker pid -> the job's socket
    idle_since = time.monotonic()
    control.send(b'{"ready": true}')
    while True:
        readable, _, _ = select.select([control], [], [], REAP_INTERVAL)
        if readable:
            try:
                message, fds, _, _ = socket.recv_fds(control, 1 << 20, 3)
            except OSError:
                message, fds = b"", []
            if not message:  # the flow process closed its end or died
                break
            job_socket = socket.socket(fileno=fds[0])
            pid = os.fork()
            if pid == 0:
                become_worker(json.loads(message), job_socket, fds[1], fds[2], [control, *jobs.values()])
            os.close(fds[1])
            os.close(fds[2])
            with contextlib.suppress(OSError):
                job_socket.send(json.dumps({"pid": pid}).encode())
            jobs[pid] = job_socket
        reap(jobs)
        if jobs:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_EXIT_SECONDS:
            break
    for pid in jobs:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def reap(jobs: dict[int, socket.socket]) -> None:
    """Send each finished worker's exit status (negative: killed by that signal) to its job."""
    while jobs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        job_socket = jobs.pop(pid, None)
        if job_socket is not None:
            with contextlib.suppress(OSError):
                job_socket.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            job_socket.close()


def become_worker(job: dict, job_socket: socket.socket, stdout: int, stderr: int, inherited: list) -> None:
    """In the forked child: turn into `python -m MODULE ARGS` as launched from the flow process; never returns."""
    code = 1
    try:
        for sock in [job_socket, *inherited]:
            sock.close()
        os.setsid()  # its own process group, so the stage's stop reaches its children too
        from tasks.contracts.child_process import die_with_parent

        die_with_parent()
        if os.getppid() == 1:  # this process died before the request took effect
            os._exit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # SIGPIPE stays ignored, as Python sets it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        for source, target in ((null, 0), (stdout, 1), (stderr, 2)):
            os.dup2(source, target)
            os.close(source)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (the process's own stdin)
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), line_buffering=True)  # noqa: SIM115
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), line_buffering=True)  # noqa: SIM115
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.sched_setaffinity(0, job["affinity"])
        module, *args = job["argv"]
        name_process(f"{job['executable']} -m {module} {' '.join(args)}")
        code = run_as_main(module, args)
    except BaseException:  # noqa: BLE001 (a worker that cannot start reports why and exits 1)
        traceback.print_exc()
    finally:
        os._exit(code)


def name_process(title: str) -> None:
    """Show the worker's own command line in `ps` and /proc/PID/cmdline, not this process's."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def run_as_main(module: str, args: list[str]) -> int:
    """Run `module` as `python -m module args` would, and return the exit status it would have."""
    sys.argv = [module, *args]
    sys.modules.pop(module, None)  # as under `python -m`, where __main__ is the module's only copy
    atexit._clear()  # the handlers this process's imports registered clean up after it, not after the worker
    if "logging" in sys.modules:
        atexit.register(sys.modules["logging"].shutdown)  # the one a worker relies on: its log handlers flushed
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exit_status(exc.code)
    except KeyboardInterrupt as exc:
        print_uncaught(exc)
        code = 128 + signal.SIGINT
    except BaseException as exc:  # noqa: BLE001 (an uncaught exception: traceback on stderr, status 1, as Python does)
        print_uncaught(exc)
        code = 1
    with contextlib.suppress(BaseException):
        threading._shutdown()  # wait for the worker's non-daemon threads, as interpreter exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def print_uncaught(exc: BaseException) -> None:
    """The traceback Python would print, from runpy down: this module's own frame left out."""
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)


def exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    # setproctitle claims the memory of the command line and the environment on its first call, which
    # must come before a worker's environment replaces this one
    name_process("tunefactory: preloaded parent of the stage workers")
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 (the workers then start cold, as they would without it)
        print(f"tunefactory: workers start without preloading ({type(exc).__name__}: {exc})", file=sys.stderr)
        sys.exit(1)
    serve(control)


if __name__ == "__main__":
    main()
