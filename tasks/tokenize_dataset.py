"""Stage 3: render each example with the base model's chat template and mask the labels.

chat (sft): labels are -100 (no loss) everywhere except the assistant turns, unless
`train_on_prompt`; examples are cut to `cutoff_len` tokens; one left with nothing to learn is
dropped and counted. text (pt): each text plus end-of-text, concatenated and cut into blocks
of `cutoff_len` tokens, every token supervised. pairs, feedback and prompts (rm, dpo, orpo,
simpo, kto, ppo): the prompt rendered with the chat template up to the assistant's turn and
each answer rendered as the template closes it, as text columns for TRL's trainers, with
token counts. The result is saved with `datasets.save_to_disk` as `train/` and `val/`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from flows.spec import TokenizeSpec
from tasks.prefect_artifacts import publish_token_stats
from tasks.stage_output import (
    Manifest,
    StageResult,
    code_version,
    published_dir,
    run_stage,
    stage_id,
    stage_run_name,
    tree_digest,
)
from tasks.tracking import StageRun, Tracking

IGNORE_INDEX = -100


def render_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; each assistant turn is a supervised span.

    Rendering the conversation up to each assistant turn, with and without that turn, gives
    the exact token span the template produces for it (its content and end-of-turn marker).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_ids(tokenizer, messages[:index], generation_prompt=True)
        full = render_ids(tokenizer, messages[: index + 1], generation_prompt=False)
        if prompt[: len(input_ids)] != input_ids or full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render conversations prefix by prefix")
        new_prompt, response = prompt[len(input_ids) :], full[len(prompt) :]
        input_ids += new_prompt + response
        labels += (new_prompt if train_on_prompt else [IGNORE_INDEX] * len(new_prompt)) + response
    return input_ids, labels


def tokenize_examples(
    tokenizer: Any, examples: list[dict[str, Any]], cutoff_len: int, train_on_prompt: bool
) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Columns input_ids and labels, plus counts of examples, tokens, truncated and dropped."""
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = {"examples": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0, "dropped": 0}
    for example in examples:
        ids, labels = encode_conversation(tokenizer, example["messages"], train_on_prompt)
        if len(ids) > cutoff_len:
            stats["truncated"] += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
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
    for example in examples:
        stream += tokenizer(example["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[start : start + cutoff_len] for start in range(0, len(stream), cutoff_len)]
    blocks = [block for block in blocks if len(block) > 1]
    stats = {"examples": len(blocks), "documents": len(examples), "tokens": len(stream)}
    stats["supervised_tokens"] = sum(len(block) for block in blocks)
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}, stats


def render_answer(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> tuple[str, str]:
    """The prompt as the template opens the assistant's turn, and the answer as the template closes it."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the answer after the generation prompt")
    return prompt, full[len(prompt) :].rstrip()  # ends at the end-of-turn token; TRL adds none twice


def render_for_trl(
    tokenizer: Any, examples: list[dict[str, Any]], kind: str, cutoff_len: int
) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """Text columns TRL's trainers read: prompt + chosen/rejected (pairs), + completion/label
    (feedback), or prompt alone (prompts); and token counts."""
    columns: dict[str, list[Any]] = {}
    stats = {"examples": 0, "tokens": 0, "truncated": 0}

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for example in examples:
        messages = example["messages"]
        if kind == "pairs":
            prompt, chosen = render_answer(tokenizer, messages, example["chosen"])
            _, rejected = render_answer(tokenizer, messages, example["rejected"])
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            lengths = [count(prompt) + count(chosen), count(prompt) + count(rejected)]
        elif kind == "feedback":
            prompt, completion = render_answer(tokenizer, messages[:-1], messages[-1]["content"])
            row = {"prompt": prompt, "completion": completion, "label": example["label"]}
            lengths = [count(prompt) + count(completion)]
        else:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            row, lengths = {"prompt": prompt}, [count(prompt)]
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
        stats["examples"] += 1
        stats["tokens"] += sum(lengths)
        stats["truncated"] += max(lengths) > cutoff_len
    return columns, stats


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tokenize_split(
    tokenizer: Any, examples: list[dict[str, Any]], kind: str, config: TokenizeSpec
) -> tuple[dict[str, list[Any]], dict[str, int]]:
    if kind == "chat":
        return tokenize_examples(tokenizer, examples, config.cutoff_len, config.train_on_prompt)
    if kind == "text":
        return pack_texts(tokenizer, examples, config.cutoff_len)
    return render_for_trl(tokenizer, examples, kind, config.cutoff_len)


def _build(config: TokenizeSpec, kind: str, templated: Path, model_path: Path, out: Path, run: StageRun) -> StageResult:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    metrics: dict[str, float] = {}
    samples, lengths = [], []
    for split in ("train", "val"):
        examples = read_jsonl(templated / f"{split}.jsonl")
        columns, stats = tokenize_split(tokenizer, examples, kind, config)
        with contextlib.redirect_stdout(io.StringIO()):  # datasets' fingerprinting prints bytecode here
            Dataset.from_dict(columns).save_to_disk(str(out / split))
        metrics.update({f"{split}_{name}": value for name, value in stats.items()})
        if "input_ids" in columns:
            samples += [tokenizer.decode(ids) for ids in columns["input_ids"][:1]]
            lengths += [{"split": split, "tokens": len(ids)} for ids in columns["input_ids"]]
        elif stats["examples"]:
            samples.append(json.dumps({k: v[0] for k, v in columns.items()}, ensure_ascii=False, indent=2))
            lengths += [{"split": split, "prompt": prompt} for prompt in columns.get("prompt", [])]
        get_run_logger().info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in stats.items()))
    if metrics["train_examples"] == 0:
        raise ValueError("no training example is left after tokenization; raise tokenize.cutoff_len")
    run.log_text(samples[0], "sample_rendered.txt")
    digest = tree_digest(out, ["train", "val"])
    run.log_dataset(lengths, name="tokenized", source=str(published_dir(out)), digest=digest[:16], context="tokenized")
    publish_token_stats(metrics)
    return StageResult(
        metrics=metrics, info={"tokenized_digest": digest, "kind": kind, "cutoff_len": config.cutoff_len}
    )


@task(name="tokenize-dataset", task_run_name=stage_run_name("tokenize dataset"))
def tokenize_dataset(
    config: TokenizeSpec,
    templated: Manifest,
    base_model: Manifest,
    workspace: Path,
    tracking: Tracking,
    for_stage: str = "train",
) -> Manifest:
    """Tokenize the templated split with the base model's chat template and label masks."""
    from tasks.materialize_model import base_model_path

    model_path = base_model_path(base_model)
    kind = templated.info.get("kind", "chat")
    return run_stage(
        stage_id("tokenize", for_stage),
        {**config.model_dump(mode="json"), "kind": kind},
        [templated, base_model],
        code_version(__file__),
        workspace,
        tracking,
        lambda out, run: _build(config, kind, templated.path, model_path, out, run),
    )
