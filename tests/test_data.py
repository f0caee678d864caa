import hashlib
import io
import json
import logging
import tarfile

import pytest
import torch
from PIL import Image

from dcgan_dist.data import shards, sources
from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input
from dcgan_dist.errors import DataError


def test_digits_manifest_is_exact(digits_dir):
    m = json.loads((digits_dir / "manifest.json").read_text())
    assert (m["source"], m["resolution"], m["channels"], m["num_images"]) == ("digits", 32, 1, 1797)
    assert [s["count"] for s in m["shards"]] == [500, 500, 500, 297]
    for s in m["shards"]:
        data = (digits_dir / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    with tarfile.open(digits_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert "000000000.png" in names and "000000000.cls" in names
        img = Image.open(tar.extractfile("000000000.png"))
        assert img.size == (32, 32) and img.mode == "L"
    assert not list(digits_dir.glob(".*tmp"))  # no temp files left behind
    assert sorted(p.name for p in (digits_dir / "parts").iterdir()) == [f"{s['name']}.json" for s in m["shards"]]


def write_image(path, size, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_source_skips_and_names_corrupt_images(tmp_path, caplog):
    src = tmp_path / "photos"
    write_image(src / "a.jpg", (120, 80))
    write_image(src / "sub" / "b.png", (50, 90))
    write_image(src / "sub" / "c.webp", (64, 64))
    (src / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (src / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        m = shards.build_shards(sources.Folder(src), str(tmp_path / "out"), resolution=32, encoding="jpg",
                                workers=1, progress=False)
    assert m["num_images"] == 3 and m["skipped"] == {"count": 1, "ids": ["sub/broken.jpg"]}
    assert "sub/broken.jpg" in caplog.text
    batch = next(make_batches(resolve_shards(str(tmp_path / "out")), channels=3, resolution=32,
                              batch_size=4, seed=0, shuffle_buffer=2))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8


def test_folder_labels_from_subfolders_reach_the_shards(tmp_path):
    from dcgan_dist.experiments.common import read_labeled

    src = tmp_path / "pets"
    colors = {"cat": (250, 0, 0), "dog": (0, 0, 250)}
    for name, color in colors.items():
        for i in range(3):
            write_image(src / name / f"{i}.png", (40, 40), color)
            write_image(src / name / "deeper" / f"{i}.jpg", (40, 40), color)  # the top-level folder decides
    m = shards.build_shards(sources.Folder(src, labels="subfolders"), str(tmp_path / "out"), resolution=32,
                            encoding="png", workers=1, progress=False)
    assert m["classes"] == ["cat", "dog"] and m["num_images"] == 12
    images, labels = read_labeled(str(tmp_path / "out"), 12, channels=3, resolution=32)
    for img, label in zip(images, labels):
        red = img[0].float().mean() > img[2].float().mean()
        assert label.item() == (0 if red else 1)  # cat images are red, dog images blue
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6

    unlabeled = shards.build_shards(sources.Folder(src), str(tmp_path / "plain"), resolution=32, workers=1,
                                    progress=False)
    assert unlabeled["classes"] is None
    write_image(src / "stray.png", (40, 40))
    with pytest.raises(DataError, match="stray.png is not inside a class subfolder"):
        sources.Folder(src, labels="subfolders")


def test_resize_center_crop_keeps_the_center():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # a white center square
    out = sources.resize_center_crop(img, 32)
    assert out.size == (32, 32)
    assert out.convert("L").getextrema()[0] > 200  # all white: the crop is the center


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.Folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        sources.Folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="all 1 were skipped"):
        shards.build_shards(sources.Folder(tmp_path / "bad"), str(tmp_path / "out"), resolution=32, workers=1,
                            progress=False)


def test_resolve_shards_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*prepare_data"):
        resolve_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json and no"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="do not exist"):
        resolve_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    (tmp_path / "badman").mkdir()
    (tmp_path / "badman" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid shard manifest"):
        resolve_shards(str(tmp_path / "badman"))


def test_brace_pattern(digits_dir):
    pattern = str(digits_dir / "shard-{000000..000003}.tar")
    shards_ = resolve_shards(pattern)
    assert shards_.urls == [str(digits_dir / f"shard-{i:06d}.tar") for i in range(4)]
    assert shards_.manifest is None


def digit_images(folder) -> set[bytes]:
    """Every image in the folder's shards, decoded here with tarfile + PIL (not the loader's reader)."""
    images = set()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    images.add(Image.open(tar.extractfile(member)).convert("L").tobytes())
    return images


def test_bare_folder_of_shards_without_a_manifest(digits_dir, tmp_path):
    """A folder holding only *.tar shards (no manifest.json) is a dataset: its shards, sorted, no manifest."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in digits_dir.glob("shard-*.tar"):
        shutil.copy(tar, bare / tar.name)
    (bare / "README.txt").write_text("not a shard")
    (bare / "old").mkdir()
    shutil.copy(digits_dir / "shard-000000.tar", bare / "old" / "shard-000009.tar")  # not at the top level
    shards_ = resolve_shards(str(bare))
    assert shards_.manifest is None and shards_.counts == {}
    assert shards_.urls == [str(bare / f"shard-{i:06d}.tar") for i in range(4)]

    known = digit_images(digits_dir)
    assert len(known) > 1000
    it = make_batches(shards_, channels=1, resolution=32, batch_size=32, seed=0, shuffle_buffer=100)
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert b.shape == (32, 1, 32, 32) and b.dtype == torch.uint8
        assert all(img[0].numpy().tobytes() in known for img in b)  # real digits, read whole
    assert len({img.numpy().tobytes() for b in batches for img in b}) > 80  # a shuffled stream, not one image
    assert it.skipped == 0


def stream(digits_dir, **kw):
    args = dict(channels=1, resolution=32, batch_size=32, seed=0, shuffle_buffer=100)
    args.update(kw)
    return make_batches(resolve_shards(str(digits_dir)), **args)


def test_stream_is_seeded_per_rank_and_step(digits_dir):
    a, b = next(stream(digits_dir, rank=0)), next(stream(digits_dir, rank=0))
    c = next(stream(digits_dir, rank=1))
    d = next(stream(digits_dir, rank=0, start_step=11))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    x = to_model_input(a, "cpu")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() > 0.9


def test_stream_with_dataloader_workers(digits_dir):
    it = stream(digits_dir, num_workers=2, batch_size=64)
    batches = [next(it) for _ in range(6)]
    assert all(b.shape == (64, 1, 32, 32) for b in batches)
    assert it.skipped == 0
    # The workers take turns and are seeded apart: no worker repeats another's stream.
    assert len({b.numpy().tobytes() for b in batches}) == 6


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def png_bytes():
    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_sample_and_truncated_shards_are_skipped_and_counted(tmp_path, caplog):
    from dcgan_dist.files import write_atomic

    good = tar_bytes([(f"{i:04d}.png", png_bytes()) for i in range(20)] + [("0020.png", b"corrupt!")])
    whole = tar_bytes([(f"{i:04d}.png", png_bytes()) for i in range(20)])
    files = {
        "shard-000000.tar": (good, 21),
        "shard-000001.tar": (whole[: len(whole) // 2 + 100], 20),  # cut inside a header
        "shard-000002.tar": (whole[: len(whole) // 2 + 700], 20),  # cut inside a member's data
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    manifest = {"channels": 1, "resolution": 32, "shards": [{"name": n, "count": c} for n, (_, c) in files.items()]}
    write_atomic(tmp_path / "manifest.json", json.dumps(manifest).encode())
    with caplog.at_level(logging.WARNING):
        it = make_batches(resolve_shards(str(tmp_path)), channels=1, resolution=32, batch_size=8, seed=0,
                          shuffle_buffer=4)
        for _ in range(8):
            assert next(it).shape == (8, 1, 32, 32)
        # counted in samples: the corrupt one, and what each cut shard lacks of its 20 (not one per shard)
        assert it.skipped >= 2 * 4
        # A sixth of the data missing is over data.max_skip_fraction (5%): past the first 100 skips, it stops
        with pytest.raises(DataError, match=r"samples unreadable, over data.max_skip_fraction=0.05"):
            for _ in range(200):
                next(it)
    for needle in ("sample 0020", "shard-000001.tar truncated", "shard-000002.tar"):
        assert needle in caplog.text


def test_a_shard_broken_mid_sample_ends_there_without_the_half_read_sample(tmp_path, caplog):
    """webdataset's group_by_keys would flush the half-read sample (an image without its label): it is dropped."""
    from dcgan_dist.data.loader import shard_samples
    from dcgan_dist.experiments.common import read_labeled

    whole = tar_bytes([(f"{i:04d}.{ext}", png_bytes() if ext == "png" else b"7")
                       for i in range(5) for ext in ("png", "cls")])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmember("0002.cls").offset_data  # sample 0002 has its image, not its label
    (tmp_path / "shard-000000.tar").write_bytes(whole[:cut])
    (tmp_path / "shard-000001.tar").write_bytes(whole)
    errors = []
    samples = list(shard_samples(str(tmp_path / "shard-000000.tar"), errors.append))
    assert [s["__key__"] for s in samples] == ["0000", "0001"] and set(samples[0]) >= {"png", "cls", "__url__"}
    assert len(errors) == 1 and "shard-000000.tar unreadable after key 0001" in errors[0]
    with caplog.at_level(logging.WARNING):
        images, labels = read_labeled(str(tmp_path), 10, channels=1, resolution=32)
    assert images.shape == (7, 1, 32, 32) and labels.tolist() == [7] * 7
    assert "shard-000000.tar unreadable" in caplog.text


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_raw_npy_samples_decode_as_np_load_does(version):
    import numpy as np

    from dcgan_dist.data.loader import decode_sample

    def npy(arr):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=version, allow_pickle=True)
        return buf.getvalue()

    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for arr in (img, np.asfortranarray(img)):
        assert torch.equal(decode_sample({"npy": npy(arr)}, 3, 8), torch.from_numpy(img).permute(2, 0, 1))
    for bad in (np.array([{"x": 1}], dtype=object), img.astype(np.float32), img[:4]):
        with pytest.raises(ValueError):
            decode_sample({"npy": npy(bad)}, 3, 8)


def write_shards(folder, shards: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    return resolve_shards(str(folder))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_wrong_resolution_folder_stops_with_an_error_naming_the_shard(tmp_path, num_workers):
    """64x64 shards without a manifest, read at 32: every sample is skipped, so the stream ends with an error
    (it used to skip forever) naming the limit, the sample, its shard and why; one line from a DataLoader worker."""
    big = io.BytesIO()
    Image.new("L", (64, 64), 128).save(big, "PNG")
    shard_set = write_shards(tmp_path, {f"shard-{i:06d}.tar": tar_bytes([(f"{i}{k:04d}.png", big.getvalue())
                                                                         for k in range(80)]) for i in range(3)})
    it = make_batches(shard_set, channels=1, resolution=32, batch_size=8, seed=0, shuffle_buffer=4,
                      num_workers=num_workers)
    with pytest.raises(DataError) as e:
        next(it)
    message = str(e.value)
    assert "101 of 101 samples unreadable, over data.max_skip_fraction=0.05" in message
    assert "image is 64x64, expected 32x32" in message and "shard-00000" in message
    assert "\n" not in message and "Traceback" not in message


def test_empty_and_unreadable_shards_in_a_row_stop_the_stream(tmp_path):
    from dcgan_dist.config import DataConfig

    empty = write_shards(tmp_path / "empty", {f"shard-{i:06d}.tar": tar_bytes([]) for i in range(3)})
    with pytest.raises(DataError, match=r"16 shards in a row without a usable image \(data.max_bad_shards=16\): "
                                        r".*shard-00000\d.tar \(no samples\)"):
        next(make_batches(empty, channels=1, resolution=32, batch_size=8, seed=0))
    junk = write_shards(tmp_path / "junk", {f"shard-{i:06d}.tar": bytes(range(256)) * 40 for i in range(3)})
    with pytest.raises(DataError, match=r"4 shards in a row .*shard-00000\d.tar \(shard .* unreadable"):
        next(make_batches(junk, channels=1, resolution=32, batch_size=8, seed=0, limits=DataConfig(max_bad_shards=4)))


def test_a_few_bad_samples_are_tolerated_and_a_good_shard_resets_the_streak(tmp_path):
    good = tar_bytes([(f"{k:04d}.png", png_bytes()) for k in range(60)] + [("0060.png", b"corrupt!")])
    shard_set = write_shards(tmp_path, {"shard-000000.tar": good, "shard-000001.tar": tar_bytes([])})
    it = make_batches(shard_set, channels=1, resolution=32, batch_size=8, seed=0, shuffle_buffer=4)
    assert all(next(it).shape == (8, 1, 32, 32) for _ in range(200))  # 1 of 61 samples bad, half the shards empty
    assert it.skipped > 0


def test_a_huge_member_ends_its_shard_unread_and_a_compressed_shard_is_refused(tmp_path):
    """A 2 GB member (a sparse file: its header says 2 GB, nothing is written) is refused from its header."""
    from dcgan_dist.data.loader import shard_samples

    info = tarfile.TarInfo("0000.png")
    info.size = 2 << 30
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    with open(tmp_path / "huge.tar", "wb") as f:
        f.write(header)
        f.truncate(len(header) + info.size + 1024)  # the member's data and the end blocks: zeros, not on disk
    assert (tmp_path / "huge.tar").stat().st_blocks * 512 < 1 << 20
    errors = []
    assert list(shard_samples(str(tmp_path / "huge.tar"), errors.append)) == []
    assert "member 0000.png is 2,147,483,648 bytes, over data.max_sample_bytes=16,777,216" in errors[0]

    with tarfile.open(tmp_path / "packed.tar", "w:gz") as tar:
        data = png_bytes()
        info = tarfile.TarInfo("0000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    errors = []
    assert list(shard_samples(str(tmp_path / "packed.tar"), errors.append)) == []
    assert "packed.tar unreadable" in errors[0]


BOMB = """
import resource, sys, torch
from dcgan_dist.data.loader import make_batches, resolve_shards
from dcgan_dist.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    next(make_batches(resolve_shards(sys.argv[1]), channels=3, resolution=32, batch_size=8, seed=0, num_workers=0))
except DataError as e:
    print("error:", e)
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def png_bomb(width: int, height: int) -> bytes:
    """A real RGB PNG of width x height black pixels, a few hundred kB on disk (zlib packs zeros ~1000:1)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * width), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_never_decoded(tmp_path):
    """9000x9000 RGB (243 MB decoded, just under PIL's own bomb check) in a 300 kB PNG: refused from its header;
    the reading process grows by far less than one decoded copy."""
    import subprocess
    import sys

    bomb = png_bomb(9000, 9000)
    assert len(bomb) < 1 << 20
    write_shards(tmp_path, {f"shard-{i:06d}.tar": tar_bytes([(f"{i}{k:03d}.png", bomb) for k in range(40)])
                            for i in range(3)})
    r = subprocess.run([sys.executable, "-c", BOMB, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "image is 9000x9000, expected 32x32" in r.stdout, r.stdout + r.stderr[-2000:]
    assert float(r.stdout.split("grew_mb")[1]) < 100, r.stdout


class PlantedCode:
    """What a planted "CIFAR batch" could hold: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    import numpy as np

    from dcgan_dist.data.sources import Cifar10

    folder, marker = tmp_path / "cifar-10-batches-py", tmp_path / "code-ran"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": np.full((4, 3072), i, np.uint8), b"labels": [1, 2, 3, 4], b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if i % 2 else 4))  # as distributed, and newer
    assert len(list(Cifar10(folder, "all").records())) == 24

    planted = pickle.dumps({b"data": PlantedCode(marker), b"labels": [1]})
    (folder / "data_batch_3").write_bytes(planted)
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR-10 batch: .*posix\.system"):
        list(Cifar10(folder, "train").records())
    assert not marker.exists()
    pickle.loads(planted)  # the proof that the file is what it claims: a plain pickle.load runs its command
    assert marker.exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": [[1, 2]], b"labels": [1]}))
    with pytest.raises(DataError, match="expected uint8 rows of 3072 values"):
        list(Cifar10(folder, "train").records())


def test_verify_sha256_reports_a_shard_changed_after_its_manifest(digits_dir, tmp_path):
    import shutil

    from dcgan_dist.config import DataConfig
    from dcgan_dist.data.loader import shard_samples

    copy = tmp_path / "digits"
    shutil.copytree(digits_dir, copy)
    shard_set = resolve_shards(str(copy))
    url = shard_set.urls[0]
    assert list(shard_samples(url, pytest.fail, sha256=shard_set.sha256s[url]))  # untouched: no complaint
    with tarfile.open(url) as tar:
        label = tar.getmember("000000000.cls")
    data = bytearray(open(url, "rb").read())
    data[label.offset_data] = ord("9") if data[label.offset_data] != ord("9") else ord("8")  # a flipped label
    open(url, "wb").write(bytes(data))
    errors = []
    # Known only at the shard's end: all samples but the last (still held by the grouping) were already read.
    assert len(list(shard_samples(url, errors.append, sha256=shard_set.sha256s[url]))) == 499
    assert len(errors) == 1 and "the shard changed after the manifest was written" in errors[0] and url in errors[0]
    it = make_batches(shard_set, channels=1, resolution=32, batch_size=50, seed=0, shuffle_buffer=10,
                      limits=DataConfig(verify_sha256=True))
    for _ in range(40):
        next(it)
    assert it.skipped >= 1  # counted in data_skipped
    it = make_batches(shard_set, channels=1, resolution=32, batch_size=50, seed=0, shuffle_buffer=10)
    for _ in range(40):
        next(it)
    assert it.skipped == 0  # off by default: not hashed
