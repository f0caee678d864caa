"""Ray Tune searches over Ray Train trials on a real local Ray cluster, tracked in a real sqlite MLflow store."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO, run_job, sets, tiny_overrides
from dcgan_dist import champion, evaluation, tracking
from dcgan_dist.config import load_config
from dcgan_dist.data.loader import read_sample, resolve_shards
from dcgan_dist.errors import ConfigError
from dcgan_dist.trainer import prepare_inputs
from dcgan_dist.tune import load_space, search
from test_evaluation import BankGenerator


def make_space(tmp_path, fixed: dict, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"fixed": fixed, "space": space}))
    return str(path)


def search_config(tmp_path, digits_dir, space_path: str, **tune_keys):
    space = load_space(space_path)
    overrides = tiny_overrides(tmp_path, digits_dir, **{"ray.num_workers": 1, "ray.cpus_per_worker": 0.45,
                                                        "tune.space": space_path,
                                                        **space.fixed,  # the tiny settings would override them
                                                        **{f"tune.{k}": v for k, v in tune_keys.items()}})
    return load_config(overrides=overrides, defaults=space.fixed), space


def trial_runs(client, cfg, parent_run_id):
    return client.search_runs([tracking.experiment_id(cfg)], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_asha_stops_the_bad_trial_registers_the_best_checkpoint_and_keeps_a_better_champion(local_ray, tmp_path,
                                                                                             digits_dir):
    # Two trials in order: a learning G, and a G that cannot move (lr_g 1e-9) which ASHA stops at its first rung.
    space_path = make_space(tmp_path, {"train.steps": 40, "train.eval_every": 20, "train.lr_d": 2e-3},
                            {"train.lr_g": {"grid": [2e-3, 1e-9]}})
    cfg, space = search_config(tmp_path, digits_dir, space_path, search="random", num_samples=1, max_concurrent=1,
                               grace_period=20, name="asha")
    # Before the search, a far better generator (real images) is champion under the same protocol.
    base = prepare_inputs(load_config(overrides=tiny_overrides(tmp_path, digits_dir)))
    ev = evaluation.make_evaluator(base)
    bank = BankGenerator(read_sample(resolve_shards(str(digits_dir)), 128, channels=1, resolution=32))
    run_id, _ = tracking.start_run(base, "bank")
    values, protocols = evaluation.score_generator(base, bank, ev)
    bank_version = tracking.log_generator(base, run_id, bank, 1, values, {k: p.key for k, p in protocols.items()})
    assert champion.promote_if_better(base, bank_version)

    out = search(cfg, space)

    rows = {row["train.lr_g"]: row for row in out.trials}
    assert rows[2e-3]["status"] == "FINISHED" and rows[2e-3]["steps"] == 40
    assert rows[1e-9]["status"] == "STOPPED" and rows[1e-9]["steps"] == 20  # stopped at the rung, not hung
    assert rows[2e-3]["swd"] < rows[1e-9]["swd"]
    assert out.best_trial == rows[2e-3]["trial"] and out.best_value == rows[2e-3]["swd"]

    client = MlflowClient(cfg.tracking.uri)
    runs = {r.data.tags[tracking.RUN_NAME_TAG]: r for r in trial_runs(client, cfg, out.parent_run_id)}
    assert set(runs) == {rows[2e-3]["trial"], rows[1e-9]["trial"]}
    stopped = runs[rows[1e-9]["trial"]]
    assert stopped.info.status == "KILLED" and stopped.data.tags["tune.outcome"] == "stopped"
    assert runs[rows[2e-3]["trial"]].info.status == "FINISHED"
    best_history = client.get_metric_history(runs[out.best_trial].info.run_id, "swd")
    assert [m.step for m in best_history] == [20, 40]
    assert min(m.value for m in best_history) == pytest.approx(out.best_value)

    # The best step's checkpoint (not necessarily the last) is registered, tagged, and loses to the champion.
    mv = client.get_model_version(cfg.tracking.model_name, out.model_version)
    assert mv.tags["step"] == str(out.best_step) and float(mv.tags["metric.swd"]) == pytest.approx(out.best_value)
    assert mv.tags["protocol.swd"] == protocols["swd"].key
    assert not out.champion
    assert str(client.get_model_version_by_alias(cfg.tracking.model_name, "champion").version) == bank_version

    parent = client.get_run(out.parent_run_id)
    assert parent.data.metrics["best_swd"] == pytest.approx(out.best_value)
    assert parent.data.tags["best_trial"] == out.best_trial
    assert {"trials.json", "trials.csv", "search_summary.png", "search_space.yaml"} <= {
        a.path for a in client.list_artifacts(out.parent_run_id)}


def test_pbt_continues_trials_from_exploited_checkpoints_with_new_learning_rates(local_ray, tmp_path, digits_dir):
    # Two segments of 4 and 2 steps: one exploit (at step 4), none at the end (PBT would clone a finished trial).
    space_path = make_space(tmp_path, {"train.steps": 6, "train.eval_every": 4},
                            {"train.lr_g": {"loguniform": [1e-4, 3e-3]}, "train.lr_d": {"loguniform": [1e-4, 3e-3]}})
    cfg, space = search_config(tmp_path, digits_dir, space_path, scheduler="pbt", num_samples=2, max_concurrent=2,
                               perturbation_interval=4, name="pbt")
    out = search(cfg, space)

    assert len(out.trials) == 2 and all(row["steps"] == 6 for row in out.trials)
    client = MlflowClient(cfg.tracking.uri)
    runs = trial_runs(client, cfg, out.parent_run_id)
    restarts = [r.data.tags.get("pbt.last_start", "") for r in runs]
    assert any(restarts), "no trial was continued from a checkpoint"
    # An exploiting trial logs its new learning rates at the step it continues from.
    lr_histories = [client.get_metric_history(r.info.run_id, "lr_g") for r in runs]
    assert any(len({m.value for m in h}) > 1 for h in lr_histories)
    assert out.model_version is not None and out.champion  # the first registered version takes the alias


def test_bad_search_spaces_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tune.space: .* does not exist"):
        load_space(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="train.lr_q"):
        load_space(make_space(tmp_path, {}, {"train.lr_q": {"uniform": [0, 1]}}))
    with pytest.raises(ConfigError, match="train.lr_g: expected one of"):
        load_space(make_space(tmp_path, {}, {"train.lr_g": {"normal": [0, 1]}}))
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_space(make_space(tmp_path, {}, {"train.batch_size": {"choice": [32, "big"]}}))


def test_the_shipped_search_runs_as_a_job(local_ray, tmp_path, digits_dir):
    """`python jobs/tune.py` with jobs/tune_space.yaml as shipped (ASHA + Optuna's TPE over its whole space),
    only shortened: every trial reports its metric, the best generator is registered and becomes champion."""
    overrides = tiny_overrides(tmp_path, digits_dir, **{
        "train.steps": 4, "train.eval_every": 2, "tune.grace_period": 2, "tune.num_samples": 2,
        "tune.max_concurrent": 2, "ray.num_workers": 1, "tune.name": "shipped"})
    assert load_space(str(REPO / "jobs" / "tune_space.yaml")).params  # the file the job reads by default
    r = run_job("tune.py", *sets(overrides), cwd=tmp_path)  # tune.space left at its default
    assert r.returncode == 0, r.stderr[-3000:]
    assert "search 'shipped': 2 trials" in r.stdout and "now @champion" in r.stdout
    cfg = load_config(overrides=overrides)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.search_runs([tracking.experiment_id(cfg)], "tags.`dcgan.search` = 'shipped'")[0]
    assert parent.data.params["tune.search"] == "optuna" and parent.data.params["tune.scheduler"] == "asha"
    space = yaml.safe_load((REPO / "jobs" / "tune_space.yaml").read_text())
    assert parent.data.params["search.params"] == ",".join(space["space"])
    trials = trial_runs(client, cfg, parent.info.run_id)
    assert len(trials) == 2 and all("swd" in t.data.metrics for t in trials)
    sampled = {t.data.params["model.ngf"] for t in trials}  # Optuna's samples reached the trials' configs
    assert sampled <= {"16", "32", "64"}
    assert client.get_model_version_by_alias(cfg.tracking.model_name, "champion").tags["metric.swd"]
