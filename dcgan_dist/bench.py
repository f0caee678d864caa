"""Benchmarks that print numbers and ratios (speed targets live here, not in timed unit tests)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from dcgan_dist.canonical import CanonicalStep
from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers

GFLOPS_PER_IMAGE_64 = 2.5  # one training step, examples preset at 64x64 (PITFALLS.md)
PRESET_COST = {"examples": 1.0, "paper": 6.0}  # the paper's ngf 128, 5x5 model is about 6x the work


def step_gflops(resolution: int, preset: str) -> float:
    """Approximate GFLOPs of one training step per image (scales with pixel count)."""
    return GFLOPS_PER_IMAGE_64 * (resolution / 64) ** 2 * PRESET_COST[preset]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make(kind: str, resolution: int, preset: str, nc: int, device: torch.device):
    cfg = load_config(overrides=[f"model.resolution={resolution}", f"model.preset={preset}"])
    torch.manual_seed(0)
    g, d = build_generator(cfg.model, nc).to(device), build_discriminator(cfg.model, nc).to(device)
    step_cls = {"canonical": CanonicalStep, "ours": GANStep}[kind]
    return step_cls(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz)


def _time(step: Callable, real: torch.Tensor, steps: int) -> float:
    _sync(real.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(real)
    _sync(real.device)
    return time.perf_counter() - t0


def bench_step(resolutions=(32, 64), batches=(64, 128), preset="examples", nc=3, steps=10, warmup=2,
               repeats=3, device: str | None = None) -> list[dict]:
    """Canonical pytorch/examples step vs ours, same process, same shapes; repeats interleaved, best kept."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for res in resolutions:
        for batch in batches:
            real = torch.rand(batch, nc, res, res, device=dev) * 2 - 1
            steppers = {k: _make(k, res, preset, nc, dev) for k in ("canonical", "ours")}
            for s in steppers.values():
                _time(s, real, warmup)
            best = {k: float("inf") for k in steppers}
            for _ in range(repeats):  # interleave so drift in machine load hits both alike
                for k, s in steppers.items():
                    best[k] = min(best[k], _time(s, real, steps))
            for k in steppers:
                ips = batch * steps / best[k]
                rows.append({"name": k, "resolution": res, "batch": batch, "preset": preset, "device": str(dev),
                             "threads": torch.get_num_threads(), "images_per_s": round(ips, 1),
                             "tflops": round(ips * step_gflops(res, preset) / 1e3, 4)})
            rows[-1]["ratio_vs_canonical"] = round(rows[-1]["images_per_s"] / rows[-2]["images_per_s"], 3)
    return rows
