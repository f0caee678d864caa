"""The one data path for training, evaluation and experiments: shards -> per-rank infinite stream.

Every rank (and every DataLoader worker inside it) draws shards from the whole set with
replacement, seeded by (seed, rank, worker, start step). The stream never ends, so every rank
runs exactly `train.steps` steps and DDP cannot hang on uneven shard counts, and a resumed run
re-seeds from its checkpoint's step. Bad samples and truncated shards are skipped and counted, within limits:
a stream that skips more than `data.max_skip_fraction` of its samples, or reads `data.max_bad_shards` shards in a
row without one usable image, stops with a DataError that names them (an endless stream would otherwise hang).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image

from dcgan_dist.config import DataConfig
from dcgan_dist.data import s3
from dcgan_dist.data.shards import MANIFEST
from dcgan_dist.errors import DataError

log = logging.getLogger(__name__)

SKIP_FLOOR = 100  # skipped samples always tolerated before data.max_skip_fraction is judged
MAX_SAMPLE_BYTES = DataConfig.max_sample_bytes


@dataclass
class ShardSet:
    urls: list[str]
    manifest: dict | None  # None for a bare brace pattern

    @property
    def counts(self) -> dict[str, int]:
        """Samples per shard URL from the manifest: lets the reader notice a truncated shard."""
        return {u: s["count"] for u, s in zip(self.urls, self.manifest["shards"])} if self.manifest else {}

    @property
    def sha256s(self) -> dict[str, str]:
        """sha256 per shard URL from the manifest, for data.verify_sha256."""
        return {u: s["sha256"] for u, s in zip(self.urls, self.manifest["shards"]) if "sha256" in s} \
            if self.manifest else {}

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


def resolve_shards(url: str) -> ShardSet:
    """A shard folder or s3:// prefix (with manifest.json, or *.tar) or a brace pattern -> shard URLs."""
    remote = s3.is_s3(url)
    if "{" in url:
        urls = list(braceexpand(url))
        if remote and s3.exists(urls[0]) is None:  # on S3 the first only: a request per shard is slow
            raise DataError(f"data.url {url!r}: the first shard {urls[0]} does not exist")
        missing = [] if remote else [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"data.url {url!r}: {len(missing)} of {len(urls)} shards do not exist "
                            f"(first: {missing[0]})")
        return ShardSet(urls, None)
    if remote:
        root = url.rstrip("/") + "/"
        s3.check_bucket(root, "read shards from")
        manifest_url = root + MANIFEST
        text = s3.read_bytes(manifest_url) if s3.exists(manifest_url) else None
    else:
        root = Path(url)
        if not root.exists():
            raise DataError(
                f"data.url {url!r} does not exist; build shards with "
                f"`python jobs/prepare_data.py digits --out {url}` (or `folder PATH --out {url}`)"
            )
        if not root.is_dir():
            raise DataError(f"data.url {url!r} is not a directory of shards")
        manifest_url = str(root / MANIFEST)
        text = (root / MANIFEST).read_text() if (root / MANIFEST).is_file() else None
    if text is not None:
        manifest = _parse_manifest(text, manifest_url)
        names = [s["name"] for s in manifest["shards"]]
        if remote:  # one paged listing, not a request per shard
            _, key_prefix = s3.split(root)
            present = {k[len(key_prefix):] for k in s3.list_keys(root)}
            missing = [n for n in names if n not in present]
        else:
            missing = [n for n in names if not (root / n).is_file()]
        if missing:  # training would reach less of the data than the manifest says, without a word
            raise DataError(f"{manifest_url} lists {len(missing)} shard(s) missing from {root}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return ShardSet([os.path.join(root, n) for n in names], manifest)
    if remote:
        bucket, key_prefix = s3.split(root)
        keys = [k for k in s3.list_keys(root) if k.endswith(".tar") and "/" not in k[len(key_prefix):]]
        urls = sorted(f"s3://{bucket}/{k}" for k in keys)
    else:
        urls = sorted(glob.glob(str(root / "*.tar")))
    if not urls:
        raise DataError(f"data.url {url!r} holds no manifest.json and no *.tar shards")
    return ShardSet(urls, None)


# What a broken or missing shard raises; anything else is a bug and propagates.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, DataError)


def _warn(what) -> bool:
    """Log and go on: `on_error` for one-off reads, and a webdataset handler (True: continue)."""
    log.warning("data: skipping %s", what)
    return True


class HashingReader:
    """A stream that hashes what is read through it: a shard's sha256 without reading it twice."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        return data

    def digest_to_end(self) -> str:
        while self.read(1 << 20):  # tarfile stops at the end-of-archive blocks; the padding after them counts too
            pass
        return self.sha256.hexdigest()


def tar_members(url: str, max_bytes: int = MAX_SAMPLE_BYTES, sha256: str | None = None) -> Iterator[dict]:
    """A shard's files as webdataset's tar stage yields them ({"fname", "data", "__url__"}), read as a plain tar
    stream: a compressed shard is refused, and a member over `max_bytes` ends the shard before it is read (its
    header gives the size), so one huge member cannot run a DataLoader worker out of memory. With `sha256` (the
    manifest's), the shard is hashed as it streams and a mismatch is an error at its end.
    Not webdataset's tar_file_expander: it reads every member whole whatever its header says, and opens gzip."""
    # An S3 object as a stream that resumes after dropped connections.
    raw = io.BufferedReader(s3.ResumableBody(url), buffer_size=1 << 20) if s3.is_s3(url) else open(url, "rb")
    with raw:
        stream = HashingReader(raw) if sha256 else raw
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.size > max_bytes:
                    raise DataError(f"member {info.name} is {info.size:,} bytes, over "
                                    f"data.max_sample_bytes={max_bytes:,}")
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        if sha256 and (actual := stream.digest_to_end()) != sha256:
            raise DataError(f"sha256 is {actual[:16]}..., the manifest says {sha256[:16]}...: the shard changed "
                            f"after the manifest was written")


def shard_samples(url: str, on_error: Callable[[str], object] = _warn, expected: int = 0,
                  max_bytes: int = MAX_SAMPLE_BYTES, sha256: str | None = None,
                  on_lost: Callable[[int], object] | None = None) -> Iterator[dict]:
    """One shard's samples ({"__key__", "__url__", ext: bytes}): our tar reader, webdataset's group_by_keys.

    A broken shard (or, with `sha256`, a changed one) is reported once to `on_error` and ends there without its
    half-read sample, and a shard with fewer than `expected` samples (the manifest's count; tarfile ends quietly at
    a cut header) is reported as truncated. When the file itself is cut short or malformed, `on_lost` gets the
    number of the manifest's samples it did not give (lost data, unlike a read that failed: an S3 outage).
    """
    key, n = None, 0
    try:
        for sample in group_by_keys(tar_members(url, max_bytes, sha256)):
            key, n = sample["__key__"], n + 1
            yield sample
    except READ_ERRORS as e:
        on_error(f"shard {url} unreadable after key {key}: {type(e).__name__}: {e.args[0] if e.args else e}")
        if on_lost and isinstance(e, (tarfile.TarError, EOFError)) and n < expected:
            on_lost(expected - n)
        return
    if n < expected:
        on_error(f"shard {url} truncated: {n} of {expected} samples after key {key}")
        if on_lost:
            on_lost(expected - n)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "npy")


@lru_cache(maxsize=16)
def _npy_header(header: bytes) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy header, parsed once: np.load spends 2/3 of its time on it."""
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)


def _load_npy(data: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) of .npy bytes (versions 1 and 2), read-only."""
    v1 = data[6:7] == b"\x01"  # version 1 stores the header length in 2 bytes, later ones in 4
    size = 10 + int.from_bytes(data[8:10], "little") if v1 else 12 + int.from_bytes(data[8:12], "little")
    shape, fortran, dtype = _npy_header(data[:size])
    return np.frombuffer(data, dtype, offset=size).reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: dict[str, bytes], channels: int, resolution: int) -> torch.Tensor:
    """Image bytes -> uint8 tensor (C, H, W); raises ValueError on anything unexpected."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image field (one of {IMAGE_EXTS}) among {sorted(sample)}")
    if ext == "npy":  # raw uint8 HWC arrays: no decode cost
        arr = _load_npy(sample[ext])
    else:
        mode = "L" if channels == 1 else "RGB"
        with Image.open(io.BytesIO(sample[ext])) as im:  # reads the header only: the size is known before decoding
            if im.size != (resolution, resolution):  # so a wrong or huge image (a decompression bomb) is never decoded
                raise ValueError(f"image is {im.size[0]}x{im.size[1]}, expected {resolution}x{resolution}")
            arr = np.asarray(im if im.mode == mode else im.convert(mode))  # convert() copies even when it matches
    if arr.dtype != np.uint8 or arr.size != resolution * resolution * channels:
        raise ValueError(f"image is {arr.dtype} {arr.shape}, expected uint8 {(resolution, resolution, channels)}")
    img = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels).copy()).permute(2, 0, 1)
    if img.shape != (channels, resolution, resolution):
        raise ValueError(f"image is {tuple(img.shape)}, expected {(channels, resolution, resolution)}")
    return img


def decode_named(sample: dict, channels: int, resolution: int) -> torch.Tensor:
    """decode_sample whose error names the sample: as a wds.map stage, its handler sees only the exception.

    Not wds.decode: it decodes each field alone, while this picks one image field and checks channels and size.
    """
    try:
        return decode_sample(sample, channels, resolution)
    except Exception as e:
        raise DataError(f"sample {sample['__key__']} in {sample['__url__']}: {type(e).__name__}: {e}") from None


class SkipLimit:
    """Bad data as both readers (ShardStream, streams.StreamBatches) handle it: bad samples and broken shards are
    skipped and counted in samples (a shard cut short or unreadable counts the samples its manifest entry promised
    and it did not give), until skips pass data.max_skip_fraction of all samples (after SKIP_FLOOR), data.max_bad_shards
    shards in a row give no usable image, or none comes for data.max_stall_s: then a DataError, as an endless
    stream of bad data, or an S3 that is down for good, would otherwise hang."""

    def __init__(self, shards: ShardSet, limits: DataConfig):
        self.limits = limits
        self.sha256s = shards.sha256s if limits.verify_sha256 else {}
        self.skipped = self.good = self.skip_events = 0
        self.last_skip = ""
        self.bad_run: list[str] = []  # the shards read in a row without a usable image, with why
        self.last_good = time.monotonic()

    def _shard(self, url: str, expected: int) -> Iterator[dict]:
        """One shard's samples under the run's limits. The checks after its last sample run when the reader asks
        for more, that is once all of the shard's samples have been decoded (`_good` counts the usable ones)."""
        problems, lost = [], []
        good_before, self.last_skip = self.good, ""
        yield from shard_samples(url, problems.append, expected, self.limits.max_sample_bytes, self.sha256s.get(url),
                                 lost.append)
        if problems:  # a cut file counts every sample it lost; a failed read (S3 down) one, the stall limit the rest
            self._skip(problems[-1], count=max(1, sum(lost)))
        if self.good > good_before:
            self.bad_run.clear()
            return
        self.bad_run.append(f"{url} ({self.last_skip or 'no samples'})")
        if len(self.bad_run) >= self.limits.max_bad_shards:
            raise DataError(f"{len(self.bad_run)} shards in a row without a usable image (data.max_bad_shards="
                            f"{self.limits.max_bad_shards}): {'; '.join(self.bad_run[-3:])}")
        stalled = time.monotonic() - self.last_good
        if stalled > self.limits.max_stall_s:  # each shard of an S3 that is down costs its retries (~40 s)
            raise DataError(f"no usable image for {stalled:.0f} s (data.max_stall_s={self.limits.max_stall_s:g}); "
                            f"the last shards: {'; '.join(self.bad_run[-3:])}")

    def _good(self) -> None:
        self.good += 1
        self.last_good = time.monotonic()

    def _skip(self, what, count: int = 1) -> bool:
        self.skipped += count
        self.skip_events += 1
        self.last_skip = str(what)
        if self.skip_events <= 10:
            log.warning("data: skipping %s", what)
        total, fraction = self.skipped + self.good, self.limits.max_skip_fraction
        if self.skipped > max(SKIP_FLOOR, fraction * total):
            raise DataError(f"{self.skipped} of {total} samples unreadable, over data.max_skip_fraction={fraction:g}; "
                            f"the last: {what}")
        return True  # as a webdataset handler: go on with the next sample


