"""The one way heavy compute is launched: a child Python process that streams JSON events.

Training, evaluation and export run as `python -m tasks.workers.<name> CONFIG.json`, so the
flow process never imports CUDA and a crash or kill of the worker cannot take the flow down.
A worker prints events (tasks/contracts/worker_events.py) as `@@tunefactory {json}` lines on
stdout; other stdout lines go to the Prefect log; stderr (progress bars) goes straight to the
terminal. Stopping the task
(Ctrl-C, cancellation) terminates the worker's whole process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from tasks.contracts import preloaded_launch
from tasks.contracts.worker_events import Event, Failed, Note, WorkerEvent

EVENT_PREFIX = "@@tunefactory "
PR_SET_PDEATHSIG = 1
# how long a worker waits for a preloaded parent still importing (about 10 s on a small CPU) before it
# starts cold; the parent started first, so waiting for it is never slower than importing beside it
PARENT_WAIT_S = 120.0


_compute_seconds = [0.0]
_compute_lock = threading.Lock()


@contextlib.contextmanager
def model_compute():
    """Count the time inside as model compute, which the run's report separates from orchestration."""
    start = time.perf_counter()
    try:
        yield
    finally:
        with _compute_lock:
            _compute_seconds[0] += time.perf_counter() - start


def model_compute_seconds() -> float:
    """Model compute so far in this process: worker processes and model conversion."""
    return _compute_seconds[0]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one): what the processes
    and threads it starts share, since more of them than cores only contend."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerError(RuntimeError):
    """A worker failed; the message says why in words meant for the user."""


class ProbablyOutOfMemory(WorkerError):
    """A worker died without a word (a signal) while the kernel's out-of-memory killer killed a process."""


VMSTAT = Path("/proc/vmstat")  # Linux's counters since boot, its oom_kill among them (kernel 4.13 and later)


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed on this machine, or None where unknown.

    It counts the kills of every cgroup's limit too, so a worker killed while it rose was probably
    killed for memory: probably, because the count is the machine's, not the worker's.
    """
    try:
        counters = dict(line.split() for line in VMSTAT.read_text().splitlines() if line.count(" ") == 1)
        return int(counters["oom_kill"])
    except (OSError, KeyError, ValueError):
        return None


EVENTS: TypeAdapter[WorkerEvent] = TypeAdapter(WorkerEvent)
EventKind = TypeVar("EventKind", bound=Event)


def emit(event: Event, every_rank: bool = False) -> None:
    """Send one event from a worker to the task that launched it (from rank 0 only, under torchrun,
    unless `every_rank`: what one rank alone may have to say, as that it ran out of memory)."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(EVENT_PREFIX + event.model_dump_json(), flush=True)


