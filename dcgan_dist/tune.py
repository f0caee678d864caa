"""Hyperparameter search: Ray Tune over Ray Train runs, each trial a multi-worker DDP training run.

Train V2 does not run inside `Tuner` directly; the working pattern (see PITFALLS) is a Tune
function that builds and fits a `TorchTrainer` with `TuneReportCallback`, so every evaluation
the trial's rank 0 reports reaches the scheduler. ASHA stops poor trials early; Optuna (TPE)
proposes new ones. PBT needs Tune checkpoints, so in PBT mode a trial trains in segments of
`tune.perturbation_interval` steps, each a Train run started from the previous checkpoint, and
reports that checkpoint to Tune; an exploited trial restarts from the donor's checkpoint with
perturbed learning rates.

MLflow: a parent run for the search, one nested run per trial. At the end the best checkpoint
of the best trial (by `tune.metric`, not its last step) is registered, and `champion` moves to it
only if it beats the current champion under the same protocol.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from dcgan_dist import checkpoint, tracking, trainer
from dcgan_dist.config import Config, from_dict, read_yaml, set_key, validate
from dcgan_dist.errors import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTIONS = {
    "loguniform": lambda a, b: tune.loguniform(a, b),
    "uniform": lambda a, b: tune.uniform(a, b),
    "randint": lambda a, b: tune.randint(a, b),
    "choice": lambda *options: tune.choice(list(options)),
    "grid": lambda *options: tune.grid_search(list(options)),  # every value, in order (random search only)
}


@dataclass
class Space:
    fixed: dict[str, Any]  # every trial: flat config keys -> values
    params: dict[str, Any]  # flat config keys -> Tune domains
    spec: dict[str, Any]  # the YAML as written (logged with the search)


def load_space(path: str) -> Space:
    """Read and check a search-space YAML: `fixed:` {key: value} and `space:` {key: {dist: [args]}}."""
    data = read_yaml(path, "tune.space: search-space file")
    if not isinstance(data, dict):
        raise ConfigError(f"tune.space: {path} must hold a mapping with 'space:' (and optionally 'fixed:')")
    unknown = set(data) - {"fixed", "space"}
    if unknown or not isinstance(data.get("space"), dict) or not data["space"]:
        raise ConfigError(f"tune.space: {path} needs a non-empty 'space:' mapping (and optionally 'fixed:'), "
                          f"got sections {sorted(data)}")
    probe = Config()
    fixed = data.get("fixed") or {}
    for key, value in fixed.items():
        set_key(probe, key, value)  # names an unknown key or a wrong type
    params = {}
    for key, dist in data["space"].items():
        where = f"tune.space: {path}: {key}"
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise ConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {dist!r}")
        (kind, args), = dist.items()
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a list of arguments, got {args!r}")
        for sample in (args if kind == "choice" else args[:1]):
            set_key(probe, key, sample)
        params[key] = DISTRIBUTIONS[kind](*args)
    return Space(fixed, params, data)


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    """The search's base config with one trial's sampled values applied."""
    cfg = from_dict(base)
    for key, value in params.items():
        set_key(cfg, key, value)  # the same typed, named checks as --set
    return validate(cfg)


def _scheduler(cfg: Config, space: Space):
    tc = cfg.tune
    if tc.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=tc.grace_period,
                                             reduction_factor=tc.reduction_factor)
    if tc.scheduler == "pbt":
        lrs = {k: v for k, v in space.params.items() if k in ("train.lr_g", "train.lr_d")}
        if not lrs:
            raise ConfigError("tune.scheduler=pbt perturbs train.lr_g / train.lr_d: put them in the search space")
        return tune.schedulers.PopulationBasedTraining(time_attr="step", perturbation_interval=tc.perturbation_interval,
                                                       hyperparam_mutations=lrs, quantile_fraction=0.5,
                                                       resample_probability=0.25, synch=True)
    return tune.schedulers.FIFOScheduler()


def _search_alg(cfg: Config):
    if cfg.tune.search == "optuna" and cfg.tune.scheduler != "pbt":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    # Random sampling, grid values in order; a SearchGenerator enforces its own concurrency limit.
    return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.tune.max_concurrent)


def _trial_dirname(trial) -> str:
    """A trial's folder is its id: `_collect` names trials by folder, because after a PBT exploit a trial's last
    result (and the `trial_id` in it) can be its donor's."""
    return trial.trial_id


