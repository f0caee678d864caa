"""Write preprocessed images as WebDataset tar shards plus a `manifest.json`.

Each shard is written under a temp name and renamed when complete, and the manifest is
written last, so a reader never sees a half-written shard and a folder with a manifest is whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data.sources import Item
from dcgan_dist.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dcgan-dist-shards/1"
ENCODINGS = {"png": "png", "jpg": "jpg"}


def encode(img: Image.Image, encoding: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, "PNG", compress_level=1)
    elif encoding == "jpg":
        img.save(buf, "JPEG", quality=quality)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temp file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """Fills `shard-000000.tar`, `shard-000001.tar`, ... with `shard_size` samples each."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict] = []
        self._tar = self._file = self._tmp = None
        self._count = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        fd, self._tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._tar = wds.TarWriter(self._file)
        self._name, self._count = name, 0

    def _close(self) -> None:
        self._tar.close()  # also closes the file
        final = self.out / self._name
        os.replace(self._tmp, final)
        self.shards.append({"name": self._name, "count": self._count, "bytes": final.stat().st_size, "sha256": sha256_file(final)})
        self._tar = None

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.shard_size:
            self._close()

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards


def build_shards(
    items: Iterable[Item],
    out: str | Path,
    *,
    source: str,
    resolution: int,
    channels: int,
    encoding: str = "png",
    quality: int = 95,
    shard_size: int = 1000,
    total: int | None = None,
) -> dict:
    """Encode `items` into shards under `out` and return the manifest (also written there, last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, shard_size)
    skipped: list[str] = []
    mode = "L" if channels == 1 else "RGB"
    written = 0
    for item in tqdm(items, total=total, desc=f"shards {out.name}", unit="img"):
        if item.image is None:
            log.warning("skipping unreadable image %s (%s)", item.key, item.error)
            skipped.append(item.key)
            continue
        sample = {
            "__key__": f"{written:09d}",
            ENCODINGS[encoding]: encode(item.image.convert(mode), encoding, quality),
            "id.txt": item.key.encode(),
        }
        if item.cls is not None:
            sample["cls"] = str(item.cls).encode()
        writer.write(sample)
        written += 1
    shards = writer.close()
    if not shards:
        raise DataError(f"no readable images for {out}: all {len(skipped)} were skipped (first: {skipped[:3]})")
    manifest = {
        "format": FORMAT,
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "encoding": encoding,
        "num_images": sum(s["count"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped": {"count": len(skipped), "ids": skipped},
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    if skipped:
        log.warning("%d unreadable image(s) skipped; their ids are in %s", len(skipped), out / MANIFEST)
    return manifest

