"""The per-worker Ray Train function: config, data, GAN step, checkpoints and reports, wired together.

Read top to bottom: [1] setup (the step, a restored checkpoint, DDP, data, tracking), [2] the loop, and the
parts it calls at its log/checkpoint steps: the metric window, evaluation, saving a checkpoint.

Every rank runs the same number of steps and calls `ray.train.report` at the same steps (Ray Train V2
requires it); only rank 0 attaches checkpoints and talks to MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from dcgan_dist import checkpoint, tracking
from dcgan_dist.config import Config, from_dict
from dcgan_dist.data.loader import ShardSet, make_batches, to_model_input
from dcgan_dist.data.streams import StreamBatches
from dcgan_dist.ddp_hooks import AllreduceTimer
from dcgan_dist.ema import GeneratorEMA, shown_generator
from dcgan_dist.errors import CheckpointError, DataError, RunBusy
from dcgan_dist.evaluation import UNSCORED
from dcgan_dist.lease import LeaseWatch
from dcgan_dist.malloc_tuning import cap_malloc_arenas, release_free_memory
from dcgan_dist.metrics.evaluator import Evaluator
from dcgan_dist.models import latents
from dcgan_dist.step import GANStep
from dcgan_dist.stopping import UNFIXABLE, fatal_error, report_fatal, stop_requested
from dcgan_dist.torch_utils import gather, to_layout, unwrap

log = logging.getLogger(__name__)

METRICS = ("loss_d", "loss_g", "d_real", "d_fake")
GRID_SAMPLES = 64


def param_digest(module: nn.Module) -> str:
    """sha256 of all parameters: equal on every rank iff DDP kept the replicas identical."""
    h = hashlib.sha256()
    for p in unwrap(module).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


class MetricWindow:
    """The step metrics since the last log step, summed on device (no sync per step), then averaged over steps and
    ranks in one collective together with the data counters and the allreduce timings."""

    def __init__(self, device, world: int, timer: AllreduceTimer | None):
        self.device, self.world, self.timer = device, world, timer
        self.sums = torch.zeros(len(METRICS), device=device)
        self.steps, self.started = 0, time.perf_counter()

    def add(self, out: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([out[k] for k in METRICS])
        self.steps += 1
        if self.timer:
            self.timer.end_step()

    def collect(self, batches, global_batch: int, stop: float = 0) -> dict[str, float]:
        """Means over the window and the ranks (every rank must call this at the same step); starts a new window.
        `stop` (rank 0's: 1 stop with a checkpoint, 2 leave without a write) comes back to every rank as
        metrics["stop"]."""
        comm = self.timer.collect() if self.timer else {}
        counts = torch.tensor([batches.skipped, batches.retries, float(stop)], dtype=self.sums.dtype,
                              device=self.device)
        per_rank = torch.tensor(list(comm.values()), dtype=self.sums.dtype, device=self.device) / self.world
        stats = torch.cat([self.sums / (self.steps * self.world), counts, per_rank])
        if self.world > 1:
            dist.all_reduce(stats)  # one collective: mean metrics and allreduce times, total counts
        metrics = dict(zip(METRICS + ("data_skipped", "data_retries", "stop") + tuple(comm), stats.tolist()))
        metrics["images_per_s"] = self.steps * global_batch / (time.perf_counter() - self.started)
        self.sums.zero_()
        self.steps, self.started = 0, time.perf_counter()
        return metrics


STAGING = "dcgan-ckpt-"  # staging folders are named dcgan-ckpt-<pid>-<random>


def _remove_stale_staging() -> None:
    """A worker SIGKILLed while staging (Ray stopping a trial, a restart, a crash) cannot clean up after itself:
    whoever stages next on the node removes the folders of processes that no longer exist."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING}*-*"):
        pid = folder.name[len(STAGING):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _wait_for_upload(step: int) -> None:
    """One checkpoint staged at a time: the previous one's folder goes once Ray has uploaded it. Without this, a
    storage slower than `train.checkpoint_every` steps would pile staged checkpoints up in the node's /tmp."""
    t0, warned = time.monotonic(), 0.0
    while any(Path(tempfile.gettempdir()).glob(f"{STAGING}{os.getpid()}-*")):
        waited = time.monotonic() - t0
        if waited - warned >= 60:
            warned = waited
            log.warning("rank 0: the checkpoint of step %d waits for the previous upload (%.0f s so far)", step,
                        waited)
        time.sleep(0.02)


def run_lost(run_name: str, why: str, step: int) -> RunBusy:
    """What a job that lost its run to another says, wherever it noticed."""
    return RunBusy(f"run {run_name!r}: {why}; this job stopped writing at step {step}")


def upload_in_background(mode: str, device: torch.device) -> bool:
    """`train.checkpoint_upload`: auto uploads beside training on GPUs (an upload of seconds is hundreds of steps
    there) and in the step on CPUs, where beside training measured no faster (docs/performance.md)."""
    return {"auto": device.type == "cuda", "async": True, "sync": False}[mode]


def _fenced_upload(watch: LeaseWatch, request, run_name: str, step: int):
    """Ray's upload thread writes a checkpoint some time after rank 0 staged it (behind the upload before it): the
    run's lease is read again right before the write, so a job that has lost its run writes nothing more. The
    error is recorded with the job first, so the group Ray restarts for it leaves at once."""
    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        if why := watch.lost(before_a_write=True):
            error = run_lost(run_name, why, step)
            report_fatal(request, error)
            raise error
        return ray.train.get_context().get_storage().persist_current_checkpoint(ckpt, dir_name)
    return upload


def save_checkpoint(step_fn: GANStep, ema: GeneratorEMA | None, batches, cfg: Config, step: int, start: int,
                    rank: int, metrics: dict, evaluation: dict | None, logger: tracking.RunLogger | None,
                    data: dict, upload_async: bool, score: bool = False, wait: bool = False,
                    watch: LeaseWatch | None = None, request=None) -> None:
    """Report this step's metrics to Ray with rank 0's checkpoint; `data`: what it was trained on
    (`data_identity`); `score`: Ray's validation task scores it beside training (`evaluation.score_checkpoint`).
    `upload_async` (`upload_in_background`): Ray uploads it in its own thread while the ranks train on (at GPU speed
    an upload of a few seconds is hundreds of steps), one upload at a time and in order; either way Ray removes the
    staged folder once it is in storage, and the next checkpoint waits for that, so nothing accumulates in the
    node's /tmp. A training function that returns waits for the last upload; `wait`: this one is waited for here
    (the node is about to go: a preemption notice). `watch`, `request`: rank 0's lease watch and the job's stop
    request (`_fenced_upload`)."""
    extra = {"step": step, "start_step": start,
             "score": ((evaluation or {}).get("values") or {}).get(cfg.tune.metric, UNSCORED)}
    # One collective: every rank's RNG state and, with data.streams, the positions of the streams it hosts.
    rngs, positions = zip(*gather((checkpoint.rng_state(step_fn.device), getattr(batches, "positions", {}))))
    if cfg.train.check_replicas:  # every rank hashes G: equal digests prove DDP kept the replicas identical
        extra["g_digests"] = gather(param_digest(step_fn.g))
    _remove_stale_staging()
    ckpt = None
    if rank == 0:
        if upload_async:  # in the step, Ray removed the last staged folder before report returned
            _wait_for_upload(step)
        staging = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-")
        try:
            state = checkpoint.training_state(step_fn, step, list(rngs), cfg.to_dict(), ema.module if ema else None,
                                              evaluation)
            if cfg.data.streams:
                merged = {s: pos for part in positions for s, pos in part.items()}
                state["data_positions"] = [merged[s] for s in range(cfg.data.streams)]
            state["data"] = data
            checkpoint.save(state, staging)
            if logger:  # what MLflow does not have yet survives a rank 0 that dies holding it
                tracking.write_held(logger.held(), staging)
            check_room(cfg.ray.storage_path, staging, step)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        ckpt = ray.train.Checkpoint.from_directory(staging)
    # Ray Train's report waits for its controller to poll, so it is called only with checkpoints (in ASYNC mode that
    # wait is in the upload thread too); per-step metrics go to MLflow directly.
    mode = ray.train.CheckpointUploadMode.ASYNC if upload_async and not wait else ray.train.CheckpointUploadMode.SYNC
    fenced = mode == ray.train.CheckpointUploadMode.ASYNC and watch and watch.fence  # SYNC: checked just before
    upload = _fenced_upload(watch, request, cfg.train.run_name, step) if fenced else None
    ray.train.report({**metrics, **extra}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:08d}",
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=upload, validation=score and ckpt is not None)
    release_free_memory()  # the state's serialization (and in the step, its upload) freed hundreds of MiB


