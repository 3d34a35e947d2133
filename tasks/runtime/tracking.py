"""The one MLflow helper: a parent run per pipeline run, a child run per stage.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else the MLflow server that `make ui`
started for the workspace, else SQLite inside the workspace, so a fresh machine needs no
server. Everything goes through an explicit `MlflowClient`, never the fluent API's global
active run, because Prefect may run tasks on worker threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.runtime import local_servers
from tasks.runtime.locks import file_lock

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = "mlflow.experimentKind"


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
    # the first client of a workspace creates the SQLite schema; two doing it at once collide
    with file_lock(workspace / ".mlflow.lock"):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, experiment, workspace)
    run = client.create_run(
        experiment_id, run_name=tags.get("flow_run_name"), tags={**git_state(), **library_versions(), **tags}
    )
    client.log_dict(run.info.run_id, spec, "spec.json")
    # the resolved spec as params too, so runs compare key by key in the MLflow UI and `compare`
    StageRun(client, run.info.run_id).log_params(spec)
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
    tracking.client().log_inputs(tracking.parent_run_id, datasets=inputs)


def tag_pipeline_run(tracking: Tracking, tags: dict[str, str]) -> None:
    StageRun(tracking.client(), tracking.parent_run_id).set_tags(tags)


def end_pipeline_run(tracking: Tracking, succeeded: bool, metrics: dict[str, float] | None = None) -> None:
    """Close the parent run; the headline metrics go on it so runs compare side by side."""
    client = tracking.client()
    if metrics:
        StageRun(client, tracking.parent_run_id).log_metrics(metrics)
    client.set_terminated(tracking.parent_run_id, "FINISHED" if succeeded else "FAILED")


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

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, value[:6000]) for key, value in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        stamp = _now_ms()
        items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        self.client.log_table(self.run_id, data=_to_frame(rows), artifact_file=name)

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
        self.client.log_inputs(self.run_id, datasets=[entity])


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
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed_by_pipeline_run", tracking.parent_run_id)
    else:
        run = client.create_run(
            tracking.experiment_id,
            run_name=stage,
            tags={PARENT_TAG: tracking.parent_run_id, "stage": stage},
        )
        run_id = run.info.run_id
        StageRun(client, run_id).log_params(params)
    try:
        yield StageRun(client, run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def built_by(client: MlflowClient, run: Run) -> Run:
    """The run that built a stage's output: `run` itself, or the one a reused stage points at."""
    producer = run.data.tags.get("produced_by_run_id")
    return client.get_run(producer) if producer and producer != "unknown" else run


def record_reused_stage(tracking: Tracking, stage: str, key: str, producer_run_id: str | None) -> str:
    """A child run for a reused stage that points to the run which produced the output."""
    client = tracking.client()
    run = client.create_run(
        tracking.experiment_id,
        run_name=f"{stage} (reused)",
        tags={
            PARENT_TAG: tracking.parent_run_id,
            "stage": stage,
            "reused": "true",
            "cache_key": key,
            "produced_by_run_id": producer_run_id or "unknown",
        },
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
