"""Workers forked from the preloaded parent (tasks/workers/preloaded.py) start as `python -m` would
start them, report as a cold worker does, and die with the flow process; jobs that need a process of
their own still get one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_probe import LightProbeJob, ProbeJob

from tasks.contracts import preloaded_launch
from tasks.contracts.child_process import WorkerError, run_worker, worker_environment

TESTS = Path(__file__).parent
READY_SECONDS = 180  # the parent's imports, on one busy core


@pytest.fixture
def probe_env(monkeypatch) -> dict[str, str]:
    """The environment the probe runs in: worker_probe importable, a variable set after any parent started."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    monkeypatch.delenv(preloaded_launch.SWITCH, raising=False)
    monkeypatch.setenv("TUNEFACTORY_PROBE", "set late")
    return worker_environment()


def probe(tmp_path: Path, then: str = "exit 0", config=None) -> tuple[dict, str | None]:
    """Run worker_probe through run_worker: what it reported, and the error it ended with, if any."""
    notes: list[str] = []
    error = None
    try:
        run_worker("worker_probe", config or ProbeJob(then=then), tmp_path / "probe.json", on_output=notes.append)
    except WorkerError as exc:
        error = str(exc)
    return json.loads(notes[0]), error


def preloaded_probe(tmp_path: Path, env: dict[str, str], then: str = "exit 0") -> tuple[dict, str | None]:
    assert preloaded_launch.warm_up(env, READY_SECONDS), "the preloaded parent never became ready"
    return probe(tmp_path, then)


def test_a_forked_worker_starts_as_its_cold_launch_would_and_reports_the_same(probe_env, tmp_path, monkeypatch):
    monkeypatch.setenv(preloaded_launch.SWITCH, "0")
    cold, _ = probe(tmp_path)
    monkeypatch.delenv(preloaded_launch.SWITCH)
    forked, _ = preloaded_probe(tmp_path, probe_env)

    assert not cold["torch_preloaded"] and forked["torch_preloaded"], "the second one was forked, with torch"
    for fact in ("argv", "cwd", "probe_variable", "affinity", "leads_its_session", "stdin"):
        assert forked[fact] == cold[fact], fact
    assert forked["probe_variable"] == "set late" and forked["leads_its_session"] and forked["stdin"] == ""
    config = str(tmp_path / "probe.json")
    assert cold["cmdline"].endswith(f"-m worker_probe {config}")
    assert forked["cmdline"] == f"{sys.executable} -m worker_probe {config}", "ps shows the worker, not the parent"


def test_a_worker_launched_while_the_parent_imports_waits_for_it_unless_its_job_is_light(
    probe_env, tmp_path, monkeypatch
):
    """Importing torch beside the parent on the same cores would slow both: the worker is forked once the
    parent is ready. A job that loads none of it (templating) starts cold at once instead."""
    monkeypatch.setenv("PROBE_IMPORT_ENV", str(time.time()))  # a variable imports could read: a new parent
    light, _ = probe(tmp_path, config=LightProbeJob())
    heavy, _ = probe(tmp_path)
    assert not light["torch_preloaded"], "started cold while the new parent imported"
    assert heavy["torch_preloaded"], "waited for the parent, then forked"


@pytest.mark.parametrize(
    ("then", "message"),
    [
        ("exit 3", "exited with code 3"),
        ("raise", "exited with code 1"),
        ("sleep", "exited with code -9 (killed by signal 9)"),
    ],
)
def test_a_forked_worker_ends_with_the_status_a_cold_one_would(probe_env, tmp_path, capfd, then, message):
    if then == "sleep":  # killed by someone else while it runs, as the kill -9 test does to a training worker
        killer = subprocess.Popen([sys.executable, "-c", KILL_THE_PROBE, str(tmp_path / "probe.json")])
    facts, error = preloaded_probe(tmp_path, probe_env, then)

    assert facts["torch_preloaded"]
    assert error == f"worker_probe: {message}"
    if then == "raise":
        stderr = capfd.readouterr().err
        assert "RuntimeError: the probe failed as asked" in stderr and "preloaded.py" not in stderr
    if then == "sleep":
        assert killer.wait(timeout=60) == 0


KILL_THE_PROBE = """
import os, signal, sys, time
from pathlib import Path
asleep = Path(sys.argv[1]).with_suffix(".asleep")
for _ in range(3000):
    if not asleep.exists():
        time.sleep(0.1)
        continue
    for proc in Path("/proc").iterdir():
        try:
            pid = int(proc.name) if proc.name.isdigit() else os.getpid()
            if pid != os.getpid() and sys.argv[1] in (proc / "cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
                sys.exit(0)
        except OSError:
            pass
    time.sleep(0.1)
sys.exit(1)
"""


FLOW_THAT_LAUNCHES_A_SLEEPER = """
import os, sys
from pathlib import Path
from tasks.contracts import preloaded_launch
from tasks.contracts.child_process import run_worker, worker_environment
from worker_probe import LightProbeJob, ProbeJob
assert preloaded_launch.warm_up(worker_environment(), float(sys.argv[2]))
run_worker("worker_probe", ProbeJob(then="sleep"), Path(sys.argv[1]), on_output=print)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_the_flow_process_takes_the_parent_and_its_workers_with_it(probe_env, tmp_path):
    flow = subprocess.Popen(
        [sys.executable, "-c", FLOW_THAT_LAUNCHES_A_SLEEPER, str(tmp_path / "probe.json"), str(READY_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=TESTS.parent,
    )
    facts = json.loads(flow.stdout.readline())
    worker, parent = facts["pid"], facts["parent"]
    assert facts["torch_preloaded"] and parent != flow.pid and alive(worker) and alive(parent)

    flow.send_signal(signal.SIGKILL)
    flow.wait()
    deadline = time.monotonic() + 30
    while (alive(worker) or alive(parent)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(worker) and not alive(parent), "nothing outlives the flow process"


def test_jobs_that_need_a_process_of_their_own_start_cold(probe_env, tmp_path, monkeypatch):
    assert preloaded_launch.warm_up(probe_env, READY_SECONDS)
    facts, _ = probe(tmp_path, config=ProbeJob(finetuning_type="qlora"))
    assert not facts["torch_preloaded"], "qlora needs bitsandbytes, which the parent leaves out"
    facts, _ = probe(tmp_path)
    assert facts["torch_preloaded"], "an ordinary job right after it is forked"

    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # a library may read it at import
    elsewhere, _ = probe(tmp_path)
    assert elsewhere["torch_preloaded"] and elsewhere["parent"] != facts["parent"], "forked from a new parent"
    assert elsewhere["hf_home_at_import"] == str(tmp_path / "elsewhere"), "which imported with the new value"
    monkeypatch.setenv(preloaded_launch.SWITCH, "0")
    monkeypatch.delenv("HF_HOME")
    facts, _ = probe(tmp_path)
    assert not facts["torch_preloaded"]
