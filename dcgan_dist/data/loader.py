"""The one data path for training, evaluation and experiments: shards -> per-rank infinite stream.

Every rank (and every DataLoader worker inside it) draws shards from the whole set with
replacement, seeded by (seed, rank, worker, start step). The stream never ends, so every rank
runs exactly `train.steps` steps and DDP cannot hang on uneven shard counts, and a resumed run
re-seeds from its checkpoint's step. Bad samples and truncated shards are skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import random
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image

from dcgan_dist.data import s3
from dcgan_dist.data.shards import MANIFEST
from dcgan_dist.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    urls: list[str]
    manifest: dict | None  # None for a bare brace pattern

    @property
    def counts(self) -> dict[str, int]:
        """Samples per shard URL from the manifest: lets the reader notice a truncated shard."""
        return {u: s["count"] for u, s in zip(self.urls, self.manifest["shards"])} if self.manifest else {}

    @property
    def channels(self) -> int | None:
        return self.manifest["channels"] if self.manifest else None

    @property
    def resolution(self) -> int | None:
        return self.manifest["resolution"] if self.manifest else None

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest (or, without one, of the shard URLs): names this exact dataset."""
        text = json.dumps(self.manifest, sort_keys=True) if self.manifest else "\n".join(self.urls)
        return hashlib.sha256(text.encode()).hexdigest()


def _parse_manifest(text: str | bytes, where: str) -> dict:
    try:
        manifest = json.loads(text)
        [s["name"] for s in manifest["shards"]], manifest["channels"], manifest["resolution"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where} is not a valid shard manifest ({type(e).__name__}: {e})") from None
    if not manifest["shards"]:
        raise DataError(f"{where} lists no shards")
    return manifest


def _resolve_s3(url: str) -> ShardSet:
    if "{" in url:
        urls = list(braceexpand(url))
        if s3.exists(urls[0]) is None:
            raise DataError(f"data.url {url!r}: the first shard {urls[0]} does not exist")
        return ShardSet(urls, None)
    prefix = url.rstrip("/") + "/"
    s3.check_bucket(prefix, "read shards from")
    if s3.exists(prefix + MANIFEST):
        manifest = _parse_manifest(s3.read_bytes(prefix + MANIFEST), prefix + MANIFEST)
        return ShardSet([prefix + s["name"] for s in manifest["shards"]], manifest)
    bucket, key_prefix = s3.split(prefix)
    keys = [k for k in s3.list_keys(prefix) if k.endswith(".tar") and "/" not in k[len(key_prefix):]]
    urls = sorted(f"s3://{bucket}/{k}" for k in keys)
    if not urls:
        raise DataError(f"data.url {url!r} holds no manifest.json and no *.tar shards")
    return ShardSet(urls, None)


def resolve_shards(url: str) -> ShardSet:
    """A shard folder or s3:// prefix (with manifest.json, or *.tar) or a brace pattern -> shard URLs."""
    if s3.is_s3(url):
        return _resolve_s3(url)
    if "{" in url:
        urls = list(braceexpand(url))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"data.url {url!r}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
        return ShardSet(urls, None)
    root = Path(url)
    if not root.exists():
        raise DataError(
            f"data.url {url!r} does not exist; build shards with "
            f"`python jobs/prepare_data.py digits --out {url}` (or `folder PATH --out {url}`)"
        )
    if not root.is_dir():
        raise DataError(f"data.url {url!r} is not a directory of shards")
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        manifest = _parse_manifest(manifest_path.read_text(), str(manifest_path))
        names = [s["name"] for s in manifest["shards"]]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise DataError(f"{manifest_path} lists {len(missing)} shard(s) missing from {root} (first: {missing[0]})")
        return ShardSet([str(root / n) for n in names], manifest)
    urls = sorted(glob.glob(str(root / "*.tar")))
    if not urls:
        raise DataError(f"data.url {url!r} holds no manifest.json and no *.tar shards")
    return ShardSet(urls, None)


def open_shard(url: str) -> IO[bytes]:
    """A local file, or an S3 object as a stream that resumes after dropped connections."""
    if s3.is_s3(url):
        return io.BufferedReader(s3.ResumableBody(url), buffer_size=1 << 20)
    return open(url, "rb")


def iter_tar(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into WebDataset samples: `key.ext` files sharing one key."""
    key, sample = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield key, sample


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "npy")


def decode_sample(sample: dict[str, bytes], channels: int, resolution: int) -> torch.Tensor:
    """Image bytes -> uint8 tensor (C, H, W); raises ValueError on anything unexpected."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image field (one of {IMAGE_EXTS}) among {sorted(sample)}")
    if ext == "npy":  # raw uint8 HWC arrays: no decode cost
        arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    else:
        with Image.open(io.BytesIO(sample[ext])) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    if arr.dtype != np.uint8 or arr.size != resolution * resolution * channels:
        raise ValueError(f"image is {arr.dtype} {arr.shape}, expected uint8 {(resolution, resolution, channels)}")
    img = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels).copy()).permute(2, 0, 1)
    if img.shape != (channels, resolution, resolution):
        raise ValueError(f"image is {tuple(img.shape)}, expected {(channels, resolution, resolution)}")
    return img


