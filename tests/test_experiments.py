"""The paper's experiments on a registered digits model (real sqlite MLflow store, a private copy per test):
latent walks, vector arithmetic, how a model version's networks are found, what jobs/experiments.py does with
no --model and no --out, and clear errors for bad arguments."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image

from conftest import EXIT_TRACKING, experiments_job, job_subprocess, run_experiment
from dcgan_dist import tracking
from dcgan_dist.errors import ConfigError, TrackingError
from dcgan_dist.experiments import latent_walk, vector_arithmetic
from dcgan_dist.networks import load_networks


def test_registered_version_holds_both_trained_networks(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    nets = load_networks(tracking_uri, model_uri)
    assert (nets.model.nc, nets.model.resolution, nets.step) == (1, 32, 300)
    z = torch.randn(4, nets.model.nz)
    with torch.no_grad():
        images = nets.g(z)
        assert images.shape == (4, 1, 32, 32)
        assert nets.d(images).shape == (4,)
        # The trained D is not the random one of the same architecture.
        assert not torch.allclose(nets.d(images), nets.random_discriminator(0)(images))
    # The registered MLflow model and our G are the same network. (`models:/` URIs resolve through the process's
    # tracking URI: download_artifacts' own tracking_uri argument did not reach the logged model's lookup.)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    served = tracking.load_generator(model_uri).generator
    with torch.no_grad():
        torch.testing.assert_close(served(z), nets.g(z), rtol=1e-4, atol=1e-5)


def test_latent_walk_is_smooth_deterministic_and_logged(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    params = dict(paths=4, steps=8, gif_keyframes=3, gif_frames=4)
    summary, out = run_experiment(tracking_uri, model_uri, latent_walk, tmp_path / "a", **params)
    grid = Image.open(tmp_path / "a" / "walk_slerp.png")
    assert grid.size == (8 * 34 + 2, 4 * 34 + 2)  # 8 steps x 4 paths of 32 px tiles, 2 px padding
    gif = Image.open(tmp_path / "a" / "walk.gif")
    assert gif.n_frames == 3 * 4
    run = MlflowClient(tracking_uri).get_run(out.run_id)
    assert run.data.tags["dcgan.experiment"] == "latent-walk" and run.data.tags["dcgan.evaluates"] == model_uri
    assert run.info.status == "FINISHED"
    ratio = run.data.metrics["slerp_max_over_mean"]
    assert 1.0 <= ratio < 3.0, ratio  # small steps, no jumps, on a trained G
    logged = {f.path for f in MlflowClient(tracking_uri).list_artifacts(out.run_id)}
    assert {"walk_linear.png", "walk_slerp.png", "walk.gif", "smoothness.png", "summary.txt"} <= logged
    again, _ = run_experiment(tracking_uri, model_uri, latent_walk, tmp_path / "b", **params)
    assert again == summary
    assert (tmp_path / "a" / "walk_slerp.png").read_bytes() == (tmp_path / "b" / "walk_slerp.png").read_bytes()


def test_smoothness_flags_a_jump():
    t = torch.linspace(0, 1, 10).reshape(1, 10, 1, 1, 1).expand(2, 10, 1, 4, 4).clone()
    smooth = latent_walk.smoothness(t.reshape(-1, 1, 4, 4), 2)
    jumpy = t.clone()
    jumpy[:, 5:] += 3.0  # one big jump halfway along each path
    jump = latent_walk.smoothness(jumpy.reshape(-1, 1, 4, 4), 2)
    assert smooth["max_over_mean"] == pytest.approx(1.0)
    assert jump["max_over_mean"] > 5


def test_slerp_keeps_the_norm_between_orthogonal_endpoints():
    z0, z1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = latent_walk.slerp(z0, z1, torch.tensor(0.5))
    assert mid.norm() == pytest.approx(1.0)
    assert latent_walk.lerp(z0, z1, torch.tensor(0.5)).norm() == pytest.approx(0.5 ** 0.5)


def test_vector_arithmetic_sheet_then_sum(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    base = dict(num=16, a=None, b=None, c=None, neighbours=4, scale=0.25)
    summary, _ = run_experiment(tracking_uri, model_uri, vector_arithmetic, tmp_path / "sheet", **base)
    assert "pick indices" in summary and (tmp_path / "sheet" / "sheet.png").exists()
    summary, out = run_experiment(tracking_uri, model_uri, vector_arithmetic, tmp_path / "sum",
                              **{**base, "a": "0,1,2", "b": "3,4", "c": "5"})
    inputs = json.loads((tmp_path / "sum" / "inputs.json").read_text())
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    expected = z[[0, 1, 2]].mean(0) - z[[3, 4]].mean(0) + z[5]
    torch.testing.assert_close(torch.tensor(inputs["z_result"]), expected)
    grid = Image.open(tmp_path / "sum" / "arithmetic.png")
    assert grid.size == (5 * 34 + 2, 5 * 34 + 2)  # rows a, b, c, result + 4 neighbours, pixel sum
    assert MlflowClient(tracking_uri).get_run(out.run_id).data.metrics["neighbourhood_change"] > 0


def all_runs(tracking_uri, view):
    """Every run in this test's own store, any experiment."""
    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=view)


