"""Measured compute and allreduce time per step, fed to the scaling model in dcgan_dist/scaling.py."""

from __future__ import annotations

import torch

from dcgan_dist.bench.step import step_gflops, step_seconds


def bench_scaling(resolution: int = 64, preset: str = "examples", batch: int = 128, gpu_tflops: float = 100.0,
                  cpu_batch: int = 32) -> dict:
    """Measured here: our step's compute time and an allreduce of the step's gradients, fp32 and bf16:
    CPU + gloo between 2 local ranks, and on a GPU machine the GPU step at `batch` + NCCL (2 ranks if
    there are 2 GPUs, else 1). Modelled: data-parallel efficiency for 1-64 GPUs at 100/400 Gb/s, with the
    measured GPU step, or without a GPU, GFLOPs per step / `gpu_tflops` (a stated assumption)."""
    from dcgan_dist import scaling

    nbytes = scaling.gradient_bytes(resolution, preset)
    cpu_step_s = step_seconds(torch.device("cpu"), resolution, preset, cpu_batch)
    ar_fp32 = scaling.measure_allreduce(nbytes)
    ar_bf16 = scaling.measure_allreduce(nbytes // 2, dtype=torch.bfloat16)
    measured = {"resolution": resolution, "preset": preset, "gradient_mb": round(nbytes / 1e6, 2),
                "cpu_batch": cpu_batch, "cpu_step_ms": round(cpu_step_s * 1e3, 1),
                "gloo_allreduce_fp32_ms_2ranks": round(ar_fp32 * 1e3, 2),
                "gloo_allreduce_bf16_ms_2ranks": round(ar_bf16 * 1e3, 2),
                "cpu_allreduce_share_2ranks": round(ar_fp32 / (cpu_step_s + ar_fp32), 3),
                "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        gpu_step_s = step_seconds(torch.device("cuda"), resolution, preset, batch)
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
