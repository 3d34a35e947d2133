"""Examples to token ids and labels through the model's chat template (worker-side: no Prefect).

chat (sft): a conversation is rendered once; each assistant turn (an answer or a function
call) is a supervised span, found by rendering the conversation up to that turn with and
without it; tokens of system, user and tool (observation) turns get IGNORE_INDEX, unless
`train_on_prompt`. text (pt): texts with end-of-text, concatenated and cut into blocks.
pairs, feedback, prompts (TRL's stages): the prompt as the template opens the assistant's
turn and each answer as the template closes it, as text columns with token counts.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # the label of a token without loss: PyTorch's cross-entropy skips it


class TemplateError(ValueError):
    """The chat template cannot render what the data holds (tools, prefix by prefix)."""


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` list and assistant `tool_calls`."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        variables = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in variables and "tool_calls" in template


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: list | None = None) -> str:
    """The conversation as the tokenizer's chat template writes it (`apply_chat_template`'s text).

    The template is compiled once and rendered directly, with the variables
    `apply_chat_template` gives it: it renders every conversation several times, prefix by
    prefix, and the library's own call spends more time copying messages than rendering them.
    """
    if not tokenizer.chat_template:
        raise TemplateError(f"{tokenizer.name_or_path} has no chat template; set model.chat_template")
    return _compiled(tokenizer.chat_template).render(
        messages=messages,
        tools=tools or None,
        documents=None,
        add_generation_prompt=generation_prompt,
        **tokenizer.special_tokens_map,
    )


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """A chat template compiled as transformers compiles it (its sandbox, filters and extensions).

    Kept here, not on the tokenizer, which must stay picklable for `map`'s processes.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def supervised_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text up to its last assistant turn, and each assistant turn's character span."""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not answers:
        return "", []
    text = render(tokenizer, messages[: answers[-1] + 1], False, tools)
    spans = []
    for index in answers:
        before = render(tokenizer, messages[:index], True, tools)
        through = render(tokenizer, messages[: index + 1], False, tools)
        if not (text.startswith(through) and through.startswith(before)):
            raise TemplateError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    return text, spans


def _token_at(encoding: Any, position: int, length: int) -> int:
    """The index of the first token that starts at or after character `position` of the text."""
    if position >= length:
        return len(encoding.ids)
    index = encoding.char_to_token(position)
    if index is None:  # a character no token covers (rare): the next one that is
        return next((i for i, (start, _) in enumerate(encoding.offsets) if start >= position), len(encoding.ids))
    return index + 1 if encoding.token_to_chars(index)[0] < position else index


def encode_texts(tokenizer: Any, texts: list[str]) -> list[Any]:
    """The texts tokenized in one call, without special tokens, as `tokenizers` Encodings (ids and offsets)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TemplateError(f"{tokenizer.name_or_path}: a fast (Rust) tokenizer is needed to find each turn's tokens")
    return backend.encode_batch(texts, add_special_tokens=False)


