"""Every quality metric by name: what it needs and how it is computed, registered in one place.

As in stylegan2-ada-pytorch's `metric_main.py`, a metric is registered once under its name; config validation,
the evaluator and the champion rule all read this table. All of them are lower-is-better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dcgan_dist.metrics import fid as fid_lib
from dcgan_dist.metrics.swd import swd


@dataclass(frozen=True)
class Metric:
    name: str
    uses_features: bool  # True: compares feature vectors (needs the Inception weights); False: uint8 pixels
    compute: Callable[..., dict[str, float]]  # (real, fake, seed) -> {name: value, ...} (extra keys allowed)


def _fid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    return {"fid": fid_lib.frechet_distance(*fid_lib.feature_stats(real), *fid_lib.feature_stats(fake))}


METRICS: dict[str, Metric] = {m.name: m for m in (
    # swd: sliced Wasserstein distance of Laplacian-pyramid patches (PGGAN); also `swd_<res>` per level
    Metric("swd", uses_features=False, compute=lambda real, fake, seed: swd(real, fake, seed=seed)),
    Metric("fid", uses_features=True, compute=_fid),
    Metric("kid", uses_features=True, compute=lambda real, fake, seed: {"kid": fid_lib.kid(real, fake, seed=seed)}),
)}
