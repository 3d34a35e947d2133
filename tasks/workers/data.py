"""The data stages' worker: `python -m tasks.workers.data JOB.json` templates or tokenizes a dataset.

Rows stream through the `datasets` library: sources are read into memory-mapped Arrow files,
`map(batched=True)` converts a batch at a time in `num_proc` processes, and the results are
written with `save_to_disk`, so memory is bounded by the batch, not by the dataset. Launched by
the template and tokenize stages (tasks/stages/template_dataset.py, tasks/stages/tokenize_dataset.py); it
imports neither Prefect nor `flows`, and reports through events (tasks/contracts/child_process.py).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from tasks.components.chat_encoding import (
    IGNORE_INDEX,
    TemplateError,
    encoded_conversations,
    template_supports_tools,
    trl_rows,
)
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.worker_configs import DataJob, TemplateJob, TokenizeJob
from tasks.contracts.worker_events import Note, SplitCounts, Templated, Tokenized
from tasks.dataset.registry import DataError, DatasetEntry, resolve_dataset
from tasks.dataset.rows import check_kind, templated_example
from tasks.dataset.sources import ROW_COLUMN, load_source, sample_rows, source_record

BATCH_ROWS = 1000
# the tokenized columns of TRL's stages, in the order the trainers' docs list them
TOKEN_COLUMNS = {"pairs": ("prompt", "chosen", "rejected"), "feedback": ("prompt", "completion", "label"),
                 "prompts": ("prompt",)}  # fmt: skip
ROWS_PER_PROCESS = 20_000  # below this many rows a dataset is mapped in this process: forking costs more
# the columns each kind of example is stored in; messages and tools are JSON text
KIND_COLUMNS = {
    "chat": ("messages", "tools"),
    "text": ("text",),
    "pairs": ("messages", "chosen", "rejected"),
    "feedback": ("messages", "label"),
    "prompts": ("messages",),
}


def token_features():
    """Token columns as int32: half the bytes of the default int64 to write and read back."""
    from datasets import Features, List, Value

    tokens = {"input_ids": List(Value("int32")), "labels": List(Value("int32"))}
    return Features({**tokens, "_supervised": Value("int64"), "_truncated": Value("bool"), "_tokens": Value("int64")})


def processes(rows: int, wanted: int) -> int | None:
    """How many processes `map` gets for `rows` rows (None: this one)."""
    count = min(wanted, rows // ROWS_PER_PROCESS)
    return count if count > 1 else None


def features(kind: str):
    from datasets import Features, Value

    types = {"label": Value("bool")}
    columns = {"dataset": Value("string"), "row": Value("int64")}
    columns.update({name: types.get(name, Value("string")) for name in KIND_COLUMNS[kind]})
    return Features({**columns, "error": Value("string"), "reason": Value("string")})


def convert_batch(batch: dict[str, list[Any]], entry: DatasetEntry, kind: str, values: dict[str, str]) -> dict:
    """A batch of raw rows as templated examples; a row that cannot be read keeps its error and reason."""
    out: dict[str, list[Any]] = {name: [] for name in ("dataset", "row", *KIND_COLUMNS[kind], "error", "reason")}
    keys = list(batch)
    for values_of_row in zip(*batch.values(), strict=True):
        row = dict(zip(keys, values_of_row, strict=True))
        index = row[ROW_COLUMN]
        try:
            example = templated_example(entry, row, index, kind, values)
            error = reason = ""
        except DataError as exc:
            example, error, reason = {"dataset": entry.name, "row": index}, str(exc), exc.reason
        for name in KIND_COLUMNS[kind]:
            value = example.get(name)
            out[name].append(json.dumps(value, ensure_ascii=False) if name in ("messages", "tools") else value)
        out["dataset"].append(entry.name)
        out["row"].append(index)
        out["error"].append(error)
        out["reason"].append(reason)
    return out


def bad_rows(converted) -> tuple[list[int], dict[str, int], str | None]:
    """The positions of rows that read well, the skipped rows per reason, and the first error."""
    import numpy as np
    import pyarrow.compute as pc

    errors = converted.data.column("error")
    bad = np.asarray(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))
    if not bad.any():
        return list(range(len(converted))), {}, None
    first = errors[int(np.argmax(bad))].as_py()
    reasons = converted.data.column("reason").filter(bad)
    counts = {item["values"]: item["counts"] for item in pc.value_counts(reasons).to_pylist()}
    return np.flatnonzero(~bad).tolist(), counts, first


def template(job: TemplateJob) -> None:
    from datasets import concatenate_datasets

    parts, sources, skipped = [], [], {}
    for name in job.names:
        entry = resolve_dataset(name, job.registry)
        check_kind(entry, job.kind)
        raw = sample_rows(load_source(entry), entry.num_samples, job.max_samples, job.seed)
        converted = raw.map(
            convert_batch,
            batched=True,
            batch_size=BATCH_ROWS,
            num_proc=processes(len(raw), job.num_proc),
            remove_columns=raw.column_names,
            features=features(job.kind),
            fn_kwargs={"entry": entry, "kind": job.kind, "values": job.template_vars},
            desc=f"templating {name}",
        )
        good, reasons, first = bad_rows(converted)
        if first is not None and job.on_bad_row == "error":
            raise DataError(f"{first} (set dataset.on_bad_row: skip to skip such rows)")
        for reason, count in reasons.items():
            skipped[f"{name}: {reason}"] = count
        parts.append(converted.select(good) if reasons else converted)
        sources.append(source_record(entry).model_copy(update={"rows": len(raw), "skipped": sum(reasons.values())}))
    examples = concatenate_datasets(parts).remove_columns(["error", "reason"])
    order = list(range(len(examples)))
    if job.shuffle:
        random.Random(job.seed).shuffle(order)
    held_out = max(1, round(len(order) * job.val_size)) if job.val_size > 0 and len(order) > 1 else 0
    out = Path(job.out)
    train, val = examples.select(order[held_out:]), examples.select(order[:held_out])
    train.save_to_disk(str(out / "train"))
    val.save_to_disk(str(out / "val"))
    preview = [decoded(row) for row in train.select(range(min(job.preview_rows, len(train))))]
    emit(
        Templated(
            sources=sources,
            rows=len(examples),
            train_rows=len(train),
            val_rows=len(val),
            skipped=skipped,
            preview=preview,
        )
    )


def decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A stored example as the example it was (messages and tools back from JSON text)."""
    return {k: json.loads(v) if k in ("messages", "tools") and v is not None else v for k, v in row.items()}


