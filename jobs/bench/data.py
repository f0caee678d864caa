"""The data path: shard build, streaming (local and loopback S3), and JPEG decoding on CPU and GPU."""

from __future__ import annotations

import time

import torch

from bench.step import bench_step


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _stream_rate(url: str, channels: int, resolution: int, batches: int, batch_size: int = 64) -> tuple[float, int]:
    """images/s of one decode worker (this process) over `batches` batches; returns (rate, images)."""
    from dcgan_dist.data.loader import make_batches, resolve_shards

    it = make_batches(resolve_shards(url), channels=channels, resolution=resolution, batch_size=batch_size, seed=0,
                      shuffle_buffer=256)
    next(it)  # fill the shuffle buffer outside the timing
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0), batches * batch_size


def _jpeg_bytes(shard_dir: str, n: int) -> list[bytes]:
    from dcgan_dist.data.loader import resolve_shards, shard_samples

    out = []
    for url in resolve_shards(shard_dir).urls:
        out += [sample["jpg"] for sample in shard_samples(url)]
        if len(out) >= n:
            break
    return out[:n]


def bench_decode(shard_dir: str, resolution: int, images: int = 2000, batch: int = 256) -> list[dict]:
    """JPEG decode rates of the images in `shard_dir`: PIL one at a time (what the loader's workers do, per
    core), torchvision's decode_jpeg on CPU, and decode_jpeg on CUDA (nvJPEG, batches of `batch`) when a
    GPU is present. Each against the training step's images/s on the same device."""
    from torchvision.io import decode_jpeg

    from dcgan_dist.data.loader import decode_sample

    data = _jpeg_bytes(shard_dir, images)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    batches = [encoded[i:i + batch] for i in range(0, len(encoded), batch)]
    rates = {}
    t0 = time.perf_counter()
    for b in data:
        decode_sample({"jpg": b}, 3, resolution)
    rates["pil", "cpu"] = len(data) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for chunk in batches:
        decode_jpeg(chunk)
    rates["torchvision", "cpu"] = len(data) / (time.perf_counter() - t0)
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        for chunk in batches[:2]:  # warm up nvJPEG's handles and buffers
            decode_jpeg(chunk, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for chunk in batches:
            decode_jpeg(chunk, device="cuda")
        torch.cuda.synchronize()
        rates["nvjpeg", "cuda"] = len(data) / (time.perf_counter() - t0)
    step = {d: bench_step((resolution,), (64,), steps=5, repeats=2, device=d)[1]["images_per_s"] for d in devices}
    rows = [{"decoder": name, "device": dev, "resolution": resolution, "images": len(data),
             "batch": batch if name != "pil" else 1, "threads": torch.get_num_threads(),
             "images_per_s": round(rate, 1), "step_images_per_s": step[dev],
             "decode_vs_step": round(rate / step[dev], 2)} for (name, dev), rate in rates.items()]
    if "cuda" not in devices:
        rows.append({"decoder": "nvjpeg", "device": "cuda", "note": "no CUDA device here: not measured"})
    return rows


def bench_data(images: int = 2000, resolution: int = 64, encodings=("jpg", "raw"), workdir: str | None = None) -> dict:
    """Shard build and streaming throughput (local and loopback S3) on an LSUN-format LMDB, per core, and
    the JPEG decoders on those shards: {"stream": rows, "decode": rows}."""
    import os
    import tempfile

    import boto3

    from dcgan_dist.data import s3, shards, sources
    from synthetic import write_lsun_lmdb
    from servers import MotoServer, client_env

    if workdir is None:  # the generated LMDB and shards go when the numbers are out
        with tempfile.TemporaryDirectory(prefix="dcgan-bench-") as tmp:
            return bench_data(images, resolution, encodings, tmp)
    work = workdir
    db = os.path.join(work, "lmdb")
    if not os.path.exists(db):
        write_lsun_lmdb(db, images, size=(256, 340))  # LSUN bedrooms: short side 256
    server = MotoServer()
    os.environ.update(client_env(server.url))
    s3._clients.clear()
    boto3.client("s3").create_bucket(Bucket="bench")
    rows = []
    try:
        step_ips = bench_step((resolution,), (64,), steps=5, repeats=2, device="cpu")[1]["images_per_s"]
        for enc in encodings:
            out = os.path.join(work, f"shards-{enc}")
            t0 = time.perf_counter()
            m = shards.build_shards(sources.Lsun(db), out, resolution=resolution, encoding=enc, shard_size=500,
                                    workers=1, progress=False)
            build_ips = m["num_images"] / (time.perf_counter() - t0)
            shards.build_shards(sources.Lsun(db), f"s3://bench/{enc}/", resolution=resolution, encoding=enc,
                                shard_size=500, workers=os.cpu_count(), progress=False)
            local_ips, _ = _stream_rate(out, 3, resolution, 60)
            s3_ips, _ = _stream_rate(f"s3://bench/{enc}/", 3, resolution, 60)
            t0 = time.perf_counter()  # raw boto3 throughput on the same shards
            nbytes = sum(len(s3.read_bytes(f"s3://bench/{enc}/{s['name']}")) for s in m["shards"])
            raw_ips = m["num_images"] / (time.perf_counter() - t0)
            rss0 = _rss_mb()
            _, streamed = _stream_rate(f"s3://bench/{enc}/", 3, resolution, 10 * m["num_images"] // 64)
            rows.append({
                "encoding": enc, "resolution": resolution, "bytes_per_image": round(m["total_bytes"] / m["num_images"]),
                "build_images_per_s_per_core": round(build_ips, 1), "stream_local_images_per_s": round(local_ips, 1),
                "stream_s3_images_per_s": round(s3_ips, 1), "raw_get_object_images_per_s": round(raw_ips, 1),
                "stream_vs_raw_get": round(s3_ips / raw_ips, 3), "step_images_per_s": step_ips,
                "decode_vs_step": round(min(local_ips, s3_ips) / step_ips, 2),
                "rss_growth_streaming_10x": round(_rss_mb() / rss0, 3), "images_streamed": streamed,
                "raw_bytes_read": nbytes,
            })
    finally:
        server.stop()
    decode = bench_decode(os.path.join(work, "shards-jpg"), resolution) if "jpg" in encodings else []
    return {"stream": rows, "decode": decode}
