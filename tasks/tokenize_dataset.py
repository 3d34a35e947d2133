"""Stage 3: render each example with the base model's chat template and mask the labels.

Labels are -100 (no loss) everywhere except the assistant turns, unless `train_on_prompt`.
Examples are cut to `cutoff_len` tokens; one left with nothing to learn is dropped and counted.
The result is saved with `datasets.save_to_disk` as `train/` and `val/`.
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
from tasks.stage_output import Manifest, StageResult, code_version, published_dir, run_stage, tree_digest
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _build(config: TokenizeSpec, templated: Path, model_path: Path, out: Path, run: StageRun) -> StageResult:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    metrics: dict[str, float] = {}
    samples, lengths = [], []
    for split in ("train", "val"):
        examples = read_jsonl(templated / f"{split}.jsonl")
        columns, stats = tokenize_examples(tokenizer, examples, config.cutoff_len, config.train_on_prompt)
        with contextlib.redirect_stdout(io.StringIO()):  # datasets' fingerprinting prints bytecode here
            Dataset.from_dict(columns).save_to_disk(str(out / split))
        metrics.update({f"{split}_{name}": value for name, value in stats.items()})
        samples += columns["input_ids"][:1]
        lengths += [{"split": split, "tokens": len(ids)} for ids in columns["input_ids"]]
        get_run_logger().info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in stats.items()))
    if metrics["train_examples"] == 0:
        raise ValueError("no training example is left after tokenization; raise tokenize.cutoff_len")
    run.log_text(tokenizer.decode(samples[0]), "sample_rendered.txt")
    digest = tree_digest(out, ["train", "val"])
    run.log_dataset(lengths, name="tokenized", source=str(published_dir(out)), digest=digest[:16], context="tokenized")
    publish_token_stats(metrics)
    return StageResult(metrics=metrics, info={"tokenized_digest": digest})


@task(name="tokenize-dataset", task_run_name="tokenize dataset")
def tokenize_dataset(
    config: TokenizeSpec, templated: Manifest, base_model: Manifest, workspace: Path, tracking: Tracking
) -> Manifest:
    """Tokenize the templated split with the base model's chat template and label masks."""
    from tasks.materialize_model import base_model_path

    model_path = base_model_path(base_model)
    return run_stage(
        "tokenize",
        config.model_dump(mode="json"),
        [templated, base_model],
        code_version(__file__),
        workspace,
        tracking,
        lambda out, run: _build(config, templated.path, model_path, out, run),
    )
