"""The stage contract: keys follow their inputs, outputs appear atomically, damage is detected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tasks.contracts.manifest import StageResult
from tasks.runtime import stage_output
from tasks.runtime.stage_output import build_output, cache_key, load_finished


def write_two_files(out: Path) -> StageResult:
    (out / "a.txt").write_text("alpha")
    (out / "sub").mkdir()
    (out / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    return StageResult(metrics={"rows": 2})


def test_cache_key_follows_config_upstream_and_code(tmp_path: Path):
    upstream = build_output(tmp_path, "up", "k1", write_two_files)
    base = cache_key("train", {"lr": 1e-4}, [upstream], "v1")
    assert base == cache_key("train", {"lr": 1e-4}, [upstream], "v1")
    assert base != cache_key("train", {"lr": 2e-4}, [upstream], "v1")
    assert base != cache_key("train", {"lr": 1e-4}, [], "v1")
    assert base != cache_key("train", {"lr": 1e-4}, [upstream], "v2")
    assert base != cache_key("evaluate", {"lr": 1e-4}, [upstream], "v1")


def test_finished_output_is_reused_and_damage_is_detected(tmp_path: Path):
    manifest = build_output(tmp_path, "stage", "key", write_two_files)
    assert set(manifest.files) == {"a.txt", "sub/b.bin"}
    assert load_finished(tmp_path, "stage", "key").files == manifest.files
    big = manifest.path / "sub" / "b.bin"
    big.write_bytes(b"\x00" * 500)  # truncated
    assert load_finished(tmp_path, "stage", "key") is None
    rebuilt = build_output(tmp_path, "stage", "key", write_two_files)
    assert load_finished(tmp_path, "stage", "key").files == rebuilt.files


def test_a_failed_build_publishes_nothing(tmp_path: Path):
    def crash(out: Path) -> StageResult:
        (out / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_output(tmp_path, "stage", "key", crash)
    assert load_finished(tmp_path, "stage", "key") is None
    assert not (tmp_path / "stages" / "stage" / "key").exists()


def test_a_verified_file_is_not_read_again_until_it_changes(tmp_path: Path, monkeypatch):
    manifest = build_output(tmp_path, "stage", "key", write_two_files)
    settled = time.time() - 60  # written a minute ago: past the clock's resolution
    for file in manifest.files:
        os.utime(manifest.path / file, (settled, settled))
    hashed = []
    real_hash = stage_output.sha256_file
    monkeypatch.setattr(stage_output, "sha256_file", lambda path: hashed.append(path.name) or real_hash(path))

    assert load_finished(tmp_path, "stage", "key") is not None
    assert sorted(hashed) == ["a.txt", "b.bin"], "the first reuse hashes every file"
    hashed.clear()
    assert load_finished(tmp_path, "stage", "key") is not None
    assert hashed == [], "unchanged files are trusted by their stamps"

    # same size, new content, its time set back: the inode and time still differ from the stamp
    big = manifest.path / "sub" / "b.bin"
    replacement = big.with_name("b.new")
    replacement.write_bytes(b"\x01" * 1000)
    os.utime(replacement, (settled, settled))
    os.replace(replacement, big)
    assert load_finished(tmp_path, "stage", "key") is None
    assert hashed == ["b.bin"]


def test_a_file_written_just_now_is_hashed_on_every_reuse(tmp_path: Path, monkeypatch):
    """Within the clock's resolution an edit may keep size and time: such a file is not trusted yet."""
    build_output(tmp_path, "stage", "key", write_two_files)
    hashed = []
    real_hash = stage_output.sha256_file
    monkeypatch.setattr(stage_output, "sha256_file", lambda path: hashed.append(path.name) or real_hash(path))
    for _ in range(2):
        assert load_finished(tmp_path, "stage", "key") is not None
    assert sorted(hashed) == ["a.txt", "a.txt", "b.bin", "b.bin"]


def test_other_weights_of_the_same_shape_change_the_base_models_key(tiny_model: Path, tmp_path: Path, monkeypatch):
    """A local base is identified by its content, hashed once per file stamp."""
    import shutil

    from tasks.stages.materialize_model import local_content_digest, source_fingerprint

    model, cache = tmp_path / "model", tmp_path / "stages" / "model" / "hashes.json"
    shutil.copytree(tiny_model, model)
    settled = time.time() - 60
    for file in model.iterdir():
        os.utime(file, (settled, settled))
    first = local_content_digest(model, cache)

    hashed = []
    real_sha256 = stage_output.sha256_file
    monkeypatch.setattr(stage_output, "sha256_file", lambda path: hashed.append(path.name) or real_sha256(path))
    assert local_content_digest(model, cache) == first and hashed == [], "unchanged files are not hashed again"

    # the same size and the same modification time, other weights: a new file put in place
    weights = model / "model.safetensors"
    listing = source_fingerprint(str(model))["files"]
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    (model / "new").write_bytes(bytes(data))
    os.replace(model / "new", weights)
    os.utime(weights, (settled, settled))
    assert source_fingerprint(str(model))["files"] == listing, "names and sizes alone cannot tell them apart"
    assert local_content_digest(model, cache) != first
    assert hashed == ["model.safetensors"], "only the replaced file is hashed"