def experiment_runs(tracking_uri, name):
    """The live runs of experiment NAME in this test's own store."""
    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                              f"tags.`dcgan.experiment` = '{name}'")


def test_job_runs_an_experiment_and_reports(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    r = experiments_job(tracking_uri, "latent-walk", "--model", model_uri, "--out", str(tmp_path / "w"), "--paths", "2",
                        "--gif-keyframes", "2", "--gif-frames", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"latent-walk on {model_uri} (step 300)" in r.stdout and "max/mean per path" in r.stdout
    assert (tmp_path / "w" / "summary.txt").read_text().strip() in r.stdout
    run_id = re.search(r"MLflow run (\w+)", r.stdout).group(1)
    assert [run.info.run_id for run in experiment_runs(tracking_uri, "latent-walk")] == [run_id]
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["paths"] == "2"


def test_bad_arguments_give_one_line_errors(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    client = MlflowClient(tracking_uri)
    before = {run.info.run_id for run in all_runs(tracking_uri, ViewType.ALL)}
    # The command-line contract itself, in a fresh interpreter (the only subprocess of these tests): the tracking
    # exit code and one line on stderr, no traceback.
    r = job_subprocess("experiments.py", "latent-walk", "--model", "models:/no-such-model/1", "--out",
                       str(tmp_path / "x"), "--set", f"tracking.uri={tracking_uri}", cwd=tmp_path)
    assert r.returncode == EXIT_TRACKING, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-2000:]  # one error line, the last one
    assert errors[0].startswith("error: models:/no-such-model/1: no such registered model version in sqlite:///")
    assert "Traceback" not in r.stderr
    # The rest in-process: same parsing and error handling.
    r = experiments_job(tracking_uri, "vector-arithmetic", "--model", model_uri, "--num", "8", "--a", "1,9", "--b",
                        "2", "--c", "3", "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert r.returncode == 2 and "error: --a: index 9 out of range 0..7" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = experiments_job(tracking_uri, "vector-arithmetic", "--model", model_uri, "--a", "1,x", "--b", "2", "--c", "3",
                        cwd=tmp_path)  # the default --out: outputs/experiments/vector-arithmetic-v1 under tmp_path
    assert r.returncode == 2 and "error: --a: expected comma-separated integers" in r.stderr, r.stderr[-2000:]
    r = experiments_job(tracking_uri, "latent-walk", "--model", "dcgan-generator", "--out", str(tmp_path / "z"),
                        cwd=tmp_path)
    assert r.returncode == 2 and "expected models:/NAME@ALIAS or models:/NAME/VERSION" in r.stderr, r.stderr[-2000:]
    # Bad input leaves nothing behind: the two vector-arithmetic runs it opened are deleted, the bad model URIs
    # opened none, every run this store held before is untouched, and the empty output folders are removed.
    after = {run.info.run_id: run for run in all_runs(tracking_uri, ViewType.ALL)}
    new = [after[i] for i in after.keys() - before]
    assert len(new) == 2, [(run.info.run_name, run.info.lifecycle_stage) for run in new]
    assert all(run.data.tags["dcgan.experiment"] == "vector-arithmetic" and run.info.lifecycle_stage == "deleted"
               for run in new)
    assert {run.info.run_id for run in all_runs(tracking_uri, ViewType.ACTIVE_ONLY)} == before
    assert client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                              "tags.`dcgan.experiment` = 'vector-arithmetic'") == []
    for folder in ("x", "y", "z", "outputs/experiments/vector-arithmetic-v1"):
        assert not (tmp_path / folder).exists(), folder


DEFAULT_JOBS = [  # (experiment, smallest arguments that keep it fast, files it writes, a line of its summary)
    ("guided-backprop", ["--max-images", "16", "--num-features", "2", "--top", "2"], {"guided_backprop.png"},
     "guided backprop of D conv layer 2 (64 features) on 16 images from {data}"),
    ("label-boxes", ["--num", "8", "--box", "3:2,4,20,28"], {"sheet.png", "boxes.png", "boxes.json"},
     "1 box(es) on 1 sample(s) written to outputs/experiments/label-boxes-v{version}/boxes.json"),
    ("nearest-neighbors", ["--max-images", "60", "--holdout", "10", "--num", "2", "--k", "2"],
     {"neighbors_pixels.png", "neighbors_d_features.png", "neighbors.json"},
     "2 generated samples and their 2 nearest of 50 training images (60 read from {data}, 10 held out)"),
]


@pytest.mark.parametrize("name, args, files, line", DEFAULT_JOBS, ids=[job[0] for job in DEFAULT_JOBS])
def test_job_defaults_run_the_champion_into_outputs(digits_model, digits_dir, tmp_path, name, args, files, line):
    """No --model, no --out, no --data: the champion, outputs/experiments/NAME-vVERSION under the working
    directory, and the data the model was trained on."""
    tracking_uri, model_uri = digits_model
    version = model_uri.rsplit("/", 1)[1]
    champion = MlflowClient(tracking_uri).get_model_version_by_alias("dcgan-generator", "champion")
    assert str(champion.version) == version
    r = experiments_job(tracking_uri, name, *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "outputs" / "experiments" / f"{name}-v{version}"
    assert {f.name for f in folder.iterdir()} == files | {"summary.txt"}
    summary = (folder / "summary.txt").read_text().strip()
    assert line.format(data=digits_dir, version=version) in summary.splitlines()[0]
    assert f"{name} on {model_uri} (step 300):\n{summary}" in r.stdout
    assert f"outputs: outputs/experiments/{name}-v{version}  (MLflow run " in r.stdout
    runs = experiment_runs(tracking_uri, name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert runs[0].data.tags["dcgan.evaluates"] == model_uri and runs[0].info.run_id in r.stdout
    logged = {f.path for f in MlflowClient(tracking_uri).list_artifacts(runs[0].info.run_id)}
    assert logged == files | {"summary.txt"}


def test_a_version_without_stored_networks_is_named(digits_model):
    tracking_uri, model_uri = digits_model
    client = MlflowClient(tracking_uri)
    name, version = model_uri.split("/")[-2:]
    client.delete_model_version_tag(name, version, "networks")  # this test's own copy of the store
    with pytest.raises(TrackingError, match=f"{model_uri}.*no 'networks' tag"):
        load_networks(tracking_uri, model_uri)
    with pytest.raises(ConfigError):
        load_networks(tracking_uri, "not-a-uri")
