"""Every quality metric by name: what it needs and how it is computed, registered in one place.

As in stylegan2-ada-pytorch's `metric_main.py`, a metric is registered once under its name; config validation,
the evaluator and the champion rule all read this table. All of them are lower-is-better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dcgan_dist.metrics import fid as fid_lib
from dcgan_dist.metrics.swd import swd


@dataclass(frozen=True)
class Metric:
    name: str
    uses_features: bool  # True: compares feature vectors (needs the Inception weights); False: uint8 pixels
    compute: Callable[..., dict[str, float]]  # (real, fake, seed) -> {name: value, ...} (extra keys allowed)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, uses_features: bool):
    def add(fn: Callable[..., dict[str, float]]):
        METRICS[name] = Metric(name, uses_features, fn)
        return fn
    return add


@register_metric("swd", uses_features=False)
def _swd(real: torch.Tensor, fake: torch.Tensor, seed: int) -> dict[str, float]:
    """Sliced Wasserstein distance of Laplacian-pyramid patches (PGGAN); also `swd_<res>` per level."""
    return swd(real, fake, seed=seed)


@register_metric("fid", uses_features=True)
def _fid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    return {"fid": fid_lib.frechet_distance(*fid_lib.feature_stats(real), *fid_lib.feature_stats(fake))}


@register_metric("kid", uses_features=True)
def _kid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    return {"kid": fid_lib.kid(real, fake, seed=seed)}