class ShardStream(SkipLimit, IterableDataset):
    """Infinite batches of uint8 images for one rank; each DataLoader worker gets its own seed.

    Yields dicts: `image` (B, C, H, W) uint8, `worker` (its id) and `stats`, this worker's
    cumulative `skipped` (bad samples, truncated shards) and `retries` (S3 re-requests) counts.
    A plain IterableDataset around a wds.DataPipeline: ray's prepare_data_loader rejects WebLoader.
    """

    def __init__(self, shards: ShardSet, *, channels: int, resolution: int, batch_size: int, seed: int,
                 rank: int = 0, start_step: int = 0, shuffle_buffer: int = 1000, limits: DataConfig | None = None):
        """`limits`: how much bad data to tolerate (the data.max_* keys and data.verify_sha256)."""
        super().__init__(shards, limits or DataConfig())
        self.urls, self.counts = shards.urls, shards.counts
        self.channels, self.resolution = channels, resolution
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.shards_read: Counter[str] = Counter()

    def _read(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Each drawn shard's samples; per shard, as a flat tarfile_to_samples loses where a shard ended."""
        for shard in shards:
            self.shards_read[shard["url"]] += 1
            yield from self._shard(shard["url"], self.counts.get(shard["url"], 0))

    def _count(self, image: torch.Tensor) -> torch.Tensor:
        self._good()
        return image

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        seed = f"{self.seed}/{self.rank}/{worker}/{self.start_step}"
        shard_seed = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)  # not hash(seed): it varies per process
        self.last_good = time.monotonic()
        return iter(wds.DataPipeline(
            wds.ResampledShards(self.urls, worker_seed=lambda: shard_seed, deterministic=True),
            self._read,
            wds.map(partial(decode_named, channels=self.channels, resolution=self.resolution), handler=self._skip),
            wds.map(self._count),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed)),
            wds.batched(self.batch_size, collation_fn=torch.stack, partial=False),
            wds.map(lambda images: {"image": images, "worker": worker,
                                    "stats": {"skipped": self.skipped, "retries": s3.retries()}}),
        ))


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
        try:
            b = next(self._it)
        except DataError as e:  # raised in a DataLoader worker
            raise e.one_line() from None
        self._stats[b["worker"]] = b["stats"]
        return b["image"]


