"""One raw row of a registered dataset to the example a training stage reads, placeholders filled.

`to_example(entry, row, index, kind)` reads a row as LLaMA-Factory's converters read it, for
the kind of example a stage needs (see `tasks/contracts/spec_sections.py:STAGE_DATA`):

    chat      {messages, tools}              a conversation ending with the assistant (sft)
    text      {text}                         plain text from the alpaca prompt column (pt)
    pairs     {messages, chosen, rejected}   a prompt with a better and a worse answer (rm, dpo, orpo, simpo)
    feedback  {messages, label}              a conversation whose last answer is good or bad (kto)
    prompts   {messages}                     a prompt to answer (ppo)

Messages are chat-template messages: roles system, user, assistant and tool; a function call
(sharegpt's `function_call` turn, openai's `tool_calls`) is an assistant message with
`tool_calls`, its result (`observation`) a `tool` message; `tools` is the list of function
schemas the conversation may call. Nothing here imports Prefect or torch: worker processes use it.

Placeholders: `<NAME>`/`{{name}}` and `<AUTHOR>`/`{{author}}` (the self-cognition values), and
`<KEY>`/`{{key}}` for any other key of `dataset.template_vars`. Any other `<MASK>` or `{{x}}` is
text. A name or author placeholder without a value is an error naming the dataset and row.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.dataset.registry import DataError, DatasetEntry

SELF_COGNITION_KEYS = ("name", "author")
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>|\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_placeholders(text: str, values: dict[str, str], where: str) -> str:
    """Replace `<KEY>` and `{{key}}` with `values[key.lower()]` in one pass, for the keys that are placeholders."""

    def substitute(match: re.Match[str]) -> str:
        key = (match.group(1) or match.group(2)).lower()
        if key in values:
            return values[key]
        if key in SELF_COGNITION_KEYS:
            raise DataError(
                f"{where}: placeholder {match.group(0)} has no value; "
                f"set dataset.template_vars.{key} (given: {', '.join(sorted(values)) or 'none'})",
                reason="placeholder without a value",
            )
        return match.group(0)  # not a placeholder: text such as <MASK> or {{x}}

    return PLACEHOLDER.sub(substitute, text)


def fill_example(example: dict[str, Any], values: dict[str, str], where: str) -> dict[str, Any]:
    """Every text of an example (messages, answers, plain text) with its placeholders filled."""
    for message in example.get("messages", []):
        if message.get("content"):
            message["content"] = fill_placeholders(message["content"], values, where)
    for key in ("chosen", "rejected", "text"):
        if key in example:
            example[key] = fill_placeholders(example[key], values, where)
    return example


def _where(entry: DatasetEntry, index: int) -> str:
    return f"{entry.where}, row {index}"


def _text(entry: DatasetEntry, row: dict[str, Any], index: int, role: str, required: bool) -> str:
    key = entry.column(role)
    value = row.get(key) if key else None
    if value is None or value == "":
        if required:
            present = ", ".join(k for k, v in row.items() if v is not None and not k.startswith("__")) or "none"
            raise DataError(
                f"{_where(entry, index)}: no {key!r} ({role}) text (its columns: {present})",
                reason=f"no {role} text",
            )
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{_where(entry, index)}: {key!r} ({role}) must be text, got {type(value).__name__}",
            reason=f"{role} not text",
        )
    return value


def parse_tools(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, Any]] | None:
    """The tools column as a list of function schemas in the chat-template form ({type: function, function})."""
    key = entry.column("tools")
    value = row.get(key) if key else None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{_where(entry, index)}: {key!r} (tools) is not JSON: {exc.msg}", "tools not JSON"
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise DataError(f"{_where(entry, index)}: {key!r} (tools) must be a list of function schemas", "bad tools")
    return [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in value]


def _tool_calls(entry: DatasetEntry, content: str, where: str) -> list[dict[str, Any]]:
    """A sharegpt function_call turn ({"name", "arguments"} as JSON, or a list of them) as tool calls."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: the function call is not JSON: {exc.msg}", reason="function call not JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(call, dict) and isinstance(call.get("name"), str) for call in calls):
        raise DataError(f"{where}: a function call needs a 'name' (and 'arguments')", reason="function call not JSON")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def alpaca_prompt(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """System, history and the user turn of an alpaca row (everything before the answer)."""
    messages = []
    system = _text(entry, row, index, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history_key = entry.column("history")
    history = (row.get(history_key) if history_key else None) or []
    if not isinstance(history, list) or not all(isinstance(t, list | tuple) and len(t) == 2 for t in history):
        raise DataError(f"{_where(entry, index)}: history must be a list of [prompt, response] pairs", "bad history")
    for turn, (prompt, response) in enumerate(history):
        for part, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):  # str() would make None into the text "None"
                where = f"{_where(entry, index)}: history turn {turn}"
                raise DataError(f"{where}: the {part} must be text, got {type(value).__name__}", "bad history")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    prompt = _text(entry, row, index, "prompt", required=False)
    query = _text(entry, row, index, "query", required=False)
    if not prompt and not query:
        _text(entry, row, index, "prompt", required=True)  # raises, naming the prompt column
    messages.append({"role": "user", "content": "\n".join(part for part in (prompt, query) if part)})
    return messages


def conversation_turns(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The system prompt and every turn of a sharegpt or openai row, as chat messages.

    As in LLaMA-Factory, user and observation turns take the odd places and assistant and
    function-call turns the even ones; a leading system turn is the system prompt.
    """
    key = entry.column("messages")
    turns = row.get(key) if key else None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{_where(entry, index)}: no {key!r} list of turns", reason="no turns")
    role_tag, content_tag = entry.tag("role_tag"), entry.tag("content_tag")
    roles = {
        entry.tag("user_tag"): "user",
        entry.tag("assistant_tag"): "assistant",
        entry.tag("observation_tag"): "tool",
        entry.tag("function_tag"): "function",
        entry.tag("system_tag"): "system",
    }
    messages = []
    system = _text(entry, row, index, "system", required=False)
    for turn_index, turn in enumerate(turns):
        where = f"{_where(entry, index)}, turn {turn_index}"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with {role_tag!r}", reason="turn not an object")
        role = roles.get(turn.get(role_tag))
        if role is None:
            raise DataError(
                f"{where}: role {turn.get(role_tag)!r} is not one of {', '.join(map(repr, roles))}",
                reason="unknown role",
            )
        content = turn.get(content_tag)
        if content is None and entry.formatting == "openai" and turn.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where}: {content_tag!r} must be text", reason="turn not text")
        if role == "system" and turn_index == 0:
            system = content
            continue
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "function":
            message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(entry, content, where)}
        elif role == "assistant" and turn.get("tool_calls"):  # openai: the calls ride on the assistant turn
            message["tool_calls"] = [
                {"type": "function", "function": call.get("function", call)} for call in turn["tool_calls"]
            ]
        if role == "system" or (len(messages) % 2 == 0) != (role in ("user", "tool")):
            expected = "a user or observation" if len(messages) % 2 == 0 else "an assistant or function-call"
            raise DataError(
                f"{where}: {turn.get(role_tag)!r} where {expected} turn was expected (turns alternate)",
                reason="turns out of order",
            )
        messages.append(message)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _ending(messages: list[dict[str, Any]], role: str, entry: DatasetEntry, index: int) -> None:
    if not messages or messages[-1]["role"] != role:
        whose = "the assistant's" if role == "assistant" else "the user's"
        raise DataError(f"{_where(entry, index)}: the conversation must end with {whose} turn", "wrong last turn")


def chat_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """A whole conversation, ending with the assistant's answer."""
    if entry.formatting == "alpaca":
        response = _text(entry, row, index, "response", required=True)
        return [*alpaca_prompt(entry, row, index), {"role": "assistant", "content": response}]
    messages = conversation_turns(entry, row, index)
    _ending(messages, "assistant", entry, index)
    return messages


def prompt_messages(entry: DatasetEntry, row: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The conversation up to the answer: a trailing assistant turn, if any, is left out."""
    if entry.formatting == "alpaca":
        return alpaca_prompt(entry, row, index)
    messages = conversation_turns(entry, row, index)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    _ending(messages, "user", entry, index)
    return messages


def _answer(entry: DatasetEntry, row: dict[str, Any], index: int, role: str) -> str:
    """A chosen or rejected answer: text (alpaca) or a message object (sharegpt, LLaMA-Factory's way)."""
    key = entry.column(role)
    value = row.get(key) if key else None
    if isinstance(value, dict):
        value = value.get(entry.tag("content_tag"))
    if not isinstance(value, str) or not value:
        raise DataError(f"{_where(entry, index)}: no {key!r} ({role}) answer text", reason=f"no {role} answer")
    return value


def _require(entry: DatasetEntry, wanted: bool, why: str) -> None:
    if not wanted:
        raise DataError(f"{entry.where}: {why}", reason="wrong kind")


def check_kind(entry: DatasetEntry, kind: str) -> None:
    """Refuse an entry whose kind of rows the stage cannot read, before any row is read."""
    if kind == "pairs":
        _require(entry, entry.ranking, "is not a preference dataset; pairs need 'ranking: true' and chosen/rejected")
    else:
        _require(entry, not entry.ranking, f"holds preference pairs, which a {kind!r} stage cannot read")
    if kind == "text":
        _require(entry, entry.formatting == "alpaca", "plain text is read from an alpaca 'prompt' column")
    if kind == "feedback":
        _require(entry, entry.column("kto_tag") is not None, "a kto stage needs a kto_tag column (good or bad)")


def to_example(entry: DatasetEntry, row: dict[str, Any], index: int, kind: str) -> dict[str, Any]:
    """One row as the kind of example a training stage reads (see the module docstring)."""
    check_kind(entry, kind)
    if kind == "pairs":
        return {
            "messages": prompt_messages(entry, row, index),
            "chosen": _answer(entry, row, index, "chosen"),
            "rejected": _answer(entry, row, index, "rejected"),
        }
    if kind == "chat":
        return {"messages": chat_messages(entry, row, index), "tools": parse_tools(entry, row, index)}
    if kind == "prompts":
        return {"messages": prompt_messages(entry, row, index)}
    if kind == "text":
        return {"text": _text(entry, row, index, "prompt", required=True)}
    if kind == "feedback":
        key = entry.column("kto_tag")
        label = row.get(key)
        if not isinstance(label, bool):
            raise DataError(
                f"{_where(entry, index)}: {key!r} (kto_tag) must be true or false, got {label!r}", reason="bad kto_tag"
            )
        return {"messages": chat_messages(entry, row, index), "label": label}
    raise ValueError(f"unknown example kind {kind!r}")


def templated_example(
    entry: DatasetEntry, row: dict[str, Any], index: int, kind: str, values: dict[str, str]
) -> dict[str, Any]:
    """`to_example` with the placeholders filled, tagged with its dataset and row."""
    example = fill_example(to_example(entry, row, index, kind), values, _where(entry, index))
    return {"dataset": entry.name, "row": index, **example}
