"""A fresh sqlite store, created by one process at a time.

MLflow builds a new sqlite database's tables when a process first opens it; two jobs that open the same new file
at once (`train.py` and `tune.py` started together, or any two jobs on the default `sqlite:///mlflow.db`) both
create tables and one fails with "table ... already exists". Every job opens its store here first, under a lock
on the database's folder, so the second one finds the tables made.
"""

from __future__ import annotations

import fcntl
import os

from mlflow import MlflowClient

from dcgan_dist.errors import ConfigError
from dcgan_dist.tracking.uris import sqlite_file


def ready_store(uri: str) -> None:
    """Open `uri`'s tracking and registry tables once, creating them if new; a no-op for a tracking server."""
    db = sqlite_file(uri)
    if db is None:
        return
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"tracking.uri: cannot use the folder {folder} for the sqlite store: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a folder lock leaves no file beside the user's database
        except OSError:
            pass  # a filesystem without flock on folders (some NFS): open it unguarded, as MLflow would
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry's
    finally:
        os.close(fd)
