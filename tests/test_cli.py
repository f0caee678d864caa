"""The jobs as a user runs them: bad input ends in one clear line and its class's exit code, never a traceback; the
success paths of prepare_data, evaluate and --config FILE; the benchmarks' JSON.

The command-line contract itself (a fresh interpreter, its exit code and stderr) is checked once per job through a
subprocess; every other case runs the same job in-process (`run_job`), which parses, fails and exits the same way.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from mlflow import MlflowClient

from conftest import EXIT_CONFIG, EXIT_DATA, EXIT_TRACKING, job_subprocess, run_job, sets, tiny_overrides


def assert_one_line_error(r, needle: str, code: int = EXIT_CONFIG) -> None:
    assert r.returncode == code, (r.stdout + r.stderr)[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_every_job_fails_bad_input_with_one_line_and_the_exit_code_of_its_class(tmp_path):
    """One real subprocess per job: what the user's shell sees."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [
        (("train.py", "--set", "train.stepz=5"), "error: unknown config key 'train.stepz'", EXIT_CONFIG),
        (("prepare_data.py", "folder", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")), "does not exist",
         EXIT_DATA),
        (("tune.py", "--set", f"tune.space={tmp_path / 'nope.yaml'}"), "tune.space: search-space file", EXIT_CONFIG),
        (("evaluate.py", "--model", "models:/nope@champion", "--set", f"tracking.uri={db}"),
         "models:/nope@champion: no such registered model version", EXIT_TRACKING),
        (("benchmark.py", "step", "--variant", "bf16=train.precision=fp8"), "train.precision: must be one of",
         EXIT_CONFIG),
        (("sample.py", "--set", f"tracking.uri={db}"), "models:/dcgan-generator@champion: no such registered model",
         EXIT_TRACKING),
    ]
    with ThreadPoolExecutor(3) as pool:  # each is mostly its imports: three at a time
        results = list(pool.map(lambda case: job_subprocess(*case[0], cwd=tmp_path), cases))
    for (argv, needle, code), r in zip(cases, results):
        assert_one_line_error(r, needle, code)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, r.stderr


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=5", "unknown config key 'train.stepz' (did you mean train.steps?)"),
        ("trian.steps=5", "unknown config key 'trian.steps' (did you mean train.steps?)"),
        ("train.steps=lots", "train.steps: expected an integer, got 'lots'"),
        ("train.lr_g=fast", "train.lr_g: expected a number"),
        ("train.sync_batchnorm=true", "train.sync_batchnorm: needs ray.use_gpu=true"),
    ],
)
def test_train_rejects_bad_config(override, needle, tmp_path):
    assert_one_line_error(run_job("train.py", "--set", override, cwd=tmp_path), needle)


def test_train_rejects_bad_data_and_weights_before_starting_ray(tmp_path, digits_dir):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"not weights")
    cases = [
        (tiny_overrides(tmp_path, tmp_path / "missing"), "does not exist; build shards with", EXIT_DATA),
        (tiny_overrides(tmp_path, tmp_path / "empty"), "holds no manifest.json and no *.tar shards", EXIT_DATA),
        (tiny_overrides(tmp_path, digits_dir, **{"model.resolution": 64}), "model.resolution is 64 but the shards",
         EXIT_CONFIG),
        (tiny_overrides(tmp_path, digits_dir, **{"metrics.inception_weights": tmp_path / "missing.pth"}),
         "metrics.inception_weights", EXIT_CONFIG),
        (tiny_overrides(tmp_path, digits_dir, **{"metrics.inception_weights": bad}), "sha256", EXIT_CONFIG),
        (tiny_overrides(tmp_path, digits_dir, **{"ray.address": "auto"}),  # a node lost takes its checkpoints
         f"ray.storage_path '{tmp_path / 'ray_results'}' is a folder on this machine, but ray.address 'auto'",
         EXIT_CONFIG),
    ]
    for overrides, needle, code in cases:
        assert_one_line_error(run_job("train.py", *sets(overrides), cwd=tmp_path), needle, code)
    # The inputs are checked before the MLflow run is created, which comes before Ray is started. (The store itself
    # may exist: every job opens it first, under a lock, so that jobs started together do not race to create it.)
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()]), \
        "a job with bad input went on to tracking and Ray"