def _trial_name(search_name: str) -> str:
    return f"{search_name}-{tune.get_context().get_trial_id()}"


def run_trial(params: dict, *, base: dict, search_name: str, parent_run_id: str, storage: str, driver_ip: str) -> None:
    """One trial (runs in a Tune actor, on any node): a nested MLflow run and one or more Train runs."""
    cfg = trial_config(base, params)
    cfg.tracking.uri = tracking.as_seen_from(cfg.tracking.uri, driver_ip, ray.util.get_node_ip_address())
    cfg.train.run_name = _trial_name(search_name)
    run_id, _ = tracking.start_run(cfg, cfg.train.run_name, parent_run_id=parent_run_id)
    if cfg.tune.scheduler == "pbt":
        _run_segments(cfg, run_id, storage)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        run_cfg = trainer.run_config(cfg, cfg.train.run_name, storage, callbacks=[TuneReportCallback()])
        trainer.deliver_held(cfg, run_id, trainer.make_trainer(cfg, run_id, run_cfg, score_in_loop=True).fit())
    tracking.end_run(cfg, run_id)


def _run_segments(cfg: Config, run_id: str, storage: str) -> None:
    """PBT: train `perturbation_interval` steps at a time, handing each checkpoint to Tune."""
    start, resume = 0, None
    restored = tune.get_checkpoint()
    if restored:  # a restart, or an exploit of another trial's checkpoint
        with restored.as_directory() as d:
            state = checkpoint.load(d)
        start, resume = state["step"], restored
        donor = state["config"]["train"]["run_name"]
        tracking.tag_run(cfg, run_id, {"pbt.last_start": f"{donor} step {start}"})
    tracking.log_values(cfg, run_id, {"lr_g": cfg.train.lr_g, "lr_d": cfg.train.lr_d}, start)
    while start < cfg.train.steps:
        seg = copy.deepcopy(cfg)
        seg.train.steps = min(start + cfg.tune.perturbation_interval, cfg.train.steps)
        name = f"{cfg.train.run_name}-from{start:07d}-{uuid.uuid4().hex[:6]}"
        result = trainer.make_trainer(seg, run_id, trainer.run_config(seg, name, storage), init_from=resume,
                                      score_in_loop=True).fit()
        trainer.deliver_held(cfg, run_id, result)
        metrics = dict(result.metrics or {})
        start, resume = int(metrics["step"]), result.checkpoint
        report = {k: metrics[k] for k in metrics if isinstance(metrics[k], (int, float))}
        tune.report({**report, "checkpoint_path": resume.path}, checkpoint=resume)


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    trials: list[dict]  # one row per trial: name, run_id, status, steps, best metric, params
    best_trial: str
    best_value: float
    best_step: int
    model_version: str | None
    champion: bool


