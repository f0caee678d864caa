"""The jobs as a user runs them: bad input ends in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_overrides


def run_job(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=5", "unknown config key 'train.stepz'"),
        ("train.steps=lots", "train.steps: expected an integer, got 'lots'"),
        ("train.lr_g=fast", "train.lr_g: expected a number"),
    ],
)
def test_train_rejects_bad_config(override, needle):
    r = run_job("jobs/train.py", "--set", override)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_train_rejects_bad_data_before_starting_ray(tmp_path, digits_dir):
    (tmp_path / "empty").mkdir()
    cases = [
        (tiny_overrides(tmp_path, tmp_path / "missing"), "does not exist; build shards with"),
        (tiny_overrides(tmp_path, tmp_path / "empty"), "holds no manifest.json and no *.tar shards"),
        (tiny_overrides(tmp_path, digits_dir, **{"model.resolution": 64}), "model.resolution is 64 but the shards"),
    ]
    for overrides, needle in cases:
        r = run_job("jobs/train.py", *sets(overrides))
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_help_config_lists_every_key():
    r = run_job("jobs/train.py", "--help-config")
    assert r.returncode == 0 and "train.checkpoint_every" in r.stdout and "tracking.model_name" in r.stdout


def test_prepare_data_digits_and_folder_errors(tmp_path):
    r = run_job("jobs/prepare_data.py", "digits", "--out", str(tmp_path / "d"), "--shard-size", "900")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["num_images"] == 1797 and m["num_shards"] == 2
    r = run_job("jobs/prepare_data.py", "folder", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_step_benchmark_writes_json_rows(tmp_path):
    out = tmp_path / "step.json"
    r = run_job("jobs/benchmark.py", "step", "--resolutions", "32", "--batches", "8", "--steps", "1",
                "--repeats", "1", "--variant", "bf16=train.precision=bf16,train.fused_adam=true", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["name"] for row in rows] == ["canonical", "ours", "bf16"]
    assert rows[2]["options"] == "train.precision=bf16 train.fused_adam=true"
    assert all(row["resolution"] == 32 and row["batch"] == 8 and row["images_per_s"] > 0 for row in rows)
    assert rows[1]["ratio_vs_canonical"] > 0 and rows[2]["ratio_vs_canonical"] > 0
    # FLOPs counted on the canonical step (G and D forward, backward), the same figure on every row
    assert len({row["gflops_per_image"] for row in rows}) == 1
    assert rows[0]["gflops_per_image"] == pytest.approx(0.42, abs=0.005)
    assert all(0 < row["utilization"] == pytest.approx(row["tflops"] / row["bf16_peak_tflops"], rel=0.01)
               for row in rows)


def test_data_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "data.json"
    r = run_job("jobs/benchmark.py", "data", "--images", "120", "--resolution", "32", "--json", str(out),
                "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["stream"]
    assert [row["encoding"] for row in rows] == ["jpg", "raw"]
    assert all(row["stream_s3_images_per_s"] > 0 and row["build_images_per_s_per_core"] > 0 for row in rows)
    assert rows[1]["bytes_per_image"] > rows[0]["bytes_per_image"]  # raw arrays are bigger than JPEGs
    decode = {(row["decoder"], row["device"]): row for row in result["decode"]}
    assert set(decode) == {("pil", "cpu"), ("torchvision", "cpu"), ("nvjpeg", "cuda")}
    for key in (("pil", "cpu"), ("torchvision", "cpu")):  # every JPEG of the shards decoded
        assert decode[key]["images"] == 120 and decode[key]["images_per_s"] > 0 and decode[key]["decode_vs_step"] > 0
    gpu = decode["nvjpeg", "cuda"]
    assert gpu["images_per_s"] > 0 if torch.cuda.is_available() else "no CUDA device" in gpu["note"]


def test_scaling_benchmark_measures_and_models(tmp_path):
    out = tmp_path / "scaling.json"
    r = run_job("jobs/benchmark.py", "scaling", "--resolution", "32", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    measured, model = result["measured"], result["model"]
    assert measured["cpu_step_ms"] > 0 and measured["gloo_allreduce_fp32_ms_2ranks"] > 0
    assert model["gpu_step_source"].startswith("measured" if torch.cuda.is_available() else "assumed")
    assert {(row["link_gbps"], row["gradients"]) for row in model["rows"]} == {
        (100, "fp32"), (100, "bf16 hook"), (400, "fp32"), (400, "bf16 hook")}
    assert "eff_no_overlap" in r.stdout  # the table is printed


def test_tune_and_evaluate_reject_bad_input_in_one_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [
        (["jobs/tune.py", "--set", f"tune.space={tmp_path / 'nope.yaml'}"], "tune.space: search-space file"),
        (["jobs/tune.py", "--set", "tune.metric=fid"], "tune.metric: fid needs metrics.inception_weights"),
        (["jobs/evaluate.py", "--model", "dcgan-generator"], "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        (["jobs/evaluate.py", "--model", "models:/nope@champion", "--set", f"tracking.uri={db}"],
         "models:/nope@champion: no such registered model version"),
    ]
    for args, needle in cases:
        r = run_job(*args)
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_train_checks_the_inception_weights_before_starting_ray(tmp_path, digits_dir):
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"not weights")
    for weights, needle in [(tmp_path / "missing.pth", "does not exist"), (bad, "sha256")]:
        r = run_job("jobs/train.py", *sets(tiny_overrides(tmp_path, digits_dir,
                                                          **{"metrics.inception_weights": weights})))
        assert r.returncode == 2, r.stderr[-2000:]
        assert "metrics.inception_weights" in r.stderr and needle in r.stderr and "Traceback" not in r.stderr
        assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_ray_overhead_benchmark_reports_startup_and_steady_state(tmp_path):
    out = tmp_path / "ray.json"
    r = run_job(str(REPO / "jobs" / "benchmark.py"), "ray-overhead", "--steps", "6", "--log-every", "2",
                "--batch", "16", "--json", str(out), cwd=tmp_path)  # the digits shards get built under tmp_path
    assert r.returncode == 0, r.stderr[-2000:]
    startup, steady = json.loads(out.read_text())
    assert startup["name"] == "time_to_first_step_s" and 0 < startup["value"] < startup["total_wall_s"]
    assert steady["windows"] == 3 and steady["ray_images_per_s"] > 0 and steady["plain_images_per_s"] > 0
    assert steady["ratio_ray_vs_plain"] > 0
    assert (tmp_path / "data" / "digits-32" / "manifest.json").exists()
