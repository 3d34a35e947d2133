"""Where a registered dataset's rows come from, loaded with the `datasets` library into Arrow.

`load_source(entry)` returns a memory-mapped `datasets.Dataset` of the raw rows:

    file_name        json (a list, or JSON Lines), jsonl, csv, parquet, arrow, txt (a row per line),
                     or a folder of files of one kind, or a folder written by `save_to_disk`
    hf_hub_url       `load_dataset(id, name=subset, data_dir=folder, split=split, revision=revision)`,
                     honouring HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and the HF cache; a local
                     folder given there is loaded the same way
    script_url       a loading folder beside the registry, loaded as a hub id would be
    cloud_file_name  an s3:// or gs:// JSON file through fsspec
    ms_hub_url, om_hub_url   ModelScope's and Modelers' own clients

A file that cannot be read says which file and why. `source_record(entry)` is what goes into
the template stage's cache key and the lineage: the file's sha256 (a folder: over its files),
or the hub id with its subset, split, folder and revision. Runs in worker processes: no Prefect.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.contracts.file_digests import files_digest, sha256_file
from tasks.contracts.stage_infos import SourceRecord
from tasks.dataset.jsonl import jsonl_lines
from tasks.dataset.registry import DataError, DatasetEntry

FILE_KINDS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
ROW_COLUMN = "__tunefactory_row"  # each row's number in its source, kept through sampling


def _files_of(entry: DatasetEntry, path: Path) -> tuple[str, list[Path]]:
    """The loader and the data files of a file entry: the file itself, or a folder's files of one kind."""
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{entry.where}: {path}: files of kind {path.suffix or '(no suffix)'!r} cannot be read; "
                f"allowed: {', '.join(FILE_KINDS)} (or a folder of them)"
            )
        return kind, [path]
    if not path.is_dir():
        raise DataError(f"{entry.where}: file {path} does not exist")
    files = sorted(p for p in path.iterdir() if not p.name.startswith((".", "_")))
    folders = [p.name for p in files if p.is_dir()]
    if folders:
        raise DataError(
            f"{entry.where}: {path} is a folder with folders inside ({', '.join(folders[:3])}); "
            "file_name names a data file, or a folder of data files of one kind"
        )
    kinds = {FILE_KINDS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        odd = next(p for p in files if FILE_KINDS.get(p.suffix.lower()) is None)
        raise DataError(f"{entry.where}: {odd} in folder {path} is not one of {', '.join(FILE_KINDS)}")
    if len(kinds) != 1:
        raise DataError(f"{entry.where}: folder {path} mixes files of kinds {', '.join(sorted(kinds))}; use one kind")
    return kinds.pop(), files


def _check_json_shape(entry: DatasetEntry, file: Path) -> None:
    """A .json file must be a list of row objects or JSON Lines; `datasets` would read others as something else."""
    with file.open("rb") as handle:
        first_line = handle.readline().decode("utf-8").lstrip("\ufeff \t\r\n")
        while not first_line and handle.peek(1):
            first_line = handle.readline().decode("utf-8").strip()
        more = bool(handle.read(1 << 16).strip())
    if not first_line:
        raise DataError(f"{entry.where}: {file} is empty: it holds no rows")
    if first_line.startswith("["):
        after = first_line[1:].lstrip()
        if after and after[0] not in "{]":
            raise DataError(f"{entry.where}: {file}: row 0 is not an object; rows are objects of columns")
        return
    if not first_line.startswith("{"):
        raise DataError(f"{entry.where}: {file} is not JSON: it starts with {first_line[:20]!r}")
    try:
        row = json.loads(first_line)
    except json.JSONDecodeError:
        row = None  # an object over several lines: one top-level object
    wrapped = [k for k, v in (row or {}).items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if row is None or (not more and wrapped):
        inside = f" (its rows may be the list under {wrapped[0]!r})" if wrapped else ""
        raise DataError(
            f"{entry.where}: {file} holds one top-level object{inside}; rows are a list of objects, "
            "or one object per line (JSON Lines)"
        )


def _utf8_problem(files: list[Path]) -> str | None:
    """Where the first file that is not UTF-8 text stops being it (a streaming read, before loading)."""
    import codecs

    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, line = 0, 1
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    line += block[: exc.start].count(b"\n")
                    return f"{file} is not UTF-8 text: byte {offset + exc.start} (line {line})"
                offset += len(block)
                line += block.count(b"\n")
    return None


def _json_problem(files: list[Path]) -> str | None:
    """Where the first file that is not a JSON list of objects or JSON Lines goes wrong (read only on an error)."""
    for file in files:
        text = file.read_text(encoding="utf-8").lstrip("\ufeff")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                return f"{file}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            odd = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
            if odd is not None:
                return f"{file}: row {odd} is {type(rows[odd]).__name__}, not an object; rows are objects of columns"
            if not rows:
                return f"{file} holds no rows (an empty list)"
            continue
        for number, line in jsonl_lines(text):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as exc:
                return f"{file}: line {number} is not valid JSON: {exc.msg} (JSON Lines: one object per line)"
            if not isinstance(row, dict):
                return f"{file}: line {number} is {type(row).__name__}, not an object (JSON Lines: one object per line)"
    return None


def _reason(exc: BaseException) -> str:
    """The innermost message of a loader's error chain: the one that says what is wrong."""
    messages = []
    while exc is not None:
        messages.append(f"{type(exc).__name__}: {exc}".strip())
        exc = exc.__cause__ or exc.__context__
    return messages[-1][:500]


def _csv_columns_as_text(files: list[Path]):
    """CSV cells are text, as LLaMA-Factory's answers are: "2" stays "2", never the number 2."""
    import csv

    from datasets import Features, Value

    with files[0].open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return Features({name: Value("string") for name in header}) if header else None


def _load_files(entry: DatasetEntry, path: Path, head: int | None):
    from datasets import Dataset, load_dataset, load_from_disk

    if entry.split != "train" and not (path / "dataset_dict.json").is_file():
        raise DataError(f"{entry.where}: split {entry.split!r}: a file entry has the one split 'train'")
    if path.is_dir() and (path / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        splits = load_from_disk(str(path))
        if entry.split not in splits:
            raise DataError(f"{entry.where}: {path} has no split {entry.split!r}; it has {', '.join(splits)}")
        return splits[entry.split]
    if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))  # a Dataset written by save_to_disk
    kind, files = _files_of(entry, path)
    if kind in ("json", "csv", "text"):
        problem = _utf8_problem(files)
        if problem:
            raise DataError(f"{entry.where}: {problem}")
    if kind == "json":
        for file in files:
            _check_json_shape(entry, file)
    options = {"features": _csv_columns_as_text(files), "keep_default_na": False} if kind == "csv" else {}
    try:
        if head is None:
            dataset = load_dataset(kind, data_files=[str(f) for f in files], split="train", **options)
        else:  # the first rows only, read as a stream: a check of a large file does not convert all of it
            stream = load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True, **options)
            dataset = Dataset.from_list(list(stream.take(head)))
    except Exception as exc:  # the loaders raise many kinds; each says in its message what it met
        problem = _json_problem(files) if kind == "json" else None
        raise DataError(f"{entry.where}: {problem or f'{path} cannot be read as {kind}: {_reason(exc)}'}") from None
    if kind == "text":  # a line per example, as LLaMA-Factory reads text: blank lines are none
        dataset = dataset.add_column(ROW_COLUMN, range(len(dataset)))
        dataset = dataset.filter(lambda text: bool(text.strip()), input_columns="text")
    return dataset


