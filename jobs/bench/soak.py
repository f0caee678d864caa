"""soak: a long run at LSUN scale, watched for anything that grows with steps, shards or checkpoints.

Builds a synthetic LSUN-format LMDB at 64x64, shards it into a loopback S3 (moto's server) in more than 1,000
objects (S3 listings paginate), starts MLflow with basic auth and its artifacts in that S3, and runs
`jobs/train.py` (2 workers, streaming from S3, evaluation, checkpoints and sample grids on) for `minutes` from
when both training workers are up, then stops it as `ray job stop` does (SIGTERM: a checkpoint, then exit 143).
Every `sample_s` it records each role's
RSS, open file descriptors and threads (driver, training workers, their DataLoader workers, Ray's own processes,
the MLflow server, the S3 server), the temp folder's size, the MLflow database's size and images/s. It writes
soak.json and soak.png and prints, per figure, its growth after warm-up per hour, in % and in its own units, and
what fills the temp folder. At the end: every logged step in MLflow exactly once, and every image taken the same
number of times (+-1) across the epoch(s) so far.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import JOBS
from bench.tracking_load import auth_server

START_S = 900  # the job's start (Ray, the shards listed in S3, the workers) must end within this
ROLES = ("driver", "train_workers", "dataloader_workers", "ray_processes", "mlflow_server", "s3_server")
KINDS = ("rss_mb", "fds", "threads")


def _role_of(proc, driver_pid: int) -> str:
    """Which role a process of the driver's tree plays (Ray names its workers' processes `ray::<Actor>...`)."""
    if proc.pid == driver_pid:
        return "driver"
    parent = proc.parent()  # first: a DataLoader worker, forked, carries its parent's title too
    if parent is not None and "RayTrainWorker" in " ".join(parent.cmdline()[:1]):
        return "dataloader_workers"
    if "RayTrainWorker" in " ".join(proc.cmdline()[:1]):
        return "train_workers"
    return "ray_processes"


def _sample(driver_pid: int, trees: dict[str, int]) -> dict:
    """Per role: RSS (MiB), open file descriptors and threads, summed over its processes, and how many."""
    import psutil

    figures = {f"{role}.{kind}": 0.0 for role in ROLES for kind in KINDS}
    counts = collections.Counter()
    owners = {}
    for role, pid in {"driver": driver_pid, **trees}.items():
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                owners[p.pid] = (p, role)
        except psutil.NoSuchProcess:
            continue
    for p, role in owners.values():
        try:
            role = _role_of(p, driver_pid) if role == "driver" else role
            with p.oneshot():
                figures[f"{role}.rss_mb"] += p.memory_info().rss / 2**20
                figures[f"{role}.fds"] += p.num_fds()
                figures[f"{role}.threads"] += p.num_threads()
            counts[role] += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {**{k: round(v, 1) for k, v in figures.items()}, **{f"{r}.processes": counts[r] for r in ROLES}}


def _size_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed while walking
    return round(total / 2**20, 1)


def growth_per_hour(times_s: list[float], values: list[float], warmup_s: float, percent: bool = True
                    ) -> float | None:
    """The least-squares slope of `values` after warm-up per hour, as % of their mean or in their own units (a
    percentage alone misleads for a figure that starts near zero, like a fresh temp folder). None: too few samples."""
    t = np.array([x for x in times_s if x >= warmup_s])
    v = np.array([y for x, y in zip(times_s, values) if x >= warmup_s], dtype=float)
    if len(t) < 3 or (percent and not v.mean()):
        return None
    slope = np.polyfit(t / 3600, v, 1)[0]
    return round(100 * slope / abs(v.mean()) if percent else slope, 1)


def _largest(folder: Path, n: int = 8) -> dict[str, float]:
    """The folders directly under `folder`'s subfolders that hold the most (MiB): what a growing temp folder holds."""
    def folders(p: Path) -> list[Path]:
        return [c for c in p.iterdir() if c.is_dir() and not c.is_symlink()]

    sizes = {str(p.relative_to(folder)): _size_mb(p) for top in folders(folder) for p in [top, *folders(top)]
             } if folder.is_dir() else {}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:n])