ROOM_MARGIN = 1 << 20  # for Ray's own small files beside the checkpoint


def check_room(storage_path: str, staging: str, step: int) -> None:
    """A storage folder on a disk without room for this checkpoint: one line naming it and the space, before
    Ray's copy fails halfway with an error that names neither (the last checkpoint stays whole)."""
    if "://" in storage_path.removeprefix("file://"):
        return  # S3 and the like: no disk of ours to measure
    folder = Path(storage_path.removeprefix("file://"))
    while not folder.exists():
        folder = folder.parent
    need = sum(f.stat().st_size for f in Path(staging).rglob("*") if f.is_file())
    free = shutil.disk_usage(folder).free
    if free < need + ROOM_MARGIN:
        raise CheckpointError(f"ray.storage_path {storage_path}: {free / 2**20:.1f} MiB free, the checkpoint of "
                              f"step {step} needs {(need + ROOM_MARGIN) / 2**20:.1f} MiB: free space there or set "
                              "ray.storage_path elsewhere (the last checkpoint is whole; the same command resumes)")


CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8}")


def run_folder(ckpt: ray.train.Checkpoint) -> str:
    return ckpt.path.rstrip("/").rsplit("/", 1)[0]


def checkpoint_name(ckpt: ray.train.Checkpoint) -> str:
    return ckpt.path.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_names(ckpt: ray.train.Checkpoint) -> list[str]:
    """Every checkpoint folder in the run folder of `ckpt`, as storage lists them (Ray's record aside), newest first."""
    return sorted((info.base_name for info in ckpt.filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder(ckpt)))
                   if info.type == pyarrow.fs.FileType.Directory and CHECKPOINT_NAME.fullmatch(info.base_name)),
                  reverse=True)


