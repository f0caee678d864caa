"""End to end on a real local Ray cluster with 2 DDP workers, real shards and a real sqlite MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import ray
import torch
from mlflow import MlflowClient

from conftest import tiny_overrides
from dcgan_dist.config import load_config
from dcgan_dist.step import resolve_precision
from dcgan_dist.trainer import train


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)  # keep the dashboard: Train uses its state API (PITFALLS)
    yield
    ray.shutdown()


def history(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_worker_run_tracks_registers_and_keeps_ranks_in_sync(local_ray, tmp_path, digits_dir):
    cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "e2e"}))
    out = train(cfg)
    assert out.step == 12 and out.model_version == "1"
    digests = out.metrics["g_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept G identical on both ranks

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12" and run.data.params["model.ngf"] == "8"
    assert run.data.params["model.nc"] == "1"  # resolved from the manifest before logging
    assert run.data.params["train.precision"] == "auto"
    assert run.data.tags["precision"] == resolve_precision("auto", torch.device("cpu"))  # what auto became
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s"):
        assert history(client, out.run_id, key) == [2, 4, 6, 8, 10, 12], key
    assert run.data.metrics["images_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert "config.yaml" in artifacts
    samples = {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert samples == {"samples/step_000006.png", "samples/step_000012.png"}

    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model("models:/dcgan-generator@champion")
    images = model.predict(np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32))
    assert images.shape == (5, 1, 32, 32)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0

    again = train(load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "e2e"})))
    assert again.run_id == out.run_id and again.step == 12  # nothing left to train
    assert again.model_version == "1"  # the same step is not registered twice
    assert len(client.search_model_versions("name='dcgan-generator'")) == 1


def test_fast_options_train_two_ranks_in_sync(local_ray, tmp_path, digits_dir):
    """bf16 autocast, fused Adam, small DDP buckets and bf16-compressed gradients (gloo) across 2 ranks."""
    cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{
        "train.run_name": "fast", "train.steps": 8, "tracking.register": "false", "train.precision": "bf16",
        "train.fused_adam": "true", "ray.ddp_bucket_mb": 1, "ray.grad_compression": "bf16"}))
    out = train(cfg)
    assert out.step == 8
    digests = out.metrics["g_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # compressed allreduce: both ranks get the same mean
    assert all(np.isfinite(out.metrics[k]) for k in ("loss_d", "loss_g"))
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(out.run_id).data.tags["precision"] == "bf16"
    # allreduce time per step, measured by the comm hook on every rank: logged with the other metrics,
    # buckets from G and D (at least one each), and inside the step's time
    assert history(client, out.run_id, "allreduce_ms") == [2, 4, 6, 8]
    assert out.metrics["allreduce_buckets"] >= 2
    step_ms = 1e3 * cfg.train.batch_size * 2 / out.metrics["images_per_s"]
    assert 0 < out.metrics["allreduce_ms"] < step_ms


def test_worker_failure_resumes_from_checkpoint_without_repeating_steps(local_ray, tmp_path, digits_dir):
    overrides = tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "crashy", "train.fail_at_step": 7,
                                                         "tracking.register": "false"})
    out = train(load_config(overrides=overrides))
    assert out.step == 12
    assert out.metrics["start_step"] == 5  # the second attempt started after the step-4 checkpoint
    client = MlflowClient(tracking_uri=load_config(overrides=overrides).tracking.uri)
    assert history(client, out.run_id, "loss_d") == [2, 4, 6, 8, 10, 12]  # no step logged twice


def test_same_run_name_resumes_and_extends(local_ray, tmp_path, digits_dir):
    base = tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "extend", "tracking.register": "false",
                                                   "train.steps": 8})
    first = train(load_config(overrides=base))
    second = train(load_config(overrides=base + ["train.steps=12"]))
    assert second.run_id == first.run_id  # the same MLflow run continues
    assert second.metrics["start_step"] == 9 and second.step == 12
    client = MlflowClient(tracking_uri=load_config(overrides=base).tracking.uri)
    assert history(client, second.run_id, "loss_g") == [2, 4, 6, 8, 10, 12]


def test_evaluated_run_with_ema_registers_its_best_checkpoint_with_scores(local_ray, tmp_path, digits_dir):
    overrides = tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "scored", "train.eval_every": 4,
                                                         "train.checkpoint_every": 6, "train.ema_decay": 0.9,
                                                         "ray.keep_checkpoints": 1})
    cfg = load_config(overrides=overrides)
    out = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    swd = {m.step: m.value for m in client.get_metric_history(out.run_id, "swd")}
    assert sorted(swd) == [4, 8, 12]  # every eval_every steps and at the end
    assert {m.step for m in client.get_metric_history(out.run_id, "swd_16")} == {4, 8, 12}
    best_step = min(swd, key=swd.get)
    assert out.best_step == best_step and out.best_scores["swd"] == pytest.approx(swd[best_step])

    mv = client.get_model_version(cfg.tracking.model_name, out.model_version)
    assert mv.tags["step"] == str(best_step) and float(mv.tags["metric.swd"]) == pytest.approx(swd[best_step])
    protocol = client.get_run(out.run_id).data.tags["protocol.swd"]
    assert mv.tags["protocol.swd"] == protocol and '"num_fake": 128' in protocol
    assert out.champion  # the first version in this registry

    # The registered (EMA) generator scores what training measured for that step (same noise, same protocol).
    from dcgan_dist import evaluation
    from dcgan_dist.trainer import prepare_inputs

    measured = evaluation.measurer(prepare_inputs(load_config(overrides=overrides)))(out.model_version)
    assert measured[0]["swd"] == pytest.approx(swd[best_step], rel=1e-3)
