"""The layers point one way: flows/ (Prefect, the pipeline spec, the command line) above tasks/,
and the worker processes below both; the folders of tasks/ say which process their code runs in.

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

from tasks.contracts.child_process import EVENT_PREFIX

REPO = Path(__file__).resolve().parents[1]


def launched_workers() -> list[str]:
    """Every module the stage tasks start as a worker process (`run_worker("tasks.…")`)."""
    names = set()
    for path in (REPO / "tasks").rglob("*.py"):
        names |= set(re.findall(r'"(tasks\.workers\.\w+)"', path.read_text(encoding="utf-8")))
    return sorted(names)


def modules_in(folder: str) -> list[str]:
    return sorted(
        f"tasks.{folder}.{path.stem}" for path in (REPO / "tasks" / folder).glob("*.py") if path.stem != "__init__"
    )


def imported_top_levels(module: str) -> set[str]:
    probe = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(result.stdout.split())


def test_the_workers_are_found():
    # a rename that hid every worker from the test below would make it pass on nothing
    assert {"tasks.workers.data", "tasks.workers.train", "tasks.workers.trl", "tasks.workers.evaluate",
            "tasks.workers.export"} <= set(launched_workers())  # fmt: skip


@pytest.mark.parametrize("module", launched_workers())
def test_a_worker_process_imports_neither_prefect_nor_flows(module):
    assert imported_top_levels(module) & {"prefect", "flows"} == set()


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.cli", "flows.sweep"])
def test_the_flow_process_imports_no_torch(module):
    loaded = imported_top_levels(module)
    assert "flows" in loaded and "pydantic" in loaded  # the probe really imported the flow layer
    assert "torch" not in loaded


@pytest.mark.parametrize("module", modules_in("workers") + modules_in("components"))
def test_code_under_workers_and_components_runs_without_prefect(module):
    """tasks/workers/ and tasks/components/ hold what runs in worker processes."""
    assert imported_top_levels(module) & {"prefect", "flows"} == set()


@pytest.mark.parametrize(
    "module", modules_in("stages") + modules_in("runtime") + modules_in("contracts") + modules_in("dataset")
)
def test_code_the_flow_process_imports_loads_no_torch(module):
    """tasks/stages/, runtime/, contracts/ and dataset/ are imported by the flow process."""
    assert "torch" not in imported_top_levels(module)


def test_no_module_under_tasks_imports_flows():
    offenders = []
    for path in sorted((REPO / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[0] == "flows"]
    assert offenders == []


def test_a_worker_refuses_a_config_that_is_not_its_contract(tmp_path):
    """A config written by other code (a renamed or missing field) is refused when the worker starts,
    with the file and every wrong field named, before any work is done."""
    config = tmp_path / "convert_config.json"
    config.write_text(json.dumps({"gguf": str(tmp_path / "model.gguf"), "output": str(tmp_path / "out")}))
    result = subprocess.run([sys.executable, "-m", "tasks.workers.gguf", str(config)], capture_output=True, text=True,
                            cwd=REPO)  # fmt: skip
    assert result.returncode == 2
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(EVENT_PREFIX)]
    event = json.loads(line[len(EVENT_PREFIX) :])
    assert event["type"] == "error"
    assert event["message"].startswith(f"{config}: not the config this worker reads")
    assert "out: Field required" in event["message"]
    assert "output: Extra inputs are not permitted" in event["message"]
    assert not (tmp_path / "out").exists()


def test_an_event_that_is_not_in_the_contract_is_refused_naming_its_field():
    """What a worker sends back is typed too: a renamed or mistyped field fails where it arrives."""
    from tasks.contracts.child_process import WorkerError, read_event
    from tasks.contracts.worker_events import StepLogged, TrainingDone

    logged = read_event(EVENT_PREFIX + StepLogged(step=3, metrics={"loss": 1.5, "tokens": 40}).model_dump_json(), "w")
    assert isinstance(logged, StepLogged) and logged.metrics == {"loss": 1.5, "tokens": 40}
    assert isinstance(logged.metrics["tokens"], int), "counts stay integers"
    with pytest.raises(
        WorkerError, match=r"tasks.workers.train sent an event .*log.step: Input should be a valid integer"
    ):
        read_event(EVENT_PREFIX + json.dumps({"type": "log", "step": "three", "metrics": {}}), "tasks.workers.train")
    with pytest.raises(WorkerError, match=r"done.final_los: Extra inputs"):
        read_event(EVENT_PREFIX + json.dumps({"type": "done", "step": 1, "final_los": 2.0, "metrics": {}}), "w")
    with pytest.raises(WorkerError, match=r"does not match any of the expected tags"):
        read_event(EVENT_PREFIX + json.dumps({"type": "finished"}), "w")
    assert TrainingDone(step=1, final_loss=2.0, metrics={}).ranks is None