def newest_readable(own: ray.train.Checkpoint) -> tuple[str, list[str]]:
    """The name of the newest checkpoint of the run that reads back whole, and the newer ones skipped (with why).
    The storage's listing decides, not Ray's record: Ray's latest can be unreadable (a truncated upload, a full
    disk), and a newer folder can be whole but unrecorded (its upload finished, the controller was lost before it
    recorded it: resuming from Ray's latest would redo those steps). The run's end removes folders Ray's retention
    does not know (`trainer.sweep_unrecorded`)."""
    folder, fs, latest = run_folder(own), own.filesystem, checkpoint_name(own)
    skipped = []
    for name in checkpoint_names(own):
        try:
            with ray.train.Checkpoint(path=f"{folder}/{name}", filesystem=fs).as_directory() as ckpt_dir:
                checkpoint.load(ckpt_dir)  # the whole file, as the resume will read it
        except (CheckpointError, OSError) as e:
            skipped.append(f"{name}: {e}")
            log.warning("skipping checkpoint %s/%s: %s", folder, name, e)
            continue
        if name > latest:
            log.warning("resuming from %s/%s, newer than Ray's record of the run (%s): its upload finished, its "
                        "record did not", folder, name, latest)
        return name, skipped
    raise CheckpointError(f"no checkpoint of the run in {folder} can be read: " + "; ".join(skipped))