def encode_rows(batch: dict[str, list[Any]], tokenizer: Any, kind: str, cutoff_len: int, train_on_prompt: bool):
    """A batch of templated examples as the columns the training stage reads, with per-row
    counts (`_tokens`, `_supervised`, `_truncated`) that the split's figures are summed from."""
    examples = [decoded(dict(zip(batch, row, strict=True))) for row in zip(*batch.values(), strict=True)]
    if kind == "chat":
        columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "_supervised": [], "_truncated": []}
        for ids, labels, truncated in encoded_conversations(tokenizer, examples, cutoff_len, train_on_prompt):
            supervised = len(labels) - labels.count(IGNORE_INDEX)
            if supervised:  # an example cut down to nothing to learn is dropped
                for name, value in zip(columns, (ids, labels, supervised, truncated), strict=True):
                    columns[name].append(value)
        columns["_tokens"] = [len(ids) for ids in columns["input_ids"]]
        return columns
    columns = {"_tokens": [], "_truncated": []}
    for row, lengths in trl_rows(tokenizer, examples, kind):
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
        columns["_tokens"].append(sum(lengths))
        columns["_truncated"].append(max(lengths) > cutoff_len)
    return columns


def pack_stream(dataset, cutoff_len: int, eos: int):
    """pt: the documents' ids end to end with end-of-text, cut into blocks, over the whole split."""
    stream: list[int] = []
    for ids in dataset["ids"] if len(dataset) < BATCH_ROWS else _column_batches(dataset, "ids"):
        stream += ids + [eos]
        while len(stream) >= cutoff_len:
            block, stream = stream[:cutoff_len], stream[cutoff_len:]
            yield {"input_ids": block, "labels": block}
    if len(stream) > 1:
        yield {"input_ids": stream, "labels": stream}


def _column_batches(dataset, column: str):
    for start in range(0, len(dataset), BATCH_ROWS):
        yield from dataset[start : start + BATCH_ROWS][column]


