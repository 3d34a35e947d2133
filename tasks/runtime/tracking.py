"""The one MLflow helper: a parent run per pipeline run, a child run per stage.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else the MLflow server that `make ui`
started for the workspace, else SQLite inside the workspace, so a fresh machine needs no
server. Everything goes through an explicit `MlflowClient`, never the fluent API's global
active run, because Prefect may run tasks on worker threads.

MLflow being away for a while (its SQLite database locked by another process, its server
restarting) does not fail a stage: each call here waits for it and sends again, up to
`TUNEFACTORY_MLFLOW_WAIT_S` (two minutes), and says once that it waits and once that it answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.runtime import local_servers
from tasks.runtime.locks import file_lock
from tasks.runtime.redaction import redact_uri
from tasks.runtime.store_template import seed_store

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = "mlflow.experimentKind"
# how long a stage waits for MLflow before failing, for a call at its start or end and for the
# training curve still queued when training ends
WAIT_ENV = "TUNEFACTORY_MLFLOW_WAIT_S"
DEFAULT_WAIT_S = 120.0
RETRY_S = 2.0
T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """MLflow did not take what a stage logged before the stage had to end."""


def mlflow_wait_s() -> float:
    """Seconds to wait for MLflow to answer: `TUNEFACTORY_MLFLOW_WAIT_S`, else two minutes."""
    setting = os.environ.get(WAIT_ENV, "").strip()
    try:
        return max(0.0, float(setting)) if setting else DEFAULT_WAIT_S
    except ValueError:
        raise TrackingUnavailable(f"{WAIT_ENV}={setting!r}: not a number of seconds") from None


def is_outage(exc: Exception) -> bool:
    """Whether MLflow may take the same call later: a locked store or a server away, not a refusal.

    MLflow answers what it refuses (a changed param, a run that does not exist) with a 4xx code;
    a failing store or server is a 5xx (a locked SQLite database: 503), a busy one 429, and a
    server that is not there an OSError from the connection itself (requests' errors are OSErrors).
    Anything else (a bug, a value MLflow cannot take) is raised at once, not waited on."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() in (429, *range(500, 600))
    return isinstance(exc, OSError)


def warn_in_log(message: str) -> None:
    """A warning in the Prefect log of the task or flow that is running, else in Python's log."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger(__name__)
    logger.warning("%s", message)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def patiently(uri: str, what: str, call: Callable[[], T], wait_s: float | None = None) -> T:
    """`call()` to MLflow at `uri`, sent again every few seconds while it is down, for up to `wait_s` (the setting).

    The wait and the recovery are each reported once; past the bound, TrackingUnavailable says
    what was not logged. A refusal (4xx) is raised at once: waiting would not change it."""
    bound = mlflow_wait_s() if wait_s is None else wait_s
    started, failure = time.monotonic(), None
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            where = redact_uri(uri)
            if failure is None and bound > 0:
                warn_in_log(
                    f"MLflow at {where} did not answer while {what} ({_first_line(exc)}); waiting up to {bound:.0f} s"
                )
            failure = _first_line(exc)
            left = bound - (time.monotonic() - started)
            if left <= 0:
                raise TrackingUnavailable(
                    f"MLflow at {where} did not answer for {bound:.0f} s while {what} ({failure}); "
                    f"{WAIT_ENV} sets how long to wait"
                ) from exc
            time.sleep(min(RETRY_S, left))
            continue
        if failure is not None:
            warn_in_log(f"MLflow answers again after {time.monotonic() - started:.0f} s; done {what}")
        return result


class Tracking(BaseModel):
    """Where a pipeline run logs: passed to every task as a plain argument."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


def tracking_uri(workspace: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the workspace's MLflow server while `make ui` runs it, else its SQLite file."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    servers = local_servers.running(workspace)
    return servers.mlflow_url if servers else f"sqlite:///{workspace.resolve() / 'mlflow.db'}"


def preload_store(workspace: Path) -> None:
    """Import MLflow's SQL store now if this workspace will use it (3 s of imports, mostly SQLAlchemy
    and alembic), so that the CLI pays for it while Prefect's server is still booting."""
    if tracking_uri(workspace).startswith("sqlite:"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def _experiment_id(client: MlflowClient, name: str, workspace: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (workspace.resolve() / "mlartifacts").as_uri()
    # the MLflow UI opens a "model training" experiment on its runs table, not the GenAI pages
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"}
    )


def git_state() -> dict[str, str]:
    """The commit of the code that ran, and whether the tree had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain")))}


LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "prefect", "mlflow", "pandas")


def library_versions() -> dict[str, str]:
    """`library.<name>` tags: what a model was built with, for the day results stop matching."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"library.{name}"] = version(name)
        except PackageNotFoundError:
            versions[f"library.{name}"] = "not installed"
    return versions


def start_pipeline_run(experiment: str, workspace: Path, spec: dict[str, Any], tags: dict[str, str]) -> Tracking:
    """Open the parent run and record the resolved spec with it."""
    uri = tracking_uri(workspace)

    def open_experiment() -> tuple[MlflowClient, str]:
        # the first client of a workspace creates the SQLite schema; two doing it at once collide
        with file_lock(workspace / ".mlflow.lock"):
            seed_store(uri)
            client = MlflowClient(tracking_uri=uri)
            return client, _experiment_id(client, experiment, workspace)

    client, experiment_id = patiently(uri, f"opening experiment {experiment!r}", open_experiment)
    run = patiently(
        uri,
        "creating the pipeline's run",
        lambda: client.create_run(
            experiment_id, run_name=tags.get("flow_run_name"), tags={**git_state(), **library_versions(), **tags}
        ),
    )
    pipeline_run = StageRun(client, run.info.run_id)
    patiently(uri, "logging the pipeline's spec", lambda: client.log_dict(run.info.run_id, spec, "spec.json"))
    # the resolved spec as params too, so runs compare key by key in the MLflow UI and `compare`
    pipeline_run.log_params(spec)
    return Tracking(uri=uri, experiment_id=experiment_id, parent_run_id=run.info.run_id)


def log_pipeline_datasets(tracking: Tracking, datasets: list[dict[str, str]]) -> None:
    """Dataset inputs (name, digest, source, context) on the pipeline run itself, rows not needed."""
    from mlflow.entities import Dataset

    inputs = [
        DatasetInput(
            Dataset(d["name"], d["digest"], "local", json.dumps({"uri": d["source"]})),
            tags=[InputTag("mlflow.data.context", d["context"])],
        )
        for d in datasets
    ]
    client = tracking.client()
    patiently(
        tracking.uri,
        "logging the pipeline's datasets",
        lambda: client.log_inputs(tracking.parent_run_id, datasets=inputs),
    )


def tag_pipeline_run(tracking: Tracking, tags: dict[str, str]) -> None:
    StageRun(tracking.client(), tracking.parent_run_id).set_tags(tags)


def log_pipeline_metrics(tracking: Tracking, metrics: dict[str, float]) -> None:
    """The headline metrics on the parent run itself, so runs compare side by side."""
    if metrics:
        StageRun(tracking.client(), tracking.parent_run_id).log_metrics(metrics)


def end_pipeline_run(tracking: Tracking, succeeded: bool) -> None:
    """Close the parent run.

    A failed pipeline is marked FAILED with one try: when MLflow is what failed it, its error is
    the one to show, not a second wait."""
    pipeline_run = StageRun(tracking.client(), tracking.parent_run_id)
    if not succeeded:
        with contextlib.suppress(TrackingUnavailable):
            pipeline_run.end("FAILED", wait_s=0)
        return
    pipeline_run.end("FINISHED")


@contextmanager
def pipeline_run(experiment: str, workspace: Path, spec: dict[str, Any], tags: dict[str, str]) -> Iterator[Tracking]:
    """The pipeline's parent run, open while the stages run: FINISHED when they return, FAILED when
    anything escapes (an interrupt too), so no run stays RUNNING in the MLflow UI."""
    tracking = start_pipeline_run(experiment, workspace, spec, tags)
    try:
        yield tracking
    except BaseException:
        end_pipeline_run(tracking, succeeded=False)
        raise
    end_pipeline_run(tracking, succeeded=True)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"lora": {"rank": 8}}` -> `{"lora.rank": "8"}`, the shape MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return flat


class StageRun:
    """A stage's child run: params, metrics, artifacts and dataset inputs."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def _send(self, what: str, call: Callable[[], T]) -> T:
        return patiently(self.client.tracking_uri, f"{what} (run {self.run_id})", call)

    def fetch(self) -> Run:
        return self._send("reading the run", lambda: self.client.get_run(self.run_id))

    def end(self, status: str = "FINISHED", wait_s: float | None = None) -> None:
        what = f"closing the run as {status} (run {self.run_id})"
        patiently(self.client.tracking_uri, what, lambda: self.client.set_terminated(self.run_id, status), wait_s)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, value[:6000]) for key, value in flatten(params).items()]
        for start in range(0, len(items), 100):
            batch = items[start : start + 100]
            self._send("logging params", lambda batch=batch: self.client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        stamp = _now_ms()
        items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        if items:
            self._send("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._send("setting tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._send(f"logging {path.name}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def log_text(self, text: str, name: str) -> None:
        self._send(f"logging {name}", lambda: self.client.log_text(self.run_id, text, name))

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        frame = _to_frame(rows)
        self._send(f"logging {name}", lambda: self.client.log_table(self.run_id, data=frame, artifact_file=name))

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        """Record a dataset input (name, digest, source) so models trace back to their data.

        Only the reference is logged, not the rows: a dataset of millions of rows stays where it is.
        """
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        if Path(source).exists():
            with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it did
                warnings.simplefilter("ignore", UserWarning)
                where = resolve_dataset_source(source)
        else:  # a hub dataset id
            where = HuggingFaceDatasetSource(source)
        dataset = MetaDataset(where, name=name, digest=digest)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self._send(f"logging dataset {name!r}", lambda: self.client.log_inputs(self.run_id, datasets=[entity]))


def _to_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(
        [
            {k: v if isinstance(v, str | int | float) else json.dumps(v, ensure_ascii=False) for k, v in r.items()}
            for r in rows
        ]
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def stage_run(
    tracking: Tracking, stage: str, params: dict[str, Any], continue_run_id: str | None = None
) -> Iterator[StageRun]:
    """A child run of the pipeline run for one stage; marked FAILED if the stage raises.

    With `continue_run_id`, the run of an interrupted attempt is reopened instead, so a
    resumed stage keeps one metric history.
    """
    client = tracking.client()
    if continue_run_id and _run_exists(client, continue_run_id):
        run_id = continue_run_id
        StageRun(client, run_id).set_tags({"resumed_by_pipeline_run": tracking.parent_run_id})
        patiently(tracking.uri, f"reopening stage {stage}'s run", lambda: client.update_run(run_id, status="RUNNING"))
    else:
        created = patiently(
            tracking.uri,
            f"creating stage {stage}'s run",
            lambda: client.create_run(
                tracking.experiment_id, run_name=stage, tags={PARENT_TAG: tracking.parent_run_id, "stage": stage}
            ),
        )
        run_id = created.info.run_id
        StageRun(client, run_id).log_params(params)
    run = StageRun(client, run_id)
    try:
        yield run
    except BaseException as failure:
        if not isinstance(failure, TrackingUnavailable):  # MLflow already had its wait: show its error now
            with contextlib.suppress(TrackingUnavailable):  # the stage's own error is the one to show
                run.end("FAILED", wait_s=0)
        raise
    run.end("FINISHED")


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        StageRun(client, run_id).fetch()
    except MlflowException:  # refused, not down: the run is not there
        return False
    return True


def built_by(client: MlflowClient, run: Run) -> Run:
    """The run that built a stage's output: `run` itself, or the one a reused stage points at."""
    producer = run.data.tags.get("produced_by_run_id")
    return client.get_run(producer) if producer and producer != "unknown" else run


def record_reused_stage(tracking: Tracking, stage: str, key: str, producer_run_id: str | None) -> str:
    """A child run for a reused stage that points to the run which produced the output."""
    client = tracking.client()
    tags = {
        PARENT_TAG: tracking.parent_run_id,
        "stage": stage,
        "reused": "true",
        "cache_key": key,
        "produced_by_run_id": producer_run_id or "unknown",
    }
    run = patiently(
        tracking.uri,
        f"recording that stage {stage} is reused",
        lambda: client.create_run(tracking.experiment_id, run_name=f"{stage} (reused)", tags=tags),
    )
    StageRun(client, run.info.run_id).end("FINISHED")
    return run.info.run_id
