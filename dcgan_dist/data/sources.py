"""Image sources for shard building; each yields `Item`s already resized and center-cropped.

A source never raises on one bad image: it yields an Item with `image=None` and the reason,
so the shard builder can skip it, count it and name it in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from dcgan_dist.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Item:
    key: str  # unique id within the source (file path, LMDB key, index)
    image: Image.Image | None  # None: unreadable, to be skipped
    cls: int | None = None  # class label where the source has one
    error: str = ""


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop the center square (the paper's LSUN recipe)."""
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def digits(resolution: int = 32) -> tuple[int, Iterator[Item]]:
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits, upscaled, grayscale, with labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = (data.images * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")

    def items() -> Iterator[Item]:
        for i, (img, label) in enumerate(zip(pixels, data.target)):
            yield Item(f"{i:06d}", Image.fromarray(img, "L").resize((resolution, resolution), Image.BICUBIC), int(label))

    return len(pixels), items()


def folder(path: str | Path, resolution: int = 64) -> tuple[int, Iterator[Item]]:
    """Every JPEG/PNG/WebP under `path` (recursive, sorted), as RGB; keys are relative paths."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")

    def items() -> Iterator[Item]:
        for p in files:
            key = p.relative_to(root).as_posix()
            try:
                with Image.open(p) as im:
                    im.load()
                    img = resize_center_crop(im.convert("RGB"), resolution)
            except Exception as e:  # PIL raises many types for corrupt files
                yield Item(key, None, error=f"{type(e).__name__}: {e}")
                continue
            yield Item(key, img)

    return len(files), items()
