"""Guided backprop of D's features, boxes labeled on samples, and forgetting the boxed object (paper 6.2, 6.3.1),
on the registered digits model in a real sqlite MLflow store."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image
from torch import nn

from conftest import experiments_job, run_experiment
from dcgan_dist.data.loader import read_sample, resolve_shards, to_model_input
from dcgan_dist.errors import ConfigError
from dcgan_dist.experiments import forget, guided_backprop, label_boxes
from dcgan_dist.models import generate, latents
from dcgan_dist.networks import load_networks


def metrics(tracking_uri, out):
    return MlflowClient(tracking_uri).get_run(out.run_id).data.metrics


def stroke_boxes(nets, seed, num, labeled):
    """A 2x2 box on each bright (stroke) cell of the first `labeled` samples: the cells of G's feature grid."""
    images = generate(nets.g, latents(num, nets.model.nz, seed))
    boxes = {}
    for i in range(labeled):
        bright = nn.functional.max_pool2d(images[i], 2)[0] > 0
        boxes[str(i)] = [[2 * x, 2 * y, 2 * x + 2, 2 * y + 2] for y, x in bright.nonzero().tolist()]
    return {"seed": seed, "num": num, "boxes": boxes}


def test_guided_relu_passes_only_positive_gradient_through_positive_inputs():
    d = nn.Module()
    d.main = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.LeakyReLU(0.2, True), nn.Conv2d(1, 1, 1, bias=False))
    nn.init.ones_(d.main[0].weight)
    x = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    net, end = guided_backprop.guided(d), guided_backprop.layer_end(d, 1)

    def both(inputs, w):
        nn.init.constant_(d.main[2].weight, w)
        nn.init.constant_(net.main[2].weight, w)
        return [guided_backprop.gradients(m, inputs, end, 0).flatten().tolist() for m in (d, net)]

    assert both(x, 1.0) == [[0, 0, 1], [0, 0, 1]]  # positive input, positive gradient: passed
    assert both(-x, 1.0) == [[pytest.approx(0.2), 0, 0], [0, 0, 0]]  # negative input: LeakyReLU's slope, not passed
    assert both(x, -1.0) == [[-1, 0, 0], [0, 0, 0]]  # negative gradient: not passed
    assert d.main[1].inplace and not d.main[1]._forward_hooks  # the original is untouched


