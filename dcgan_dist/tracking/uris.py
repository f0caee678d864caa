"""Tracking URIs: made absolute where workers in other folders must find the same store, and stripped of
credentials wherever they are shown or logged."""

from __future__ import annotations

import re
from pathlib import Path


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute, so Ray workers in other folders find the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def redact(value: object) -> str:
    """Drop `user:password@` from URIs so credentials never reach MLflow params or logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(value))


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go in `mlartifacts/` beside the database file, not in whatever folder the
    first run happened to start in (MLflow's default is `./mlruns` of the current directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix + "/"):
        return (Path(uri[len(prefix):]).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides (its --artifacts-destination)