def _load_hub(entry: DatasetEntry, kind: str, location: str):
    from datasets import config, load_dataset

    path = str(entry.local_path(location)) if kind == "script" else location
    attribute = {"hf_hub": "hf_hub_url", "script": "script_url"}[kind]
    try:
        return load_dataset(path, name=entry.subset, data_dir=entry.folder, split=entry.split, revision=entry.revision)
    except Exception as exc:
        reason = _reason(exc)
        offline = config.HF_HUB_OFFLINE
        if kind == "hf_hub" and not Path(location).exists():
            how = (
                "offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) and not in the HF cache"
                if offline
                else "not reachable from here and not in the HF cache"
            )
            raise DataError(
                f"{entry.where}: hf_hub_url {location!r} needs the Hugging Face Hub, which is {how}; "
                f"download it once where the hub can be reached, or point file_name at a local copy ({reason})"
            ) from None
        raise DataError(f"{entry.where}: {attribute} {location!r} cannot be loaded: {reason}") from None


def _load_other_hub(entry: DatasetEntry, kind: str, location: str):
    if kind == "ms_hub":
        from modelscope import MsDataset  # checked to be installed when the entry was resolved

        dataset = MsDataset.load(location, subset_name=entry.subset, data_dir=entry.folder, split=entry.split)
        return dataset.to_hf_dataset() if hasattr(dataset, "to_hf_dataset") else dataset
    from openmind import OmDataset

    return OmDataset.load_dataset(path=location, name=entry.subset, data_dir=entry.folder, split=entry.split)


