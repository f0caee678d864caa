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
from dcgan_dist.ddp_hooks import AllreduceTimer
from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input
from dcgan_dist.ema import GeneratorEMA, recalibrate_bn
from dcgan_dist.metrics.registry import Evaluator, eval_noise, generate
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import (GANStep, apply_hparams, compile_models, make_optimizers, resolve_precision, to_layout,
                             unwrap)
from dcgan_dist.tracking import RunLogger

log = logging.getLogger(__name__)

METRICS = ("loss_d", "loss_g", "d_real", "d_fake")
GRID_SAMPLES = 64
# Ray ranks checkpoints by "score" (lower is better); a checkpoint without an evaluation ranks last.
# A finite number, not NaN or inf: Ray's saved run state turns those into null and then fails on resume.
UNSCORED = 1e30


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


def evaluate(evaluator: Evaluator, generator: nn.Module, cfg: Config, rank: int, world: int, device) -> dict:
    """Every rank generates its share of the fixed evaluation noise; rank 0 scores; all ranks get the result.

    Returns {"values": {"swd": ..., ...}, "protocols": {"swd": key, ...}} on every rank.
    """
    mc = cfg.metrics
    z = eval_noise(cfg.model.nz, mc.num_images, mc.seed, rank, world)
    payload = evaluator.payload(generate(generator, z, mc.batch_size, device))
    if world == 1:
        payloads = [payload]
    else:
        payloads = [None] * world if rank == 0 else None
        dist.gather_object(payload, payloads, dst=0)
    result = [None]
    if rank == 0:
        values, protocols = evaluator.score(payloads, mc.num_images)
        result = [{"values": values, "protocols": {k: p.key for k, p in protocols.items()}}]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def eval_generator(g: nn.Module, ema: GeneratorEMA | None, cfg: Config) -> nn.Module:
    """The network that is evaluated and exported: the EMA (with recalibrated batch norm) or G itself."""
    if ema is None:
        return unwrap(g).eval()
    return recalibrate_bn(ema.module, cfg.model.nz, seed=cfg.metrics.seed)


