"""Evaluate a generator outside training: a registered MLflow model version, or G from a checkpoint.

One path serves `jobs/evaluate.py` and the champion rule (which re-measures the current champion
when its recorded number was taken with another protocol). The fake images come from the same
fixed noise as evaluations during training, so the numbers are directly comparable.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from dcgan_dist import checkpoint as checkpoints
from dcgan_dist import tracking
from dcgan_dist.config import Config, from_dict, set_key
from dcgan_dist.ema import generator_from_state
from dcgan_dist.data.loader import resolve_shards
from dcgan_dist.errors import ConfigError, TrackingError
from dcgan_dist.malloc_tuning import cap_malloc_arenas, release_free_memory
from dcgan_dist.metrics.evaluator import Evaluator, Protocol, eval_noise, fake_images

log = logging.getLogger(__name__)


def make_evaluator(cfg: Config, extractor=None) -> Evaluator:
    """An evaluator for `cfg.data.url` at the config's resolution (the real side comes from the cache when it can)."""
    shards = resolve_shards(cfg.data.url)
    channels = cfg.model.nc or shards.channels
    if channels is None:
        raise ConfigError(f"data.url {cfg.data.url!r} has no manifest: set model.nc")
    if shards.resolution and shards.resolution != cfg.model.resolution:
        raise ConfigError(f"model.resolution is {cfg.model.resolution} but data.url holds "
                          f"{shards.resolution}x{shards.resolution} images")
    return Evaluator(cfg.metrics, shards, channels=channels, resolution=cfg.model.resolution, extractor=extractor)


def score_generator(cfg: Config, generator, evaluator: Evaluator, device="cpu") -> tuple[dict[str, float], dict[str, Protocol]]:
    """Generate `metrics.num_images` images from the fixed evaluation noise and score them."""
    z = eval_noise(cfg.model.nz, cfg.metrics.num_images, cfg.metrics.seed)
    fake = fake_images(generator, z, cfg.metrics.batch_size, device)
    want = (evaluator.channels, evaluator.resolution, evaluator.resolution)
    if tuple(fake.shape[1:]) != want:
        raise ConfigError(f"the generator makes {tuple(fake.shape[1:])} images but data.url holds {want} (C, H, W)")
    return evaluator.score([evaluator.payload(fake)], cfg.metrics.num_images)


UNSCORED = 1e30  # Ray ranks checkpoints by "score" (lower is better); unscored ones rank last (a finite number:
# Ray's saved run state turns NaN and inf into null and then fails on resume)


def score_checkpoint(checkpoint, config: dict, run_id: str, driver_ip: str) -> dict:
    """Ray Train's validation task for a training run's evaluation steps: scores the generator of a reported
    checkpoint beside training, so the ranks never wait for scoring (SWD, FID and KID take seconds to minutes on a
    CPU, while a GPU trains 100 steps a second). Logs the values to the MLflow run at the checkpoint's step, once
    however often Ray reruns the task (it requeues unfinished ones on resume), and returns them for Ray to rank the
    checkpoint: {"score", each value, "evaluation": {"values", "protocols"}}."""
    import ray

    cap_malloc_arenas()  # a pooled Ray worker, kept between evaluations with what it allocated (malloc_tuning.py)
    cfg = from_dict(config)
    with checkpoint.as_directory() as folder:
        state = checkpoints.load(folder)
    t0 = time.perf_counter()
    with torch.no_grad():
        values, protocols = score_generator(cfg, generator_from_state(state, cfg.model, cfg.metrics.seed),
                                            make_evaluator(cfg))
    keys = {k: p.key for k, p in protocols.items()}
    step, now = state["step"], int(time.time() * 1000)
    client = MlflowClient(tracking.as_seen_from(cfg.tracking.uri, driver_ip, ray.util.get_node_ip_address()))
    if step not in {m.step for m in client.get_metric_history(run_id, next(iter(values)))}:
        logged = {**values, "eval_s": time.perf_counter() - t0}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in logged.items()],
                         tags=[RunTag(f"protocol.{k}", v) for k, v in keys.items()])
    log.info("step %d scored beside training: %s", step, "  ".join(f"{k} {v:.3f}" for k, v in values.items()
                                                                   if "_" not in k))
    release_free_memory()  # the generated images and features it freed, before the worker idles until the next
    return {"score": values.get(cfg.tune.metric, UNSCORED), **values,
            "evaluation": {"values": values, "protocols": keys}}


def resolve_version(tracking_uri: str, uri: str):
    """The MLflow ModelVersion of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, or an error naming the URI."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not m:
        raise ConfigError(f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient(tracking_uri)
    try:
        return client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3])
    except MlflowException as e:
        raise TrackingError(f"{uri}: no such registered model version in {tracking_uri} "
                            f"({e.message.splitlines()[0]})") from None


def measure_version(cfg: Config, version: str, evaluator: Evaluator) -> tuple[dict[str, float], dict[str, Protocol]]:
    """Score registered version `version` of `tracking.model_name` with `evaluator`'s protocol."""
    log.info("measuring %s version %s on %s", cfg.tracking.model_name, version, cfg.data.url)
    model = tracking.load_generator(f"models:/{cfg.tracking.model_name}/{version}", cfg.tracking.uri).generator
    with torch.no_grad():
        return score_generator(cfg, lambda z: model(z.float().cpu()), evaluator)


def measurer(cfg: Config, evaluator: Evaluator | None = None):
    """`measure(version) -> (values, {metric: protocol key})` for the champion rule; the evaluator is built on first use."""
    def measure(version: str) -> tuple[dict[str, float], dict[str, str]]:
        nonlocal evaluator
        evaluator = evaluator or make_evaluator(cfg)
        values, protocols = measure_version(cfg, version, evaluator)
        return values, {k: p.key for k, p in protocols.items()}

    return measure


@dataclass
class EvalOutcome:
    version: str
    step: str
    data_url: str
    values: dict[str, float]
    protocols: dict[str, Protocol]
    run_id: str


def evaluate_registered(cfg: Config, model_uri: str, data_url: str | None = None) -> EvalOutcome:
    """Score a registered generator; log the numbers with their protocols to MLflow and on the version."""
    mv = resolve_version(cfg.tracking.uri, model_uri)
    trained = MlflowClient(cfg.tracking.uri).get_run(mv.run_id).data.params  # the model's shape and data
    for key in ("model.nz", "model.resolution", "model.nc"):
        if key in trained:
            set_key(cfg, key, trained[key])
    cfg.data.url = data_url or trained.get("data.url") or cfg.data.url
    cfg.tracking.model_name = mv.name
    values, protocols = measure_version(cfg, str(mv.version), make_evaluator(cfg))
    keys = {k: p.key for k, p in protocols.items()}
    tracking.tag_scores(cfg, str(mv.version), values, keys)
    run_id = tracking.create_run(cfg, f"evaluate-{mv.name}-v{mv.version}",
                                 {"dcgan.evaluates": f"models:/{mv.name}/{mv.version}"},
                                 {**{f"protocol.{k}": v for k, v in keys.items()}, "data.url": cfg.data.url})
    tracking.log_dataset(cfg, run_id, resolve_shards(cfg.data.url))
    tracking.log_values(cfg, run_id, values, step=int(mv.tags.get("step", 0)))
    tracking.end_run(cfg, run_id)
    return EvalOutcome(str(mv.version), mv.tags.get("step", "?"), cfg.data.url, values, protocols, run_id)