def make_batches(shards: ShardSet, *, num_workers: int = 0, **stream) -> Batches:
    """A rank's batches: ShardStream(shards, **stream), read by `num_workers` DataLoader workers."""
    return Batches(ShardStream(shards, **stream), num_workers)


def read_sample(shards: ShardSet, n: int, *, channels: int, resolution: int, threads: int = 16) -> torch.Tensor:
    """A fixed, deterministic set of up to `n` real images (uint8, N x C x H x W) spread over the dataset.

    Takes the first ceil(n / m) images of m evenly spaced shards (m = min(shards, n)): the same
    images every time, from every part of the data, without reading all of it. Evaluation's real side.
    """
    m = min(len(shards.urls), n)
    picked = [shards.urls[i * len(shards.urls) // m] for i in range(m)]
    per_shard = -(-n // m)

    def head(url: str) -> list[torch.Tensor]:
        decode = partial(decode_named, channels=channels, resolution=resolution)
        return list(islice(wds.map(decode, handler=_warn)(shard_samples(url)), per_shard))

    with ThreadPoolExecutor(threads) as pool:
        images = [img for part in pool.map(head, picked) for img in part][:n]
    if not images:
        raise DataError(f"no readable images in {len(picked)} shard(s) starting at {picked[0]}")
    return torch.stack(images)


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1] on `device` (converted after the copy: 4x less traffic)."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
