"""A new workspace's MLflow store is copied from a per-machine template: the same store MLflow builds,
never over an existing one, and MLflow builds it as before where the cache cannot be written."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.runtime.store_template import seed_store


def clauses(sql: str | None) -> frozenset[str]:
    """A statement's lines without their order: alembic's table rebuilds list a table's constraints in
    an order that differs between two builds by the same MLflow."""
    return frozenset(line.strip().rstrip(",").strip() for line in (sql or "").splitlines())


def contents(store: Path) -> tuple[set, list, list]:
    with contextlib.closing(sqlite3.connect(store)) as db:
        schema = {
            (kind, name, clauses(sql)) for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master")
        }
        migration = db.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = db.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments")
        return schema, migration, experiments.fetchall()


def test_a_new_workspace_store_is_the_one_mlflow_builds_and_an_existing_one_is_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TUNEFACTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "built.db"
    MlflowClient(tracking_uri=f"sqlite:///{built}").search_experiments()
    store = tmp_path / "workspace" / "mlflow.db"
    store.parent.mkdir()

    seed_store(f"sqlite:///{store}")

    assert len(list((tmp_path / "cache" / "mlflow-stores").glob("*.db"))) == 1, "the template, kept for next time"
    assert contents(store) == contents(built)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.create_run(client.create_experiment("seeded"))
    client.log_metric(run.info.run_id, "loss", 1.5)
    seed_store(f"sqlite:///{store}")
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.5}, "an existing store is never replaced"


def test_without_a_writable_cache_mlflow_builds_the_store_itself(tmp_path: Path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("TUNEFACTORY_CACHE", str(tmp_path / "not-a-folder"))
    store = tmp_path / "mlflow.db"

    seed_store(f"sqlite:///{store}")

    assert not store.exists()
    assert [e.name for e in MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()] == ["Default"]
