"""The driver side of a training run: check inputs, start Ray, run the TorchTrainer, register G.

Runs wherever `jobs/train.py` runs: a laptop (starting a local Ray), or the head node under
`ray job submit` (`ray.address=auto`). Inputs are checked here, before any worker starts, so a
bad path or config fails in seconds with a message instead of inside a remote worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from dcgan_dist import champion, checkpoint, evaluation, networks, tracking, train_loop, validation_task
from dcgan_dist.config import Config, DataConfig
from dcgan_dist.data import shards, sources
from dcgan_dist.data.loader import ShardSet, resolve_shards
from dcgan_dist.errors import ConfigError, DataError, DcganError, RunBusy, Stopped, TrackingError
from dcgan_dist.ema import generator_from_state
from dcgan_dist.evaluation import UNSCORED
from dcgan_dist.metrics.inception import load_inception
from dcgan_dist.lease import RunLease
from dcgan_dist.stopping import stop_on_sigterm
from dcgan_dist.train_loop import train_loop_per_worker

log = logging.getLogger(__name__)

# Non-secret settings workers need to reach the same S3 / MLflow endpoints as the driver, and the NCCL settings
# (NCCL_SOCKET_IFNAME, NCCL_DEBUG, TORCH_NCCL_..., by prefix) a user sets for the collectives.
# Credentials are deliberately absent: workers get theirs from the standard AWS chain on their node.
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
              "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
WORKER_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "MLFLOW_SYSTEM_METRICS_")


def worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in WORKER_ENV or k.startswith(WORKER_ENV_PREFIXES)}


@dataclass
class TrainOutcome:
    run_name: str
    run_id: str
    step: int
    metrics: dict
    checkpoint_path: str
    model_version: str | None
    best_step: int = 0  # the step whose generator was registered (best by tune.metric, else the last)
    best_scores: dict | None = None
    champion: bool = False  # whether the registered version holds the champion alias now


def _is_remote(path: str) -> bool:
    return "://" in path


def prepare_inputs(cfg: Config) -> Config:
    """Absolute paths (workers run in other folders), default data built if missing, nc from the manifest."""
    if not _is_remote(cfg.data.url):
        if cfg.data.url == DataConfig.url and not Path(cfg.data.url).exists():
            log.info("building the embedded digits dataset in %s", cfg.data.url)
            shards.build_shards(sources.Digits(), cfg.data.url, resolution=32, encoding="png")
        cfg.data.url = str(Path(cfg.data.url).resolve()) if "{" not in cfg.data.url else cfg.data.url
    if not _is_remote(cfg.ray.storage_path):
        if cfg.ray.address:
            raise ConfigError(
                f"ray.storage_path {cfg.ray.storage_path!r} is a folder on this machine, but ray.address "
                f"{cfg.ray.address!r} (or RAY_ADDRESS, which `ray job submit` sets) is a cluster: checkpoints "
                "written on a node are lost with it. Use s3://bucket/prefix, or file:///path for a folder that "
                "every node mounts")
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).resolve())

    _SHARDS.pop(cfg.data.url, None)  # resolved afresh for each job: the data may have changed since the last one
    shard_set = shards_of(cfg)
    if shard_set.manifest:
        if shard_set.resolution != cfg.model.resolution:
            raise ConfigError(
                f"model.resolution is {cfg.model.resolution} but the shards in data.url are "
                f"{shard_set.resolution}x{shard_set.resolution}; set --set model.resolution={shard_set.resolution}"
            )
        if cfg.model.nc and cfg.model.nc != shard_set.channels:
            raise ConfigError(f"model.nc is {cfg.model.nc} but the shards have {shard_set.channels} channel(s)")
        cfg.model.nc = shard_set.channels
    elif not cfg.model.nc:
        raise DataError(f"data.url {cfg.data.url!r} has no manifest.json: set model.nc (1 or 3) explicitly")
    weights = cfg.metrics.inception_weights
    if weights and cfg.train.eval_every:
        if not _is_remote(weights):
            cfg.metrics.inception_weights = weights = str(Path(weights).expanduser().resolve())
        load_inception(weights, cfg.metrics.inception_sha256)  # a missing or wrong file fails here, not in a worker
    if not cfg.train.run_name:
        cfg.train.run_name = time.strftime("dcgan-%Y%m%d-%H%M%S")
    return cfg


_SHARDS: dict[str, ShardSet] = {}


def shards_of(cfg: Config) -> ShardSet:
    """`data.url` resolved once per job (listing an S3 prefix costs requests); workers get the result."""
    if cfg.data.url not in _SHARDS:
        _SHARDS[cfg.data.url] = resolve_shards(cfg.data.url)
    return _SHARDS[cfg.data.url]


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        ray.init()


def run_config(cfg: Config, name: str, storage_path: str | None = None, callbacks=()) -> ray.train.RunConfig:
    """Where and how a Train run keeps its checkpoints; with evaluation on, the best ones by score survive."""
    r = cfg.ray
    keep = dict(checkpoint_score_attribute="score", checkpoint_score_order="min") if cfg.train.eval_every else {}
    return ray.train.RunConfig(
        name=name,
        storage_path=storage_path or r.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=r.keep_checkpoints, **keep),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our rank 0 logs progress
        worker_runtime_env={"env_vars": worker_env()},
        callbacks=list(callbacks),
    )


def validation_config(cfg: Config, run_id: str, driver_ip: str) -> ray.train.ValidationConfig | None:
    """Evaluations scored by a Ray task beside training. Its function travels by name through Ray Train's
    controller, which imports the function's module only to hand it on: `validation_task`, which imports nothing."""
    if not cfg.train.eval_every:
        return None
    return ray.train.ValidationConfig(
        validation_task.score_checkpoint, ray_remote_kwargs={"num_cpus": cfg.metrics.eval_cpus},
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"config": cfg.to_dict(), "run_id": run_id, "driver_ip": driver_ip}))


