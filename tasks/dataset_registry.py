"""The dataset registry: names in a `dataset_info.json` (LLaMA-Factory's format) to training examples.

An entry gives `file_name` (relative to the registry), `formatting` (alpaca or sharegpt),
`columns` (which keys hold the prompt, query, response, system, history, messages, chosen,
rejected, kto_tag or text), `tags` for sharegpt (which role names mean user and assistant),
and `ranking: true` for preference pairs. Datasets prepared for LLaMA-Factory work unchanged.

`to_example(entry, row, index, kind)` reads one row as the kind of example a training stage
needs (see `flows/spec.py:STAGE_DATA`):

    chat      {messages}                       a conversation ending with the assistant (sft)
    text      {text}                           plain text (pt; alpaca `prompt` column, LLaMA-Factory's way)
    pairs     {messages, chosen, rejected}     a prompt and a better and a worse answer (rm, dpo, orpo, simpo)
    feedback  {messages, label}                a conversation and whether its last answer is good (kto)
    prompts   {messages}                       a prompt to answer (ppo)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHIPPED_REGISTRY = Path(__file__).resolve().parents[1] / "data" / "dataset_info.json"

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "kto_tag",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": "system",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "kto_tag",
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


class DataError(ValueError):
    """A dataset the pipeline cannot read, with the file, row and what is wrong."""


class DatasetEntry(BaseModel):
    """One registry entry; unknown keys of LLaMA-Factory's format are kept but unused."""

    model_config = ConfigDict(extra="allow")

    name: str
    file_name: str
    formatting: str = "alpaca"
    columns: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    ranking: bool = False
    registry: str = ""

    @property
    def file(self) -> Path:
        return Path(self.registry).parent / self.file_name

    def column(self, role: str) -> str:
        defaults = SHAREGPT_COLUMNS if self.formatting == "sharegpt" else ALPACA_COLUMNS
        return self.columns.get(role, defaults.get(role, role))

    def tag(self, role: str) -> str:
        return self.tags.get(role, SHAREGPT_TAGS[role])


