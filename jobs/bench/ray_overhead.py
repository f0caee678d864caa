"""Ray Train's cost: `python jobs/train.py` (1 worker) against the same step in a plain loop, and startup time."""

from __future__ import annotations

import time

from dcgan_dist.config import load_config
from dcgan_dist.step import GANStep
from dcgan_dist.torch_utils import to_layout


def _plain_loop_rate(cfg, steps: int, warmup: int) -> float:
    """images/s of the training step in a plain loop: same model, data path, options and batch as training."""
    from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input

    m, t = cfg.model, cfg.train
    step = GANStep.from_config(cfg)
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

    Startup: from launching `python jobs/train.py` to the MLflow timestamp of step 1. Steady state: the median
    of the same run's images/s windows after the first, against the plain loop's rate.
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

    if workdir is None:  # the run's MLflow store and checkpoints go when the numbers are out
        with tempfile.TemporaryDirectory(prefix="dcgan-bench-ray-") as tmp:
            return bench_ray_overhead(steps, batch, resolution, log_every, tmp)
    work = Path(workdir)
    cpus = os.cpu_count() or 1
    base = [f"model.resolution={resolution}", f"train.batch_size={batch}", "ray.num_workers=1",
            f"ray.cpus_per_worker={cpus}", "train.eval_every=0", "train.sample_every=0", "tracking.register=false",
            f"ray.storage_path=file://{work / 'ray'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    cfg = prepare_inputs(load_config(overrides=base))
    # One run gives both numbers: its launch-to-first-step time, and its images/s windows after the first.
    run_name = f"bench-ray-overhead-{int(time.time())}"
    overrides = [*base, f"data.url={cfg.data.url}", f"train.run_name={run_name}", f"train.steps={steps}",
                 f"train.log_every={log_every}", "train.checkpoint_every=1000"]  # metrics must not wait for one
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"),
                             *[x for o in overrides for x in ("--set", o)]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    client, seen = MlflowClient(cfg.tracking.uri), {}  # step -> when it was first visible in MLflow
    while proc.poll() is None:  # a user watching the run's chart: how long after its step a point shows up
        time.sleep(0.25)
        try:
            run_id = tracking.find_run(cfg, run_name)
            for m in client.get_metric_history(run_id, "loss_d") if run_id else []:
                seen.setdefault(m.step, (time.time(), m.timestamp / 1000))
        except Exception:  # noqa: BLE001 - the store or the run not made yet
            pass
    if proc.returncode:
        raise RuntimeError(f"jobs/train.py failed: {proc.stderr.read()[-3000:]}")
    wall = time.time() - t0
    lags = sorted(at - stamped for at, stamped in seen.values())
    last_stamp = max((stamped for _, stamped in seen.values()), default=0.0)
    early = sum(at < last_stamp for at, _ in seen.values())  # visible before the last step was even taken
    run_id = tracking.find_run(cfg, run_name)
    first = min(m.timestamp for m in client.get_metric_history(run_id, "loss_d"))
    windows = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)]
    ray_ips = statistics.median(windows[1:]) if len(windows) > 1 else windows[0]
    plain_ips = _plain_loop_rate(cfg, steps, warmup=10)
    return [{"name": "time_to_first_step_s", "value": round(first / 1000 - t0, 2), "total_wall_s": round(wall, 1)},
            {"name": "steady_state", "steps": steps, "batch": batch, "resolution": resolution, "threads": cpus,
             "ray_images_per_s": round(ray_ips, 1), "plain_images_per_s": round(plain_ips, 1),
             "ratio_ray_vs_plain": round(ray_ips / plain_ips, 3), "windows": len(windows),
             "total_wall_s": round(wall, 1)},
            {"name": "metric_lag_s", "checkpoint_every": 1000, "points_seen_live": len(lags),
             "visible_before_the_last_step": early,
             "median": round(statistics.median(lags), 2) if lags else None,
             "max": round(lags[-1], 2) if lags else None}]