def test_unusable_data_found_by_the_workers_ends_training_in_one_line(local_ray, tmp_path):
    """A manifest-less folder of 64x64 shards trained at 32: the workers' stream stops after 101 unusable samples
    (it used to skip forever) and the job ends with the data exit code, the reason in one line, the run marked FAILED.
    With ray.max_failures=-1 (the spot recipe: restart forever) too: no restart can fix bad data, so the restarted
    group leaves at once (it used to restart for ever, the job RUNNING and the error never shown)."""
    import io
    import tarfile

    from mlflow import MlflowClient
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (64, 64), 128).save(png, "PNG")
    data = tmp_path / "big"
    data.mkdir()
    for i in range(2):
        with tarfile.open(data / f"shard-{i:06d}.tar", "w") as tar:
            for k in range(120):
                info = tarfile.TarInfo(f"{i}{k:04d}.png")
                info.size = len(png.getvalue())
                tar.addfile(info, io.BytesIO(png.getvalue()))
    overrides = tiny_overrides(tmp_path, data, **{"model.nc": 1, "ray.max_failures": -1, "train.run_name": "big"})
    t0 = time.time()
    r = run_job("train.py", *sets(overrides), cwd=tmp_path)
    assert r.returncode == EXIT_DATA, (r.stdout + r.stderr)[-3000:]
    assert time.time() - t0 < 120  # one restart of the group at most, which leaves at once
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 101 of 101 samples unreadable") and "image is 64x64, expected 32x32" in last, last
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_config_file_reaches_the_job_and_set_wins_over_it(tmp_path, digits_dir):
    """--config FILE through a job: its values are used, --set overrides them, and a bad key in it is named."""
    good = tmp_path / "run.yaml"
    good.write_text("train:\n  steps: 3\n  lr_g: fast\n")
    r = run_job("train.py", "--config", str(good), *sets(tiny_overrides(tmp_path, digits_dir)), cwd=tmp_path)
    assert_one_line_error(r, "train.lr_g: expected a number, got 'fast'")  # the file's value was read
    good.write_text("model:\n  resolution: 64\n")
    r = run_job("train.py", "--config", str(good), *sets(tiny_overrides(tmp_path, digits_dir)), cwd=tmp_path)
    assert_one_line_error(r, "model.resolution is 64 but the shards")  # the file's value reached the data check
    r = run_job("train.py", "--config", str(good), *sets(tiny_overrides(tmp_path, digits_dir)),
                "--set", "model.resolution=48", cwd=tmp_path)
    assert_one_line_error(r, "model.resolution: must be one of")  # --set came after the file
    r = run_job("train.py", "--config", str(tmp_path / "none.yaml"), cwd=tmp_path)
    assert_one_line_error(r, f"config file {tmp_path / 'none.yaml'} does not exist")


def test_help_config_lists_every_key(tmp_path):
    r = run_job("train.py", "--help-config", cwd=tmp_path)
    assert r.returncode == 0 and "train.checkpoint_every" in r.stdout and "tracking.model_name" in r.stdout


