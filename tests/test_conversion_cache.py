"""The machine's cache of converted base models: reused only whole and unchanged, written whole or not
at all, and shared by two runs at once without either converting twice. (A pipeline that reuses a
conversion: tests/test_pipeline_flow.py, the GGUF round trip.)"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tasks.runtime import conversion_cache


def converted(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


@pytest.fixture
def entry(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEFACTORY_CACHE", str(tmp_path / "cache"))
    return conversion_cache.entry("ab" * 32, "c0ffee")


def test_a_kept_conversion_is_reused_as_links_and_a_damaged_one_is_removed(entry: Path, tmp_path: Path):
    assert conversion_cache.reuse(entry, tmp_path / "first") == "absent"
    conversion_cache.keep(converted(tmp_path / "built"), entry)
    assert entry.parent == tmp_path / "cache" / "converted-models"
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(f".{entry.name}.")], "no staging left"

    assert conversion_cache.reuse(entry, tmp_path / "second") == "reused"
    assert (tmp_path / "second" / "model.safetensors").samefile(entry / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == ["config.json", "model.safetensors"]

    cut_short, removed = (lambda f: f.write_bytes(f.read_bytes()[:-1])), (lambda f: f.unlink())
    garbled = lambda f: (f.parent / ".digests.json").write_text("{not json")  # noqa: E731
    for damage in (cut_short, removed, garbled):
        conversion_cache.keep(converted(tmp_path / f"built-{id(damage)}"), entry)
        damage(entry / "model.safetensors")
        assert conversion_cache.reuse(entry, tmp_path / f"third-{id(damage)}") == "damaged"
        assert not entry.exists() and not (tmp_path / f"third-{id(damage)}").exists()


def test_an_entry_without_its_digests_is_not_reused(entry: Path, tmp_path: Path):
    """Files copied in by hand, or a keep cut off before its last write: not a finished conversion."""
    converted(entry)
    assert conversion_cache.reuse(entry, tmp_path / "out") == "absent"


def test_two_runs_at_once_convert_once(entry: Path, tmp_path: Path):
    conversions: list[str] = []
    outcomes: dict[str, str] = {}

    def run(name: str) -> None:
        with conversion_cache.converting(entry):
            outcome = conversion_cache.reuse(entry, tmp_path / name)
            if outcome != "reused":
                conversions.append(name)
                time.sleep(0.5)  # converting, while the other run waits for the lock
                conversion_cache.keep(converted(tmp_path / name), entry)
            outcomes[name] = outcome

    runs = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(timeout=30)
    assert len(conversions) == 1 and sorted(outcomes.values()) == ["absent", "reused"]
    assert (tmp_path / "a" / "model.safetensors").samefile(tmp_path / "b" / "model.safetensors")


def test_a_cache_folder_that_cannot_be_written_only_costs_the_reuse(tmp_path: Path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("TUNEFACTORY_CACHE", str(blocked))
    entry = conversion_cache.entry("cd" * 32, "c0ffee")
    with conversion_cache.converting(entry):
        assert conversion_cache.reuse(entry, tmp_path / "out") == "absent"
        conversion_cache.keep(converted(tmp_path / "built"), entry)
    assert (tmp_path / "built" / "model.safetensors").is_file()
