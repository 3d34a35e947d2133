"""The one file hasher: stage outputs, data sources, checkpoints and benchmark files are hashed alike.

Here, at the bottom of the layers, because both processes hash files: the flow side for manifests,
cache keys and lineage, the workers for the records of their checkpoints. A file is read in blocks,
so a model's weights never sit in memory whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(root: Path, files: list[Path]) -> str:
    """One digest over `files` (under `root`), each by its path relative to `root` and its sha256."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root)}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()
