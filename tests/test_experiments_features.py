"""D's features for classification with few labels (paper 5.1) and the nearest-neighbor memorization check,
on the registered digits model in a real sqlite MLflow store."""

from __future__ import annotations

import json
import re
from argparse import Namespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image

from conftest import experiments_job
from dcgan_dist.config import load_config
from dcgan_dist.data.loader import to_model_input
from dcgan_dist.errors import ConfigError
from dcgan_dist.experiments import feature_svm, nearest_neighbors
from dcgan_dist.experiments.common import ExperimentRun, read_labeled
from dcgan_dist.networks import load_networks


@pytest.fixture(scope="module")
def digits(digits_store, digits_dir):
    """The trained networks (read from the session's store, which nothing here writes to) and every labeled
    digit (1,797, 32x32)."""
    db, model_uri = digits_store
    nets = load_networks(f"sqlite:///{db}", model_uri)
    images, labels = read_labeled(str(digits_dir), 5000, channels=1, resolution=32)
    return nets, images, labels.numpy()


def svm_table(nets, images, labels, seed, **kw):
    features = feature_svm.feature_sets(nets, images, seed)
    draws = feature_svm.evaluate(features, labels, seed=seed, **kw)
    return feature_svm.summarize(features, draws), draws


def job(tracking_uri, model_uri, cwd, *args):
    """jobs/experiments.py feature-svm in-process, in `cwd`, writing to cwd/out."""
    return experiments_job(tracking_uri, "feature-svm", "--model", model_uri, "--out", str(cwd / "out"), *args,
                           cwd=cwd)


def svm_runs(tracking_uri, view=ViewType.ACTIVE_ONLY):
    """The feature-svm runs in this test's own store."""
    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                              "tags.`dcgan.experiment` = 'feature-svm'", run_view_type=view)


def test_trained_d_features_beat_pixels_and_match_random_d(digits):
    """What holds on this tiny model (ndf=16, 300 steps) with the job's label counts (10 + 10 per class), over
    3 seeds of 3 label draws each (each seed: other draws and another random D). Measured at seeds 0-14:

    - over pixels, the trained D's features win at every seed (+0.63 to +3.97 points); the mean of any 3 of
      those seeds is +0.94 to +2.62 (seeds 0-2: +1.68). Asserted: a win at each seed, >= 1 point on average.
    - over a random D of the same architecture, the paper's gap does not show here: -1.42 to +2.00 points per
      seed, -0.04 on average over the 15, i.e. within the draw-to-draw noise (sd ~1.3 points per draw). Only
      "not clearly worse" is asserted: a 3-seed mean above -2 points (any 3 of the 15 seeds: -1.20 to +1.56).
    """
    nets, images, labels = digits
    gains = {"pixels": [], "random D": []}  # trained D's accuracy minus each baseline's, in points, per seed
    for seed in (0, 1, 2):
        table, _ = svm_table(nets, images, labels, seed, per_class=10, val_per_class=10, test_size=None, draws=3)
        assert min(row["mean"] for row in table.values()) > 0.5, table  # chance is 0.1
        for baseline, gain in gains.items():
            gain.append(100 * (table["trained D"]["mean"] - table[baseline]["mean"]))
    assert all(g > 0 for g in gains["pixels"]), gains
    assert np.mean(gains["pixels"]) >= 1.0, gains
    assert np.mean(gains["random D"]) > -2.0, gains


def test_label_draws_are_stratified_disjoint_and_deterministic(digits):
    nets, images, labels = digits
    train, val, test = feature_svm.draw_split(labels, 5, 3, None, np.random.default_rng(0))
    assert np.bincount(labels[train]).tolist() == [5] * 10 and np.bincount(labels[val]).tolist() == [3] * 10
    assert len(set(train) | set(val) | set(test)) == len(train) + len(val) + len(test) == len(labels)
    again = feature_svm.draw_split(labels, 5, 3, 100, np.random.default_rng(0))
    assert (again[0] == train).all() and len(again[2]) == 100 and set(again[2]) <= set(test)

    kw = {"per_class": 5, "val_per_class": 5, "test_size": 300, "draws": 2}
    first, draws = svm_table(nets, images[:600], labels[:600], 3, **kw)
    second, draws_again = svm_table(nets, images[:600], labels[:600], 3, **kw)
    assert draws == draws_again and first == second
    other = feature_svm.draw_split(labels, 5, 3, None, np.random.default_rng(1))[0]
    assert set(other) != set(train)  # another seed, other labels


def test_feature_vector_has_every_conv_layer_pooled_to_4x4(digits):
    nets, images, _ = digits
    assert feature_svm.layer_sizes(nets.d) == [16 * 16, 32 * 16, 64 * 16]  # ndf=16: 16, 32, 64 channels, 4x4 each
    feats = feature_svm.d_features(nets.d, images[:7], batch=3)
    assert feats.shape == (7, 1792)
    assert torch.allclose(feature_svm.d_features(nets.d, to_model_input(images[:7], "cpu")), feats)
    balanced = feature_svm.balance(feats, feature_svm.layer_sizes(nets.d))
    for block in balanced.split(feature_svm.layer_sizes(nets.d), 1):
        assert block.square().sum(1).mean().item() == pytest.approx(1.0, rel=1e-4)
    sets = feature_svm.feature_sets(nets, images[:7], 0)
    assert {k: v.shape for k, v in sets.items()} == {"trained D": (7, 1792), "random D": (7, 1792),
                                                      "pixels": (7, 1024)}


