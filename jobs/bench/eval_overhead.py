"""What evaluation and checkpoints cost the training ranks: steps/s with no evaluation, with scoring in the loop
(every rank waits, as searches still do), with scoring beside training (Ray Train's checkpoint validation, the
default), and with a checkpoint every few steps, uploaded in the step or by Ray's thread beside training."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dcgan_dist.config import load_config


def _one_run(overrides: list[str], mode: str, steps: int) -> dict:
    from mlflow import MlflowClient

    from dcgan_dist import tracking, trainer

    cfg = trainer.prepare_inputs(load_config(overrides=[*overrides, f"train.run_name=bench-eval-{mode}"]))
    run_id, _ = tracking.start_run(cfg, cfg.train.run_name)
    trainer.init_ray(cfg)
    t0 = time.time()
    trainer.make_trainer(cfg, run_id, trainer.run_config(cfg, cfg.train.run_name),
                         score_in_loop=mode == "in_loop").fit()
    wall = time.time() - t0
    tracking.end_run(cfg, run_id)
    client = MlflowClient(cfg.tracking.uri)
    points = sorted(client.get_metric_history(run_id, "loss_d"), key=lambda m: m.step)
    first, last = points[0], points[-1]  # the training ranks' pace: first to last logged step
    scored = sorted(m.step for m in client.get_metric_history(run_id, cfg.tune.metric))
    return {"mode": mode, "steps": steps, "steps_per_s": round((last.step - first.step) * 1000 /
                                                                 max(last.timestamp - first.timestamp, 1), 2),
            "evaluations": len(scored), "fit_wall_s": round(wall, 1)}


def bench_eval_overhead(steps: int = 300, eval_every: int = 50, num_images: int = 2048, batch: int = 64,
                        checkpoint_every: int = 10, workdir: str | None = None) -> list[dict]:
    """One worker (all CPUs but the scoring task's one) on the digits at 32x32; each mode its own run. On a GPU the
    in-loop cost is the same seconds per evaluation against ~100x faster steps."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dcgan-bench-eval-") as tmp:
            return bench_eval_overhead(steps, eval_every, num_images, batch, checkpoint_every, tmp)
    import os

    work = Path(workdir)
    cpus = max(1, (os.cpu_count() or 2) - 1)
    base = [f"train.batch_size={batch}", "ray.num_workers=1", f"ray.cpus_per_worker={cpus}", "metrics.eval_cpus=1",
            f"metrics.num_images={num_images}", f"metrics.cache_dir={work / 'cache'}", f"train.steps={steps}",
            "train.log_every=10", f"train.checkpoint_every={steps}", "train.sample_every=0",
            "tracking.register=false", f"ray.storage_path={work / 'ray'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    rows = [_one_run([*base, "train.eval_every=0"], "off", steps)]
    for mode in ("in_loop", "beside"):
        rows.append(_one_run([*base, f"train.eval_every={eval_every}"], mode, steps))
    for upload in ("sync", "async"):  # the step waits for each upload, or Ray's thread uploads beside training
        rows.append(_one_run([*base, "train.eval_every=0", f"train.checkpoint_every={checkpoint_every}",
                              f"train.checkpoint_upload={upload}"], f"checkpoints_every_{checkpoint_every}_{upload}",
                             steps))
    for row in rows:
        row["vs_off"] = round(row["steps_per_s"] / rows[0]["steps_per_s"], 3)
    return rows