def test_prepare_data_digits_folder_and_cifar10(tmp_path):
    from PIL import Image

    from test_s3_data import make_cifar

    r = run_job("prepare_data.py", "digits", "--out", str(tmp_path / "d"), "--shard-size", "900", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["num_images"] == 1797 and m["num_shards"] == 2

    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (tmp_path / "photos" / "sub").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80 + 10 * i, 60), color).save(tmp_path / "photos" / ("sub" if i else ".") / f"{i}.png")
    r = run_job("prepare_data.py", "folder", str(tmp_path / "photos"), "--out", str(tmp_path / "f"), "--resolution",
                "32", "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 images in 1 shard(s)" in r.stdout
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert (m["num_images"], m["channels"], m["resolution"], m["source"]) == (3, 3, 32, "folder")

    make_cifar(tmp_path / "cifar-10-batches-py", per_batch=4)
    r = run_job("prepare_data.py", "cifar10", str(tmp_path / "cifar-10-batches-py"), "--split", "all", "--out",
                str(tmp_path / "c"), "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (m["num_images"], m["channels"], m["source"]) == (24, 3, "cifar10")  # 6 batches of 4
    assert m["classes"][:2] == ["airplane", "automobile"]


def test_tune_and_evaluate_reject_bad_input_in_one_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [
        (["tune.py", "--set", "tune.metric=fid"], "tune.metric: fid needs metrics.inception_weights", EXIT_CONFIG),
        (["evaluate.py", "--model", "dcgan-generator"], "expected models:/NAME@ALIAS or models:/NAME/VERSION",
         EXIT_CONFIG),
        (["evaluate.py", "--model", "models:/nope/3", "--set", f"tracking.uri={db}"],
         "models:/nope/3: no such registered model version", EXIT_TRACKING),
    ]
    for argv, needle, code in cases:
        assert_one_line_error(run_job(*argv, cwd=tmp_path), needle, code)


def test_evaluate_job_scores_the_champion_on_other_data(digits_model, digits_dir, tmp_path):
    """`jobs/evaluate.py --model ...@champion --set data.url=OTHER` (as --data OTHER): scored against the data asked
    for (the setting was silently ignored for the data the model was trained on), logged and tagged."""
    from mlflow import MlflowClient

    from dcgan_dist.data import shards, sources
    from dcgan_dist.data.loader import resolve_shards
    from dcgan_dist.metrics.evaluator import Protocol

    tracking_uri, _ = digits_model
    other = tmp_path / "digits-other"
    shards.build_shards(sources.Digits(), str(other), resolution=32, encoding="png", shard_size=900, progress=False)
    r = run_job("evaluate.py", "--model", "models:/dcgan-generator@champion", "--set", f"data.url={other}",
                "--set", f"tracking.uri={tracking_uri}", "--set", "metrics.num_images=64",
                "--set", f"metrics.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on {other}" in r.stdout and "swd" in r.stdout
    client = MlflowClient(tracking_uri)
    mv = client.get_model_version_by_alias("dcgan-generator", "champion")
    protocol = Protocol.from_key(mv.tags["protocol.swd"])
    assert protocol.data == resolve_shards(str(other)).fingerprint != resolve_shards(str(digits_dir)).fingerprint
    assert protocol.num_fake == 64 and float(mv.tags["metric.swd"]) > 0
    # The evaluation run's input dataset is the data it was scored on (lineage), named by its manifest's digest.
    run = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                             f"tags.`dcgan.evaluates` = 'models:/dcgan-generator/{mv.version}'")[0]
    (data,) = [i.dataset for i in run.inputs.dataset_inputs]
    assert data.digest == resolve_shards(str(other)).fingerprint[:32] and str(other) in data.source


def dcgan_step_gflops(resolution: int, width: int = 64, nc: int = 3, nz: int = 100, k: int = 4) -> float:
    """GFLOPs per image of pytorch/examples' training step, from the architecture on paper (not from our modules):
    a conv costs 2 x Cin x Cout x k^2 per output pixel (a transposed conv per input pixel); the step runs G forward
    and backward (no input gradient for z), D forward and backward on the real and the fake batch (no input gradient
    for either) and once more for G's update (every gradient, D's weight gradients included, as the example does)."""
    blocks = {32: 3, 64: 4}[resolution]
    chans = [width * 2 ** i for i in range(blocks)]  # D: 64, 128, 256 at 32x32; G mirrors it
    d = [2 * nc * chans[0] * k * k * (resolution // 2) ** 2]
    d += [2 * chans[i] * chans[i + 1] * k * k * (resolution // 2 ** (i + 2)) ** 2 for i in range(blocks - 1)]
    d += [2 * chans[-1] * k * k]  # 4x4 -> one logit
    g = [2 * nz * chans[-1] * k * k]  # 1x1 -> 4x4
    g += [2 * chans[i + 1] * chans[i] * k * k * (4 * 2 ** (blocks - 2 - i)) ** 2 for i in reversed(range(blocks - 1))]
    g += [2 * chans[0] * nc * k * k * (resolution // 2) ** 2]
    f_d, f_g = sum(d), sum(g)
    return (3 * f_g - g[0] + 3 * (3 * f_d) - 2 * d[0]) / 1e9


def test_step_benchmark_writes_json_rows(tmp_path):
    """Each row is read against the peak of its own precision: on a CPU without native bf16 (AVX-512 but no
    AVX512-BF16 or AMX) a bf16 matmul peak is below what an fp32 step achieves, so one bf16 peak for every row fails
    there (it did). `ONEDNN_MAX_CPU_ISA=AVX512_CORE` shows that case on a CPU that has bf16."""
    out = tmp_path / "step.json"
    r = run_job("benchmark.py", "step", "--resolutions", "32", "--batches", "8", "--steps", "1", "--repeats", "1",
                "--variant", "bf16=train.precision=bf16,train.fused_adam=true", "--variant", "fp32=train.precision=fp32",
                "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["canonical", "ours", "bf16", "fp32"]
    assert rows["bf16"]["options"] == "train.precision=bf16 train.fused_adam=true"
    assert all(row["resolution"] == 32 and row["batch"] == 8 and row["images_per_s"] > 0 for row in rows.values())
    # the precision each row ran in: `auto` follows torch's own CPUID probes (AVX512-BF16, or AMX) and the cap
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    native = native and os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL") not in ("AVX512_CORE", "AVX512_CORE_VNNI", "AVX2")
    assert all(row["native_bf16"] == native for row in rows.values())
    assert [rows[k]["precision"] for k in rows] == ["fp32", "bf16" if native else "fp32", "bf16", "fp32"]
    # FLOPs counted on the canonical step, the same figure on every row, equal to the count from the architecture
    assert len({row["gflops_per_image"] for row in rows.values()}) == 1
    assert rows["canonical"]["gflops_per_image"] == pytest.approx(dcgan_step_gflops(32), abs=0.001)
    # fp32 rows share the fp32 peak; a mixed-precision row's ceiling is never below it; no row runs above its own
    assert rows["canonical"]["peak_tflops"] == rows["fp32"]["peak_tflops"] <= rows["bf16"]["peak_tflops"]
    for row in rows.values():
        assert row["tflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_s"] / 1e3, rel=0.02)
        assert 0 < row["tflops"] < row["peak_tflops"], row
        assert row["utilization"] == pytest.approx(row["tflops"] / row["peak_tflops"], rel=0.02)
    for k in ("ours", "bf16", "fp32"):  # ratios of the measured rates, not of anything else
        assert rows[k]["ratio_vs_canonical"] == pytest.approx(
            rows[k]["images_per_s"] / rows["canonical"]["images_per_s"], rel=0.02)


def test_data_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "data.json"
    r = run_job("benchmark.py", "data", "--images", "60", "--resolution", "32", "--json", str(out),
                "--workdir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["stream"]
    assert [row["encoding"] for row in rows] == ["jpg", "raw"]
    assert all(row["stream_s3_images_per_s"] > 0 and row["build_images_per_s_per_core"] > 0 for row in rows)
    assert rows[1]["bytes_per_image"] > rows[0]["bytes_per_image"]  # raw arrays are bigger than JPEGs
    decode = {(row["decoder"], row["device"]): row for row in result["decode"]}
    assert set(decode) == {("pil", "cpu"), ("torchvision", "cpu"), ("nvjpeg", "cuda")}
    for key in (("pil", "cpu"), ("torchvision", "cpu")):  # every JPEG of the shards decoded
        assert decode[key]["images"] == 60 and decode[key]["images_per_s"] > 0 and decode[key]["decode_vs_step"] > 0
    gpu = decode["nvjpeg", "cuda"]
    assert gpu["images_per_s"] > 0 if torch.cuda.is_available() else "no CUDA device" in gpu["note"]


def test_scaling_benchmark_measures_and_models(tmp_path):
    out = tmp_path / "scaling.json"
    r = run_job("benchmark.py", "scaling", "--resolution", "32", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    measured, model = result["measured"], result["model"]
    assert measured["cpu_step_ms"] > 0 and measured["gloo_allreduce_fp32_ms_2ranks"] > 0
    assert model["gpu_step_source"].startswith("measured" if torch.cuda.is_available() else "assumed")
    assert {(row["link_gbps"], row["gradients"]) for row in model["rows"]} == {
        (100, "fp32"), (100, "bf16 hook"), (400, "fp32"), (400, "bf16 hook")}
    assert "eff_no_overlap" in r.stdout  # the table is printed


def test_ray_overhead_benchmark_reports_startup_and_steady_state(local_ray, tmp_path, monkeypatch):
    """The training subprocess joins the session's Ray (RAY_ADDRESS) instead of starting its own; its MLflow store
    and checkpoints leave nothing behind in the temp folder."""
    import tempfile
    from pathlib import Path

    left = set(Path(tempfile.gettempdir()).glob("dcgan-bench-ray-*"))
    monkeypatch.setenv("RAY_ADDRESS", local_ray)
    out = tmp_path / "ray.json"
    r = run_job("benchmark.py", "ray-overhead", "--steps", "30", "--log-every", "2", "--batch", "16",
                "--json", str(out), cwd=tmp_path)  # the digits shards get built under tmp_path
    assert r.returncode == 0, r.stderr[-2000:]
    startup, steady, lag = json.loads(out.read_text())
    assert startup["name"] == "time_to_first_step_s" and 0 < startup["value"] < startup["total_wall_s"]
    assert steady["windows"] == 15 and steady["ray_images_per_s"] > 0 and steady["plain_images_per_s"] > 0
    assert steady["ratio_ray_vs_plain"] == pytest.approx(steady["ray_images_per_s"] / steady["plain_images_per_s"],
                                                         rel=0.01)
    # Metrics are visible while the run goes on, not at its (only) checkpoint: seconds after their step.
    assert lag["checkpoint_every"] == 1000 and lag["visible_before_the_last_step"] >= 1 and lag["max"] < 10, lag
    assert (tmp_path / "data" / "digits-32" / "manifest.json").exists()
    assert set(Path(tempfile.gettempdir()).glob("dcgan-bench-ray-*")) == left


def test_tracking_load_benchmark_reports_what_one_authenticated_server_answered(tmp_path):
    """1 and 2 simulated trials against cluster/start_mlflow.sh with basic auth and the login cache on: one row
    each, every point arrived (read back from the server by the benchmark), the server's CPU per request and the
    senders' latencies measured."""
    out = tmp_path / "load.json"
    r = job_subprocess("benchmark.py", "tracking-load", "--trials", "1", "2", "--seconds", "4", "--log-every-s",
                       "0.5", "--grid-every", "4", "--cache-ttls", "60", "--workdir", str(tmp_path), "--json",
                       str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(row["auth_cache_ttl_s"], row["trials"]) for row in rows] == [(60, 1), (60, 2)]
    for row in rows:
        assert row["all_arrived"] and row["backlog_at_end"] == 0, row
        assert row["offered_batches_per_s"] == row["trials"] / 0.5
        assert row["requests_per_s"] > 0 and row["points_per_s"] > 0 and row["server_cpu_ms_per_request"] > 0
        assert 0 < row["send_p50_ms"] <= row["send_p99_ms"]
    assert not list(tmp_path.glob("tmp*"))  # the servers' state goes with the run


@pytest.mark.timeout(900)
def test_soak_benchmark_samples_every_process_and_checks_each_image_and_step(tmp_path):
    """A quarter of a minute of the soak on 1,100 images, counted from when both training workers are up (the job's
    start takes a minute or more: Ray, the shards listed in S3, the workers): more than 1,000 shards in the loopback
    S3 (its listings paginate), the driver's own Ray with 2 training workers sampled, exit 143 at SIGTERM, every
    logged step once and every image taken as often as every other (+-1) over the epochs so far."""
    out = tmp_path / "soak"
    r = job_subprocess("benchmark.py", "soak", "--images", "1100", "--minutes", "0.25", "--sample-s", "2",
                       "--warmup-min", "0", "--out", str(out), "--set", "model.ngf=16", "--set", "model.ndf=16",
                       timeout=900)
    job_log = (out / "train.log").read_text(errors="replace") if (out / "train.log").exists() else ""
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:], job_log[-3000:])
    result = json.loads((out / "soak.json").read_text())
    assert result["training_started_s"] > 0  # the quarter minute counts from there
    assert result["shards"] > 1000 and result["exit_code"] == 143 and not result["ended_early"]
    samples = result["samples"]
    assert len(samples) >= 12 and all(s["driver.processes"] == 1 for s in samples)
    assert max(s["train_workers.processes"] for s in samples) == 2  # found in the driver's process tree
    assert all(s["mlflow_server.rss_mb"] > 0 and s["s3_server.rss_mb"] > 0 for s in samples)
    assert set(result["growth_pct_per_hour"]) == set(result["growth_per_hour"]) >= {"train_workers.rss_mb", "tmp_mb"}
    mlflow, images = result["mlflow"], result["images_taken"]
    assert mlflow["logged_steps"] >= 1 and mlflow["duplicated_steps"] == mlflow["missing_steps"] == 0
    assert images["images_taken"] == 128 * images["steps_in_key_log"]  # 2 workers x batch 64, every step once
    times = {int(k): n for k, n in images["times_taken"].items()}  # times an image was taken -> how many images
    assert sum(k * n for k, n in times.items()) == images["images_taken"] and max(times) - min(times) <= 1
    assert images["distinct_images"] == min(1100, images["images_taken"]) and images["even"]
    assert (out / "soak.png").stat().st_size > 0 and b"step" in (out / "train.log").read_bytes()
    assert len(re.findall(r"rank \d of 2 .* malloc arenas (capped at 2|as the environment set)", job_log)) == 2


@pytest.mark.parametrize("job", ["train.py", "tune.py", "evaluate.py", "sample.py"])
def test_a_mistyped_key_is_refused_before_torch_mlflow_or_ray_is_imported(job, tmp_path):
    """A typo costs the interpreter's start, not the 3-4 CPU-seconds of torch's and MLflow's imports. Python's own
    import log (PYTHONPROFILEIMPORTTIME) says what the job imported before it refused."""
    r = job_subprocess(job, "--set", "train.stepz=5", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    assert r.returncode == EXIT_CONFIG and "unknown config key 'train.stepz'" in r.stderr.splitlines()[-1], r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "dcgan_dist.config" in imported and not imported & {"torch", "mlflow", "ray"}, sorted(imported)


@pytest.mark.parametrize("job", ["train.py", "tune.py", "evaluate.py", "sample.py", "experiments.py",
                                 "prepare_data.py", "benchmark.py"])
def test_every_jobs_help_ends_with_examples(job, tmp_path):
    r = run_job(job, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    examples = r.stdout.split("examples:\n", 1)[-1]
    assert "examples:\n" in r.stdout and f"python jobs/{job}" in examples, r.stdout[-2000:]