def test_nearest_neighbors_figures_numbers_and_exact_search(digits, digits_model, digits_dir, tmp_path):
    nets, images, _ = digits
    bank = to_model_input(images[:300], "cpu")
    dist, idx = nearest_neighbors.nearest(bank[[0, 7, 123]], bank, 3)
    for row, (i, d) in enumerate(zip([0, 7, 123], dist)):
        assert d[0] == 0 and i in idx[row][dist[row] == 0].tolist()  # a training image finds itself
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    d1, i1 = nearest_neighbors.nearest(bank[[42]] + 0.01 * torch.randn(1, 1, 32, 32), bank, 1)
    assert i1.item() == 42 and 0 < d1.item() < 1

    tracking_uri = digits_model[0]
    args = Namespace(seed=0, data=str(digits_dir), num=4, k=3, holdout=50, max_images=300, batch=128)
    out = ExperimentRun(load_config(overrides=[f"tracking.uri={tracking_uri}"]), nets, nearest_neighbors.NAME,
                        tmp_path, vars(args))
    summary = nearest_neighbors.run(args, nets, out)
    assert "3 nearest of 250 training images" in summary and "ratio" in summary
    for space in ("pixels", "d_features"):
        with Image.open(tmp_path / f"neighbors_{space}.png") as im:
            assert im.size == (4 * 34 + 2, 4 * 34 + 2)  # k + 1 columns, num rows of 32 px + 2 px padding
    result = json.loads((tmp_path / "neighbors.json").read_text())["spaces"]
    for space in ("pixels", "d_features"):
        samples = result[space]["samples"]
        assert len(samples) == 4 and all(len(s["image_index"]) == 3 and s["distance"] == sorted(s["distance"])
                                         for s in samples)
    metrics = MlflowClient(tracking_uri).get_run(out.run_id).data.metrics
    assert metrics["nn_pixels_ratio"] > 0.5  # 300 steps of blurry digits: nothing memorized
    assert metrics["nn_pixels_ratio"] == pytest.approx(metrics["nn_pixels_generated"] / metrics["nn_pixels_heldout"])


def test_feature_svm_job_end_to_end(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    r = job(tracking_uri, model_uri, tmp_path, "--max-images", "400", "--labels-per-class", "5",
            "--val-per-class", "5", "--draws", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained D    1792" in r.stdout and "random D" in r.stdout and "pixels       1024" in r.stdout
    assert "paper: CIFAR-10 82.8% (D trained on ImageNet-1k); SVHN 22.48% error with 1,000 labels" in r.stdout
    run_id = re.search(r"MLflow run (\w+)", r.stdout).group(1)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert [found.info.run_id for found in svm_runs(tracking_uri)] == [run_id]  # the job's run, and only that one
    assert run.data.tags["dcgan.experiment"] == "feature-svm" and run.info.status == "FINISHED"
    assert run.data.tags["dcgan.evaluates"] == model_uri and run.data.params["labels_per_class"] == "5"
    assert {"acc_trained_d", "acc_trained_d_std", "acc_random_d", "acc_pixels_std"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id)} == {"accuracy.png", "draws.json", "summary.txt"}
    saved = json.loads((tmp_path / "out" / "draws.json").read_text())
    assert len(saved["draws"]) == 2 and saved["draws"][0]["train"] == 50


def test_bad_arguments_are_clear_errors(digits, digits_model, digits_dir, tmp_path):
    tracking_uri, model_uri = digits_model
    r = job(tracking_uri, model_uri, tmp_path, "--labels-per-class", "500")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"error: --labels-per-class 500 .* class \d has 1\d\d ", r.stderr), r.stderr[-2000:]
    # The job had opened its run and folder before reading the data: both are gone again.
    assert svm_runs(tracking_uri) == [] and len(svm_runs(tracking_uri, ViewType.DELETED_ONLY)) == 1
    assert not (tmp_path / "out").exists()

    nets = digits[0]
    with pytest.raises(ConfigError, match="leaves no test images"):
        feature_svm.check_counts(np.repeat([0, 1], 10), 5, 5)
    with pytest.raises(ConfigError, match="1 class"):
        feature_svm.check_counts(np.zeros(50, dtype=int), 5, 5)
    bad = Namespace(seed=0, data=None, labels_per_class=10, val_per_class=10, test_size=None, draws=0, max_images=10,
                    batch=256)
    with pytest.raises(ConfigError, match="--draws"):
        feature_svm.run(bad, nets, None)
    nn_args = Namespace(seed=0, data=str(digits_dir), num=4, k=3, holdout=100, max_images=100, batch=128)
    with pytest.raises(ConfigError, match="--holdout 100 .* read 100"):
        nearest_neighbors.run(nn_args, nets, None)