def tokenize_split(job: TokenizeJob, tokenizer: Any, split: str) -> dict[str, int]:
    import pyarrow.compute as pc
    from datasets import Dataset, load_from_disk

    templated = load_from_disk(str(Path(job.templated) / split))
    procs = processes(len(templated), job.num_proc)
    target = str(Path(job.out) / split)
    if job.kind == "text":
        ids = templated.map(
            lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            batch_size=BATCH_ROWS,
            num_proc=procs,
            remove_columns=templated.column_names,
            desc=f"tokenizing {split}",
        )
        blocks = Dataset.from_generator(
            pack_stream, gen_kwargs={"dataset": ids, "cutoff_len": job.cutoff_len, "eos": tokenizer.eos_token_id},
            cache_dir=job.scratch_dir,
        ) if len(ids) else Dataset.from_dict({"input_ids": [], "labels": []})  # fmt: skip
        blocks.save_to_disk(target)
        tokens = sum(len(i) + 1 for i in _column_batches(ids, "ids")) if len(ids) else 0
        return {"examples": len(blocks), "documents": len(templated), "tokens": tokens,
                "supervised_tokens": _total_length(blocks, "input_ids")}  # fmt: skip
    encoded = templated.map(
        encode_rows,
        batched=True,
        batch_size=BATCH_ROWS,
        num_proc=procs,
        remove_columns=templated.column_names,
        fn_kwargs={"tokenizer": tokenizer, "kind": job.kind, "cutoff_len": job.cutoff_len,
                   "train_on_prompt": job.train_on_prompt},
        features=token_features() if job.kind == "chat" else None,
        desc=f"tokenizing {split}",
    )  # fmt: skip
    counted = [name for name in encoded.column_names if name.startswith("_")]
    sums = {name[1:]: int(pc.sum(encoded.data.column(name)).as_py() or 0) for name in counted}
    columns = TOKEN_COLUMNS.get(job.kind) or ("input_ids", "labels")
    encoded.select_columns([c for c in columns if c in encoded.column_names]).save_to_disk(target)
    stats = {"examples": len(encoded), "tokens": sums["tokens"], "truncated": sums["truncated"]}
    if job.kind == "chat":
        stats.update({"supervised_tokens": sums["supervised"], "dropped": len(templated) - len(encoded)})
    return stats


def _total_length(dataset, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column(column))).as_py() or 0) if len(dataset) else 0


def uses_tools(templated: Path) -> bool:
    """Whether any templated example has tools or function calls."""
    import pyarrow.compute as pc
    from datasets import load_from_disk

    for split in ("train", "val"):
        data = load_from_disk(str(templated / split)).data
        if (
            "messages" in data.column_names
            and pc.any(pc.match_substring(data.column("messages"), '"tool_calls"')).as_py()
        ):
            return True
        if "tools" in data.column_names and pc.any(pc.not_equal(data.column("tools"), "null")).as_py():
            return True
    return False


def tokenize(job: TokenizeJob) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code)
    if uses_tools(Path(job.templated)) and not template_supports_tools(tokenizer.chat_template):
        raise WorkerError(
            f"the chat template of {job.model_path} cannot render tools or function calls, which the data holds; "
            "set model.chat_template to one that can (e.g. chatml_tools)"
        )
    splits: dict[str, SplitCounts] = {}
    for split in ("train", "val"):
        splits[split] = SplitCounts(**tokenize_split(job, tokenizer, split))
        emit(Note(message=f"{split}: " + ", ".join(f"{k}={v}" for k, v in splits[split].counted().items())))
    emit(Tokenized(**splits, sample=_sample(Path(job.out) / "train", tokenizer)))


def _sample(split: Path, tokenizer: Any) -> str:
    from datasets import load_from_disk

    dataset = load_from_disk(str(split))
    if not len(dataset):
        return ""
    first = dataset[0]
    if "input_ids" in first:
        return tokenizer.decode(first["input_ids"])
    return json.dumps(first, ensure_ascii=False, indent=2)


def main(job: TemplateJob | TokenizeJob) -> None:
    import datasets

    # our stages are the cache; the library's transform cache would only fill the disk twice
    datasets.disable_caching()
    scratch = Path(job.scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(scratch)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        template(job) if isinstance(job, TemplateJob) else tokenize(job)
    except (DataError, TemplateError) as exc:
        raise WorkerError(str(exc)) from None


if __name__ == "__main__":
    worker_entry(main, DataJob)
