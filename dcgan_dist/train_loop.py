"""The per-worker Ray Train function: config, data, GAN step, checkpoints and reports, wired together.

Every rank runs the same number of steps and calls `ray.train.report` at the same steps (Ray
Train V2 requires it); only rank 0 attaches checkpoints and talks to MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from dcgan_dist import checkpoint
from dcgan_dist.config import Config, from_dict
from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers, to_layout, unwrap
from dcgan_dist.tracking import RunLogger

log = logging.getLogger(__name__)

METRICS = ("loss_d", "loss_g", "d_real", "d_fake")
GRID_SAMPLES = 64


def fixed_noise(cfg: Config) -> torch.Tensor:
    """The same 64 z vectors for every sample grid of a run, so grids are comparable over time."""
    return torch.randn(GRID_SAMPLES, cfg.model.nz, generator=torch.Generator().manual_seed(cfg.train.seed))


def param_digest(module: nn.Module) -> str:
    """sha256 of all parameters: equal on every rank iff DDP kept the replicas identical."""
    h = hashlib.sha256()
    for p in unwrap(module).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    m, t = cfg.model, cfg.train

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    g, d = build_generator(m, m.nc), build_discriminator(m, m.nc)
    if t.sync_batchnorm and world > 1:
        g, d = nn.SyncBatchNorm.convert_sync_batchnorm(g), nn.SyncBatchNorm.convert_sync_batchnorm(d)
    g, d = to_layout(t.channels_last, g.to(device), d.to(device))
    opt_g, opt_d = make_optimizers(g, d, t)

    start, restored = 1, ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as ckpt_dir:
            state = checkpoint.load(ckpt_dir, map_location=device)
        checkpoint.restore(state, g, d, opt_g, opt_d)
        start = state["step"] + 1
        log.info("rank %d: resumed from the checkpoint of step %d", rank, state["step"])
    # D runs twice per step: per-rank batch-norm buffers must not be broadcast mid-step.
    ddp = {"broadcast_buffers": False}
    g = ray.train.torch.prepare_model(g, parallel_strategy_kwargs=ddp)
    d = ray.train.torch.prepare_model(d, parallel_strategy_kwargs=ddp)
    if restored and len(state["rng"]) == world:
        checkpoint.set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(t.seed * 1000 + rank * 7919 + start)

    batches = make_batches(resolve_shards(cfg.data.url), channels=m.nc, resolution=m.resolution,
                           batch_size=t.batch_size, seed=t.seed, rank=rank, start_step=start,
                           num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer)
    step_fn = GANStep(g, d, opt_g, opt_d, m.nz)
    logger = RunLogger(cfg.tracking.uri, loop_config["mlflow_run_id"]) if rank == 0 else None
    z_grid = fixed_noise(cfg).to(device)

    sums = torch.zeros(len(METRICS), device=device)
    window_steps, window_start = 0, time.perf_counter()
    for step in range(start, t.steps + 1):
        if step == t.fail_at_step and not restored:
            raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")
        (real,) = to_layout(t.channels_last, to_model_input(next(batches), device))
        out = step_fn(real)
        sums += torch.stack([out[k] for k in METRICS])
        window_steps += 1

        is_last = step == t.steps
        save_now = step % t.checkpoint_every == 0 or is_last
        if step % t.log_every == 0 or save_now:
            counts = torch.tensor([batches.skipped, batches.retries], dtype=sums.dtype, device=device)
            stats = torch.cat([sums / (window_steps * world), counts])
            if world > 1:
                dist.all_reduce(stats)  # one collective: mean metrics, total counts
            elapsed = time.perf_counter() - window_start
            metrics = dict(zip(METRICS + ("data_skipped", "data_retries"), stats.tolist()))
            metrics["images_per_s"] = window_steps * t.batch_size * world / elapsed
            if logger:
                log.info("step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  %.0f img/s%s", step, t.steps,
                         metrics["loss_d"], metrics["loss_g"], metrics["d_real"], metrics["d_fake"],
                         metrics["images_per_s"], "  [checkpoint]" if save_now else "")
                logger.add(step, metrics)
            if save_now:
                # Ray Train's report blocks until its controller polls (about every 2 s), so it is
                # called only with checkpoints; per-step metrics go to MLflow directly.
                rngs = gather(checkpoint.rng_state())
                extra = {"step": step, "start_step": start, "g_digests": gather(param_digest(g))}
                ckpt = None
                if rank == 0:
                    tmp = tempfile.mkdtemp(prefix="dcgan-ckpt-")
                    checkpoint.save(checkpoint.training_state(g, d, opt_g, opt_d, step, rngs, cfg.to_dict()), tmp)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, **extra}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:08d}")
                if logger:
                    logger.flush()  # the checkpoint is persisted: these steps will not be redone
            sums.zero_()
            window_steps, window_start = 0, time.perf_counter()

        if logger and ((t.sample_every and step % t.sample_every == 0) or is_last):
            gen = unwrap(g)
            gen.eval()
            with torch.no_grad():
                logger.log_grid(step, gen(z_grid))
            gen.train()