def data_identity(shards: ShardSet) -> dict:
    """What a checkpoint records of the data it was trained on: the manifest's digest and the shard list."""
    return {"fingerprint": shards.fingerprint, "shards": [u.rsplit("/", 1)[-1] for u in shards.urls]}


def check_same_data(resumed: dict, now: dict, cfg: Config) -> dict:
    """The checkpoint's state, refused when it was trained on other data (the stream positions it holds would
    point at other samples: some seen twice, some never) unless data.allow_changed; then without the positions."""
    was = resumed.get("data")
    if was is None or was["fingerprint"] == now["fingerprint"]:
        return resumed
    change = (f"the checkpoint of step {resumed['step']} was trained on data {was['fingerprint'][:12]} "
              f"({len(was['shards'])} shards), data.url {cfg.data.url} is now {now['fingerprint'][:12]} "
              f"({len(now['shards'])} shards)")
    if not cfg.data.allow_changed:
        raise DataError(f"{change}: train on the data the run started with, or resume on this data with "
                        "--set data.allow_changed=true")
    log.warning("%s: resuming on it (data.allow_changed); the streams restart from the step's seeded positions",
                change)
    return {k: v for k, v in resumed.items() if k != "data_positions"}


def make_data(cfg: Config, shards: ShardSet, rank: int, world: int, start: int, resumed: dict | None):
    """This rank's batches: its part of a global batch of train.batch_size x the most workers, so an elastic group
    of any size takes the same optimisation step. With data.streams the images of each step are also the same set
    at any size; without, each rank draws at random and the first (global batch mod world) ranks take one more."""
    m, t, global_batch = cfg.model, cfg.train, cfg.global_batch
    if cfg.data.streams:
        return StreamBatches(shards, channels=m.nc, resolution=m.resolution, global_batch=global_batch, seed=t.seed,
                             rank=rank, world=world, start_step=start,
                             positions=(resumed or {}).get("data_positions"), limits=cfg.data)
    share = global_batch // world + (rank < global_batch % world)
    return make_batches(shards, channels=m.nc, resolution=m.resolution, batch_size=share, seed=t.seed, rank=rank,
                        start_step=start, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                        limits=cfg.data)


def train_loop_per_worker(loop_config: dict) -> None:
    """The loop, unless a worker of this job already met an error no restart can fix (then the group Ray Train
    restarted leaves at once, whatever ray.max_failures says, and the driver reports the error)."""
    request = loop_config.get("stop_request")
    if fatal_error(request) is not None:
        return
    try:
        run_loop(loop_config)
    except UNFIXABLE as e:
        report_fatal(request, e)
        raise


