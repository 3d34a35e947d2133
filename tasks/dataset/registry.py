"""The dataset registry: a `dataset_info.json` in LLaMA-Factory's format, read as LLaMA-Factory reads it.

Each entry names where its rows are and how to read them:

    where     hf_hub_url | ms_hub_url | om_hub_url    a hub dataset (ModelScope with USE_MODELSCOPE_HUB=1,
                                                      Modelers with USE_OPENMIND_HUB=1, else the HF Hub)
              script_url                              a loading folder, relative to the registry
              cloud_file_name                         an s3:// or gs:// JSON file
              file_name                               a file or a folder of files beside the registry
              (the first present wins, in this order, as in LLaMA-Factory's parser)
    which     subset (hub config name), split (default train), folder (hub data_dir), revision,
              num_samples (sample down, or repeat up, to this many rows)
    how       formatting: alpaca | sharegpt | openai; ranking: true for preference pairs;
              columns: prompt, query, response, history, messages, system, tools, images, videos,
              audios, chosen, rejected, kto_tag; tags: role_tag, content_tag, user_tag,
              assistant_tag, observation_tag, function_tag, system_tag

The registry file is read whole, but an entry is checked only when a spec names it, so an
entry this machine cannot load never blocks the ones it can. What an entry reads on this machine
stays inside the registry's folder unless the spec sets dataset.allow_paths_outside_registry
(`check_paths_in_registry`, run when the spec is validated). Rows become examples in
`tasks/dataset/rows.py`; sources are loaded in `tasks/dataset/sources.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHIPPED_REGISTRY = Path(__file__).resolve().parents[2] / "data" / "dataset_info.json"

COLUMN_ROLES = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
MEDIA_COLUMNS = ("images", "videos", "audios")
TAG_ROLES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")

# LLaMA-Factory's defaults: alpaca's columns and sharegpt's; system, history, tools and the media are read
# only where `columns` names them (as there). chosen, rejected and kto_tag default to their own names.
DEFAULT_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "messages": "conversations",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "kto_tag",
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}
OUTSIDE_SETTING = "dataset.allow_paths_outside_registry"  # the spec's opt-in to reading files elsewhere
SOURCE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name")


class DataError(ValueError):
    """A dataset the pipeline cannot read, with the file, row and what is wrong.

    `reason` is the short kind of the problem, used to count skipped rows.
    """

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


class DatasetEntry(BaseModel):
    """One registry entry, LLaMA-Factory's attributes; `name` and `registry` say where it came from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    registry: str = ""
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    file_name: str | None = None
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    revision: str | None = None
    num_samples: int | None = Field(None, ge=1)
    columns: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def where(self) -> str:
        """How messages name this entry: its name and its registry."""
        return f"dataset {self.name!r} ({self.registry})"

    def source(self) -> tuple[str, str]:
        """(kind, location): hf_hub, ms_hub, om_hub, script, cloud_file or file, by LLaMA-Factory's precedence."""
        hf, ms, om = self.hf_hub_url, self.ms_hub_url, self.om_hub_url
        if hf or ms or om:
            if ms and (os.environ.get("USE_MODELSCOPE_HUB", "0") in ("1", "true") or not hf):
                return "ms_hub", ms
            if om and (os.environ.get("USE_OPENMIND_HUB", "0") in ("1", "true") or not hf):
                return "om_hub", om
            return "hf_hub", hf or ""
        if self.script_url:
            return "script", self.script_url
        if self.cloud_file_name:
            return "cloud_file", self.cloud_file_name
        return "file", self.file_name or ""

    def local_path(self, location: str) -> Path:
        """A file_name or script_url, relative to the registry's folder."""
        return Path(self.registry).parent / location

    @property
    def file(self) -> Path:
        """The file or folder of a file entry (for messages and digests)."""
        kind, location = self.source()
        return self.local_path(location) if kind in ("file", "script") else Path(location)

    def column(self, role: str) -> str | None:
        """The column that holds `role`; None where the entry has none (system, tools, ... by default)."""
        return self.columns.get(role, DEFAULT_COLUMNS.get(role))

    def tag(self, role: str) -> str:
        defaults = OPENAI_TAGS if self.formatting == "openai" else SHAREGPT_TAGS
        return self.tags.get(role, defaults[role])


