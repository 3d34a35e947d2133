"""The layers point one way: flows/ (Prefect, the pipeline spec, the command line) above tasks/,
and the worker processes below both.

A worker process imports neither Prefect nor `flows` (whose package sets Prefect's environment
up); the flow process imports no torch (its stage tasks launch the workers that do). Each module
is imported in a fresh interpreter and its `sys.modules` read, so nothing imported earlier in the
test session hides a dependency.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.child_process import EVENT_PREFIX

REPO = Path(__file__).resolve().parents[1]


def launched_workers() -> list[str]:
    """Every module the stage tasks start as a worker process (`run_worker("tasks.…")`)."""
    names = set()
    for path in (REPO / "tasks").glob("*.py"):
        names |= set(re.findall(r'"(tasks\.\w+_worker)"', path.read_text(encoding="utf-8")))
    return sorted(names)


def imported_top_levels(module: str) -> set[str]:
    probe = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(result.stdout.split())


def test_the_workers_are_found():
    # a rename that hid every worker from the test below would make it pass on nothing
    assert {"tasks.data_worker", "tasks.train_worker", "tasks.trl_worker", "tasks.evaluate_worker",
            "tasks.export_worker"} <= set(launched_workers())  # fmt: skip


@pytest.mark.parametrize("module", launched_workers())
def test_a_worker_process_imports_neither_prefect_nor_flows(module):
    assert imported_top_levels(module) & {"prefect", "flows"} == set()


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.cli", "flows.sweep"])
def test_the_flow_process_imports_no_torch(module):
    loaded = imported_top_levels(module)
    assert "flows" in loaded and "pydantic" in loaded  # the probe really imported the flow layer
    assert "torch" not in loaded


def test_no_module_under_tasks_imports_flows():
    offenders = []
    for path in sorted((REPO / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "flows"]
    assert offenders == []


def test_a_worker_refuses_a_config_that_is_not_its_contract(tmp_path):
    """A config written by other code (a renamed or missing field) is refused when the worker starts,
    with the file and every wrong field named, before any work is done."""
    config = tmp_path / "convert_config.json"
    config.write_text(json.dumps({"gguf": str(tmp_path / "model.gguf"), "output": str(tmp_path / "out")}))
    result = subprocess.run([sys.executable, "-m", "tasks.gguf_worker", str(config)], capture_output=True, text=True,
                            cwd=REPO)  # fmt: skip
    assert result.returncode == 2
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(EVENT_PREFIX)]
    event = json.loads(line[len(EVENT_PREFIX) :])
    assert event["type"] == "error"
    assert event["message"].startswith(f"{config}: not the config this worker reads")
    assert "out: Field required" in event["message"]
    assert "output: Extra inputs are not permitted" in event["message"]
    assert not (tmp_path / "out").exists()
