"""The training step: ours vs pytorch/examples', images/s, counted FLOPs, utilization of the measured peak.

Each row is read against the peak of the precision it ran in: an fp32 row against the fp32 matmul peak, a bf16 or
fp16 row against the better of that dtype's peak and fp32's (autocast keeps batch norm and the losses in fp32).
On a CPU without native bf16 the bf16 peak is below an fp32 step's rate, so one shared bf16 peak is wrong there."""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from bench.canonical import CanonicalStep
from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers
from dcgan_dist.torch_utils import native_bf16, to_layout


@functools.lru_cache
def step_gflops(resolution: int, preset: str, nc: int = 3) -> float:
    """GFLOPs of one training step per image, counted (torch's FlopCounterMode) on the canonical
    pytorch/examples step: the same work figure for every row, so TFLOP/s compare like with like
    (ours does ~8% fewer FLOPs for the same update). 2.48 at 64x64 `examples`, 0.42 at 32x32."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = make_step("canonical", resolution, preset, nc, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        step(torch.zeros(2, nc, resolution, resolution))
    return counter.get_total_flops() / 2 / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(kind: str, resolution: int, preset: str, nc: int, device: torch.device, overrides=()):
    """The canonical step as pytorch/examples runs it (fp32, plain Adam, NCHW), or ours with the training
    defaults plus `overrides` (e.g. train.precision=bf16)."""
    cfg = load_config(overrides=[f"model.resolution={resolution}", f"model.preset={preset}", f"model.nc={nc}",
                                 *overrides])
    if kind == "canonical":
        torch.manual_seed(cfg.train.seed)
        g, d = build_generator(cfg.model).to(device), build_discriminator(cfg.model).to(device)
        cfg.train.fused_adam = False
        return CanonicalStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz), False
    return GANStep.from_config(cfg, device), cfg.train.channels_last


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 2.0) -> float:
    """Measured dense matmul TFLOP/s of `device` in `dtype`: the ceiling our step's utilization is read against.

    Square matmuls big enough to saturate the device (8192 on a GPU, 2048 on a CPU); the best of 10
    short bursts over about `seconds`, since a shared VM's clock and neighbours vary."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    a @ b
    sync(device)
    reps = max(1, int(seconds / 10 / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def time_steps(step: Callable, real: torch.Tensor, steps: int) -> float:
    sync(real.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(real)
    sync(real.device)
    return time.perf_counter() - t0


def precision_peaks(device: torch.device, precisions) -> dict[str, float]:
    """{precision: TFLOP/s ceiling} for the precisions the rows ran in (see the module docstring)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    measured = {p: matmul_peak_tflops(device, dtypes[p]) for p in {"fp32", *precisions}}
    return {p: max(measured[p], measured["fp32"]) for p in measured}


def bench_step(resolutions=(32, 64), batches=(64, 128), preset="examples", nc=3, steps=10, warmup=2,
               repeats=3, device: str | None = None, variants: dict[str, list[str]] | None = None) -> list[dict]:
    """Canonical pytorch/examples step vs ours (and `variants` of ours: {name: config overrides}), same
    process, same shapes; repeats interleaved, best kept; every row of ours has its ratio to canonical, and
    every row its utilization of the measured matmul peak of its own precision."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kinds = {"canonical": [], "ours": [], **(variants or {})}
    rows, peaks = [], None
    for res in resolutions:
        for batch in batches:
            real = torch.rand(batch, nc, res, res, device=dev) * 2 - 1
            steppers = {k: make_step("canonical" if k == "canonical" else "ours", res, preset, nc, dev, o)
                        for k, o in kinds.items()}
            precision = {k: getattr(s, "precision", "fp32") for k, (s, _) in steppers.items()}
            peaks = peaks or precision_peaks(dev, set(precision.values()))
            inputs = {k: to_layout(cl, real)[0] for k, (_, cl) in steppers.items()}
            warm = {k: time_steps(s, inputs[k], warmup) for k, (s, _) in steppers.items()}  # compiles, if asked
            best = {k: float("inf") for k in steppers}
            for _ in range(repeats):  # interleave so drift in machine load hits all alike
                for k, (s, _) in steppers.items():
                    best[k] = min(best[k], time_steps(s, inputs[k], steps))
            for k in steppers:
                ips = batch * steps / best[k]
                tflops = ips * step_gflops(res, preset, nc) / 1e3
                row = {"name": k, "resolution": res, "batch": batch, "preset": preset, "device": str(dev),
                       "native_bf16": native_bf16(dev), "precision": precision[k],
                       "channels_last": steppers[k][1], "options": " ".join(kinds[k]),
                       "threads": torch.get_num_threads(), "warmup_s": round(warm[k], 2),
                       "images_per_s": round(ips, 1),
                       "gflops_per_image": round(step_gflops(res, preset, nc), 3),
                       "tflops": round(tflops, 4),
                       "peak_tflops": round(peaks[precision[k]], 3),
                       "utilization": round(tflops / peaks[precision[k]], 4)}
                if k != "canonical":
                    row["ratio_vs_canonical"] = round(ips / (batch * steps / best["canonical"]), 3)
                rows.append(row)
    return rows


def step_seconds(device: torch.device, resolution: int, preset: str, batch: int) -> float:
    """Seconds per step of ours (training defaults) at `batch`, best of 2 bursts."""
    step, cl = make_step("ours", resolution, preset, 3, device)
    real = to_layout(cl, torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1)[0]
    time_steps(step, real, 3)
    n = 3 if device.type == "cpu" else 20
    return min(time_steps(step, real, n) for _ in range(2)) / n
