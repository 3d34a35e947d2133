"""The layers point one way: flows/ (Prefect, the pipeline spec, the command line) above tasks/,
and the worker processes below both; the folders of tasks/ say which process their code runs in.

A worker process imports neither Prefect nor `flows` (whose package sets Prefect's environment
up); the flow process imports no torch (its stage tasks launch the workers that do). Each module
is imported in a fresh interpreter and its `sys.modules` read, so nothing imported earlier in the
test session hides a dependency.

Which folder may import which is stated as data (`LAYERS`), read from the source with `ast`: every
`import` and `from ... import`, at module level or inside a function, since an import deferred
into a function is still a dependency. A module imports from its own folder and from the layers
below its own, never from a layer above. Two folders of one layer import each other only where
`SAME_LAYER_EDGES` says so, with the reason: runtime/ and workers/ never do, either way, because
they run in different processes (the flow process and the workers it launches), which meet only
through contracts/. No import cycle joins modules of tasks/ and flows/, deferred imports included.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.contracts.child_process import EVENT_PREFIX

REPO = Path(__file__).resolve().parents[1]

# The folders of the project, lowest layer first: a module imports from its own folder and from
# the layers below it. contracts/ is what every process agrees on; components/ (worker-side torch
# code) and dataset/ (the registry and its rows, read by both sides) build on it; runtime/ (what
# the stage tasks stand on, in the flow process) and workers/ (the child processes) on those;
# stages/ (the Prefect tasks) and tools/ (commands beside the pipeline) on those; flows/ on top.
LAYERS = [
    {"tasks", "tasks/contracts"},
    {"tasks/components", "tasks/dataset"},
    {"tasks/runtime", "tasks/workers"},
    {"tasks/stages", "tasks/tools"},
    {"flows"},
]

# The only imports between two folders of one layer, each with its reason; the reverse edge of
# each, and runtime/ <-> workers/ (two processes), stay refused.
SAME_LAYER_EDGES = {
    ("tasks/components", "tasks/dataset"): "worker-side code reads and writes rows as the registry does "
    "(its DataError, JSON Lines, file digests); dataset/ runs in the flow process too and imports no torch code",
    ("tasks/tools", "tasks/stages"): "a command beside the pipeline reuses a stage's own definition of its "
    "inputs (the packaged GGUF, the evaluation prompts, the templated examples) rather than a copy",
}


def project_modules() -> dict[str, Path]:
    """Every module of tasks/ and flows/ by its dotted name; a package by its own name."""
    modules = {}
    for path in sorted([*(REPO / "tasks").rglob("*.py"), *(REPO / "flows").rglob("*.py")]):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def folder_of(path: Path) -> str:
    return path.parent.relative_to(REPO).as_posix()


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement asks for: `from a import b` asks for `a.b` (a module, or
    a name in `a`), a relative import is resolved against the importing module's package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
    return [f"{base}.{alias.name}" for alias in node.names]


def project_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported project module, line) for every import in tasks/ and flows/,
    at module level or inside a function."""
    modules = project_modules()
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(node, module, path.name == "__init__.py"):
                while name not in modules and "." in name:  # `a.b.SomeClass` is module `a.b`
                    name = name.rsplit(".", 1)[0]
                if name in modules and name != module:
                    found.append((module, name, node.lineno))
    return found


def layer_of(folder: str) -> int:
    (layer,) = [position for position, folders in enumerate(LAYERS) if folder in folders]
    return layer


def import_is_allowed(importer: str, imported: str) -> bool:
    if importer == imported or (importer, imported) in SAME_LAYER_EDGES:
        return True
    return layer_of(imported) < layer_of(importer)


