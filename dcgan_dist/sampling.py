"""Sampling a registered generator without writing code: a grid, raw arrays, a latent walk (`jobs/sample.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dcgan_dist import tracking
from dcgan_dist.errors import ConfigError
from dcgan_dist.evaluation import resolve_version
from dcgan_dist.grids import save_grid
from dcgan_dist.experiments.latent_walk import paths, slerp
from dcgan_dist.models import generate, latents


def latent_rows(nz: int, n: int, seed: int, interpolate: int = 0) -> torch.Tensor:
    """n random latents, or with `interpolate` K: n rows of K points each along the great circle between two
    random latents (the paper's latent walk, section 6.1)."""
    if n < 1 or interpolate < 0 or interpolate == 1:
        raise ConfigError(f"-n must be >= 1 and --interpolate 0 or >= 2, got -n {n} --interpolate {interpolate}")
    if not interpolate:
        return latents(n, nz, seed)
    ends = latents(2 * n, nz, seed)
    return paths(ends[:n], ends[n:], interpolate, slerp)


def write(images: torch.Tensor, out: str | Path | None, npz: str | Path | None, nrow: int) -> None:
    """A PNG grid (pixels 0-255 from [-1, 1]) and/or an npz with `images` (N, C, H, W) float32 in [-1, 1]."""
    for path in (out, npz):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if out:
        save_grid(images, out, nrow=nrow)
    if npz:
        np.savez_compressed(npz, images=images.float().numpy())


def sample(tracking_uri: str, model_uri: str, n: int, seed: int, interpolate: int = 0):
    """(images, version): G's samples for `latent_rows(...)`; the same seed gives the same images. An unknown model,
    alias or version is a TrackingError naming the URI."""
    mv = resolve_version(tracking_uri, model_uri)
    model = tracking.load_generator(f"models:/{mv.name}/{mv.version}", tracking_uri)
    z = latent_rows(model.nz, n, seed, interpolate)
    return generate(model.generator, z, batch_size=256), str(mv.version)