def search(cfg: Config, space: Space) -> SearchOutcome:
    """Run the search described by `cfg.tune` over `space`; register the best generator found."""
    tc, metric = cfg.tune, cfg.tune.metric
    if not cfg.train.eval_every:
        raise ConfigError("train.eval_every is 0: a search needs evaluations to compare trials")
    if tc.scheduler == "asha" and tc.grace_period > cfg.train.steps:
        raise ConfigError(f"tune.grace_period ({tc.grace_period}) is longer than train.steps ({cfg.train.steps})")
    if cfg.train.checkpoint_every != cfg.train.eval_every:
        log.info("search: checkpointing with every evaluation (train.checkpoint_every = %d)", cfg.train.eval_every)
        cfg.train.checkpoint_every = cfg.train.eval_every
    cfg = trainer.prepare_inputs(cfg)
    name = tc.name or time.strftime("search-%Y%m%d-%H%M%S")
    storage = f"{cfg.ray.storage_path.rstrip('/')}/{name}"
    parent_run_id = tracking.start_search_run(cfg, name, space.spec)
    trainer.init_ray(cfg)
    fn = tune.with_parameters(run_trial, base=cfg.to_dict(), search_name=name, parent_run_id=parent_run_id,
                              storage=storage, driver_ip=ray.util.get_node_ip_address())
    search_alg = _search_alg(cfg)
    limit = None if isinstance(search_alg, BasicVariantGenerator) else tc.max_concurrent  # it limits itself
    tuner = tune.Tuner(
        tune.with_resources(fn, {"CPU": 0.01}),  # the trial's Train workers reserve the real resources
        param_space=space.params,
        tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=tc.num_samples,
                                    max_concurrent_trials=limit, scheduler=_scheduler(cfg, space),
                                    search_alg=search_alg, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=cfg.ray.storage_path, verbose=1,  # the trial table as it goes
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.end_run(cfg, parent_run_id, "FAILED")
        raise
    rows, best = _collect(grid, name, metric, cfg.train.steps)
    if best is None:
        tracking.close_trial_runs(cfg, parent_run_id, {r["trial"]: r["status"] for r in rows})
        tracking.end_run(cfg, parent_run_id, "FAILED")
        raise RuntimeError(f"search {name}: no trial reported {metric}")
    version, is_champion = _register_best(cfg, best)
    tracking.close_trial_runs(cfg, parent_run_id, {r["trial"]: r["status"] for r in rows})
    tracking.log_search_summary(cfg, parent_run_id, rows, metric, best, version)
    tracking.end_run(cfg, parent_run_id)
    return SearchOutcome(name, parent_run_id, rows, best["trial"], best["value"], best["step"], version, is_champion)


def _collect(grid, name: str, metric: str, total_steps: int) -> tuple[list[dict], dict | None]:
    """One row per trial, and the best (trial, step, checkpoint) over every evaluation of every trial."""
    rows, best = [], None
    for result in grid:
        df = result.metrics_dataframe
        trial = f"{name}-{Path(result.path).name}"
        row = {"trial": trial, "status": "FAILED" if result.error else "FINISHED", **result.config}
        if df is None or metric not in df or df[metric].dropna().empty:
            rows.append({**row, metric: math.nan, "steps": 0})
            continue
        scored = df.dropna(subset=[metric])
        i = scored[metric].idxmin()
        # A PBT trial exploited at its last perturbation ends on its donor's checkpoint (and last result), which
        # reached further than the trial's own rows.
        steps = max(int(df["step"].max()), int((result.metrics or {}).get("step", 0)))
        row.update({metric: float(scored.loc[i, metric]), "best_step": int(scored.loc[i, "step"]), "steps": steps})
        if steps < result.config.get("train.steps", total_steps) and not result.error:
            row["status"] = "STOPPED"  # the scheduler ended it early
        rows.append(row)
        if best is None or row[metric] < best["value"]:
            best = {"trial": trial, "value": row[metric], "step": row["best_step"],
                    "checkpoint_path": scored.loc[i, "checkpoint_path"]}
    return rows, best


def _uri(path: str, storage: str) -> str:
    """Checkpoint paths come back without their scheme (`bucket/key`); put the storage's back (`s3://bucket/key`)."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


def _register_best(cfg: Config, best: dict) -> tuple[str | None, bool]:
    """Register the best checkpoint's generator in its trial's MLflow run; move champion if it is better."""
    ckpt = ray.train.Checkpoint(_uri(best["checkpoint_path"], cfg.ray.storage_path))
    with ckpt.as_directory() as d:
        state = checkpoint.load(d)
    trial_cfg = from_dict(state["config"])
    trial_cfg.tracking, trial_cfg.metrics, trial_cfg.data = cfg.tracking, cfg.metrics, cfg.data
    if not cfg.tracking.register:
        return None, False
    return trainer.register(trial_cfg, tracking.find_run(trial_cfg, trial_cfg.train.run_name), state)
