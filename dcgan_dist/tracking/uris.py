"""Tracking URIs: made absolute where workers in other folders must find the same store, pointed at the driver's
machine for processes on other nodes, and stripped of credentials wherever they are shown or logged."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


SQLITE = "sqlite:///"


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute, so Ray workers in other folders find the same file."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a resolved (absolute) sqlite URI; None for a tracking server."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE + "/") else None


def redact(value: object) -> str:
    """Drop `user:password@` from URIs so credentials never reach MLflow params or logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(value))


def where_to_browse(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on a tracking server (what the MLflow UI links to), or the command that serves a local
    store's UI."""
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go in `mlartifacts/` beside the database file, not in whatever folder the
    first run happened to start in (MLflow's default is `./mlruns` of the current directory)."""
    db = sqlite_file(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None  # a server decides (its --artifacts-destination)


def as_seen_from(uri: str, driver_ip: str, node_ip: str) -> str:
    """The tracking URI as a process on `node_ip` reaches it. A loopback server (`http://127.0.0.1:5000`, as
    docs/cluster.md says for the server on the head) is the driver's machine, so on any other node it is at the driver's
    address; the server must listen there too (cluster/start_mlflow.sh: MLFLOW_HOST)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or node_ip == driver_ip or not _is_loopback(parts.hostname or ""):
        return uri
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo + '@' if userinfo else ''}{driver_ip}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