class ShardStream(IterableDataset):
    """Infinite batches of uint8 images for one rank; each DataLoader worker gets its own seed.

    Yields dicts: `image` (B, C, H, W) uint8, `worker` (its id) and `stats`, this worker's
    cumulative `skipped` (bad samples, truncated shards) and `retries` (S3 re-requests) counts.
    """

    def __init__(self, urls: list[str], *, counts: dict[str, int] | None = None, channels: int, resolution: int,
                 batch_size: int, seed: int, rank: int, start_step: int, shuffle_buffer: int = 1000):
        self.urls, self.counts = urls, counts or {}
        self.channels, self.resolution = channels, resolution
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.skipped = 0
        self.shards_read: Counter[str] = Counter()

    @property
    def stats(self) -> dict[str, int]:
        return {"skipped": self.skipped, "retries": s3.retries()}

    def _samples(self, rng: random.Random) -> Iterator[torch.Tensor]:
        while True:
            url = rng.choice(self.urls)
            self.shards_read[url] += 1
            key, seen = None, 0
            try:
                with open_shard(url) as f:
                    for key, sample in iter_tar(f):
                        seen += 1
                        try:
                            yield decode_sample(sample, self.channels, self.resolution)
                        except Exception as e:
                            self._skip(f"sample {key} in {url}: {type(e).__name__}: {e}")
            except (tarfile.TarError, OSError, EOFError, DataError) as e:
                self._skip(f"shard {url} unreadable after key {key}: {type(e).__name__}: {e}")
                continue
            if seen < self.counts.get(url, 0):  # tarfile ends quietly at a cut header
                self._skip(f"shard {url} truncated: {seen} of {self.counts[url]} samples after key {key}")

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if self.skipped <= 10:
            log.warning("data: skipping %s", what)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_step}")
        buffer: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        for img in self._samples(rng):
            buffer.append(img)
            if len(buffer) < self.shuffle_buffer:
                continue
            i = rng.randrange(len(buffer))  # emit a random held sample (swap with last, pop: O(1))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            batch.append(buffer.pop())
            if len(batch) == self.batch_size:
                yield {"image": torch.stack(batch), "worker": worker, "stats": self.stats}
                batch = []


class Batches:
    """Iterate a rank's stream; `skipped` and `retries` sum the counts of all its DataLoader workers."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
        self._it = iter(self.loader)
        self._stats: dict[int, dict[str, int]] = {}

    @property
    def skipped(self) -> int:
        return sum(s["skipped"] for s in self._stats.values())

    @property
    def retries(self) -> int:
        return sum(s["retries"] for s in self._stats.values())

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> torch.Tensor:
        b = next(self._it)
        self._stats[b["worker"]] = b["stats"]
        return b["image"]


def make_batches(shards: ShardSet, *, channels: int, resolution: int, batch_size: int, seed: int,
                 rank: int = 0, start_step: int = 0, num_workers: int = 0, shuffle_buffer: int = 1000) -> Batches:
    stream = ShardStream(shards.urls, counts=shards.counts, channels=channels, resolution=resolution, batch_size=batch_size,
                         seed=seed, rank=rank, start_step=start_step, shuffle_buffer=shuffle_buffer)
    return Batches(stream, num_workers)


def read_sample(shards: ShardSet, n: int, *, channels: int, resolution: int, threads: int = 16) -> torch.Tensor:
    """A fixed, deterministic set of up to `n` real images (uint8, N x C x H x W) spread over the dataset.

    Takes the first ceil(n / m) images of m evenly spaced shards (m = min(shards, n)): the same
    images every time, from every part of the data, without reading all of it. Evaluation's real side.
    """
    m = min(len(shards.urls), n)
    picked = [shards.urls[i * len(shards.urls) // m] for i in range(m)]
    per_shard = -(-n // m)

    def head(url: str) -> list[torch.Tensor]:
        out = []
        try:
            with open_shard(url) as f:
                for key, sample in iter_tar(f):
                    try:
                        out.append(decode_sample(sample, channels, resolution))
                    except ValueError as e:
                        log.warning("data: skipping sample %s in %s: %s", key, url, e)
                    if len(out) == per_shard:
                        break
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("data: shard %s unreadable after %d samples: %s", url, len(out), e)
        return out

    with ThreadPoolExecutor(threads) as pool:
        images = [img for part in pool.map(head, picked) for img in part][:n]
    if not images:
        raise DataError(f"no readable images in {len(picked)} shard(s) starting at {picked[0]}")
    return torch.stack(images)


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1] on `device` (converted after the copy: 4x less traffic)."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
