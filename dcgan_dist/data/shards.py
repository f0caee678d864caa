"""Build WebDataset tar shards plus `manifest.json`, in parallel, resumably, locally or on S3.

Shard i holds source records [i * shard_size, (i + 1) * shard_size) in source order, and tars are
written with fixed metadata, so the same command always produces byte-identical shards. That is
what makes a re-run safe: a shard whose part record (`parts/shard-NNNNNN.json`) matches the shard
is kept, the rest are rebuilt, and the manifest, written last, comes out the same as an
uninterrupted run's. Shards appear only when complete (local: temp file + rename; S3: an upload
completed at the end).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data import s3
from dcgan_dist.data.sources import Source
from dcgan_dist.errors import DataError
from dcgan_dist.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dcgan-dist-shards/1"
ENCODINGS = ("jpg", "png", "raw")
FIXED_MTIME = 0  # reproducible tars: no timestamps


def encode(img: Image.Image, encoding: str, quality: int = 95) -> tuple[str, bytes]:
    """-> (field name in the sample, bytes). `raw` is the uint8 HWC array as .npy (no decode cost)."""
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, "PNG", compress_level=1)
    elif encoding == "jpg":
        img.save(buf, "JPEG", quality=quality)
    elif encoding == "raw":
        np.save(buf, np.asarray(img), allow_pickle=False)
        return "npy", buf.getvalue()
    else:
        raise DataError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    return encoding, buf.getvalue()


class Target:
    """Where shards go: a local folder or an s3://bucket/prefix/, behind one small interface."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/" if s3.is_s3(url) else url
        self.remote = s3.is_s3(url)
        if not self.remote:
            (Path(url) / "parts").mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return self.url + name if self.remote else str(Path(self.url) / name)

    def read_json(self, name: str) -> dict | None:
        if self.remote:
            return json.loads(s3.read_bytes(self.path(name))) if s3.exists(self.path(name)) else None
        p = Path(self.path(name))
        return json.loads(p.read_text()) if p.is_file() else None

    def write_json(self, name: str, obj: dict) -> None:
        data = json.dumps(obj, indent=1).encode()
        if self.remote:
            s3.write_bytes(self.path(name), data)
        else:
            write_atomic(Path(self.path(name)), data)

    def put_shard(self, tmp: str, info: dict) -> None:
        """Publish a finished temp tar under its final name (atomically), then its part record."""
        if self.remote:
            s3.upload_file(tmp, self.path(info["name"]), metadata={"sha256": info["sha256"]})
            os.unlink(tmp)
        else:
            os.replace(tmp, self.path(info["name"]))
        self.write_json(f"parts/{info['name']}.json", info)

    def done(self, name: str) -> dict | None:
        """The part record of an existing, intact shard; None if it must be (re)built."""
        info = self.read_json(f"parts/{name}.json")
        if info is None:
            return None
        if self.remote:
            head = s3.exists(self.path(name))
            ok = head and head["bytes"] == info["bytes"] and head["metadata"].get("sha256") == info["sha256"]
        else:
            p = Path(self.path(name))
            ok = p.is_file() and p.stat().st_size == info["bytes"] and sha256_file(p) == info["sha256"]
        return info if ok else None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


_worker: dict = {}


def _init_worker(source: Source, target: Target, resolution: int, encoding: str, quality: int) -> None:
    """Each pool process receives the source and settings once, not with every shard."""
    _worker.update(source=source, target=target, resolution=resolution, encoding=encoding, quality=quality)


def write_shard(index: int, records: list, first: int) -> dict:
    """Worker: decode, preprocess, encode and write one shard; returns its part record."""
    source, target, encoding = _worker["source"], _worker["target"], _worker["encoding"]
    name = shard_name(index)
    mode = "L" if source.channels == 1 else "RGB"
    skipped = []
    fd, tmp = tempfile.mkstemp(dir=None if target.remote else target.url, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, wds.TarWriter(f, mtime=FIXED_MTIME) as tar:
            for offset, (key, raw) in enumerate(records):
                try:
                    img, label = source.load(raw, _worker["resolution"])
                    field, data = encode(img.convert(mode), encoding, _worker["quality"])
                except Exception as e:  # PIL raises many types for corrupt images
                    log.warning("skipping unreadable image %s (%s: %s)", key, type(e).__name__, e)
                    skipped.append(key)
                    continue
                sample = {"__key__": f"{first + offset:09d}", field: data, "id.txt": key.encode()}
                if label is not None:
                    sample["cls"] = str(label).encode()
                tar.write(sample)
        info = {"name": name, "count": len(records) - len(skipped), "bytes": os.path.getsize(tmp),
                "sha256": sha256_file(tmp), "skipped": skipped}
        target.put_shard(tmp, info)
        return info
    finally:
        Path(tmp).unlink(missing_ok=True)


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(records, size)):
        yield chunk


def build_shards(source: Source, out: str, *, resolution: int, encoding: str = "jpg", quality: int = 95,
                 shard_size: int = 1000, workers: int | None = None, progress: bool = True) -> dict:
    """Build (or finish building) the shards of `source` under `out`; returns the manifest, written last."""
    if encoding not in ENCODINGS:
        raise DataError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if s3.is_s3(out):
        s3.check_bucket(out, "write shards to")
    target = Target(out)
    if not target.remote:  # temp files of an interrupted run are never shards: clear them
        for stale in Path(out).glob(".shard-*.tmp"):
            stale.unlink()
    workers = workers or os.cpu_count() or 1
    infos: dict[int, dict] = {}
    bar = tqdm(total=source.total, desc=f"shards -> {out}", unit="img", disable=not progress, smoothing=0.1)
    init = (source, target, resolution, encoding, quality)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init) as pool:
        running: dict[Future, tuple[int, int]] = {}

        def collect(done) -> None:
            for fut in done:
                index, n = running.pop(fut)
                infos[index] = fut.result()  # re-raises a worker's exception here
                bar.update(n)

        for index, chunk in enumerate(_chunks(source.records(), shard_size)):
            existing = target.done(shard_name(index))
            if existing:
                infos[index] = existing
                bar.update(len(chunk))
                continue
            while len(running) >= 2 * workers:  # bounded memory: at most 2 chunks per worker in flight
                collect(wait(running, return_when=FIRST_COMPLETED).done)
            running[pool.submit(write_shard, index, chunk, index * shard_size)] = (index, len(chunk))
        collect(wait(running).done)
    bar.close()
    shards = [infos[i] for i in sorted(infos)]
    skipped = [k for s in shards for k in s["skipped"]]
    if not any(s["count"] for s in shards):
        raise DataError(f"no readable images for {out}: all {len(skipped)} were skipped (first: {skipped[:3]})")
    manifest = {
        "format": FORMAT,
        "source": source.name,
        "resolution": resolution,
        "channels": source.channels,
        "classes": source.classes,
        "encoding": encoding,
        "num_images": sum(s["count"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": [{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in shards],
        "skipped": {"count": len(skipped), "ids": skipped},
    }
    target.write_json(MANIFEST, manifest)
    if skipped:
        log.warning("%d unreadable image(s) skipped (%s%s); all ids are in %s", len(skipped), ", ".join(skipped[:10]),
                    ", ..." if len(skipped) > 10 else "", target.path(MANIFEST))
    return manifest

