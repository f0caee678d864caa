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
from bench.step import step_gflops, step_seconds
from dcgan_dist.models import build_discriminator, build_generator

LINKS_GBPS = (100, 400)
RANKS = (1, 2, 4, 8, 16, 32, 64)


def gradient_bytes(resolution: int = 64, preset: str = "examples", nc: int = 3) -> int:
    """fp32 bytes all-reduced per step: every parameter of G and D once."""
    cfg = load_config(overrides=[f"model.resolution={resolution}", f"model.preset={preset}", f"model.nc={nc}"])
    params = sum(p.numel() for m in (build_generator(cfg.model), build_discriminator(cfg.model))
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
    from servers import free_port

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


def bench_scaling(resolution: int = 64, preset: str = "examples", batch: int = 128, gpu_tflops: float = 100.0,
                  cpu_batch: int = 32) -> dict:
    """Measured here: our step's compute time and an allreduce of the step's gradients, fp32 and bf16:
    CPU + gloo between 2 local ranks, and on a GPU machine the GPU step at `batch` + NCCL (2 ranks if
    there are 2 GPUs, else 1). Modelled: data-parallel efficiency for 1-64 GPUs at 100/400 Gb/s, with the
    measured GPU step, or without a GPU, GFLOPs per step / `gpu_tflops` (a stated assumption)."""
    nbytes = gradient_bytes(resolution, preset)
    cpu_step_s = step_seconds(torch.device("cpu"), resolution, preset, cpu_batch)
    ar_fp32 = measure_allreduce(nbytes)
    ar_bf16 = measure_allreduce(nbytes // 2, dtype=torch.bfloat16)
    measured = {"resolution": resolution, "preset": preset, "gradient_mb": round(nbytes / 1e6, 2),
                "cpu_batch": cpu_batch, "cpu_step_ms": round(cpu_step_s * 1e3, 1),
                "gloo_allreduce_fp32_ms_2ranks": round(ar_fp32 * 1e3, 2),
                "gloo_allreduce_bf16_ms_2ranks": round(ar_bf16 * 1e3, 2),
                "cpu_allreduce_share_2ranks": round(ar_fp32 / (cpu_step_s + ar_fp32), 3),
                "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        gpu_step_s = step_seconds(torch.device("cuda"), resolution, preset, batch)
        ranks = min(2, torch.cuda.device_count())
        nccl = {w: measure_allreduce(nbytes // (2 if w == "bf16" else 1), world=ranks, backend="nccl",
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
                  "rows": efficiency_table(gpu_step_s, nbytes, nbytes / 2)},
    }


HOST_RATES_MBIT = (1000, 4000)


def measure_between_hosts(nbytes: int, rates_mbit=HOST_RATES_MBIT, repeats: int = 5) -> list[dict]:
    """The step's gradient allreduce (gloo, 2 ranks) between two hosts of the test bed (network namespaces,
    tests/netbed.py; needs root), each host's link shaped with tbf to each rate, fp32 and bf16: measured against
    `comm_seconds`' ring model at that rate. The bed is test scaffolding, found beside this checkout."""
    import sys
    from pathlib import Path

    import netbed  # from tests/ (see bench/__init__.py)

    from bench import JOBS

    netbed.require_capabilities()
    rows = []
    with netbed.Bed(["rank0", "rank1"]) as bed:
        hosts = [bed["rank0"], bed["rank1"]]
        for rate in (0, *rates_mbit):
            for h in hosts:
                h.unshape()
                if rate:
                    h.shape(rate_mbit=rate)
            for label, dtype, size in (("fp32", "float32", nbytes), ("bf16 hook", "bfloat16", nbytes // 2)):
                port = 29500 + len(rows)
                code = (f"from bench.scaling import _host_rank; "
                        f"_host_rank({{rank}}, '{hosts[0].ip}', {port}, {size}, '{dtype}', {repeats})")
                env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOBS)}
                procs = [h.spawn([sys.executable, "-c", code.format(rank=r)], env=env, log=f"allreduce-{len(rows)}.log")
                         for r, h in enumerate(hosts)]
                for p in procs:
                    p.wait(timeout=300)
                out = Path(procs[0].log).read_text()
                if procs[0].returncode or "median_s" not in out:
                    raise RuntimeError(f"allreduce between bed hosts failed:\n{out[-2000:]}")
                measured = float(out.rsplit("median_s", 1)[1].split()[0])
                row = {"link_mbit": rate or "unshaped", "gradients": label, "mb": round(size / 1e6, 2),
                       "measured_ms": round(measured * 1e3, 1)}
                if rate:
                    model = comm_seconds(size, 2, rate / 1000, latency_s=0)
                    row.update(model_ms=round(model * 1e3, 1), measured_over_model=round(measured / model, 2))
                rows.append(row)
    return rows


def _host_rank(rank: int, master: str, port: int, nbytes: int, dtype: str, repeats: int) -> None:
    """One rank of `measure_between_hosts`, run on a bed host: prints the median allreduce time (rank 0)."""
    os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    kind = getattr(torch, dtype)
    x = torch.ones(nbytes // torch.tensor([], dtype=kind).element_size(), dtype=kind)
    dist.all_reduce(x)  # warm up the connections
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print("median_s", statistics.median(times), flush=True)
    dist.destroy_process_group()
