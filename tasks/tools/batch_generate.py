"""`tunefactory generate MODEL --input prompts.jsonl --output answers.jsonl`: batch answers.

Each input line is `{"messages": [{"role": ..., "content": ...}, ...]}` (a conversation; the
answer is the assistant's next turn) or `{"prompt": "..."}` (one user turn). Each output line
is the input line with `"answer"` added, in the same order, or, where that one line could not be
answered, with `"error": {"code", "message"}` instead (as OpenAI's Batch API reports a failed
line: the line's own fields, its custom id among them, are kept; the other lines are answered).
MODEL is what `tunefactory api` takes. Answers are greedy, through the model's chat template,
in batches.

Nothing is lost to a stop: every input line is checked, and the output folder written to, before
any weights load; each batch's lines are appended to the output as it finishes; and a rerun of
the same command resumes after the last whole line. `answers.jsonl.meta.json` beside the output
holds digests of the input, the model and the settings, so a rerun with anything else changed
refuses to add to the file instead of mixing answers of two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.dataset.jsonl import jsonl_lines, read_jsonl
from tasks.dataset.registry import DataError

ROLES = ("system", "user", "assistant")


class Requests(BaseModel):
    """The input file, read and checked: its rows, their conversations and line numbers, its digest."""

    rows: list[Any]
    conversations: list[list[dict[str, str]]]
    line_numbers: list[int]
    sha256: str


class AnswersMeta(BaseModel):
    """What produced an answers file (its sidecar): a rerun adds to the file only where all of it matches."""

    model_config = ConfigDict(extra="forbid")

    input_sha256: str
    model_sha256: str
    max_new_tokens: int
    requests: int


# how a refusal names what changed between a run and its rerun
MEANING = {"input_sha256": "the input", "model_sha256": "the model", "max_new_tokens": "--max-new-tokens",
           "requests": "the input"}  # fmt: skip


class LineFailure(Exception):
    """One input line that could not be answered, with an OpenAI-style error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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


