"""The code version in a stage's cache key is derived from what its worker imports, and from the
libraries that compute the stage: an edit or an upgrade reruns the stage, a change elsewhere does not."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

from tasks.runtime import code_version as versions


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A small project on sys.path: a stage module, a worker that reaches a helper lazily, and the
    helper's own import two levels down."""
    name = f"cvpkg_{request.node.name.replace('[', '_').replace(']', '_')}"[:60]
    root = tmp_path / name
    (root / "inner").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": f"from {name} import reporting\n\nSTAGE = 1\n",
        "reporting.py": "REPORT = 'table'\n",
        "worker.py": (
            "from typing import TYPE_CHECKING\n\n"
            f"if TYPE_CHECKING:\n    from {name} import typing_only\n\n\n"
            f"def main():\n    from {name}.inner import helper\n\n    return helper.run()\n"
        ),
        "typing_only.py": "class Hint: ...\n",
        "inner/__init__.py": "",
        "inner/helper.py": "from ..deep import value\n\n\ndef run():\n    return value()\n",
        "deep.py": "def value():\n    return 1\n",
    }
    for relative, text in files.items():
        (root / relative).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name, root


def test_editing_a_module_the_worker_reaches_through_others_changes_the_version(package):
    name, root = package
    before = versions.code_version(f"{name}.stage", (f"{name}.worker",))
    (root / "deep.py").write_text("def value():\n    return 2\n")
    after = versions.code_version(f"{name}.stage", (f"{name}.worker",))
    assert after != before
    modules = versions.project_modules(f"{name}.worker")
    assert {f"{name}.inner.helper", f"{name}.deep", f"{name}.inner"} <= set(modules)


def test_modules_only_the_flow_or_a_type_checker_reads_leave_the_version_alone(package):
    name, root = package
    before = versions.code_version(f"{name}.stage", (f"{name}.worker",))
    (root / "typing_only.py").write_text("class Hint:\n    size = 2\n")
    (root / "reporting.py").write_text("REPORT = 'chart'\n")
    assert versions.code_version(f"{name}.stage", (f"{name}.worker",)) == before
    (root / "stage.py").write_text(f"from {name} import reporting\n\nSTAGE = 2\n")
    assert versions.code_version(f"{name}.stage", (f"{name}.worker",)) != before


def test_upgrading_a_library_of_the_stage_changes_the_version(package, monkeypatch: pytest.MonkeyPatch):
    name, _ = package
    before = versions.code_version(f"{name}.stage", (f"{name}.worker",), ("tokenizers", "transformers"))
    assert versions.code_version(f"{name}.stage", (f"{name}.worker",)) != before
    installed = importlib.metadata.version

    def upgraded(distribution: str) -> str:
        return "999.0" if distribution == "tokenizers" else installed(distribution)

    monkeypatch.setattr(importlib.metadata, "version", upgraded)
    assert versions.code_version(f"{name}.stage", (f"{name}.worker",), ("tokenizers", "transformers")) != before


def test_the_workers_derived_modules_include_those_once_missed_from_the_hand_written_lists():
    # packing.py shapes every packed batch; modeling.py loads and merges what export writes
    assert "tasks.components.packing" in versions.project_modules("tasks.workers.train")
    assert "tasks.components.modeling" in versions.project_modules("tasks.workers.export")
    assert "tasks.dataset.rows" in versions.project_modules("tasks.workers.data")
    # what only the flow process runs is not a worker's code
    assert not any(m.startswith(("flows", "tasks.runtime")) for m in versions.project_modules("tasks.workers.train"))


def test_a_worker_module_that_does_not_exist_is_named():
    with pytest.raises(ModuleNotFoundError, match="tasks.workers.nothing"):
        versions.code_version("tasks.stages.train", ("tasks.workers.nothing",))
