"""Image sources for shard building.

A source lists cheap `(key, raw)` records in a fixed order (file paths, LMDB values, array rows)
and turns one raw record into a preprocessed image in `load`, which runs in worker processes.
A bad image raises in `load`; the builder skips it, counts it and names it in the manifest.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dcgan_dist.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop the center square (the paper's LSUN recipe)."""
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


class Source:
    """Base: `records()` in a stable order, `load(raw, resolution)` -> (PIL image, label or None)."""

    name = "source"
    channels = 3
    total: int | None = None
    classes: list[str] | None = None  # label i names classes[i]; None for unlabeled sources

    def records(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def load(self, raw, resolution: int) -> tuple[Image.Image, int | None]:
        raise NotImplementedError

    @staticmethod
    def _decode(data: bytes, resolution: int) -> Image.Image:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return resize_center_crop(im.convert("RGB"), resolution)


class Digits(Source):
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits, upscaled, grayscale, with labels."""

    name, channels = "digits", 1
    classes = [str(i) for i in range(10)]

    def __init__(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        self.pixels = (data.images * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
        self.labels = data.target
        self.total = len(self.pixels)

    def records(self):
        for i, (img, label) in enumerate(zip(self.pixels, self.labels)):
            yield f"{i:06d}", (img, int(label))

    def load(self, raw, resolution):
        img, label = raw
        return Image.fromarray(img, "L").resize((resolution, resolution), Image.BICUBIC), label


class Folder(Source):
    """Every JPEG/PNG/WebP under a folder (recursive, sorted), as RGB; keys are relative paths.

    With `labels="subfolders"` the top-level subfolder is the class (ImageFolder's layout: root/cat/...,
    root/dog/...), numbered in sorted name order, so features can be scored against labels.
    """

    name = "folder"

    def __init__(self, path: str | Path, labels: str = "none"):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory")
        if labels not in ("none", "subfolders"):
            raise DataError(f"folder labels must be none or subfolders, got {labels!r}")
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"image folder {self.root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        self.total = len(self.files)
        self.label_of: dict[str, int] | None = None
        if labels == "subfolders":
            loose = [f for f in self.files if "/" not in f]
            if loose:
                raise DataError(f"labels from subfolders: {self.root / loose[0]} is not inside a class subfolder "
                                f"({len(loose)} such file(s)); move them or build without labels")
            self.classes = sorted({f.split("/", 1)[0] for f in self.files})
            self.label_of = {c: i for i, c in enumerate(self.classes)}

    def records(self):
        for rel in self.files:
            label = self.label_of[rel.split("/", 1)[0]] if self.label_of else None
            yield rel, (str(self.root / rel), label)

    def __getstate__(self):  # workers only need `load`: don't ship a million paths to each
        return {**self.__dict__, "files": []}

    def load(self, raw, resolution):
        path, label = raw
        return self._decode(Path(path).read_bytes(), resolution), label


class Lsun(Source):
    """An LSUN LMDB directory as distributed (e.g. bedroom_train_lmdb): hex keys -> WebP/JPEG bytes.

    Streams with a read-only cursor, so memory stays flat whatever the database size.
    """

    name = "lsun"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise DataError(f"{self.path} is not an LMDB directory (no data.mdb inside)")
        with self._open() as env:
            self.total = env.stat()["entries"]

    def _open(self):
        import lmdb

        return lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, max_readers=64)

    def records(self):
        with self._open() as env, env.begin(write=False) as txn:
            for key, value in txn.cursor():
                yield key.decode("ascii", "replace"), bytes(value)

    def load(self, raw, resolution):
        return self._decode(raw, resolution), None


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (dicts, lists, bytes, ints, numpy arrays): a planted file that
    names any other global (os.system, builtins.exec, ...) is refused before anything in it runs."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(N x 3072 uint8 rows, N labels) of one batch file, or a DataError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise DataError(f"{path} is not a CIFAR-10 batch: {type(e).__name__}: {e}") from None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data) and all(isinstance(x, int) for x in labels)):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected uint8 rows of 3072 values and as many int labels")
    return data, labels


class Cifar10(Source):
    """CIFAR-10's python-pickle batches as distributed (data_batch_1..5, then test_batch), with labels."""

    name = "cifar10"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __init__(self, path: str | Path, split: str = "train"):
        self.root = Path(path)
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        names["all"] = names["train"] + names["test"]
        if split not in names:
            raise DataError(f"cifar10 split must be one of {', '.join(names)}, got {split!r}")
        self.batches = [self.root / n for n in names[split]]
        missing = [b.name for b in self.batches if not b.is_file()]
        if missing:
            raise DataError(f"{self.root} is not a cifar-10-batches-py folder: missing {', '.join(missing)}")
        self.total = 10_000 * len(self.batches)

    def records(self):
        for path in self.batches:
            data, labels = read_cifar_batch(path)
            for i in range(len(labels)):
                yield f"{path.name}/{i:05d}", (np.asarray(data[i], dtype=np.uint8), int(labels[i]))

    def load(self, raw, resolution):
        row, label = raw
        img = Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0), "RGB")
        return resize_center_crop(img, resolution), label


SOURCES = {"digits": Digits, "folder": Folder, "lsun": Lsun, "cifar10": Cifar10}
