"""`tunefactory generate MODEL --input prompts.jsonl --output answers.jsonl`: batch answers.

Each input line is `{"messages": [{"role": ..., "content": ...}, ...]}` (a conversation; the
answer is the assistant's next turn) or `{"prompt": "..."}` (one user turn). Each output line
is the input line with `"answer"` added, in the same order. MODEL is what `tunefactory api`
takes (an export or adapter directory, or a registry reference). Answers are greedy, through
the model's chat template, in batches; the output is written under `.partial` and renamed when
every answer is in, so a stopped run leaves no half file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasks.dataset.jsonl import jsonl_lines, write_jsonl
from tasks.dataset.registry import DataError

ROLES = ("system", "user", "assistant")


def conversation(row: Any, where: str) -> list[dict[str, str]]:
    """The messages of one input line, or a DataError naming the line and what is wrong."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "messages" not in row:
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
    for turn, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}, message {turn}: expected a role ({', '.join(ROLES)}) and text content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_requests(path: Path) -> tuple[list[Any], list[list[dict[str, str]]]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows, conversations = [], []
    for number, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        conversations.append(conversation(row, f"{path}, line {number}"))
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no requests")
    return rows, conversations


def generate_file(
    reference: str, source: Path, target: Path, workspace: Path, max_new_tokens: int = 256, batch_size: int = 8
) -> int:
    """Answer every request of `source` into `target`; returns how many."""
    rows, conversations = read_requests(source)  # a bad line stops it before any weights load
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from tasks.components.generation import generate_answers
    from tasks.components.modeling import compute_setup, load_model
    from tasks.tools.api_server import model_directories

    model_dir, adapter = model_directories(reference, workspace)
    setup = compute_setup("auto")
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if adapter and (adapter / "tokenizer.json").exists() else model_dir
    )
    model = load_model(model_dir, adapter, setup.device, setup.autocast_dtype or torch.float32).eval()
    with tqdm(total=len(rows), unit="answer", desc="generating") as progress:
        answers = generate_answers(
            model, tokenizer, conversations, max_new_tokens, batch_size, setup.device, on_batch=progress.update
        )
    partial = target.with_name(target.name + ".partial")
    write_jsonl(partial, ({**row, "answer": answer} for row, answer in zip(rows, answers, strict=True)))
    os.replace(partial, target)
    return len(rows)