def check_encodable(row: Any, where: str) -> None:
    """JSON's "\\ud800" escape reads as half of a UTF-16 pair, which no tokenizer takes and UTF-8 cannot write."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        half = ascii(exc.object[exc.start : exc.end])
        raise DataError(f"{where}: holds {half}, half of a UTF-16 surrogate pair, which is not text") from None


def read_requests(path: Path) -> Requests:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows, conversations, numbers = [], [], []
    for number, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        conversations.append(conversation(row, f"{path}, line {number}"))
        check_encodable(row, f"{path}, line {number}")
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise DataError(f"{path}: no requests")
    return Requests(
        rows=rows, conversations=conversations, line_numbers=numbers, sha256=hashlib.sha256(data).hexdigest()
    )


def check_sizes(max_new_tokens: int, batch_size: int) -> None:
    for option, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise DataError(f"{option}: {value} is not allowed; give a whole number of 1 or more")


def meta_path(target: Path) -> Path:
    return target.with_name(target.name + ".meta.json")


def check_output(target: Path) -> None:
    """The output can be written: its folder exists and takes files, and it is not a folder itself."""
    if not target.parent.is_dir():
        raise DataError(f"--output {target}: the folder {target.parent} does not exist")
    if target.is_dir():
        raise DataError(f"--output {target}: is a folder; name the JSON Lines file to write")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise DataError(f"--output {target}: cannot be written here (permission denied)")


def model_sha256(model_dir: Path, adapter: Path | None) -> str:
    """The model's files by name, size and modification time: a retrained or re-exported model differs.
    (Not the weights' own sha256, which would read gigabytes before the first answer.)"""
    digest = hashlib.sha256()
    for folder in (model_dir, adapter):
        for file in sorted(p for p in folder.rglob("*") if p.is_file()) if folder else []:
            stat = file.stat()
            digest.update(f"{folder.name}/{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_meta(target: Path, meta: AnswersMeta) -> None:
    """Write the sidecar whole or not at all; its temporary file never outlives the call."""
    path = meta_path(target)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        raise DataError(f"--output {target}: cannot write {path.name} beside it ({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def answers_kept(target: Path, meta: AnswersMeta) -> int:
    """How many lines of an earlier run of the same request `target` holds (0 for a new file).

    A line cut short by a stop is dropped; a file of other requests is refused, naming it."""
    if not target.exists() or target.stat().st_size == 0:
        return 0
    other = f"--output {target}: holds answers"
    try:
        kept = AnswersMeta.model_validate_json(meta_path(target).read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        raise DataError(f"{other} not written by this command ({meta_path(target).name} is missing or "
                        "unreadable); remove it or name another --output") from None  # fmt: skip
    changed = dict.fromkeys(MEANING[name] for name, value in meta if getattr(kept, name) != value)
    if changed:
        raise DataError(f"{other} of another run ({' and '.join(changed)} changed since, per {meta_path(target).name}"
                        "); remove both files to start over, or name another --output")  # fmt: skip
    data = target.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if whole.count(b"\n") > meta.requests:
        raise DataError(f"{other} on more lines than the input has; remove it or name another --output")
    if len(whole) < len(data):
        with target.open("r+b") as handle:
            handle.truncate(len(whole))
    return whole.count(b"\n")


def whole_lines(target: Path) -> int:
    """How many whole lines an answers file holds (0 where there is none)."""
    return target.read_bytes().count(b"\n") if target.is_file() else 0


def answer_batch(answer: Callable[[list], list[str]], conversations: list) -> list[str | LineFailure]:
    """Answers of a batch; where the batch fails, each line alone, so one bad line costs only itself."""
    try:
        return answer(conversations)
    except Exception as exc:  # a template, a length or memory that one line breaks: that line's error
        if len(conversations) > 1:
            return [answer_batch(answer, [one])[0] for one in conversations]
        if isinstance(exc, LineFailure):
            return [exc]
        return [LineFailure("generation_failed", f"{type(exc).__name__}: {exc}")]


def output_line(row: dict[str, Any], number: int, result: str | LineFailure) -> str:
    """The input line with its answer, or with its error and no answer (an input's own is dropped)."""
    if isinstance(result, LineFailure):
        error = {"code": result.code, "message": f"line {number}: {result}"}
        line = {**{k: v for k, v in row.items() if k != "answer"}, "error": error}
    else:
        line = {**{k: v for k, v in row.items() if k != "error"}, "answer": result}
    return json.dumps(line, ensure_ascii=False) + "\n"


def append_lines(target: Path, lines: list[str]) -> None:
    """Add a finished batch to the output, on disk before the next batch starts."""
    try:
        with target.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise DataError(f"--output {target}: cannot be written ({exc.strerror}); the lines written are kept "
                        "and the same command resumes after them") from None  # fmt: skip


def load_answerer(model_dir: Path, adapter: Path | None, max_new_tokens: int) -> Callable[[list], list[str]]:
    """The model, loaded, as a function from a batch of conversations to their answers."""
    import torch
    from transformers import AutoTokenizer

    from tasks.components.generation import generate_answers
    from tasks.components.modeling import compute_setup, load_model

    setup = compute_setup("auto")
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if adapter and (adapter / "tokenizer.json").exists() else model_dir
    )
    model = load_model(model_dir, adapter, setup.device, setup.autocast_dtype or torch.float32).eval()
    context = getattr(model.config, "max_position_embeddings", None)

    def answer(conversations: list) -> list[str]:
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if context and length >= context:
                raise LineFailure(
                    "context_length_exceeded", f"the prompt is {length} tokens; the model reads at most {context}"
                )
        return generate_answers(model, tokenizer, conversations, max_new_tokens, len(conversations), setup.device)

    return answer


def generate_file(
    reference: str, source: Path, target: Path, workspace: Path, max_new_tokens: int = 256, batch_size: int = 8
) -> tuple[int, int]:
    """Answer every request of `source` into `target`, resuming an earlier run of the same request;
    returns (lines answered, lines failed) of the whole file."""
    from tqdm import tqdm

    from tasks.tools.api_server import model_directories

    requests = read_requests(source)  # a bad line, size or output stops it before any weights load
    check_sizes(max_new_tokens, batch_size)
    check_output(target)
    model_dir, adapter = model_directories(reference, workspace)
    meta = AnswersMeta(input_sha256=requests.sha256, model_sha256=model_sha256(model_dir, adapter),
                       max_new_tokens=max_new_tokens, requests=len(requests.rows))  # fmt: skip
    done = answers_kept(target, meta)
    write_meta(target, meta)
    if done < len(requests.rows):
        answer = load_answerer(model_dir, adapter, max_new_tokens)
        with tqdm(total=len(requests.rows), initial=done, unit="answer", desc="generating") as progress:
            for start in range(done, len(requests.rows), batch_size):
                batch = range(start, min(start + batch_size, len(requests.rows)))
                results = answer_batch(answer, [requests.conversations[i] for i in batch])
                numbered = zip(batch, results, strict=True)
                append_lines(target, [output_line(requests.rows[i], requests.line_numbers[i], r) for i, r in numbered])
                progress.update(len(batch))
    answered = sum("answer" in row for row in read_jsonl(target))
    return answered, len(requests.rows) - answered
