"""Scoring generators: the real side, the fixed evaluation noise, and the protocol that travels with each number.

A number is only meaningful with its protocol: how many real and fake images, which feature extractor (and its
checksum), which data (the manifest's sha256), which resolution and seed. Two numbers are compared only when
their protocols match (`Protocol.key`).

`Evaluator` holds the real side, cached on disk per data manifest so that each evaluation only generates and
scores the fake side; `evaluate` splits the fake side over the ranks of a training run and scores on rank 0.
The metrics themselves are in `registry.py`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dcgan_dist.config import MetricsConfig
from dcgan_dist.data.loader import ShardSet, read_sample
from dcgan_dist.files import write_atomic
from dcgan_dist.metrics.inception import load_inception
from dcgan_dist.metrics.registry import METRICS
from dcgan_dist.models import generate, latents

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # evaluation noise never coincides with the sample grids' (seeded by train.seed)


@dataclass(frozen=True)
class Protocol:
    """What a number was measured with; equal protocols -> comparable numbers."""

    metric: str
    num_fake: int
    num_real: int
    resolution: int
    data: str  # sha256 of the data manifest
    extractor: str = ""  # "name:sha256" of the feature network ("" for swd)
    seed: int = 0
    device: str = "cpu"  # where G ran and features were taken: cuDNN/TF32 numerics differ from the CPU's

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_key(cls, key: str) -> "Protocol":
        return cls(**json.loads(key))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 images, as they would be saved to disk."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().contiguous()


def eval_noise(nz: int, count: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice of the evaluation's fixed z vectors.

    The whole set depends only on (nz, count, seed), so the images scored are the same whatever
    the number of ranks, and the same as `jobs/evaluate.py` generates for a registered model.
    """
    z = latents(count, nz, seed + EVAL_SEED_OFFSET)
    per_rank = -(-count // world)
    return z[rank * per_rank:(rank + 1) * per_rank]


def fake_images(generator, z: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """uint8 images from `generator` (any callable z -> images in [-1, 1]), as they would be saved to disk."""
    return generate(generator, z, batch_size, device, each=to_uint8)


class Evaluator:
    """Scores generated images against a fixed real sample of one dataset.

    `names`: swd always; fid and kid when an extractor (the Inception weights) is configured.
    Pass `extractor` to use another feature network (tests use a small stand-in).
    """

    def __init__(self, mcfg: MetricsConfig, shards: ShardSet, *, channels: int, resolution: int,
                 device="cpu", extractor=None, load_real: bool = True):
        self.cfg, self.shards = mcfg, shards
        self.channels, self.resolution = channels, resolution
        self.device_type = torch.device(device).type
        if extractor is None and mcfg.inception_weights:
            extractor = load_inception(mcfg.inception_weights, mcfg.inception_sha256, device=device,
                                       batch_size=mcfg.batch_size)
        self.extractor = extractor
        self.names = tuple(n for n, m in METRICS.items() if extractor is not None or not m.uses_features)
        self.real_images: torch.Tensor | None = None
        self.real_features: np.ndarray | None = None
        self.cache_hits: list[str] = []  # which real-side files came from the cache (tests, logs)
        if load_real:
            self._load_real()

    # --- the real side, cached per data fingerprint ---
    def _cached(self, what: str, compute) -> np.ndarray:
        name = f"real-{self.shards.fingerprint[:16]}-{self.resolution}px-n{self.cfg.num_images}-{what}.npy"
        path = Path(self.cfg.cache_dir).expanduser() / name
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                self.cache_hits.append(what)
                return arr
            except (ValueError, OSError) as e:
                log.warning("metrics: ignoring unreadable cache file %s (%s)", path, e)
        arr = compute()
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buf.getvalue())
        except OSError as e:
            log.warning("metrics: cannot cache real-data statistics in %s (%s)", path, e)
        return arr

    def _load_real(self) -> None:
        self.real_images = torch.from_numpy(self._cached("images", lambda: read_sample(
            self.shards, self.cfg.num_images, channels=self.channels, resolution=self.resolution).numpy()))
        if self.extractor is not None:
            tag = f"{self.extractor.name}-{self.extractor.sha256[:12]}"
            self.real_features = self._cached(tag, lambda: self.extractor(self.real_images))
        log.info("metrics: real side = %d images of %s (%s)", len(self.real_images), self.shards.urls[0],
                 "cached" if self.cache_hits else "computed and cached")

    # --- protocols ---
    def protocol(self, name: str, num_fake: int) -> Protocol:
        extractor = f"{self.extractor.name}:{self.extractor.sha256}" if METRICS[name].uses_features else ""
        return Protocol(name, num_fake, len(self.real_images), self.resolution, self.shards.fingerprint,
                        extractor, self.cfg.seed, self.device_type)

    # --- the fake side ---
    def payload(self, fake: torch.Tensor) -> dict:
        """What one rank contributes for its uint8 fake images: the images and, for FID/KID, features."""
        out = {"images": fake}
        if self.extractor is not None:
            out["features"] = self.extractor(fake)
        return out

    def score(self, payloads: list[dict], num_fake: int | None = None) -> tuple[dict[str, float], dict[str, Protocol]]:
        """Metric values (plus extras like per-level swd_*) and the protocol of each named metric."""
        fake = torch.cat([p["images"] for p in payloads])[:num_fake]
        feats = np.concatenate([p["features"] for p in payloads])[:num_fake] if self.extractor is not None else None
        values = {}
        for name in self.names:
            metric = METRICS[name]
            real_side, fake_side = (self.real_features, feats) if metric.uses_features else (self.real_images, fake)
            values.update(metric.compute(real_side, fake_side, self.cfg.seed))
        return values, {name: self.protocol(name, len(fake)) for name in self.names}

    def evaluate(self, generator, nz: int, device, rank: int = 0, world: int = 1) -> dict:
        """Every rank generates its share of the fixed evaluation noise; rank 0 scores; every rank gets the result:
        {"values": {"swd": ..., ...}, "protocols": {"swd": key, ...}}."""
        mc = self.cfg
        z = eval_noise(nz, mc.num_images, mc.seed, rank, world)
        payload = self.payload(fake_images(generator, z, mc.batch_size, device))
        if world == 1:
            payloads = [payload]
        else:
            payloads = [None] * world if rank == 0 else None
            dist.gather_object(payload, payloads, dst=0)
        result = [None]
        if rank == 0:
            values, protocols = self.score(payloads, mc.num_images)
            result = [{"values": values, "protocols": {k: p.key for k, p in protocols.items()}}]
        if world > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]
