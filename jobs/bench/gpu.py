"""The first run on a GPU machine, as one script within 10 minutes (`make bench-gpu`): a preflight, the step table,
real training-loop rates from local shards and from a loopback S3, decode against the GPU step, a resume (every
GPU resume crashed before checkpoint.resume), and a 2-process NCCL try on one GPU. One JSON, one short table.

`--device cpu` runs the same script on a machine without a GPU (gloo, no nvJPEG), to check it before the loan."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.data import bench_data
from bench.step import bench_step


def preflight(device: str) -> dict:
    """What the GPU run stands on; raises with one line when CUDA is asked for and is not usable."""
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "device": device}
    if device != "cuda":
        return info
    if not torch.cuda.is_available():
        raise RuntimeError(f"no usable CUDA device (torch {torch.__version__} built for CUDA {torch.version.cuda}: "
                           "the driver must support that CUDA version; see nvidia-smi)")
    props = torch.cuda.get_device_properties(0)
    info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                gpus=torch.cuda.device_count(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                native_bf16=props.major >= 8)
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    return info


def train_rate(overrides: list[str]) -> dict:
    """`jobs/train.py`'s work in this process; images/s from the run's MLflow windows after the first."""
    from mlflow import MlflowClient

    from dcgan_dist.config import load_config
    from dcgan_dist.trainer import train

    cfg = load_config(overrides=overrides)
    t0 = time.time()
    out = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    windows = [m.value for m in sorted(client.get_metric_history(out.run_id, "images_per_s"), key=lambda m: m.step)]
    return {"step": out.step, "start_step": out.metrics.get("start_step"), "wall_s": round(time.time() - t0, 1),
            "images_per_s": round(statistics.median(windows[1:] or windows), 1)}


def nccl_two_processes_one_gpu() -> dict:
    """Two NCCL ranks on GPU 0 (a one-GPU machine's only way to run DDP over NCCL); NCCL may refuse it."""
    code = ("import os, torch, torch.distributed as dist\n"
            "dist.init_process_group('nccl', rank=int(os.environ['RANK']), world_size=2)\n"
            "t = torch.ones(1 << 20, device='cuda:0'); dist.all_reduce(t); torch.cuda.synchronize()\n"
            "assert t[0].item() == 2.0; dist.destroy_process_group(); print('ok')\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"nccl_2proc_1gpu": "timed out after 90 s"}
    if all(p.returncode == 0 for p in procs):
        return {"nccl_2proc_1gpu": "ok"}
    err = next((e for (_, e), p in zip(outs, procs) if p.returncode), "")
    return {"nccl_2proc_1gpu": "refused: " + (err.strip().splitlines() or ["?"])[-1][:300]}


def bench_gpu(device: str = "cuda", images: int = 4000, steps: int = 300, workdir: str | None = None) -> dict:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dcgan-bench-gpu-") as tmp:
            return bench_gpu(device, images, steps, tmp)
    import boto3

    from dcgan_dist.data import s3, shards, sources
    from servers import MotoServer, client_env

    work = Path(workdir)
    result: dict = {"preflight": preflight(device), "errors": {}}

    def part(name, fn):
        t0 = time.time()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' numbers
            result["errors"][name] = "".join(traceback.format_exception_only(e)).strip()[-500:]
        print(f"[bench-gpu] {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    part("step", lambda: bench_step((64,), (128, 512), steps=20 if device == "cuda" else 2, repeats=2, device=device,
                                    variants={"fp32": ["train.precision=fp32"], "fused": ["train.fused_adam=true"]}))
    part("data", lambda: bench_data(images, 64, ("jpg",), str(work)))  # LMDB, shards, decode vs the step
    gpu = ["ray.use_gpu=true"] if device == "cuda" else ["ray.cpus_per_worker=1"]
    base = [*gpu, "ray.num_workers=1", "model.resolution=64", "train.batch_size=128", "train.log_every=25",
            "train.checkpoint_every=100", "train.eval_every=0", "train.sample_every=0", "tracking.register=false",
            "data.num_workers=4" if device == "cuda" else "data.num_workers=1",
            f"ray.storage_path={work / 'ray'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    local = [*base, f"data.url={work / 'shards-jpg'}", "train.run_name=gpu-local"]
    part("train_local", lambda: train_rate([*local, f"train.steps={steps}"]))
    # The same run name again, further: resumes from its checkpoint (RNG states and Adam's counters on the GPU path)
    part("resume", lambda: train_rate([*local, f"train.steps={steps + 100}"]))
    server = MotoServer()
    os.environ.update(client_env(server.url))
    s3._clients.clear()
    try:
        boto3.client("s3").create_bucket(Bucket="gpu")
        shards.build_shards(sources.Lsun(str(work / "lmdb")), "s3://gpu/jpg/", resolution=64, encoding="jpg",
                            shard_size=500, workers=os.cpu_count(), progress=False)
        part("train_s3", lambda: train_rate([*base, "data.url=s3://gpu/jpg/", "train.run_name=gpu-s3",
                                             f"train.steps={steps}"]))
    finally:
        server.stop()
    if device == "cuda":
        part("nccl", nccl_two_processes_one_gpu)
    return result


def summary_rows(result: dict) -> list[dict]:
    rows = [{"what": f"step {r['name']} b{r['batch']}", "images_per_s": r["images_per_s"],
             "note": f"{r['precision']}, {r['utilization']:.0%} of peak"} for r in result.get("step", [])]
    for r in (result.get("data") or {}).get("decode", []):
        if "images_per_s" in r:
            rows.append({"what": f"decode {r['decoder']} {r['device']}", "images_per_s": r["images_per_s"],
                         "note": f"{r['decode_vs_step']}x the step"})
    for name in ("train_local", "resume", "train_s3"):
        if name in result:
            r = result[name]
            rows.append({"what": name, "images_per_s": r["images_per_s"],
                         "note": f"to step {r['step']} from {r['start_step']}, {r['wall_s']} s"})
    if "nccl" in result:
        rows.append({"what": "nccl 2 procs 1 GPU", "images_per_s": "", "note": result["nccl"]["nccl_2proc_1gpu"]})
    rows += [{"what": f"FAILED {k}", "images_per_s": "", "note": v.splitlines()[-1][:120]}
             for k, v in result["errors"].items()]
    return rows