def load_registry(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The registry's entries by name, as written; `resolve_dataset` checks the one a spec names."""
    registry = Path(path) if path else SHIPPED_REGISTRY
    try:
        raw = json.loads(registry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{registry}: no such dataset registry (dataset.registry)") from None
    except IsADirectoryError:
        raise DataError(f"{registry}: is a folder; dataset.registry names its dataset_info.json") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{registry}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{registry}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{registry}: the top level must be an object of entries by name, not {type(raw).__name__}")
    return raw


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return (
            f"{key!r} is not an attribute of LLaMA-Factory's format (known: {', '.join(SOURCE_KEYS)}, formatting, "
            "ranking, subset, split, folder, revision, num_samples, columns, tags)"
        )
    if error["type"] == "literal_error":
        return f"{key}: {error['input']!r} is not one of alpaca, sharegpt, openai"
    return f"{key}: {error['msg']}"


def check_entry(entry: DatasetEntry) -> None:
    """Refuse what this pipeline cannot read, naming the entry and the attribute."""
    kind, location = entry.source()
    if not location:
        raise DataError(f"{entry.where}: says nowhere where its rows are; give one of {', '.join(SOURCE_KEYS)}")
    for role in entry.columns:
        if role not in COLUMN_ROLES:
            raise DataError(f"{entry.where}: columns.{role} is not a column of the format ({', '.join(COLUMN_ROLES)})")
    for role in entry.tags:
        if role not in TAG_ROLES:
            raise DataError(f"{entry.where}: tags.{role} is not a tag of the format ({', '.join(TAG_ROLES)})")
    for media in MEDIA_COLUMNS:
        if media in entry.columns:
            article = "an" if media[0] in "aeiou" else "a"
            raise DataError(
                f"{entry.where}: has {article} {media} column ({entry.columns[media]!r}); tunefactory trains text-only "
                "language models and would drop the media, so it does not read this dataset",
                reason="multimodal",
            )
    needs = {"ms_hub": ("modelscope", "ms_hub_url", "pip install modelscope"),
             "om_hub": ("openmind", "om_hub_url", "pip install openmind"),
             }  # fmt: skip
    if kind in needs:
        module, attribute, install = needs[kind]
        if importlib.util.find_spec(module) is None:
            variable = "USE_MODELSCOPE_HUB" if kind == "ms_hub" else "USE_OPENMIND_HUB"
            other = (
                f"or unset {variable}, which chose it over hf_hub_url {entry.hf_hub_url!r}"
                if entry.hf_hub_url
                else "or give the entry an hf_hub_url or file_name"
            )
            raise DataError(f"{entry.where}: {attribute} {location!r} needs the {module} package ({install}); {other}")
    if kind == "cloud_file":
        scheme = location.split("://", 1)[0] if "://" in location else ""
        module = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme)
        if module is None:
            raise DataError(f"{entry.where}: cloud_file_name {location!r} must start with s3:// or gs://")
        if importlib.util.find_spec(module) is None:
            raise DataError(
                f"{entry.where}: cloud_file_name {location!r} needs the {module} package (pip install {module})"
            )
    if kind in ("file", "cloud_file"):
        for attribute in ("subset", "folder"):
            if getattr(entry, attribute) is not None:
                raise DataError(
                    f"{entry.where}: {attribute} applies to hub datasets and script_url folders, not to {kind} "
                    f"{location!r}; name the file or folder in file_name instead"
                )


def resolve_dataset(name: str, registry: str | Path | None = None) -> DatasetEntry:
    """The named entry of the registry, checked; unknown names list what the registry has."""
    registry_path = Path(registry) if registry else SHIPPED_REGISTRY
    entries = load_registry(registry_path)
    if name not in entries:
        raise DataError(f"unknown dataset {name!r}; {registry_path} registers: {', '.join(sorted(entries))}")
    fields = entries[name]
    if not isinstance(fields, dict):
        raise DataError(f"{registry_path}: entry {name!r} must be an object of attributes, not {type(fields).__name__}")
    try:
        entry = DatasetEntry(name=name, registry=str(registry_path), **fields)
    except (ValidationError, TypeError) as exc:
        problems = "; ".join(_describe(e) for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
        raise DataError(f"{registry_path}: entry {name!r}: {problems}") from None
    check_entry(entry)
    return entry


def _local_source(entry: DatasetEntry) -> tuple[str, str, Path] | None:
    """The attribute, its value and the local file or folder an entry reads; None for a hub id or a cloud file."""
    kind, location = entry.source()
    if kind in ("file", "script"):
        return ("file_name" if kind == "file" else "script_url"), location, entry.local_path(location)
    if kind == "hf_hub" and Path(location).exists():  # a local folder is loaded as a hub id would be
        return "hf_hub_url", location, Path(location)
    return None


def _first_outside(path: Path, folder: Path) -> Path | None:
    """The real path (symlinks followed) of `path`, or of a file in it, that is not inside `folder`;
    a folder's own files count, since a link inside a data folder can lead anywhere."""
    try:
        for item in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            real = item.resolve()
            if not real.is_relative_to(folder):
                return real
    except (OSError, ValueError):  # a name no file can have (a NUL, too long): the loader says it does not exist
        return None
    return None


def check_paths_in_registry(key: str, names: list[str], registry: str | Path | None, eval_sets: bool = False) -> None:
    """Refuse a named entry that reads a file outside its registry's folder (a '..', an absolute
    path, a symlink), naming the key, the registry, the entry, the path and the setting that
    allows it: a spec arriving through the Prefect API or a sweep could otherwise read any file
    the machine can read into training data and MLflow. Entries that do not resolve are left to
    the checks before stage one, whose messages say why."""
    for name in names:
        try:
            entry = resolve_eval_set(name, registry) if eval_sets else resolve_dataset(name, registry)
        except DataError:
            continue
        local = _local_source(entry)
        folder = Path(entry.registry).absolute().parent.resolve()
        real = _first_outside(local[2], folder) if local else None
        if local and real:
            attribute, location, _ = local
            raise DataError(
                f"{key}: {entry.registry}: entry {name!r}: {attribute} {location!r} reads {str(real)!r}, outside the "
                f"registry's folder {folder}; move the data beside the registry, or set {OUTSIDE_SETTING}: true"
            )


def resolve_eval_set(name: str, registry: str | Path | None) -> DatasetEntry:
    """An evaluation set: from the user's registry if it registers the name, else the project's own.

    A registry brought from LLaMA-Factory has no identity_eval or general_eval; the shipped
    sets are found anyway, and a user's set of the same name takes precedence.
    """
    if registry and name in load_registry(registry):
        return resolve_dataset(name, registry)
    return resolve_dataset(name, None)
