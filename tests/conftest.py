"""Fixtures: a tiny random Llama with the real SmolLM2 tokenizer, Prefect's test harness, LLaMA-Factory's
data; and how pytest-xdist spreads the files over the cores. The plain helpers the tests import live in
modules named for what they hold: tiny_pipeline.py, loopback.py, shared_inputs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import free_port
from shared_inputs import llamafactory_data_or_fail_in_ci
from tiny_pipeline import build_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `compute_type: auto` stays fp32 on every CI machine, also one with bf16 arithmetic: the tests compare
# losses and logits at fp32 tolerances (the demo test runs with the real detection)
os.environ["TUNEFACTORY_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ui_servers(tmp_path_factory: pytest.TempPathFactory):
    """What `make ui` starts: both servers on free loopback ports, their databases in a workspace of
    their own; (workspace, servers). Session-wide: about a minute of one core to start, shared by the
    files of SHARED_PROCESS below (test_schedule.py stops them in its last test)."""
    from tasks.runtime import local_servers

    workspace = tmp_path_factory.mktemp("ui-workspace")
    ports = ["--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    started = subprocess.run(
        [str(Path(sys.executable).parent / "tunefactory"), "ui", "start", "--workspace", str(workspace), *ports],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    servers = local_servers.recorded(workspace)
    assert servers is not None and servers.prefect_url in started.stdout and servers.mlflow_url in started.stdout
    yield workspace, servers
    local_servers.stop(workspace)


@pytest.fixture(scope="session")
def llamafactory_data() -> Path:
    """LLaMA-Factory's data folder, for `needs_llamafactory_data`: session-wide, so it fails or skips a
    test before any module fixture that would read the data is built."""
    return llamafactory_data_or_fail_in_ci()


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`), each test process and everything it launches keeps to one core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})


# Files that share a session fixture too costly to build twice go to one test process together:
# file -> the file whose process it joins (`ui_servers`; test_schedule.py's last test stops them)
SHARED_PROCESS = {"test_browser_guard.py": "test_schedule.py"}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's --dist loadfile (a file's tests in one process), with SHARED_PROCESS's files joined.
    `_split_scope` is xdist's own hook for subclasses (3.x; pyproject pins <4): a file's scope is its path."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            directory, _, name = scope.rpartition("/")
            return f"{directory}/{SHARED_PROCESS[name]}" if name in SHARED_PROCESS else scope

    return SharedFixtureScheduling(config, log)


# The longest files (minutes each, docs/tests.md), started first: pytest-xdist, run with
# --no-loadscope-reorder (the Makefile does), hands out whole
# files in collection order, so one of these left for last would keep one process busy alone.
# A file that joins another's process (SHARED_PROCESS) comes just before it: its tests run first
LONGEST_FIRST = [
    "test_demo_e2e.py",
    "test_resume_and_retry.py",
    "test_distributed_training.py",
    "test_training_stages.py",
    "test_browser_guard.py",
    "test_schedule.py",
    "test_sweep_compare_lineage.py",
    "test_llamafactory_pipeline.py",
    "test_memory_failures.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
