"""JSON Lines, read and written in one way: one object per line, lines split on "\\n" only.

`str.splitlines()` would also break a line at U+2028, U+0085 and the other separators that a
valid JSON string may hold unescaped; the JSON Lines format splits on newline alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for each line of a JSON Lines text, blank lines included."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def read_jsonl(path: Path) -> list[Any]:
    """Every non-blank line of a JSON Lines file, parsed."""
    return [json.loads(line) for _, line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON value per line, UTF-8, replacing the file."""
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