def read_event(line: str, module: str) -> WorkerEvent:
    """An event line as its model; one that is not in the contract is the worker's bug, named."""
    try:
        return EVENTS.validate_json(line[len(EVENT_PREFIX) :])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise WorkerError(
            f"{module} sent an event that is not in tasks/contracts/worker_events.py ({problems})"
        ) from None


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the launching thread dies.

    Without this, a flow process that is killed outright (kill -9, an out-of-memory kill, a
    cancelled deployment's process) would leave its training worker running on its own.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the process-group stop still applies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_launcher() -> None:
    """In a rank torchrun started: SIGKILL it when torchrun dies, or exit now if torchrun is gone.

    torchrun starts each rank in a session of its own, so neither the signal that stops the
    launcher's process group nor the kill that `die_with_parent` sends torchrun when the flow
    process dies reaches the ranks: without this they keep training, on the GPU and into the
    stage's `.partial` output, after the stage is gone.
    """
    launcher = os.getppid()
    die_with_parent()
    if launcher == 1 or os.getppid() != launcher:  # torchrun died before the request took effect
        os._exit(1)


def _stop(process: subprocess.Popen[str] | preloaded_launch.PreloadedWorker) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def worker_environment() -> dict[str, str]:
    """The environment a worker starts with: this process's, its output unbuffered (lines arrive as printed)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_preloading() -> None:
    """Start the preloaded parent of the workers now (tasks/contracts/preloaded_launch.py), so that its
    imports are done by the first stage that computes; nothing where workers start cold anyway."""
    preloaded_launch.warm_up(worker_environment())


def run_worker(
    module: str,
    config: BaseModel | None,
    config_path: Path,
    on_event: Callable[[WorkerEvent], None] | None = None,
    on_output: Callable[[str], None] = print,
    torchrun: list[str] | None = None,
) -> list[WorkerEvent]:
    """Run `python -m module config_path` to completion; the events it sent, each also handed to
    `on_event` as it arrives (`Note`s go to `on_output`, a `Failed` becomes the WorkerError).

    config: a worker config from tasks/contracts/worker_configs.py, written to config_path first
    (None: it is there already). torchrun: launch through torchrun with these arguments, which
    start one copy per process (RANK, WORLD_SIZE and a rendezvous set for each); if one dies,
    torchrun stops the others and exits with an error.
    """
    if config is not None:
        config_path.write_text(config.model_dump_json(indent=2))
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", *torchrun]
    # torchrun starts its ranks itself; a job without its config here, or one that quantizes, starts cold
    preloadable = not torchrun and config is not None and not needs_bitsandbytes(config)
    wait = PARENT_WAIT_S if preloadable and getattr(config, "loads_model_libraries", True) else 0.0
    with model_compute():
        return _run([*launcher, "-m", module, str(config_path)], module, on_event, on_output, preloadable, wait)


def final(events: list[WorkerEvent], kind: type[EventKind]) -> EventKind:
    """The last event of `kind` a worker sent (its result); a worker that exits without it has a bug."""
    for event in reversed(events):
        if isinstance(event, kind):
            return event
    raise WorkerError(f"the worker finished without sending its {kind.__name__} event")


def _run(
    command: list[str],
    module: str,
    on_event: Callable[[WorkerEvent], None] | None,
    on_output: Callable[[str], None],
    preloadable: bool = False,
    wait: float = 0.0,
) -> list[WorkerEvent]:
    env = worker_environment()
    process = (preloaded_launch.launch(command, module, env, wait) if preloadable else None) or subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group, so a stop reaches its children too
        preexec_fn=die_with_parent,
        env=env,
    )
    error, events, kills_before = None, [], oom_kills()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(EVENT_PREFIX):
                event = read_event(line, module)
                if isinstance(event, Failed):
                    error = event.message
                elif isinstance(event, Note):
                    on_output(event.message)
                else:
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
            elif line.strip():
                on_output(line.rstrip())
        returncode = process.wait()
    except BaseException:
        _stop(process)
        raise
    if returncode != 0:
        reason = error or f"exited with code {returncode}" + (
            f" (killed by signal {-returncode})" if returncode < 0 else ""
        )
        kills_after = oom_kills()
        if error is None and kills_before is not None and kills_after is not None and kills_after > kills_before:
            raise ProbablyOutOfMemory(
                f"{module}: {reason}, probably out of memory: the kernel's out-of-memory killer killed "
                f"{kills_after - kills_before} process(es) on this machine while it ran"
            )
        raise WorkerError(f"{module}: {reason}")
    return events


def needs_bitsandbytes(config: object) -> bool:
    """Whether a worker config's job quantizes (a qlora stage, or the export of a qlora adapter)."""
    return getattr(config, "finetuning_type", None) == "qlora" or getattr(config, "quantized_base", None) is not None


def hide_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail in this process, as if it were not installed.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes' import sets up its
    kernels through torch.compile: about 2.5 s on 2 cores, paid by every process that loads an
    adapter. Only a qlora training stage quantizes (and the export of its adapter, to check it
    against the quantized base), so every other worker goes without it; peft and transformers read
    the missing module as "not installed" and use plain layers.
    """
    sys.modules.setdefault("bitsandbytes", None)


def worker_entry(main: Callable[[Any], None], config_type: object) -> None:
    """`if __name__ == "__main__": worker_entry(main, ItsConfig)` in a worker module.

    The config file is validated as `config_type` (a model of tasks/contracts/worker_configs.py, or a
    union of them) before `main` sees it: a field that is missing, unknown or of the wrong type
    is an error event naming the file and the field.
    A WorkerError becomes an error event (a message for the user, exit code 2); anything
    else is a bug and keeps its traceback on stderr.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank that torchrun started
        die_with_launcher()
    path = Path(sys.argv[1])
    try:
        config = TypeAdapter(config_type).validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        emit(Failed(message=f"{path}: not the config this worker reads ({problems})"))
        sys.exit(2)
    if not needs_bitsandbytes(config):
        hide_bitsandbytes()
    try:
        main(config)
    except WorkerError as exc:
        emit(Failed(message=str(exc)))
        sys.exit(2)
