"""Benchmarks that print numbers and ratios (speed targets live here, not in timed unit tests)."""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from dcgan_dist.canonical import CanonicalStep
from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, compile_models, make_optimizers, resolve_precision, to_layout

@functools.lru_cache
def step_gflops(resolution: int, preset: str, nc: int = 3) -> float:
    """GFLOPs of one training step per image, counted (torch's FlopCounterMode) on the canonical
    pytorch/examples step: the same work figure for every row, so TFLOP/s compare like with like
    (ours does ~8% fewer FLOPs for the same update). 2.48 at 64x64 `examples`, 0.42 at 32x32."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = _make("canonical", resolution, preset, nc, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        step(torch.zeros(2, nc, resolution, resolution))
    return counter.get_total_flops() / 2 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make(kind: str, resolution: int, preset: str, nc: int, device: torch.device, overrides=()):
    """The canonical step as pytorch/examples runs it (fp32, plain Adam, NCHW), or ours with the training
    defaults plus `overrides` (e.g. train.precision=bf16)."""
    cfg = load_config(overrides=[f"model.resolution={resolution}", f"model.preset={preset}", *overrides])
    torch.manual_seed(0)
    g, d = build_generator(cfg.model, nc).to(device), build_discriminator(cfg.model, nc).to(device)
    if kind == "canonical":
        cfg.train.fused_adam = False
        return CanonicalStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz), False
    g, d = to_layout(cfg.train.channels_last, g, d)
    compile_models(cfg.train.compile, g, d)
    precision = resolve_precision(cfg.train.precision, device)
    return GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz, precision), cfg.train.channels_last


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 2.0) -> float:
    """Measured dense matmul TFLOP/s of `device` in `dtype`: the ceiling our step's utilization is read against.

    Square matmuls big enough to saturate the device (8192 on a GPU, 2048 on a CPU); the best of 10
    short bursts over about `seconds`, since a shared VM's clock and neighbours vary."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    reps = max(1, int(seconds / 10 / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def _time(step: Callable, real: torch.Tensor, steps: int) -> float:
    _sync(real.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(real)
    _sync(real.device)
    return time.perf_counter() - t0


def bench_step(resolutions=(32, 64), batches=(64, 128), preset="examples", nc=3, steps=10, warmup=2,
               repeats=3, device: str | None = None, variants: dict[str, list[str]] | None = None) -> list[dict]:
    """Canonical pytorch/examples step vs ours (and `variants` of ours: {name: config overrides}), same
    process, same shapes; repeats interleaved, best kept; every row of ours has its ratio to canonical, and
    every row its utilization of the device's measured bf16 matmul peak."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = matmul_peak_tflops(dev)
    kinds = {"canonical": [], "ours": [], **(variants or {})}
    rows = []
    for res in resolutions:
        for batch in batches:
            real = torch.rand(batch, nc, res, res, device=dev) * 2 - 1
            steppers = {k: _make("canonical" if k == "canonical" else "ours", res, preset, nc, dev, o)
                        for k, o in kinds.items()}
            inputs = {k: to_layout(cl, real)[0] for k, (_, cl) in steppers.items()}
            warm = {k: _time(s, inputs[k], warmup) for k, (s, _) in steppers.items()}  # compiles, if asked
            best = {k: float("inf") for k in steppers}
            for _ in range(repeats):  # interleave so drift in machine load hits all alike
                for k, (s, _) in steppers.items():
                    best[k] = min(best[k], _time(s, inputs[k], steps))
            for k in steppers:
                ips = batch * steps / best[k]
                row = {"name": k, "resolution": res, "batch": batch, "preset": preset, "device": str(dev),
                       "channels_last": steppers[k][1], "options": " ".join(kinds[k]),
                       "threads": torch.get_num_threads(), "warmup_s": round(warm[k], 2),
                       "images_per_s": round(ips, 1),
                       "gflops_per_image": round(step_gflops(res, preset, nc), 3),
                       "tflops": round(ips * step_gflops(res, preset, nc) / 1e3, 4),
                       "bf16_peak_tflops": round(peak, 3),
                       "utilization": round(ips * step_gflops(res, preset, nc) / 1e3 / peak, 4)}
                if k != "canonical":
                    row["ratio_vs_canonical"] = round(ips / (batch * steps / best["canonical"]), 3)
                rows.append(row)
    return rows


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
    from dcgan_dist.data.loader import iter_tar, open_shard, resolve_shards

    out = []
    for url in resolve_shards(shard_dir).urls:
        with open_shard(url) as f:
            out += [sample["jpg"] for _, sample in iter_tar(f)]
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
    from dcgan_dist.data.synthetic import write_lsun_lmdb
    from dcgan_dist.devtools import MotoServer, client_env

    work = workdir or tempfile.mkdtemp(prefix="dcgan-bench-")
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


def _plain_loop_rate(cfg, steps: int, warmup: int) -> float:
    """images/s of the training step in a plain loop: same model, data path, options and batch as training."""
    from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input

    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    g, d = to_layout(t.channels_last, build_generator(m, m.nc), build_discriminator(m, m.nc))
    compile_models(t.compile, g, d)
    step = GANStep(g, d, *make_optimizers(g, d, t), m.nz, resolve_precision(t.precision, torch.device("cpu")))
    batches = make_batches(resolve_shards(cfg.data.url), channels=m.nc, resolution=m.resolution,
                           batch_size=t.batch_size, seed=t.seed, num_workers=cfg.data.num_workers,
                           shuffle_buffer=cfg.data.shuffle_buffer)
    for _ in range(warmup):
        step(to_layout(t.channels_last, to_model_input(next(batches), "cpu"))[0])
    t0 = time.perf_counter()
    for _ in range(steps):
        step(to_layout(t.channels_last, to_model_input(next(batches), "cpu"))[0])
    return steps * t.batch_size / (time.perf_counter() - t0)


def bench_ray_overhead(steps: int = 300, batch: int = 64, resolution: int = 32, log_every: int = 25,
                       workdir: str | None = None) -> list[dict]:
    """`python jobs/train.py` (Ray Train, 1 worker, CPU) vs the same steps in a plain loop.

    Steady state: the median of training's own images/s windows after the first, against the plain
    loop's rate. Startup: from launching `python jobs/train.py` to the MLflow timestamp of step 1.
    """
    import os
    import statistics
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    from dcgan_dist import tracking
    from dcgan_dist.trainer import prepare_inputs

    work = Path(workdir or tempfile.mkdtemp(prefix="dcgan-bench-ray-"))
    cpus = os.cpu_count() or 1
    base = [f"model.resolution={resolution}", f"train.batch_size={batch}", "ray.num_workers=1",
            f"ray.cpus_per_worker={cpus}", "train.eval_every=0", "train.sample_every=0", "tracking.register=false",
            f"ray.storage_path={work / 'ray'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    cfg = prepare_inputs(load_config(overrides=base))
    rows = []
    for name, extra in (("startup", ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2"]),
                        ("steady", [f"train.steps={steps}", f"train.log_every={log_every}",
                                    f"train.checkpoint_every={steps}"])):
        run_name = f"bench-{name}-{int(time.time())}"
        argv = [x for o in [*base, f"data.url={cfg.data.url}", f"train.run_name={run_name}", *extra]
                for x in ("--set", o)]
        t0 = time.time()
        train_py = Path(__file__).resolve().parent.parent / "jobs" / "train.py"
        subprocess.run([sys.executable, str(train_py), *argv], check=True, capture_output=True,
                       env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
        wall = time.time() - t0
        client = MlflowClient(cfg.tracking.uri)
        run_id = tracking.find_run(cfg, run_name)
        if name == "startup":
            first = min(m.timestamp for m in client.get_metric_history(run_id, "loss_d"))
            rows.append({"name": "time_to_first_step_s", "value": round(first / 1000 - t0, 2),
                         "total_wall_s": round(wall, 1)})
            continue
        windows = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)]
        ray_ips = statistics.median(windows[1:]) if len(windows) > 1 else windows[0]
        plain_ips = _plain_loop_rate(cfg, steps, warmup=10)
        rows.append({"name": "steady_state", "steps": steps, "batch": batch, "resolution": resolution,
                     "threads": cpus, "ray_images_per_s": round(ray_ips, 1), "plain_images_per_s": round(plain_ips, 1),
                     "ratio_ray_vs_plain": round(ray_ips / plain_ips, 3), "windows": len(windows),
                     "total_wall_s": round(wall, 1)})
    return rows


def _step_seconds(device: torch.device, resolution: int, preset: str, batch: int) -> float:
    """Seconds per step of ours (training defaults) at `batch`, best of 2 bursts."""
    step, cl = _make("ours", resolution, preset, 3, device)
    real = to_layout(cl, torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1)[0]
    _time(step, real, 3)
    n = 3 if device.type == "cpu" else 20
    return min(_time(step, real, n) for _ in range(2)) / n


def bench_scaling(resolution: int = 64, preset: str = "examples", batch: int = 128, gpu_tflops: float = 100.0,
                  cpu_batch: int = 32) -> dict:
    """Measured here: our step's compute time and an allreduce of the step's gradients, fp32 and bf16:
    CPU + gloo between 2 local ranks, and on a GPU machine the GPU step at `batch` + NCCL (2 ranks if
    there are 2 GPUs, else 1). Modelled: data-parallel efficiency for 1-64 GPUs at 100/400 Gb/s, with the
    measured GPU step, or without a GPU, GFLOPs per step / `gpu_tflops` (a stated assumption)."""
    from dcgan_dist import scaling

    nbytes = scaling.gradient_bytes(resolution, preset)
    cpu_step_s = _step_seconds(torch.device("cpu"), resolution, preset, cpu_batch)
    ar_fp32 = scaling.measure_allreduce(nbytes)
    ar_bf16 = scaling.measure_allreduce(nbytes // 2, dtype=torch.bfloat16)
    measured = {"resolution": resolution, "preset": preset, "gradient_mb": round(nbytes / 1e6, 2),
                "cpu_batch": cpu_batch, "cpu_step_ms": round(cpu_step_s * 1e3, 1),
                "gloo_allreduce_fp32_ms_2ranks": round(ar_fp32 * 1e3, 2),
                "gloo_allreduce_bf16_ms_2ranks": round(ar_bf16 * 1e3, 2),
                "cpu_allreduce_share_2ranks": round(ar_fp32 / (cpu_step_s + ar_fp32), 3),
                "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        gpu_step_s = _step_seconds(torch.device("cuda"), resolution, preset, batch)
        ranks = min(2, torch.cuda.device_count())
        nccl = {w: scaling.measure_allreduce(nbytes // (2 if w == "bf16" else 1), world=ranks, backend="nccl",
                                             dtype=torch.bfloat16 if w == "bf16" else torch.float32, repeats=20)
                for w in ("fp32", "bf16")}
        measured.update({"gpu": torch.cuda.get_device_name(), "gpu_batch": batch,
                         "gpu_step_ms": round(gpu_step_s * 1e3, 3),
                         "gpu_tflops_achieved": round(step_gflops(resolution, preset) * batch / gpu_step_s / 1e3, 2),
                         **{f"nccl_allreduce_{w}_ms_{ranks}ranks": round(t * 1e3, 3) for w, t in nccl.items()}})
        source = "measured on this GPU"
    else:
        gpu_step_s = step_gflops(resolution, preset) * batch / (gpu_tflops * 1e3)
        source = f"assumed: {gpu_tflops} TFLOP/s achieved"
    return {
        "measured": measured,
        "model": {"gpu_batch": batch, "gpu_step_ms": round(gpu_step_s * 1e3, 3), "gpu_step_source": source,
                  "rows": scaling.efficiency_table(gpu_step_s, nbytes, nbytes / 2)},
    }