def labelled(
    encoding: Any, text: str, spans: list[tuple[int, int]], train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels: a token is its own label where it starts inside a supervised span
    (anywhere, with train_on_prompt), else IGNORE_INDEX."""
    ids = list(encoding.ids)
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first, last = _token_at(encoding, start, len(text)), _token_at(encoding, end, len(text))
        labels[first:last] = ids[first:last]
    return ids, labels


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], train_on_prompt: bool = False, tools: list | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; each assistant turn is a supervised span."""
    text, spans = supervised_spans(tokenizer, messages, tools)
    return labelled(encode_texts(tokenizer, [text])[0], text, spans, train_on_prompt)


def encoded_conversations(
    tokenizer: Any, examples: list[dict[str, Any]], cutoff_len: int, train_on_prompt: bool
) -> Iterator[tuple[list[int], list[int], bool]]:
    """(input_ids, labels, truncated) of each example, cut to cutoff_len; the texts are tokenized in one call."""
    rendered = [supervised_spans(tokenizer, e["messages"], e.get("tools")) for e in examples]
    encodings = encode_texts(tokenizer, [text for text, _ in rendered])
    for (text, spans), encoding in zip(rendered, encodings, strict=True):
        ids, labels = labelled(encoding, text, spans, train_on_prompt)
        yield ids[:cutoff_len], labels[:cutoff_len], len(ids) > cutoff_len


def tokenize_examples(
    tokenizer: Any, examples: list[dict[str, Any]], cutoff_len: int, train_on_prompt: bool
) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Columns input_ids and labels, plus counts of examples, tokens, truncated and dropped
    (an example left with nothing to learn after the cut)."""
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = {"examples": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0, "dropped": 0}
    for ids, labels, truncated in encoded_conversations(tokenizer, examples, cutoff_len, train_on_prompt):
        stats["truncated"] += truncated
        supervised = sum(label != IGNORE_INDEX for label in labels)
        if supervised == 0:
            stats["dropped"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += supervised
    return columns, stats


def pack_texts(
    tokenizer: Any, examples: list[dict[str, Any]], cutoff_len: int
) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Plain texts, each ended by the end-of-text token, concatenated and cut into blocks."""
    stream: list[int] = []
    for ids in tokenizer([e["text"] for e in examples], add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    blocks = [stream[start : start + cutoff_len] for start in range(0, len(stream), cutoff_len)]
    blocks = [block for block in blocks if len(block) > 1]
    stats = {"examples": len(blocks), "documents": len(examples), "tokens": len(stream)}
    stats["supervised_tokens"] = sum(len(block) for block in blocks)
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}, stats


def render_answer(tokenizer: Any, messages: list[dict[str, Any]], answer: str) -> tuple[str, str]:
    """The prompt as the template opens the assistant's turn, and the answer as the template closes it."""
    prompt = render(tokenizer, messages, True)
    full = render(tokenizer, [*messages, {"role": "assistant", "content": answer}], False)
    if not full.startswith(prompt):
        raise TemplateError("the chat template does not render the answer after the generation prompt")
    return prompt, full[len(prompt) :].rstrip()  # ends at the end-of-turn token; TRL adds none twice


def trl_rows(tokenizer: Any, examples: list[dict[str, Any]], kind: str) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """Each example as the text columns TRL's trainers read: prompt + chosen/rejected (pairs),
    + completion/label (feedback), or prompt alone (prompts); with the token length of each sequence."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for example in examples:
        messages = example["messages"]
        if kind == "pairs":
            prompt, chosen = render_answer(tokenizer, messages, example["chosen"])
            _, rejected = render_answer(tokenizer, messages, example["rejected"])
            yield (
                {"prompt": prompt, "chosen": chosen, "rejected": rejected},
                [
                    count(prompt) + count(chosen),
                    count(prompt) + count(rejected),
                ],
            )
        elif kind == "feedback":
            prompt, completion = render_answer(tokenizer, messages[:-1], messages[-1]["content"])
            yield (
                {"prompt": prompt, "completion": completion, "label": example["label"]},
                [count(prompt) + count(completion)],
            )
        else:
            prompt = render(tokenizer, messages, True)
            yield {"prompt": prompt}, [count(prompt)]


def render_for_trl(
    tokenizer: Any, examples: list[dict[str, Any]], kind: str, cutoff_len: int
) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """The columns of `trl_rows` for a list of examples, and token counts."""
    columns: dict[str, list[Any]] = {}
    stats = {"examples": 0, "tokens": 0, "truncated": 0}
    for row, lengths in trl_rows(tokenizer, examples, kind):
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
        stats["examples"] += 1
        stats["tokens"] += sum(lengths)
        stats["truncated"] += max(lengths) > cutoff_len
    return columns, stats


def directory_chat_template(directory: Path) -> str | None:
    """The chat template a model directory's tokenizer renders with, read without loading it:
    `chat_template.jinja` (what transformers 5 saves), else tokenizer_config.json's entry."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "tokenizer_config.json").is_file():
        template = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None
