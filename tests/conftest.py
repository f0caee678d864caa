"""Shared fixtures: real shards, a real local Ray cluster, a real sqlite MLflow store. No mocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dcgan_dist.devtools import free_port  # noqa: F401  (re-exported for the tests)

# Token auth would make a later `ray start --head` + `ray job submit` fail (see PITFALLS).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits as 32x32 shards, built once per session with the real shard writer."""
    from dcgan_dist.data import shards, sources

    out = tmp_path_factory.mktemp("data") / "digits-32"
    shards.build_shards(sources.Digits(), str(out), resolution=32, encoding="png", shard_size=500, workers=2,
                        progress=False)
    return out


def tiny_overrides(tmp: Path, digits: Path, **extra) -> list[str]:
    """A small, fast training config on the digits shards, all state under `tmp`."""
    values = {
        "data.url": str(digits),
        "data.num_workers": 0,
        "data.shuffle_buffer": 200,
        "model.ngf": 8,
        "model.ndf": 8,
        "train.batch_size": 16,
        "train.steps": 12,
        "train.log_every": 2,
        "train.checkpoint_every": 4,
        "train.sample_every": 6,
        "ray.storage_path": str(tmp / "ray_results"),
        "ray.cpus_per_worker": 0.5,
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "metrics.num_images": 128,
        "metrics.batch_size": 64,
        "metrics.cache_dir": str(tmp / "metrics-cache"),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