def _growth(samples: list[dict], warmup_s: float, percent: bool) -> dict:
    keys = [k for k in samples[0] if k != "t_s" and not k.endswith(".processes")] if samples else []
    return {k: growth_per_hour([s["t_s"] for s in samples], [s.get(k) or 0 for s in samples], warmup_s, percent)
            for k in keys}


def _plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    panels = [(kind, [f"{r}.{kind}" for r in ROLES]) for kind in KINDS]
    panels += [("MiB", ["tmp_mb", "mlflow_db_mb"]), ("images/s", ["images_per_s"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3 * len(panels)), sharex=True)
    for ax, (label, keys) in zip(axes, panels):
        for k in keys:
            ax.plot(t, [s.get(k) for s in samples], label=k)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _exactly_once(client, run_id: str, log_every: int) -> dict:
    steps = [m.step for m in client.get_metric_history(run_id, "loss_d")]
    expected = set(range(log_every, max(steps, default=0) + 1, log_every))
    return {"logged_steps": len(steps), "duplicated_steps": len(steps) - len(set(steps)),
            "missing_steps": len(expected - set(steps))}


def _image_counts(key_log: Path, images: int) -> dict:
    """Every step's keys (all ranks together) once, and each image's count across the run so far."""
    by_step: dict[int, list[str]] = collections.defaultdict(list)
    for f in key_log.glob("rank*.txt"):
        for line in f.read_text().splitlines():
            step, key = line.split()
            by_step[int(step)].append(key)
    counts = collections.Counter(k for keys in by_step.values() for k in keys)
    taken = sum(counts.values())
    spread = collections.Counter(counts.get(k, 0) for k in counts)
    return {"steps_in_key_log": len(by_step), "images_taken": taken, "distinct_images": len(counts),
            "epochs": round(taken / images, 3), "times_taken": dict(sorted(spread.items())),
            "even": max(counts.values(), default=0) - min(counts.values(), default=0) <= 1
            and (taken < images or len(counts) == images)}


def bench_soak(images: int = 300_000, minutes: float = 45, sample_s: float = 30, warmup_min: float = 5,
               out: str = "outputs/soak", workdir: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """Returns the result that `out`/soak.json holds (with soak.png and the job's train.log beside it)."""
    if workdir is None:  # the LMDB, the servers' state and Ray's temp folder go when the numbers are out
        with tempfile.TemporaryDirectory(prefix="dcgan-soak-") as tmp:
            return bench_soak(images, minutes, sample_s, warmup_min, out, tmp, overrides)
    import boto3
    from mlflow import MlflowClient

    from dcgan_dist.data import s3, shards, sources
    from servers import MotoServer, client_env
    from synthetic import write_lsun_lmdb

    work = Path(workdir)
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    moto = MotoServer()
    s3_env = client_env(moto.url)
    os.environ.update(s3_env)
    s3._clients.clear()
    boto3.client("s3").create_bucket(Bucket="soak")
    t0 = time.time()
    write_lsun_lmdb(work / "lmdb", images, size=(64, 96))
    shard_size = max(1, images // 1100)  # > 1,000 objects: every listing of them paginates
    manifest = shards.build_shards(sources.Lsun(str(work / "lmdb")), "s3://soak/shards/", resolution=64,
                                   shard_size=shard_size, workers=os.cpu_count(), progress=False)
    prepared_s = time.time() - t0
    server, login = auth_server(work / "mlflow", {**s3_env, "MLFLOW_ARTIFACTS_DESTINATION": "s3://soak/mlflow"})
    log_every = 10
    # Every 200 steps (about 3 minutes here): each kind of event, checkpoint, grid and evaluation, first happens
    # within the warm-up, so what grows after it grows with their repetition, not with their first time.
    settings = ["data.url=s3://soak/shards/", "model.resolution=64", "ray.num_workers=2",
                "ray.cpus_per_worker=0.5", "metrics.eval_cpus=0.5", "data.num_workers=1", "data.streams=4",
                "train.steps=100000000", f"train.log_every={log_every}", "train.checkpoint_every=200",
                "train.sample_every=200", "train.eval_every=200", "metrics.num_images=512",
                f"metrics.cache_dir={work / 'cache'}", f"train.key_log={work / 'keys'}", "train.run_name=soak",
                f"tracking.uri={server.url}", "ray.storage_path=s3://soak/ckpt", *overrides]
    # Ray's sockets live in its temp folder and a socket's path may not exceed 107 bytes: a short folder of its own
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir=tempfile.gettempdir()))
    env = {**os.environ, **login, "TMPDIR": str(work / "tmp"), "RAY_TMPDIR": str(ray_tmp)}
    cmd = [sys.executable, str(JOBS / "train.py")] + [a for s in settings for a in ("--set", s)]
    samples, t_start = [], time.time()
    with open(work / "train.log", "wb") as job_log:
        driver = subprocess.Popen(cmd, env=env, stdout=job_log, stderr=subprocess.STDOUT, cwd=work)
    os.environ.update(login)
    client = MlflowClient(server.url)
    run_id = None
    try:
        t_train = None  # `minutes` count from the first sample with both training workers up, not from the launch
        while driver.poll() is None and time.time() - (t_train or t_start) < (minutes * 60 if t_train else START_S):
            time.sleep(sample_s)
            if run_id is None:
                found = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                                           "tags.`dcgan.run_name` = 'soak'") if client.get_experiment_by_name(
                                               "dcgan") else []
                run_id = found[0].info.run_id if found else None
            ips = client.get_run(run_id).data.metrics.get("images_per_s") if run_id else None
            samples.append({"t_s": round(time.time() - t_start, 1),
                            **_sample(driver.pid, {"mlflow_server": server.proc.pid, "s3_server": moto.proc.pid}),
                            "tmp_mb": round(_size_mb(work / "tmp") + _size_mb(ray_tmp), 1),
                            "mlflow_db_mb": _size_mb(work / "mlflow" / "state" / "mlflow.db"),
                            "images_per_s": ips})
            print(json.dumps(samples[-1]), flush=True)
            if t_train is None and samples[-1]["train_workers.processes"] >= 2:
                t_train = time.time()
        crashed = driver.poll()
        driver.send_signal(signal.SIGTERM)  # as `ray job stop` does: a checkpoint, then exit 143
        code = driver.wait(timeout=600)
        started_s = t_train - t_start if t_train else None
        warmup_s = (started_s or 0) + warmup_min * 60  # the first minutes of training, not of the launch
        result = {"images": images, "shards": len(manifest["shards"]), "prepare_s": round(prepared_s),
                  "minutes": minutes, "exit_code": code, "ended_early": crashed is not None or t_train is None,
                  "training_started_s": round(started_s, 1) if started_s else None,
                  "settings": settings, "samples": samples,
                  "warmup_ends_s": round(warmup_s, 1),
                  "growth_pct_per_hour": _growth(samples, warmup_s, percent=True),
                  "growth_per_hour": _growth(samples, warmup_s, percent=False),
                  "tmp_largest_mb": {**_largest(work / "tmp"), **_largest(ray_tmp)},
                  "mlflow": _exactly_once(client, run_id, log_every) if run_id else None,
                  "images_taken": _image_counts(work / "keys", manifest["num_images"])}
    finally:
        if driver.poll() is None:
            driver.kill()
        server.stop()
        moto.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "soak.json").write_text(json.dumps(result, indent=2))
    (folder / "train.log").write_bytes((work / "train.log").read_bytes())
    if samples:
        _plot(samples, folder / "soak.png")
    return result
