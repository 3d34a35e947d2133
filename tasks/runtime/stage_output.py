"""The stage contract: cache keys, manifests written and verified, atomic outputs and reuse.

The manifest itself is data, in tasks/contracts/manifest.py; this module does the I/O around it.

A stage writes into `<workspace>/stages/<stage>/<key>.partial/`, and only a complete output is
renamed to `<workspace>/stages/<stage>/<key>/` with a `manifest.json` listing every file's
sha256. A later run with the same key reuses that directory after checking the hashes; a
missing or altered file makes the stage run again.

Hashing a model's weights on every reuse costs seconds per gigabyte, so, as git's index does,
a file whose hash has matched is remembered by its size, modification time and inode
(`.verified.json`); while those are unchanged it is not read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.contracts.file_digests import files_digest, sha256_file
from tasks.contracts.manifest import Manifest, StageResult
from tasks.runtime.locks import file_lock
from tasks.runtime.tracking import (
    PARENT_TAG,
    StageRun,
    Tracking,
    TrackingUnavailable,
    record_reused_stage,
    stage_run,
    warn_in_log,
)

PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
# a file modified this recently could change again within the clock's resolution without its
# stamp changing: it is hashed until it is older than this
SETTLED_NS = 2_000_000_000


def tree_digest(root: Path, names: list[str]) -> str:
    """One digest over the named files and directories under `root`: a dataset's identity."""
    files = []
    for name in names:
        path = root / name
        files += [file for file in (sorted(path.rglob("*")) if path.is_dir() else [path]) if file.is_file()]
    return files_digest(root, files)


