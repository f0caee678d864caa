"""Photo-like synthetic images and an LSUN-format LMDB writer, for tests and benchmarks.

Nothing is downloaded: LSUN itself is 40+ GB, so benchmarks build a database of the same format
(hex keys -> WebP bytes, varied sizes around LSUN's 256-pixel short side) from generated images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, unlike flat colors or pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.2, 1)) % 256, (y * rng.uniform(0.2, 1)) % 256, (x + y) % 256], -1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))


def lsun_key(i: int) -> str:
    return f"{i * 7919:040x}"


def write_lsun_lmdb(path: str | Path, n: int, size: tuple[int, int] = (80, 140), corrupt: set[int] = frozenset(),
                    seed: int = 0) -> list[str]:
    """An LMDB as LSUN ships it: 40-hex-digit keys -> WebP bytes. Returns the keys in LMDB (sorted) order."""
    import lmdb

    rng = np.random.default_rng(seed)
    Path(path).mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 34)
    keys = []
    with env.begin(write=True) as txn:
        for i in range(n):
            buf = io.BytesIO()
            photo(rng, int(rng.integers(*size)), int(rng.integers(*size))).save(buf, "WEBP", quality=80)
            key = lsun_key(i)
            txn.put(key.encode(), b"garbage, not an image" if i in corrupt else buf.getvalue())
            keys.append(key)
    env.close()
    return sorted(keys)