def make_trainer(cfg: Config, run_id: str, run_cfg: ray.train.RunConfig,
                 init_from: ray.train.Checkpoint | None = None, loop=train_loop_per_worker,
                 score_in_loop: bool = False, stop_request=None, lease: dict | None = None) -> TorchTrainer:
    """`init_from`: a checkpoint a new run starts from (PBT); the run's own checkpoints, once any exist, win.
    `loop`: the per-worker function (tests wrap the real one in probes). Evaluations are scored by a Ray task beside
    training (Ray Train's checkpoint validation), or with `score_in_loop` by the ranks at the step (a search: its
    scheduler needs the number in the step's report). `stop_request`: the job's `stopping.StopRequest`; `lease`:
    the run lease the workers check before they write (RunLease.fence)."""
    r = cfg.ray
    # Ray Train reads this from the driver's environment and hands it to its controller. A node lost without
    # notice still counts as alive for a while; the first restart waits this long for it before trying fewer.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(r.start_timeout_s)
    driver_ip = ray.util.get_node_ip_address()  # where a loopback tracking URI points
    validation = None if score_in_loop else validation_config(cfg, run_id, driver_ip)
    return TorchTrainer(
        loop,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "init_from": init_from,
                           "shards": dataclasses.asdict(shards_of(cfg)), "driver_ip": driver_ip,
                           "score_in_loop": score_in_loop, "stop_request": stop_request, "lease": lease},
        validation_config=validation,
        scaling_config=ray.train.ScalingConfig(
            # MIN-MAX: Ray Train restarts on what is left (>= MIN) after a loss and grows back at a resize check
            num_workers=r.max_workers if r.worker_range[0] == r.max_workers else r.worker_range,
            elastic_resize_monitor_interval_s=r.resize_check_s,
            use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}
        ),
        run_config=run_cfg,
    )


def deliver_held(cfg: Config, run_id: str, result) -> None:
    """Metrics and tags rank 0 could not send before it ended travel in the last checkpoint: send them from here, or
    fail loudly (never a green job with steps missing in MLflow)."""
    if result.checkpoint and (sent := tracking.deliver_held(cfg.tracking.uri, run_id,
                                                            tracking.read_held(result.checkpoint))):
        log.warning("delivered %d metric values and tags that rank 0 could not send to MLflow", sent)


def sweep_unrecorded(result) -> list[str]:
    """Remove the run's checkpoint folders that Ray's record does not list (uploaded by a controller lost before it
    recorded them; a resume may have started from one, `train_loop.newest_readable`): Ray's retention never
    deletes what it does not know. Called at the run's successful end, when its newest checkpoint is recorded."""
    kept = {train_loop.checkpoint_name(c) for c, _ in result.best_checkpoints or []}
    kept.add(train_loop.checkpoint_name(result.checkpoint))
    folder, fs = train_loop.run_folder(result.checkpoint), result.checkpoint.filesystem
    swept = sorted(name for name in train_loop.checkpoint_names(result.checkpoint) if name not in kept)
    for name in swept:
        fs.delete_dir(f"{folder}/{name}")
        log.info("removed %s/%s: a checkpoint Ray's record of the run does not list", folder, name)
    return swept


def best_checkpoint(result) -> tuple[ray.train.Checkpoint, dict | None]:
    """The checkpoint with the lowest evaluated score (the metric) and its evaluation, else the latest one."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("score", UNSCORED) < UNSCORED]
    if not scored:
        return result.checkpoint, None
    best, metrics = min(scored, key=lambda cm: cm[1]["score"])
    return best, metrics.get("evaluation")


def register(cfg: Config, run_id: str, state: dict) -> tuple[str, bool]:
    """Register the checkpoint's generator with its scores and model card; the champion alias moves only if it is
    better."""
    scored = state.get("evaluation") or {}
    g = generator_from_state(state, cfg.model, cfg.metrics.seed)
    version = tracking.log_generator(cfg, run_id, g, state["step"], scored.get("values"), scored.get("protocols"))
    networks.log_networks(cfg.tracking.uri, run_id, cfg.tracking.model_name, version, g.state_dict(), state,
                          cfg.model, tracking.redact(cfg.data.url))
    shards = shards_of(cfg)
    data = {"url": cfg.data.url, "sha256": shards.fingerprint, "resolution": cfg.model.resolution,
            "images": sum(shards.counts.values()) if shards.manifest else None}
    tracking.write_card(cfg, run_id, version, g, state, data)
    return version, champion.promote_if_better(cfg, version, evaluation.measurer(cfg))


def user_error(e: BaseException) -> DcganError | None:
    """The error of ours (bad data, say) that made Train's worker group fail, as one line: what the user can fix,
    instead of Ray's traceback around it."""
    for failure in getattr(e, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)  # a RayTaskError wraps the worker's exception
        if isinstance(cause, DcganError):
            return cause.one_line()
    return None