def load_registry(path: str | Path | None = None) -> dict[str, DatasetEntry]:
    registry = Path(path) if path else SHIPPED_REGISTRY
    try:
        raw = json.loads(registry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{registry}: no such dataset registry (dataset.registry)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{registry}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    entries = {}
    for name, fields in raw.items():
        try:
            entries[name] = DatasetEntry(name=name, registry=str(registry), **fields)
        except (ValidationError, TypeError) as exc:
            raise DataError(f"{registry}: entry {name!r} is malformed: {exc}") from None
        if entries[name].formatting not in ("alpaca", "sharegpt"):
            raise DataError(
                f"{registry}: entry {name!r}: formatting {entries[name].formatting!r} is not one of alpaca, sharegpt"
            )
    return entries


def resolve_dataset(name: str, registry: str | Path | None = None) -> DatasetEntry:
    entries = load_registry(registry)
    if name not in entries:
        where = registry or "data/dataset_info.json"
        raise DataError(f"unknown dataset {name!r}; {where} registers: {', '.join(sorted(entries))}")
    return entries[name]


def read_rows(entry: DatasetEntry) -> list[dict[str, Any]]:
    """The raw rows of a dataset file: a JSON list, or JSON Lines (.jsonl)."""
    file = entry.file
    if not file.is_file():
        raise DataError(f"dataset {entry.name!r}: file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}: line {number} is not valid JSON: {exc.msg}") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{file}: expected a list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{file}: row {index} is {type(row).__name__}, expected an object")
    return rows


def _text(entry: DatasetEntry, row: dict[str, Any], index: int, role: str, required: bool) -> str:
    key = entry.column(role)
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise DataError(f"{entry.file}: row {index} has no {key!r} ({role}) text")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{entry.file}: row {index}: {key!r} must be text, got {type(value).__name__}")
    return value


def alpaca_prompt(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """System, history and the user turn of an alpaca row (everything before the answer)."""
    messages = []
    system = _text(entry, row, index, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get(entry.column("history")) or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
        raise DataError(f"{entry.file}: row {index}: history must be a list of [prompt, response] pairs")
    for prompt, response in history:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    prompt = _text(entry, row, index, "prompt", required=True)
    query = _text(entry, row, index, "query", required=False)
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    return messages


def alpaca_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    response = _text(entry, row, index, "response", required=True)
    return [*alpaca_prompt(entry, row, index), {"role": "assistant", "content": response}]


def sharegpt_turns(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """The system prompt and every turn of a sharegpt row, as chat messages."""
    turns = row.get(entry.column("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{entry.file}: row {index} has no {entry.column('messages')!r} list")
    roles = {
        entry.tag("user_tag"): "user",
        entry.tag("assistant_tag"): "assistant",
        entry.tag("system_tag"): "system",
    }
    messages = []
    system = _text(entry, row, index, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for turn_index, turn in enumerate(turns):
        where = f"{entry.file}: row {index}, turn {turn_index}"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with {entry.tag('role_tag')!r}")
        tag = turn.get(entry.tag("role_tag"))
        if tag not in roles:
            raise DataError(f"{where}: role {tag!r} is not one of {', '.join(map(repr, roles))}")
        content = turn.get(entry.tag("content_tag"))
        if not isinstance(content, str):
            raise DataError(f"{where}: {entry.tag('content_tag')!r} must be text")
        messages.append({"role": roles[tag], "content": content})
    return messages


def sharegpt_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    messages = sharegpt_turns(entry, row, index)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{entry.file}: row {index}: the last turn must be the assistant's")
    return messages


def to_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """Normalize one row of either format to chat messages ({role, content})."""
    if entry.formatting == "sharegpt":
        return sharegpt_messages(entry, row, index)
    return alpaca_messages(entry, row, index)


def prompt_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """The conversation up to the answer: a trailing assistant turn, if any, is left out."""
    if entry.formatting == "sharegpt":
        messages = sharegpt_turns(entry, row, index)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        messages = alpaca_prompt(entry, row, index)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{entry.file}: row {index}: the prompt must end with the user's turn")
    return messages


def _answer(entry: DatasetEntry, row: dict[str, Any], index: int, role: str) -> str:
    """A chosen or rejected answer: text (alpaca) or a message object (sharegpt, LLaMA-Factory's way)."""
    key = entry.column(role)
    value = row.get(key)
    if isinstance(value, dict):
        value = value.get(entry.tag("content_tag"))
    if not isinstance(value, str) or not value:
        raise DataError(f"{entry.file}: row {index} has no {key!r} ({role}) answer text")
    return value


def _require(entry: DatasetEntry, wanted: bool, why: str) -> None:
    if not wanted:
        raise DataError(f"dataset {entry.name!r} ({entry.registry}): {why}")


def to_example(entry: DatasetEntry, row: dict[str, Any], index: int, kind: str) -> dict[str, Any]:
    """One row as the kind of example a training stage reads (see the module docstring)."""
    ranked = entry.ranking
    if kind == "pairs":
        _require(entry, ranked, "is not a preference dataset; pairs need 'ranking: true' and chosen/rejected")
        return {
            "messages": prompt_messages(entry, row, index),
            "chosen": _answer(entry, row, index, "chosen"),
            "rejected": _answer(entry, row, index, "rejected"),
        }
    _require(entry, not ranked, f"holds preference pairs, which a {kind!r} stage cannot read")
    if kind == "chat":
        return {"messages": to_messages(entry, row, index)}
    if kind == "prompts":
        return {"messages": prompt_messages(entry, row, index)}
    if kind == "text":
        _require(entry, entry.formatting == "alpaca", "plain text is read from an alpaca 'prompt' column")
        return {"text": _text(entry, row, index, "prompt", required=True)}
    if kind == "feedback":
        key = entry.column("kto_tag")
        label = row.get(key)
        if not isinstance(label, bool):
            raise DataError(f"{entry.file}: row {index}: {key!r} (kto_tag) must be true or false, got {label!r}")
        return {"messages": to_messages(entry, row, index), "label": label}
    raise ValueError(f"unknown example kind {kind!r}")
