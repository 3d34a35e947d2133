"""A new workspace's MLflow SQLite store, copied from a template with MLflow's schema in place.

MLflow builds its schema in a new SQLite file by running every one of its migrations: about 3 s on
a small CPU, in every new workspace. The result depends only on the MLflow and SQLAlchemy
versions, so it is built once per machine, in the user's cache folder
(tasks/runtime/user_cache.py), and copied. The copy is the store MLflow would have made, down to
its Default experiment's artifact folder, which MLflow derives from the working folder of the
process that first opens the store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from importlib.metadata import version
from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.runtime.user_cache import user_cache

SQLITE = "sqlite:///"


def template() -> Path | None:
    """The empty store with MLflow's schema for these library versions, built if it is not there yet
    (None where the cache folder cannot be written: the store is then built in place, as usual)."""
    path = user_cache() / "mlflow-stores" / f"mlflow-{version('mlflow')}-sqlalchemy-{version('sqlalchemy')}.db"
    if path.is_file():
        return path
    building = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=SQLITE + str(building)).search_experiments()
        os.replace(building, path)  # whole or not at all; two builders at once each replace it with a whole one
    except Exception:  # noqa: BLE001 (a folder it cannot write, as SQLAlchemy's error or the OS's: build in place)
        with contextlib.suppress(OSError):
            building.unlink(missing_ok=True)
        return None
    return path


def seed_store(uri: str) -> None:
    """Put the template in place of a workspace store that does not exist yet; leave any other alone."""
    if not uri.startswith(SQLITE):
        return
    store = Path(uri.removeprefix(SQLITE))
    if store.exists():
        return
    source = template()
    if source is None:
        return
    copy = store.with_name(f".{store.name}.{os.getpid()}")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)  # a workspace not made yet (`tunefactory api --record`)
        shutil.copyfile(source, copy)
        with contextlib.closing(sqlite3.connect(copy)) as db, db:
            now = int(time.time() * 1000)
            db.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                "WHERE experiment_id = 0",
                (os.path.abspath(os.path.join("mlruns", "0")), now, now),
            )
        with contextlib.suppress(FileExistsError):  # a store that appeared meanwhile is kept
            os.link(copy, store)
    except OSError:
        pass  # MLflow builds it in place
    finally:
        copy.unlink(missing_ok=True)
