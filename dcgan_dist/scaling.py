"""An honest data-parallel scaling model for the DCGAN step: measured compute and allreduce, stated links.

Each step all-reduces D's and G's gradients once (see step.py). A ring allreduce of B bytes over N
ranks moves 2(N-1)/N * B bytes through each rank's link and takes 2(N-1) latency hops, so

    t_comm(N) = 2(N-1)/N * B / bandwidth + 2(N-1) * latency
    efficiency = t_compute / (t_compute + t_comm)        (no overlap: a lower bound)
                 t_compute / max(t_compute, t_comm)      (perfect overlap with backward: an upper bound)

DDP overlaps bucket allreduces with the backward pass, so real runs land between the two bounds.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator

LINKS_GBPS = (100, 400)
RANKS = (1, 2, 4, 8, 16, 32, 64)


def gradient_bytes(resolution: int = 64, preset: str = "examples", nc: int = 3) -> int:
    """fp32 bytes all-reduced per step: every parameter of G and D once."""
    cfg = load_config(overrides=[f"model.resolution={resolution}", f"model.preset={preset}"])
    params = sum(p.numel() for m in (build_generator(cfg.model, nc), build_discriminator(cfg.model, nc))
                 for p in m.parameters())
    return params * 4


def comm_seconds(nbytes: float, ranks: int, gbps: float, latency_s: float = 10e-6) -> float:
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9 / 8) + 2 * (ranks - 1) * latency_s


def efficiency_table(compute_s: float, nbytes: float, compressed_bytes: float) -> list[dict]:
    rows = []
    for gbps in LINKS_GBPS:
        for label, b in (("fp32", nbytes), ("bf16 hook", compressed_bytes)):
            for n in RANKS:
                c = comm_seconds(b, n, gbps)
                rows.append({"link_gbps": gbps, "gradients": label, "ranks": n, "comm_ms": round(c * 1e3, 3),
                             "eff_no_overlap": round(compute_s / (compute_s + c), 3),
                             "eff_full_overlap": round(compute_s / max(compute_s, c), 3)})
    return rows


def _allreduce_worker(rank: int, world: int, port: int, nbytes: int, dtype: torch.dtype, repeats: int,
                      backend: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    x = torch.ones(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)
    dist.all_reduce(x)  # warm up the connections
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()  # NCCL returns once queued; time the transfer itself
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def measure_allreduce(nbytes: int, world: int = 2, dtype: torch.dtype = torch.float32, repeats: int = 5,
                      backend: str = "gloo") -> float:
    """Median seconds of one allreduce of `nbytes` among `world` local processes: gloo over loopback, or
    NCCL with one GPU per process (NCCL allows no two ranks on one GPU)."""
    from dcgan_dist.devtools import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, nbytes, dtype, repeats, backend, out))
             for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result