def run_loop(loop_config: dict) -> None:
    # [1] setup: who we are, the step, where it resumes, DDP, data, tracking
    _log_to_console()
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log.info("rank %d of %d on node %s, pid %d, malloc arenas %s", rank, world, ray.util.get_node_ip_address(),
             os.getpid(), cap_malloc_arenas())  # before the loop's threads start: the uploads', the streams'
    device = ray.train.torch.get_device()
    m, t = cfg.model, cfg.train

    step_fn = GANStep.from_config(cfg, device, sync_batchnorm=t.sync_batchnorm and world > 1)
    upload_async = upload_in_background(t.checkpoint_upload, device)
    ema = GeneratorEMA(step_fn.g, t.ema_decay) if t.ema_decay > 0 else None
    start, resumed, skipped = 1, None, []
    own = ray.train.get_checkpoint()
    if own:  # rank 0 picks, every rank loads the same one
        name, skipped = newest_readable(own) if rank == 0 else (None, [])
        own = ray.train.Checkpoint(path=f"{run_folder(own)}/{gather(name)[0]}", filesystem=own.filesystem)
    source = own or loop_config.get("init_from")  # the run's own, else a PBT donor's
    if source:
        with source.as_directory() as ckpt_dir:
            resumed = checkpoint.resume(ckpt_dir, step_fn, ema.module if ema else None, t)
        start = resumed["step"] + 1
        log.info("rank %d: resumed from the checkpoint of step %d", rank, resumed["step"])

    # D runs twice per step: per-rank batch-norm buffers must not be broadcast mid-step.
    # (forward_sync_buffers=False: no broadcast in forward, unlike DDP's default; it still syncs at construction,
    # which changes nothing here: every rank starts from the same seeded or restored buffers.)
    ddp = {"forward_sync_buffers": False, "bucket_cap_mb": cfg.ray.ddp_bucket_mb}
    step_fn.wrap(lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp))
    timer = None
    if world > 1:  # DDP-wrapped: time every allreduce (and compress the gradients when asked)
        timer = AllreduceTimer(cfg.ray.grad_compression)
        for model in (step_fn.g, step_fn.d):
            timer.register(model)
    if resumed and len(resumed["rng"]) == world:
        checkpoint.set_rng_state(resumed["rng"][rank], device)
    else:
        torch.manual_seed(t.seed * 1000 + rank * 7919 + start)

    shards = ShardSet(**loop_config["shards"])  # resolved once, by the driver
    data = data_identity(shards)  # what every checkpoint records of it
    if resumed:
        resumed = check_same_data(resumed, data, cfg)
    batches = make_data(cfg, shards, rank, world, start, resumed)
    logger, system = None, None
    node = ray.util.get_node_ip_address()
    uri = tracking.as_seen_from(cfg.tracking.uri, loop_config["driver_ip"], node)
    if cfg.tracking.system_metrics and ctx.get_local_rank() == 0:  # one per node
        system = tracking.SystemWatch(uri, loop_config["mlflow_run_id"], node)
    if rank == 0:  # the only rank that logs training to MLflow, from whichever node it landed on
        logger = tracking.RunLogger(uri, loop_config["mlflow_run_id"], skip_logged=True)
        if own:  # a predecessor's undelivered metrics (a donor's belong to another run)
            logger.take_over(tracking.read_held(own))
    if logger:
        logger.set_tags({"precision": step_fn.precision, "device": str(device)})  # what `auto` became, where
        if skipped:
            logger.set_tags({f"dcgan.resume.skipped.step_{start:08d}": "; ".join(skipped)[:5000]})
        if resumed and len(resumed["rng"]) != world:  # elastic: the group shrank or grew (one RNG state a rank)
            log.info("resized: %d -> %d workers at step %d", len(resumed["rng"]), world, start)
            logger.set_tags({f"dcgan.resize.step_{start:08d}": f"{len(resumed['rng'])} -> {world} workers"})
    evaluator = None
    if t.eval_every and loop_config.get("score_in_loop"):  # a search: the real side lives on rank 0; all generate
        evaluator = Evaluator(cfg.metrics, shards, channels=m.nc, resolution=m.resolution, device=device,
                              load_real=rank == 0)
    z_grid = latents(GRID_SAMPLES, m.nz, t.seed).to(device)  # the same grid noise all run long: comparable grids
    window = MetricWindow(device, world, timer)

    key_log = None
    if t.key_log:  # line-buffered: what a killed rank took is on disk
        Path(t.key_log).mkdir(parents=True, exist_ok=True)
        key_log = open(Path(t.key_log) / f"rank{rank}-of-{world}-pid{os.getpid()}.txt", "a", buffering=1)
    noticed = None  # the preemption notice already answered with a checkpoint
    stopping = False
    watch = LeaseWatch(loop_config.get("lease")) if rank == 0 else None  # is the run still this job's?

    # [2] the loop
    for step in range(start, t.steps + 1):
        (real,) = to_layout(t.channels_last, to_model_input(next(batches), device))
        if key_log:
            key_log.write("".join(f"{step} {key}\n" for key in batches.keys))
        out = step_fn(real, weight=real.shape[0] * world / cfg.global_batch)
        if ema:
            ema.update(step_fn.g)
        window.add(out)

        is_last = step == t.steps
        eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or is_last)
        log_now = step % t.log_every == 0
        save_now = step % t.checkpoint_every == 0 or is_last or eval_now
        sample_now = bool(logger) and ((t.sample_every and step % t.sample_every == 0) or is_last)
        shown = None  # the eval-mode generator, made once per step for the evaluation and the grid
        if log_now or save_now:
            # One collective and one device-to-host read per log step: the metrics and rank 0's answer to "was a
            # stop requested?" travel together, so every rank agrees on the step to stop at.
            asked = rank == 0 and log_now and stop_requested(loop_config.get("stop_request"))
            fenced = watch.lost(before_a_write=save_now) if watch else None
            metrics, evaluation = window.collect(batches, cfg.global_batch, stop=2 if fenced else asked), None
            flag = metrics.pop("stop")
            if flag >= 2:  # the run is no longer this job's: not one more checkpoint, metric or grid
                if rank == 0:
                    log.error("rank 0: %s; leaving at step %d without a checkpoint", fenced, step)
                    report_fatal(loop_config.get("stop_request"),
                                 run_lost(t.run_name, fenced, step))
                if logger:
                    logger.abandon()
                    logger = None
                break
            stopping = flag > 0
            # A node being drained for preemption (how a spot instance's notice reaches Ray). Ray makes this call a
            # barrier of all ranks, so it is asked at log steps only. Keep what was trained now; Ray Train restarts
            # the group without that node when it goes.
            notice = ray.train.get_preemption_info() if log_now else None
            preempted = notice is not None and notice != noticed
            if preempted:
                noticed = notice
                log.warning("rank %d: node(s) %s to be preempted (deadline %s ms): checkpoint at step %d", rank,
                            ", ".join(n[:8] for n in notice.preempted_node_ids), notice.deadline_ms, step)
            save_now = save_now or stopping or preempted
            metrics["num_workers"] = world
            if eval_now and evaluator:
                t0 = time.perf_counter()
                shown = shown_generator(step_fn.g, ema.module if ema else None, m.nz, cfg.metrics.seed)
                evaluation = evaluator.evaluate(shown, m.nz, device, rank, world)
                metrics.update(evaluation["values"], eval_s=time.perf_counter() - t0)
                if logger:
                    logger.set_protocols(evaluation["protocols"])
            if logger:
                scores = (evaluation or {}).get("values", {})
                log.info("step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  %.0f img/s%s%s", step,
                         t.steps, metrics["loss_d"], metrics["loss_g"], metrics["d_real"], metrics["d_fake"],
                         metrics["images_per_s"], "".join(f"  {k} {v:.3f}" for k, v in scores.items() if "_" not in k),
                         "  [checkpoint]" if save_now else "")
                logger.add(step, metrics)
                # Sent now, not at the next checkpoint: a step redone after a resume is skipped on the way out,
                # since the run already has it (RunLogger reads how far the run got when it starts).
                logger.flush()
            if save_now:
                save_checkpoint(step_fn, ema, batches, cfg, step, start, rank, metrics, evaluation, logger,
                                data, upload_async, score=eval_now and not evaluator, wait=preempted, watch=watch,
                                request=loop_config.get("stop_request"))
        if sample_now:
            if shown is None:
                shown = shown_generator(step_fn.g, ema.module if ema else None, m.nz, cfg.metrics.seed)
            with torch.no_grad():
                logger.log_grid(step, shown(z_grid))
        if shown is not None:
            unwrap(step_fn.g).train()
        if stopping:
            log.info("rank %d: stop requested; checkpoint of step %d saved, leaving", rank, step)
            break
    if key_log:
        key_log.close()
    if logger:
        logger.close()  # waits (bounded) for metrics held while MLflow was unreachable
    if system:
        system.finish()