def cache_key(stage: str, config: dict[str, Any], upstream: list[Manifest], version: str) -> str:
    """The one cache-key function: stage name, its config section, upstream digests, code version."""
    payload = {
        "stage": stage,
        "config": config,
        "upstream": sorted(manifest.digest() for manifest in upstream),
        "code": version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_id(base: str, for_stage: str) -> str:
    """A stage's name for one training stage of a chain: 'train' keeps the plain name
    ('tokenize'), a later stage 'reward' gets its own ('tokenize-reward')."""
    return base if for_stage == "train" else f"{base}-{for_stage}"


def stage_run_name(label: str) -> Callable[[], str]:
    """A Prefect task-run name: the label, plus the training stage it serves when not 'train'."""

    def name() -> str:
        from prefect.runtime import task_run

        for_stage = task_run.parameters.get("for_stage", "train")
        return label if for_stage == "train" else f"{label} ({for_stage})"

    return name


def stage_dir(workspace: Path, stage: str, key: str) -> Path:
    return workspace / "stages" / stage / key


def scratch_dir(workspace: Path) -> Path:
    """Where the data worker's transforms spill while the template or tokenize stage runs (the Arrow
    conversions of the sources themselves live in the Hugging Face datasets cache, shared with the
    checks before stage one)."""
    return workspace / "cache" / "data-worker"


def file_stamp(path: Path) -> list[int]:
    """Size, modification time and inode: what changes when a file is rewritten or replaced."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ino]


def hashes_by_stamp(files: dict[str, Path], cache: Path) -> dict[str, str]:
    """The sha256 of each file, by name; a file whose stamp is the one `cache` remembers is not read.

    Hashes of settled files are remembered for next time (written atomically; a read-only place
    is hashed every time, nothing worse). A missing file raises FileNotFoundError.
    """
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    hashes, remembered = {}, {}
    for name, file in files.items():
        stamp, entry = file_stamp(file), known.get(name)
        sha = entry["sha256"] if isinstance(entry, dict) and entry.get("stamp") == stamp else sha256_file(file)
        hashes[name] = sha
        if time.time_ns() - stamp[1] > SETTLED_NS:
            remembered[name] = {"stamp": stamp, "sha256": sha}
    if any(known.get(name) != entry for name, entry in remembered.items()):
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}")
            partial.write_text(json.dumps({**known, **remembered}))
            os.replace(partial, cache)
    return hashes


def load_finished(workspace: Path, stage: str, key: str) -> Manifest | None:
    """The manifest of a finished output whose files all match their hashes, else None.

    A file whose stamp is the one recorded when it was last hashed is not hashed again.
    """
    directory = stage_dir(workspace, stage, key)
    try:
        manifest = Manifest.model_validate_json((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    try:
        found = hashes_by_stamp({name: directory / name for name in manifest.files}, directory / VERIFIED)
    except OSError:  # a file of the output is gone
        return None
    if found != manifest.files:
        return None
    return manifest.model_copy(update={"output_dir": str(directory)})


def build_output(
    workspace: Path,
    stage: str,
    key: str,
    build: Callable[[Path], StageResult],
    mlflow_run_id: str | None = None,
    resumable: bool = False,
) -> Manifest:
    """Run `build` in the stage's partial directory, then publish it atomically.

    A resumable stage (training) keeps what a failed attempt left in the partial directory,
    so it finds its checkpoints there; any other stage starts from an empty one.
    """
    final = stage_dir(workspace, stage, key)
    partial = final.with_name(key + PARTIAL_SUFFIX)
    if not resumable:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = build(partial)
    files = {
        str(path.relative_to(partial)): sha256_file(path)
        for path in sorted(partial.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = Manifest(
        stage=stage,
        key=key,
        output_dir=str(final),
        files=files,
        metrics=result.metrics,
        info=result.info.model_dump(mode="json") if result.info is not None else {},
        mlflow_run_id=mlflow_run_id,
        created_at=started,
        duration_s=round(time.time() - started, 2),
    )
    (partial / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    if final.exists():  # an output that failed verification: replace it
        shutil.rmtree(final)
    os.replace(partial, final)
    return manifest


def published_dir(out: Path) -> Path:
    """Where a stage's output lives once built: `out` is its `.partial` directory while building."""
    return out.with_name(out.name.removesuffix(PARTIAL_SUFFIX))


class StageContext(BaseModel):
    """Where a pipeline run's stages work: its workspace, and the MLflow run they log under."""

    workspace: Path
    tracking: Tracking


def run_stage(
    stage: str,
    config: dict[str, Any],
    upstream: list[Manifest],
    version: str,
    ctx: StageContext,
    build: Callable[[Path, StageRun], StageResult],
    resumable: bool = False,
) -> Manifest:
    """Reuse the stage's verified output if its key matches, else build it under a child run.

    Runs holding the same key wait for each other (a file lock), so two pipelines that share
    a stage build it once. A resumable stage continues the MLflow run of its interrupted
    attempt, so its metrics carry on from where they stopped.
    """
    started = time.time()
    workspace, tracking = ctx.workspace, ctx.tracking
    key = cache_key(stage, config, upstream, version)
    with stage_lock(workspace, stage, key):
        attempt = stage_dir(workspace, stage, key).with_name(key + ".attempt")
        finished = load_finished(workspace, stage, key)
        if finished is not None and attempt.is_file() and attempt.read_text().strip() == finished.mlflow_run_id:
            built_here = close_missed_run(tracking, finished)
            attempt.unlink()
            if built_here:  # this pipeline run's own earlier attempt built it: not a reuse
                return finished.model_copy(update={"elapsed_s": round(time.time() - started, 2)})
        if finished is not None:
            record_reused_stage(tracking, stage, key, finished.mlflow_run_id)
            return finished.model_copy(update={"reused": True, "elapsed_s": round(time.time() - started, 2)})
        earlier_run = attempt.read_text().strip() if resumable and attempt.is_file() else None
        manifest = None
        try:
            with stage_run(tracking, stage, config, continue_run_id=earlier_run) as run:
                attempt.write_text(run.run_id)
                run.set_tags({"cache_key": key})
                manifest = build_output(workspace, stage, key, lambda out: build(out, run), run.run_id, resumable)
                log_stage_end(run, manifest)
        except TrackingUnavailable as missed:
            if manifest is None:
                raise
            raise TrackingUnavailable(
                f"{missed}. Stage {stage}'s output is complete and kept ({manifest.output_dir}): "
                "running the stage again logs what MLflow missed instead of rebuilding it"
            ) from missed
        attempt.unlink()
    return manifest.model_copy(update={"elapsed_s": round(time.time() - started, 2)})


def log_stage_end(run: StageRun, manifest: Manifest, metrics: dict[str, float] | None = None) -> None:
    """What a stage's run gets once its output is in place: the metrics (all, or `metrics`) and the manifest."""
    run.log_metrics(manifest.metrics if metrics is None else metrics)
    run.log_text(manifest.model_dump_json(indent=2), "manifest.json")


def close_missed_run(tracking: Tracking, manifest: Manifest) -> bool:
    """Log what MLflow missed at the end of the attempt that built `manifest`, and close its run.

    Whether that run is a stage run of this pipeline run (a retry), not of an earlier one."""
    from mlflow.exceptions import MlflowException

    run = StageRun(tracking.client(), str(manifest.mlflow_run_id))
    try:
        logged = run.fetch()
    except MlflowException:  # refused, not down: the run was deleted; the output is reused as any other
        return False
    missed = {name: value for name, value in manifest.metrics.items() if name not in logged.data.metrics}
    log_stage_end(run, manifest, missed)
    run.end("FINISHED")
    warn_in_log(
        f"stage {manifest.stage}: its output was complete, but MLflow missed the end of its run {run.run_id}; "
        f"logged the {len(missed)} metrics and manifest it missed and closed the run, without rebuilding"
    )
    return logged.data.tags.get(PARENT_TAG) == tracking.parent_run_id


def stage_lock(workspace: Path, stage: str, key: str):
    """An exclusive lock on one stage output."""
    return file_lock(stage_dir(workspace, stage, key).with_name(key + ".lock"))


def point_link(link: Path, target: Path) -> Path:
    """Make `link` a symlink to `target`, replacing an older one: stable names for outputs."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link