def end_run_quietly(cfg: Config, run_id: str, status: str) -> None:
    """End the run on a failure path without hiding the failure: an MLflow error here is only logged."""
    try:
        tracking.end_run(cfg, run_id, status)
    except Exception as e:  # noqa: BLE001 - the error being raised matters more
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)


def train(cfg: Config) -> TrainOutcome:
    """Run (or resume) the training run `cfg.train.run_name` to `cfg.train.steps` steps; one job per run name at a
    time (a second one is refused while the first holds the run's lease)."""
    cfg = prepare_inputs(cfg)
    with RunLease(cfg.ray.storage_path, cfg.train.run_name, ttl_s=cfg.train.lease_ttl_s) as lease:
        return _train_holding_the_lease(cfg, lease)


def _train_holding_the_lease(cfg: Config, lease: RunLease) -> TrainOutcome:
    run_name = cfg.train.run_name
    init_ray(cfg)
    lease.check_every_node_sees_it()  # before the MLflow run: a refused job leaves no trace there
    run_id, resumed = tracking.start_run(cfg, run_name)
    log.info("%s MLflow run %s (%s), run name %r", "resuming" if resumed else "started", run_id,
             tracking.redact(cfg.tracking.uri), run_name)
    tracking.log_dataset(cfg, run_id, shards_of(cfg))
    stop = {"fatal": None}
    try:
        with stop_on_sigterm(cfg.train.stop_timeout_s) as stop:
            trainer = make_trainer(cfg, run_id, run_config(cfg, run_name), stop_request=stop["request"],
                                   lease=lease.fence())
            result = trainer.fit()
    except BaseException as e:
        end_run_quietly(cfg, run_id, "KILLED" if isinstance(e, (Stopped, KeyboardInterrupt)) else "FAILED")
        ours = stop["fatal"] or user_error(e)
        if ours is not None:
            raise ours from None
        raise
    if stop["fatal"]:  # met by a worker; the restarted group left at once
        if not isinstance(stop["fatal"], RunBusy):  # else the MLflow run is the lease's new holder's now
            end_run_quietly(cfg, run_id, "FAILED")
        raise stop["fatal"]
    if stop["requested"]:
        deliver_held(cfg, run_id, result)
        end_run_quietly(cfg, run_id, "KILLED")
        where = result.checkpoint.path if result.checkpoint else "(none)"
        raise Stopped(f"run {run_name} stopped at step {(result.metrics or {}).get('step')}, its checkpoint in "
                      f"{where}; the same command resumes it")
    if result.checkpoint is None:
        tracking.end_run(cfg, run_id, "FAILED")
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    reached = int((result.metrics or {}).get("step", 0))
    if reached < cfg.train.steps:  # never register and report "finished" a run that left early unasked
        tracking.end_run(cfg, run_id, "FAILED")
        raise RuntimeError(f"run {run_name} left training at step {reached} of {cfg.train.steps} without a stop "
                           f"request; its checkpoint is in {result.checkpoint.path}: the same command resumes it")
    log.info("training ended at step %s", (result.metrics or {}).get("step"))
    deliver_held(cfg, run_id, result)
    sweep_unrecorded(result)
    best, scored = best_checkpoint(result)
    with best.as_directory() as ckpt_dir:
        state = checkpoint.load(ckpt_dir)
    if scored:  # scored beside training: the numbers are Ray's record of the checkpoint, not in its file
        state["evaluation"] = scored
    version, is_champion = None, False
    if cfg.tracking.register:
        try:
            version, is_champion = register(cfg, run_id, state)
        except Exception as e:
            log.warning("registering the generator of run %s failed", run_name, exc_info=True)  # the whole story
            end_run_quietly(cfg, run_id, "FAILED")
            raise TrackingError(f"run {run_name} trained to step {state['step']} (checkpoints in "
                                f"{result.checkpoint.path}), but registering its generator failed: {e}; run the same "
                                f"command again once MLflow is reachable to register it") from None
    tracking.end_run(cfg, run_id)
    return TrainOutcome(run_name, run_id, int((result.metrics or {}).get("step", state["step"])),
                        dict(result.metrics or {}), result.checkpoint.path, version, state["step"],
                        (state.get("evaluation") or {}).get("values") or {}, is_champion)
