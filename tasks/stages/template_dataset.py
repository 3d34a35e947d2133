"""Stage 2: read the registered datasets, fill their placeholders, shuffle, sample and split.

The work runs in `tasks/workers/data.py` (a child process streaming the rows through Arrow); this
task keys, launches and records it. Placeholders are described in `tasks/dataset/rows.py`. A row
that cannot be read stops the stage with its dataset, row and reason, or, with
`dataset.on_bad_row: skip`, is skipped and counted per reason (log, MLflow metrics, preview).

`peek_examples` reads the first rows the same way, for `tunefactory preview` and the checks
made before stage one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.contracts.child_process import final, run_worker, usable_cores
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.spec_sections import DatasetSpec
from tasks.contracts.stage_infos import TemplateInfo
from tasks.contracts.worker_configs import TemplateJob
from tasks.contracts.worker_events import Templated
from tasks.dataset.registry import DataError, resolve_dataset
from tasks.dataset.rows import check_kind, templated_example
from tasks.dataset.sources import ROW_COLUMN, load_source, sample_rows, source_record
from tasks.runtime.code_version import code_version
from tasks.runtime.prefect_artifacts import publish_preview
from tasks.runtime.stage_output import (
    StageContext,
    published_dir,
    run_stage,
    scratch_dir,
    stage_id,
    stage_run_name,
    tree_digest,
)
from tasks.runtime.tracking import StageRun

PEEK_ROWS = 200


def peek_examples(
    names: list[str],
    registry: str | None,
    template_vars: dict[str, str],
    kind: str = "chat",
    rows: int | None = PEEK_ROWS,
    max_samples: int | None = None,
    skip_bad_rows: bool = False,
    seed: int = 42,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first `rows` rows (None: all) of each named dataset as templated examples, and each source
    (its `rows`: how many were read, all of them where `rows` is None).

    A bad row raises DataError naming the dataset, row and reason, unless `skip_bad_rows`.
    """
    examples, sources = [], []
    for name in names:
        entry = resolve_dataset(name, registry)
        check_kind(entry, kind)
        wanted = rows if max_samples is None or rows is None else min(rows, max_samples)
        raw = sample_rows(load_source(entry, head=wanted), entry.num_samples, max_samples, seed)
        head = raw if rows is None or rows >= len(raw) else raw.select(range(rows))
        skipped = 0
        for row in head:
            try:
                examples.append(templated_example(entry, row, row[ROW_COLUMN], kind, template_vars))
            except DataError:
                if not skip_bad_rows:
                    raise
                skipped += 1
        sources.append({"name": name, "file": str(entry.file), "rows": len(raw), "skipped_in_first": skipped})
    return examples, sources


def split_examples(
    examples: list[dict[str, Any]], val_size: float, shuffle: bool, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `seed`, then hold out `val_size` of the rows (at least one when asked for).

    The data worker orders rows the same way, so a preview shows what the stage trains on.
    """
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    held_out = max(1, round(len(order) * val_size)) if val_size > 0 and len(order) > 1 else 0
    return [examples[i] for i in order[held_out:]], [examples[i] for i in order[:held_out]]


PREVIEW_CHARS = 400


def _clip(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + f"... ({len(text)} characters)"


def preview_rows(examples: list[dict[str, Any]], count: int) -> list[dict[str, str]]:
    """The first rows flattened for a table: dataset, row, and each role's text (long texts clipped)."""
    table = []
    for example in examples[:count]:
        row = {"dataset": example["dataset"], "row": str(example["row"])}
        for message in example.get("messages") or []:
            text = message.get("content") or json.dumps(message.get("tool_calls"), ensure_ascii=False)
            row[message["role"]] = (row.get(message["role"], "") + " " + text).strip()
        if example.get("tools"):
            row["tools"] = ", ".join(t["function"].get("name", "?") for t in example["tools"])
        row.update({k: str(example[k]) for k in ("chosen", "rejected", "label", "text") if k in example})
        table.append({k: _clip(v) for k, v in row.items()})
    return table


def source_digests(names: list[str], registry: str | None) -> list[dict[str, Any]]:
    """Each named dataset's source with its digest: an edited file or another hub revision changes the key."""
    return [source_record(resolve_dataset(name, registry)).model_dump(exclude_none=True) for name in names]


def _build(config: DatasetSpec, kind: str, num_proc: int, workspace: Path, out: Path, run: StageRun) -> StageResult:
    logger = get_run_logger()
    job = TemplateJob(
        **config.model_dump(include={"names", "registry", "template_vars", "max_samples", "shuffle", "seed",
                                     "val_size", "preview_rows", "on_bad_row"}),
        kind=kind,
        num_proc=num_proc,
        scratch_dir=str(scratch_dir(workspace)),
        out=str(out),
    )  # fmt: skip
    done = final(run_worker("tasks.workers.data", job, out / "job.json", on_output=logger.info), Templated)
    skipped, preview = done.skipped, preview_rows(done.preview, 10**9)
    (out / "preview.json").write_text(json.dumps(preview, ensure_ascii=False, indent=2))
    run.log_table(preview, "preview.json")
    publish_preview(preview, skipped)
    for source in done.sources:
        run.log_dataset(name=source.name, source=source.file, digest=source.sha256[:16], context="raw")
    templated_digest = tree_digest(out, ["train", "val"])
    run.log_dataset(name="templated", source=str(published_dir(out)), digest=templated_digest[:16], context="templated")
    logger.info("templated %d rows: %d train, %d validation", done.rows, done.train_rows, done.val_rows)
    for reason, count in skipped.items():
        logger.warning("skipped %d rows of %s", count, reason)
    for row in preview:
        logger.info("preview %s #%s: %s", row["dataset"], row["row"],
                    {k: v for k, v in row.items() if k not in ("dataset", "row")})  # fmt: skip
    metrics = {**done.model_dump(include={"rows", "train_rows", "val_rows"}), "skipped_rows": sum(skipped.values())}
    metrics.update({f"skipped_{_metric_name(reason)}": count for reason, count in skipped.items()})
    info = TemplateInfo(
        sources=done.sources,
        template_vars=config.template_vars,
        templated_digest=templated_digest,
        kind=kind,
        skipped=skipped,
    )
    return StageResult(metrics=metrics, info=info)


def _metric_name(reason: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in reason)


@task(name="template-dataset", task_run_name=stage_run_name("template dataset"))
def template_dataset(
    ctx: StageContext,
    config: DatasetSpec,
    kind: str = "chat",
    for_stage: str = "train",
    num_proc: int | None = None,
) -> Manifest:
    """Write train/ and val/ (Arrow) of examples of `kind` with the template values filled in.

    `for_stage` names the training stage the data is for; a later one's is "template-<for_stage>".
    `num_proc` (default: the cores) changes how fast, not what is written, so it is not in the key.
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
        code_version(__name__, ("tasks.workers.data",), ("datasets", "pyarrow")),
        ctx,
        lambda out, run: _build(config, kind, num_proc or usable_cores(), ctx.workspace, out, run),
    )