def import_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle in the graph `edges` (module -> the modules it imports), as a path that returns to
    its start; [] when there is none. A depth-first search: a module met again while still on the
    path closes a cycle."""
    on_path, finished = [], set()

    def visit(module: str) -> list[str]:
        on_path.append(module)
        for imported in sorted(edges.get(module, ())):
            if imported in on_path:
                return [*on_path[on_path.index(imported) :], imported]
            if imported not in finished and (cycle := visit(imported)):
                return cycle
        finished.add(on_path.pop())
        return []

    for start in sorted(edges):
        if start not in finished and (cycle := visit(start)):
            return cycle
    return []


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


def first_to_load(modules: list[str], packages: set[str]) -> dict[str, str]:
    """In one fresh interpreter, `modules` imported one after another: for each of `packages` that got
    loaded, the module whose import loaded it first (what a fresh process of that module would load too).
    One interpreter for a whole list, not one per module: the answer is the same, the imports paid once."""
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    print(name, ' '.join(sorted({m.split('.')[0] for m in sys.modules})), flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    found: dict[str, str] = {}
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == modules, "every module imported"
    for line in lines:
        name, *loaded = line.split()
        for package in packages & set(loaded):
            found.setdefault(package, name)
    return found


def test_the_workers_are_found():
    # a rename that hid every worker from the test below would make it pass on nothing
    assert {"tasks.workers.data", "tasks.workers.train", "tasks.workers.trl", "tasks.workers.evaluate",
            "tasks.workers.export"} <= set(launched_workers())  # fmt: skip


def test_a_worker_process_imports_neither_prefect_nor_flows():
    assert first_to_load(launched_workers(), {"prefect", "flows"}) == {}


def test_the_flow_process_imports_no_torch():
    modules = ["flows.pipeline", "flows.cli", "flows.sweep"]
    loaded = first_to_load(modules, {"torch", "flows", "pydantic"})
    assert loaded == {"flows": "flows.pipeline", "pydantic": "flows.pipeline"}, "the flow layer, and no torch"


def test_code_under_workers_and_components_runs_without_prefect():
    """tasks/workers/ and tasks/components/ hold what runs in worker processes."""
    assert first_to_load(modules_in("workers") + modules_in("components"), {"prefect", "flows"}) == {}


def test_code_the_flow_process_imports_loads_no_torch():
    """tasks/stages/, runtime/, contracts/ and dataset/ are imported by the flow process."""
    modules = modules_in("stages") + modules_in("runtime") + modules_in("contracts") + modules_in("dataset")
    assert first_to_load(modules, {"torch"}) == {}


def test_no_module_under_tasks_imports_flows():
    modules = project_modules()
    offenders = [f"{modules[importer].relative_to(REPO)}:{line}: {imported}"
                 for importer, imported, line in project_imports()
                 if importer.startswith("tasks") and imported.split(".")[0] == "flows"]  # fmt: skip
    assert offenders == []


def test_every_folder_of_tasks_and_flows_has_a_layer():
    # a new folder must be placed in LAYERS, or its imports would go unchecked
    known = set().union(*LAYERS)
    assert {folder_of(path) for path in project_modules().values()} - known == set()


def test_imports_point_down_the_layers():
    modules = project_modules()
    upward = []
    for importer, imported, line in project_imports():
        importer_folder, imported_folder = folder_of(modules[importer]), folder_of(modules[imported])
        if not import_is_allowed(importer_folder, imported_folder):
            where = f"{modules[importer].relative_to(REPO)}:{line}"
            upward.append(f"{where}: {importer} imports {imported} ({importer_folder} -> {imported_folder})")
    assert upward == [], "imports that point up the layers (LAYERS, SAME_LAYER_EDGES):\n" + "\n".join(upward)


def test_each_same_layer_exception_is_still_needed():
    modules = project_modules()
    used = {(folder_of(modules[importer]), folder_of(modules[imported])) for importer, imported, _ in project_imports()}
    assert set(SAME_LAYER_EDGES) - used == set(), "remove the exceptions no import needs any more"


def test_the_layer_check_sees_deferred_and_relative_imports():
    # the parse must see an import inside a function, and resolve `from . import x`, or the tests
    # above would pass on code they never read
    tree = ast.parse("def later():\n    from . import stage_output\n    import tasks.contracts.manifest\n")
    found = [name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
             for name in imported_names(node, "tasks.runtime.tracking", is_package=False)]  # fmt: skip
    assert found == ["tasks.runtime.stage_output", "tasks.contracts.manifest"]
    assert not import_is_allowed("tasks/contracts", "tasks/runtime")  # up a layer
    assert not import_is_allowed("tasks/workers", "tasks/runtime")  # across processes, either way
    assert not import_is_allowed("tasks/runtime", "tasks/workers")
    assert import_is_allowed("flows", "tasks/workers") and import_is_allowed("tasks/stages", "tasks/stages")


def test_no_import_cycle_among_the_modules_of_tasks_and_flows():
    edges: dict[str, set[str]] = {}
    for importer, imported, _ in project_imports():
        edges.setdefault(importer, set()).add(imported)
    assert import_cycle(edges) == [], "an import cycle: " + " -> ".join(import_cycle(edges))


def test_the_cycle_search_finds_a_cycle_and_names_it():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert import_cycle(edges) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


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


def test_saving_a_model_imports_no_deepspeed_unless_the_process_used_it(tmp_path):
    """accelerate unwraps every model `save_pretrained` writes, importing DeepSpeed (3-4 s) where it is
    installed; a worker that loaded its model through `load_model` skips that, and a DeepSpeed run,
    which imported it first, is still unwrapped as a DeepSpeed engine."""
    script = (
        "import sys, torch, accelerate.utils.other as other\n"
        "from tasks.components.modeling import skip_unused_deepspeed_check\n"
        "skip_unused_deepspeed_check()\n"
        "other.extract_model_from_parallel(torch.nn.Linear(2, 2))\n"
        "print('deepspeed' in sys.modules, other.is_deepspeed_available())\n"
        "import deepspeed\n"
        "print(other.is_deepspeed_available())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True"]
