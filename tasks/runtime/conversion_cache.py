"""Converted GGUF base models, kept once per machine.

Converting a GGUF file (the packaged SmolLM2, a `.gguf` path) into safetensors unpacks every weight:
24-37 s for SmolLM2 on a 2-core CPU, in every new workspace. What it writes depends only on the
file's content and the converter (its code and the libraries that read the file), so it is kept in
the user's cache folder (tasks/runtime/user_cache.py) under both digests and linked into each
workspace that converts the same file again.

An entry is complete once the digests of its files are written, last, into it; every reuse checks
the files against them, and an entry that does not match (a file edited, cut short or missing) is
removed and the file converted again. Two runs converting one file at once take turns on a lock: the
second reuses what the first kept. A cache folder that cannot be written only costs the reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tasks.contracts.file_digests import sha256_file
from tasks.runtime.locks import file_lock
from tasks.runtime.user_cache import user_cache

DIGESTS = ".digests.json"


def entry(gguf_digest: str, converter: str) -> Path:
    return user_cache() / "converted-models" / f"{gguf_digest}-{converter}"


@contextlib.contextmanager
def converting(folder: Path) -> Iterator[None]:
    """Held while one run looks for, or builds and keeps, the entry `folder`."""
    try:
        lock = folder.with_name(f".{folder.name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # nowhere to keep conversions: each run converts for itself
        yield
        return
    with file_lock(lock):
        yield


def reuse(folder: Path, destination: Path) -> Literal["reused", "absent", "damaged"]:
    """The entry's files linked (or copied) into the new folder `destination` if the entry is complete
    and every file still has its recorded digest; a damaged entry is removed."""
    record = folder / DIGESTS
    if not record.is_file():
        return "absent"
    try:
        expected = json.loads(record.read_text())
    except (OSError, ValueError):  # edited or unreadable: as damaged as a file that changed
        expected = None
    found = {file.name: sha256_file(file) for file in folder.iterdir() if file.is_file() and file.name != DIGESTS}
    if found != expected:
        shutil.rmtree(folder, ignore_errors=True)
        return "damaged"
    destination.mkdir(parents=True)
    for name in sorted(expected):
        place(folder / name, destination / name)
    return "reused"


def keep(built: Path, folder: Path) -> None:
    """A finished conversion put into the cache as the entry `folder`, whole or not at all."""
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        digests = {}
        for file in sorted(built.iterdir()):
            if file.is_file():
                place(file, staging / file.name)
                digests[file.name] = sha256_file(file)
        (staging / DIGESTS).write_text(json.dumps(digests, indent=2))
        shutil.rmtree(folder, ignore_errors=True)  # a bad entry reuse did not remove (it could not read it)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def place(source: Path, target: Path) -> None:
    """A hard link where both folders are on one file system (no second copy of the weights), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