def test_guided_backprop_figure_shapes_and_determinism(digits_model, digits_dir, tmp_path):
    tracking_uri, model_uri = digits_model
    summary, out = run_experiment(tracking_uri, model_uri, guided_backprop, tmp_path, layer=None, features=None,
                              num_features=3, top=4, data=str(digits_dir), max_images=128)
    assert (tmp_path / "guided_backprop.png").exists() and "conv layer 2 (64 features) on 128 images" in summary
    assert 0 < metrics(tracking_uri, out)["trained_concentration"] <= 1

    nets = load_networks(tracking_uri, model_uri)
    images = to_model_input(read_sample(resolve_shards(str(digits_dir)), 32, channels=1, resolution=32), "cpu")
    end = guided_backprop.layer_end(nets.d, 1)
    grads = guided_backprop.visualize(nets.d, images, end, [0, 5], 3)
    assert grads.shape == (2, 3, 1, 32, 32)
    guided = guided_backprop.gradients(guided_backprop.guided(nets.d), images, end, 5)
    plain = guided_backprop.gradients(nets.d, images, end, 5)
    assert guided.shape == plain.shape == images.shape
    assert not torch.allclose(guided, plain) and guided.abs().sum() > 0
    same = [guided_backprop.visualize(nets.random_discriminator(3), images, end, [1, 2], 3) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    assert not torch.allclose(same[0], guided_backprop.visualize(nets.random_discriminator(4), images, end, [1, 2], 3))
    with pytest.raises(ConfigError, match=r"--layer 4: D has conv layers 0..3"):
        guided_backprop.layer_end(nets.d, 4)


def test_forget_changes_pixels_mostly_inside_the_boxes(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    nets = load_networks(tracking_uri, model_uri)
    data = stroke_boxes(nets, seed=0, num=32, labeled=12)
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    summary, out = run_experiment(tracking_uri, model_uri, forget, tmp_path / "out", boxes=str(tmp_path / "boxes.json"),
                              threshold=0.0, C=1.0, extra=4)
    m = metrics(tracking_uri, out)
    assert 1 <= m["maps_dropped"] < m["maps_total"] == 16
    # Measured on this model: 6 of 16 maps, change 0.42 inside vs 0.04 outside (ratio ~10).
    assert m["change_inside"] > 2 * m["change_outside"], m
    assert f"dropped {int(m['maps_dropped'])} of 16 feature maps" in summary
    assert Image.open(tmp_path / "out" / "forget.png").size == (16 * 34 + 2, 2 * 34 + 2)  # 12 labeled + 4 extra
    # Control: dropping the other maps instead changes mostly the outside, so the regression picked the right ones.
    dropped = json.loads((tmp_path / "out" / "dropped.json").read_text())["dropped_maps"]
    z, labeled = latents(32, nets.model.nz, 0)[:12], list(range(12))
    boxes = {int(k): v for k, v in data["boxes"].items()}
    inside = forget.box_mask(boxes, labeled, 32)
    other = forget.generate_without(nets.g, z, [c for c in range(16) if c not in dropped])
    change = (other - generate(nets.g, z)).abs().mean(1)
    assert change[inside].mean() < change[~inside].mean()


def test_label_boxes_writes_the_file_forget_reads(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    file = tmp_path / "labels" / "boxes.json"
    summary, _ = run_experiment(tracking_uri, model_uri, label_boxes, tmp_path / "sheet", num=16, box=[], write=None)
    assert "box what to forget" in summary and (tmp_path / "sheet" / "sheet.png").exists()
    boxes = ["3:2,4,20,28", "3:0,0,4,4", "5:8,8,24,24"]
    summary, _ = run_experiment(tracking_uri, model_uri, label_boxes, tmp_path / "lb", num=16, box=boxes,
                                write=str(file))
    assert "3 box(es) on 2 sample(s)" in summary and (tmp_path / "lb" / "boxes.png").exists()
    assert json.loads(file.read_text()) == {"seed": 0, "num": 16, "boxes": {"3": [[2, 4, 20, 28], [0, 0, 4, 4]],
                                                                              "5": [[8, 8, 24, 24]]}}
    assert forget.read_boxes(str(file), 32) == (0, 16, {3: [[2, 4, 20, 28], [0, 0, 4, 4]], 5: [[8, 8, 24, 24]]})
    summary, _ = run_experiment(tracking_uri, model_uri, forget, tmp_path / "f", boxes=str(file), threshold=0.0, C=1.0,
                            extra=2)
    assert "learned from 2 labeled sample(s)" in summary
    for bad, message in [("16:0,0,4,4", "sample index 16 out of range 0..15"), ("3:2,4,40,28", "0 <= x0 < x1 <= 32"),
                         ("3:4,0,2,4", "0 <= x0 < x1"), ("3-1,2", "expected IDX:x0,y0,x1,y1")]:
        with pytest.raises(ConfigError, match=f"{re.escape(f'--box {bad}:')}.*{re.escape(message)}"):
            run_experiment(tracking_uri, model_uri, label_boxes, tmp_path / "bad", num=16, box=[bad], write=None)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"seed": 0, "num": 8, "boxes": [[0, 0, 4, 4]]}', '"boxes" must map sample indices'),
    ('{"seed": 0, "num": 8, "boxes": {"1": [[0, 0, 4]]}}', "a box must be 4 integers"),
    ('{"seed": 0, "num": 8, "boxes": {"1": [[0, 0, 4.5, 4]]}}', "a box must be 4 integers"),
    ('{"seed": 0, "num": 8, "boxes": {"1": [0, 0, 4, 4]}}', "boxes of sample 1 must be a list of [x0, y0"),
    ('{"seed": 0, "num": 8, "boxes": {"x": [[0, 0, 4, 4]]}}', "box key 'x' is not a sample index"),
    ('{"seed": 0, "num": 8, "boxes": {"8": [[0, 0, 4, 4]]}}', "sample index 8 out of range 0..7"),
    ('{"seed": 0, "num": 8, "boxes": {"1": [[0, 0, 33, 4]]}}', "0 <= x0 < x1 <= 32"),
    ('{"seed": 0, "boxes": {}}', 'expected {"seed": S'),
])
def test_malformed_box_files_are_named(tmp_path, content, message):
    file = tmp_path / "boxes.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(ConfigError, match=f"{re.escape(f'--boxes {file}')}.*{re.escape(message)}"):
        forget.read_boxes(str(file), 32)


def test_forget_needs_positives_and_negatives(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    for boxes, message in [({}, "no positives"), ({"0": [[0, 0, 32, 32]]}, "no negatives")]:
        (tmp_path / "b.json").write_text(json.dumps({"seed": 0, "num": 4, "boxes": boxes}))
        with pytest.raises(ConfigError, match=message):
            run_experiment(tracking_uri, model_uri, forget, tmp_path / "out", boxes=str(tmp_path / "b.json"),
                       threshold=0.0, C=1.0, extra=0)


def test_forget_job_reports_and_names_a_bad_file(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    good, bad = tmp_path / "boxes.json", tmp_path / "bad.json"
    good.write_text(json.dumps(stroke_boxes(load_networks(tracking_uri, model_uri), seed=1, num=16, labeled=6)))
    bad.write_text('{"seed": 0, "num": 4, "boxes": {"9": [[0, 0, 4, 4]]}}')
    client = MlflowClient(tracking_uri)

    def job(boxes, folder):
        return experiments_job(tracking_uri, "forget", "--model", model_uri, "--boxes", str(boxes),
                               "--out", str(folder), cwd=tmp_path)

    def forget_runs(view=ViewType.ACTIVE_ONLY):  # this test's own store: only the runs these jobs opened
        return client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                                  "tags.`dcgan.experiment` = 'forget'", run_view_type=view)

    r = job(good, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"forget on {model_uri}" in r.stdout and "feature maps" in r.stdout and "inside the boxes" in r.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().strip() in r.stdout
    runs = forget_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "change_ratio" in runs[0].data.metrics
    assert runs[0].data.params["boxes"] == str(good) and runs[0].info.run_id in r.stdout
    r = job(bad, tmp_path / "bad")
    assert r.returncode == 2 and f"error: --boxes {bad}: sample index 9 out of range 0..3" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # The bad file's run is deleted and its empty folder removed; the good run stays as it was.
    assert [run.info.run_id for run in forget_runs()] == [runs[0].info.run_id]
    assert len(forget_runs(ViewType.DELETED_ONLY)) == 1 and not (tmp_path / "bad").exists()
