"""Stage 2: read the registered datasets, fill their placeholders, shuffle, sample and split.

`<NAME>` and `{{name}}` both take `template_vars.name`. Values go in literally: a value that
itself looks like a placeholder is not substituted again. A placeholder with no value is an
error naming the dataset, the row and the placeholder.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from flows.spec import DatasetSpec
from tasks.dataset_registry import DataError, read_rows, resolve_dataset, to_example
from tasks.prefect_artifacts import publish_preview
from tasks.stage_output import (
    Manifest,
    StageResult,
    code_version,
    published_dir,
    run_stage,
    sha256_file,
    stage_id,
    stage_run_name,
    tree_digest,
)
from tasks.tracking import StageRun, Tracking

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>|\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_placeholders(text: str, values: dict[str, str], where: str) -> str:
    """Replace `<KEY>` and `{{key}}` with `values[key.lower()]`, in one pass."""

    def substitute(match: re.Match[str]) -> str:
        key = (match.group(1) or match.group(2)).lower()
        if key not in values:
            raise DataError(
                f"{where}: placeholder {match.group(0)} has no value; "
                f"set dataset.template_vars.{key} (given: {', '.join(sorted(values)) or 'none'})"
            )
        return values[key]

    return PLACEHOLDER.sub(substitute, text)


def fill_example(example: dict[str, Any], values: dict[str, str], where: str) -> dict[str, Any]:
    """Every text of an example (messages, answers, plain text) with its placeholders filled."""
    for message in example.get("messages", []):
        message["content"] = fill_placeholders(message["content"], values, where)
    for key in ("chosen", "rejected", "text"):
        if key in example:
            example[key] = fill_placeholders(example[key], values, where)
    return example


def templated_examples(
    names: list[str],
    registry: str | None,
    template_vars: dict[str, str],
    max_samples: int | None = None,
    kind: str = "chat",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All rows of the named datasets as templated examples of `kind`, plus a record of each source."""
    examples, sources = [], []
    for name in names:
        entry = resolve_dataset(name, registry)
        rows = read_rows(entry)[:max_samples]
        for index, row in enumerate(rows):
            where = f"dataset {name!r} ({entry.file}), row {index}"
            example = fill_example(to_example(entry, row, index, kind), template_vars, where)
            examples.append({"dataset": name, "row": index, **example})
        sources.append({"name": name, "file": str(entry.file), "sha256": sha256_file(entry.file), "rows": len(rows)})
    return examples, sources


def split_examples(
    examples: list[dict[str, Any]], val_size: float, shuffle: bool, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `seed`, then hold out `val_size` of the rows (at least one when asked for)."""
    ordered = list(examples)
    if shuffle:
        random.Random(seed).shuffle(ordered)
    held_out = max(1, round(len(ordered) * val_size)) if val_size > 0 and len(ordered) > 1 else 0
    return ordered[held_out:], ordered[:held_out]


def preview_rows(examples: list[dict[str, Any]], count: int) -> list[dict[str, str]]:
    """The first rows flattened for a table: dataset, row, and each role's text."""
    table = []
    for example in examples[:count]:
        row = {"dataset": example["dataset"], "row": str(example["row"])}
        for message in example.get("messages", []):
            row[message["role"]] = (row.get(message["role"], "") + " " + message["content"]).strip()
        row.update({k: str(example[k]) for k in ("chosen", "rejected", "label", "text") if k in example})
        table.append(row)
    return table


def source_digests(names: list[str], registry: str | None) -> list[dict[str, str]]:
    """The files behind the named datasets with their hashes: an edited file changes the key."""
    entries = [resolve_dataset(name, registry) for name in names]
    for entry in entries:
        if not entry.file.is_file():
            raise DataError(f"dataset {entry.name!r}: file {entry.file} does not exist")
    return [{"name": e.name, "sha256": sha256_file(e.file)} for e in entries]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build(config: DatasetSpec, kind: str, out: Path, run: StageRun) -> StageResult:
    examples, sources = templated_examples(
        config.names, config.registry, config.template_vars, config.max_samples, kind
    )
    train, val = split_examples(examples, config.val_size, config.shuffle, config.seed)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    preview = preview_rows(train, config.preview_rows)
    (out / "preview.json").write_text(json.dumps(preview, ensure_ascii=False, indent=2))
    run.log_table(preview, "preview.json")
    publish_preview(preview)
    for source in sources:  # each raw file as it is on disk
        run.log_dataset(
            read_rows(resolve_dataset(source["name"], config.registry)),
            name=source["name"],
            source=source["file"],
            digest=source["sha256"][:16],
            context="raw",
        )
    templated_digest = tree_digest(out, ["train.jsonl", "val.jsonl"])
    run.log_dataset(
        [{"split": split, **e} for split, rows in (("train", train), ("val", val)) for e in rows],
        name="templated",
        source=str(published_dir(out)),
        digest=templated_digest[:16],
        context="templated",
    )
    logger = get_run_logger()
    logger.info("templated %d rows: %d train, %d validation", len(examples), len(train), len(val))
    for row in preview:
        logger.info(
            "preview %s #%s: %s",
            row["dataset"],
            row["row"],
            {k: v for k, v in row.items() if k not in ("dataset", "row")},
        )
    info = {"sources": sources, "template_vars": config.template_vars, "templated_digest": templated_digest}
    return StageResult(
        metrics={"rows": len(examples), "train_rows": len(train), "val_rows": len(val)},
        info={**info, "kind": kind},
    )


@task(name="template-dataset", task_run_name=stage_run_name("template dataset"))
def template_dataset(
    config: DatasetSpec, workspace: Path, tracking: Tracking, kind: str = "chat", for_stage: str = "train"
) -> Manifest:
    """Write train.jsonl and val.jsonl of examples of `kind` with the template values filled in.

    `for_stage` names the training stage the data is for; a later one's is "template-<for_stage>".
    """
    key_config = {
        **config.model_dump(mode="json"),
        "kind": kind,
        "sources": source_digests(config.names, config.registry),
    }
    return run_stage(
        stage_id("template", for_stage),
        key_config,
        [],
        code_version(__file__, str(Path(__file__).with_name("dataset_registry.py"))),
        workspace,
        tracking,
        lambda out, run: _build(config, kind, out, run),
    )