def load_source(entry: DatasetEntry, head: int | None = None):
    """The entry's raw rows as a `datasets.Dataset` with each row's source number in ROW_COLUMN.

    Arrow conversions are kept in the Hugging Face datasets cache (HF_DATASETS_CACHE), so a
    file is converted once, however many workspaces read it. head: a local file's first rows
    only, streamed (for previews and the checks before stage one); ignored with num_samples,
    which samples from the whole dataset.
    """
    kind, location = entry.source()
    if kind == "file":
        dataset = _load_files(entry, entry.local_path(location), None if entry.num_samples else head)
    elif kind in ("hf_hub", "script"):
        dataset = _load_hub(entry, kind, location)
    elif kind == "cloud_file":
        from datasets import load_dataset

        try:
            dataset = load_dataset("json", data_files=location, split="train")
        except Exception as exc:
            raise DataError(f"{entry.where}: cloud_file_name {location!r} cannot be read: {_reason(exc)}") from None
    else:
        dataset = _load_other_hub(entry, kind, location)
    if not hasattr(dataset, "column_names") or hasattr(dataset, "keys"):
        raise DataError(f"{entry.where}: {location!r} holds several splits; set the entry's split to one of them")
    if ROW_COLUMN in dataset.column_names:  # text files number their lines before blank ones are left out
        return dataset
    return dataset.add_column(ROW_COLUMN, range(len(dataset)))


def sample_rows(dataset, num_samples: int | None, max_samples: int | None, seed: int):
    """LLaMA-Factory's num_samples (a random sample, with repeats past the dataset's size), then max_samples."""
    import numpy as np

    if num_samples is not None and len(dataset):
        rng = np.random.default_rng(seed)
        indexes = rng.permutation(len(dataset))[:num_samples]
        if num_samples > len(indexes):
            indexes = np.concatenate([indexes, rng.choice(len(dataset), num_samples - len(indexes))])
        dataset = dataset.select(indexes)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset


def source_record(entry: DatasetEntry) -> SourceRecord:
    """The entry's identity for cache keys and lineage: its name, where it is, and a digest of the data."""
    kind, location = entry.source()
    if kind in ("file", "script") or (kind == "hf_hub" and Path(location).is_dir()):
        path = entry.local_path(location) if kind != "hf_hub" else Path(location)
        if not path.exists():
            raise DataError(f"{entry.where}: file {path} does not exist")
        location = str(path)
        if path.is_file():
            sha256 = sha256_file(path)
        else:
            sha256 = files_digest(path, sorted(p for p in path.rglob("*") if p.is_file()))
    else:  # a remote dataset: what names it; pin `revision` in the entry to pin its contents
        identity = json.dumps([location, entry.subset, entry.split, entry.folder, entry.revision])
        sha256 = hashlib.sha256(identity.encode()).hexdigest()
    # what the entry leaves empty stays out of the record (and of the cache key it goes into)
    return SourceRecord(
        name=entry.name,
        kind=kind,
        file=location,
        sha256=sha256,
        **{k: getattr(entry, k) or None for k in ("subset", "split", "folder", "revision", "num_samples")},
    )