def _log_to_console() -> None:
    """Our progress lines at INFO on the worker's console, without raising Ray's own loggers to INFO."""
    pkg = logging.getLogger("dcgan_dist")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False
    try:  # Ray Train 2.60 logs every report of every rank, with all metrics, at INFO (a logger named by file)
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    _log_to_console()
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
    compile_models(t.compile, g, d)
    opt_g, opt_d = make_optimizers(g, d, t)
    ema = GeneratorEMA(g, t.ema_decay) if t.ema_decay > 0 else None

    start, restored = 1, ray.train.get_checkpoint()
    if restored is None:
        restored = loop_config.get("init_from")
    if restored:
        with restored.as_directory() as ckpt_dir:
            state = checkpoint.load(ckpt_dir, map_location=device)
        checkpoint.restore(state, g, d, opt_g, opt_d, ema.module if ema else None)
        apply_hparams(opt_g, opt_d, t)
        start = state["step"] + 1
        log.info("rank %d: resumed from the checkpoint of step %d", rank, state["step"])
    # D runs twice per step: per-rank batch-norm buffers must not be broadcast mid-step.
    ddp = {"broadcast_buffers": False, "bucket_cap_mb": cfg.ray.ddp_bucket_mb}
    g = ray.train.torch.prepare_model(g, parallel_strategy_kwargs=ddp)
    d = ray.train.torch.prepare_model(d, parallel_strategy_kwargs=ddp)
    timer = None
    if world > 1:  # DDP-wrapped: time every allreduce (and compress the gradients when asked)
        timer = AllreduceTimer(cfg.ray.grad_compression)
        for model in (g, d):
            timer.register(model)
    if restored and len(state["rng"]) == world:
        checkpoint.set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(t.seed * 1000 + rank * 7919 + start)

    batches = make_batches(resolve_shards(cfg.data.url), channels=m.nc, resolution=m.resolution,
                           batch_size=t.batch_size, seed=t.seed, rank=rank, start_step=start,
                           num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer)
    precision = resolve_precision(t.precision, device)
    step_fn = GANStep(g, d, opt_g, opt_d, m.nz, precision)
    if restored:
        checkpoint.restore_scaler(state, step_fn.scaler)
    logger = RunLogger(cfg.tracking.uri, loop_config["mlflow_run_id"], skip_logged=True) if rank == 0 else None
    if logger:
        logger.set_tags({"precision": precision, "device": str(device)})  # what `auto` became, where it ran
    evaluator = None
    if t.eval_every:  # the real side (read or cached) lives on rank 0; other ranks only generate
        shard_set = resolve_shards(cfg.data.url)
        evaluator = Evaluator(cfg.metrics, shard_set, channels=m.nc, resolution=m.resolution, device=device,
                              load_real=rank == 0)
    z_grid = fixed_noise(cfg).to(device)

    sums = torch.zeros(len(METRICS), device=device)
    window_steps, window_start = 0, time.perf_counter()
    for step in range(start, t.steps + 1):
        (real,) = to_layout(t.channels_last, to_model_input(next(batches), device))
        out = step_fn(real)
        if ema:
            ema.update(g)
        if timer:
            timer.end_step()
        sums += torch.stack([out[k] for k in METRICS])
        window_steps += 1

        is_last = step == t.steps
        eval_now = bool(evaluator) and (step % t.eval_every == 0 or is_last)
        save_now = step % t.checkpoint_every == 0 or is_last or eval_now
        sample_now = bool(logger) and ((t.sample_every and step % t.sample_every == 0) or is_last)
        shown = None  # the eval-mode generator, made once per step for the evaluation and the grid
        if step % t.log_every == 0 or save_now:
            comm = timer.collect() if timer else {}
            counts = torch.tensor([batches.skipped, batches.retries], dtype=sums.dtype, device=device)
            per_rank = torch.tensor(list(comm.values()), dtype=sums.dtype, device=device) / world
            stats = torch.cat([sums / (window_steps * world), counts, per_rank])
            if world > 1:
                dist.all_reduce(stats)  # one collective: mean metrics and allreduce times, total counts
            elapsed = time.perf_counter() - window_start
            metrics = dict(zip(METRICS + ("data_skipped", "data_retries") + tuple(comm), stats.tolist()))
            metrics["images_per_s"] = window_steps * t.batch_size * world / elapsed
            scores, result = {}, None
            if eval_now:
                t0 = time.perf_counter()
                shown = eval_generator(g, ema, cfg)
                result = evaluate(evaluator, shown, cfg, rank, world, device)
                scores = result["values"]
                metrics.update(scores, eval_s=time.perf_counter() - t0)
                if logger:
                    logger.set_protocols(result["protocols"])
            if logger:
                log.info("step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  %.0f img/s%s%s", step,
                         t.steps, metrics["loss_d"], metrics["loss_g"], metrics["d_real"], metrics["d_fake"],
                         metrics["images_per_s"], "".join(f"  {k} {v:.3f}" for k, v in scores.items() if "_" not in k),
                         "  [checkpoint]" if save_now else "")
                logger.add(step, metrics)
            if save_now:
                # Ray Train's report blocks until its controller polls (about every 2 s), so it is
                # called only with checkpoints; per-step metrics go to MLflow directly.
                rngs = gather(checkpoint.rng_state())
                extra = {"step": step, "start_step": start, "g_digests": gather(param_digest(g)),
                         "score": scores.get(cfg.tune.metric, UNSCORED)}
                ckpt = None
                if rank == 0:
                    tmp = tempfile.mkdtemp(prefix="dcgan-ckpt-")
                    state = checkpoint.training_state(g, d, opt_g, opt_d, step, rngs, cfg.to_dict(),
                                                      ema.module if ema else None, result, step_fn.scaler)
                    checkpoint.save(state, tmp)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, **extra}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:08d}")
                if logger:
                    logger.flush()  # the checkpoint is persisted: these steps will not be redone
            sums.zero_()
            window_steps, window_start = 0, time.perf_counter()

        if sample_now:
            shown = eval_generator(g, ema, cfg) if shown is None else shown
            with torch.no_grad():
                logger.log_grid(step, shown(z_grid))
        if shown is not None:
            unwrap(g).train()
    if logger:
        logger.close()  # waits (bounded) for metrics held while MLflow was unreachable
