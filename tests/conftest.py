"""Shared fixtures: real shards, one real local Ray cluster for the session, real sqlite MLflow stores. No mocks."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import leftovers
from servers import free_port  # noqa: F401  (re-exported for the tests)

# Token auth would make a later `ray start --head` + `ray job submit` fail (see PITFALLS).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Test traffic stays on loopback and the bed's own hosts: no usage reports from MLflow or Ray (MLflow's would
# otherwise reach out to config.mlflow-telemetry.io from the processes that use MLflow; the hosts inherit this).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test "nodes" hold S3 credentials the way an instance profile gives them: in their environment from the
# start, before the session's Ray (whose workers inherit it) is up. Fake keys for the loopback moto server only.
for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(key, value)
# Ray Train's controller collects reports (and registers checkpoints) at this interval, 2 s by default; tiny test
# runs report every few steps, so most of their wall time would be this wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# MLflow's system metrics every second (10 s by default): tiny runs last seconds.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

REPO = Path(__file__).resolve().parent.parent
# The exit codes a user's script reads (docs/troubleshooting.md), by failure class; 2 is also argparse's own.
EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT, EXIT_TRACKING, EXIT_BUSY = 2, 3, 4, 5, 6
SESSION, TMP_AT_START = leftovers.mark_session()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves nothing running and nothing in /tmp: a leftover fails the session, named."""
    if lines := leftovers.report(SESSION, TMP_AT_START):
        print("\n" + "\n".join(["the session left these behind:", *lines]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


MLFLOW_ENV_AT_START = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}


def restore_mlflow_env() -> None:
    for k, v in MLFLOW_ENV_AT_START.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def mlflow_settings_do_not_leak():
    """mlflow.set_tracking_uri() (which the jobs call) also sets MLFLOW_TRACKING_URI in the process environment, and
    load_config reads that variable as a user's setting: every test starts and ends with the session's own values
    (session fixtures that train, set up inside some test's setup, set it too)."""
    restore_mlflow_env()
    yield
    restore_mlflow_env()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray cluster for every in-process test that trains (starting one costs ~10 s). The dashboard
    stays on: Train cleans up stopped trials through its state API (PITFALLS). Yields the GCS address, which
    job subprocesses join through RAY_ADDRESS instead of starting their own cluster."""
    import ray

    # "local": a new instance, whatever /tmp/ray/ray_current_cluster (left by any earlier `ray start` on the
    # machine, live or not) names; without it ray.init() would try to join that one.
    context = ray.init(address="local", num_cpus=2, log_to_driver=False)
    os.environ["DCGAN_TEST_DASHBOARD"] = f"http://{context.dashboard_url}"  # its job server, for `ray job submit`
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@contextlib.contextmanager
def moto_server(*buckets: str):
    """A real moto S3 server on loopback with `buckets`, and this process's S3 settings pointed at it."""
    import boto3

    from servers import MotoServer, client_env
    from dcgan_dist.data import s3

    server = MotoServer()
    saved = {k: os.environ.get(k) for k in client_env("")}
    os.environ.update(client_env(server.url))
    s3._clients.clear()
    for bucket in buckets:
        boto3.client("s3").create_bucket(Bucket=bucket)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        s3._clients.clear()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits as 32x32 shards, built once per session with the real shard writer."""
    from dcgan_dist.data import shards, sources

    out = tmp_path_factory.mktemp("data") / "digits-32"
    shards.build_shards(sources.Digits(), str(out), resolution=32, encoding="png", shard_size=500, workers=2,
                        progress=False)
    return out


def tiny_overrides(tmp: Path, digits: Path, **extra) -> list[str]:
    """A small, fast training config on the digits shards, all state under `tmp`."""
    values = {
        "data.url": str(digits),
        "data.num_workers": 0,
        "data.shuffle_buffer": 200,
        "model.ngf": 8,
        "model.ndf": 8,
        "train.batch_size": 16,
        "train.steps": 12,
        "train.log_every": 2,
        "train.checkpoint_every": 4,
        "train.sample_every": 6,
        "ray.storage_path": str(tmp / "ray_results"),
        "ray.cpus_per_worker": 0.5,
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "metrics.num_images": 128,
        "metrics.batch_size": 64,
        "metrics.cache_dir": str(tmp / "metrics-cache"),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def checkpoint_steps(names) -> set[int]:
    """The steps of those names that are checkpoint folders' (train_loop.CHECKPOINT_NAME)."""
    from dcgan_dist.train_loop import CHECKPOINT_NAME

    return {int(n.removeprefix("checkpoint_")) for n in names if CHECKPOINT_NAME.fullmatch(n)}


def imported_by(code: str, names, stdin: bytes = b"") -> list[str]:
    """Which of `names` a fresh interpreter holds in sys.modules after running `code` (reading `stdin`): what a
    process that does only that pays for in imports."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {sorted(names)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], input=stdin, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return out.stdout.decode().split()


def sets(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]: overrides as a job's command line."""
    return [x for o in overrides for x in ("--set", o)]


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str


def run_job(script: str, *argv: str, cwd: Path | None = None) -> JobResult:
    """`python jobs/SCRIPT ARGV` as a user runs it, but in this process: the same argument parsing, error
    handling and exit code, without paying ~10 s of imports per call. `cwd` is where relative outputs land."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(REPO / "jobs" / script), *argv]
    code = 0
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return JobResult(code, out.getvalue(), err.getvalue())


def job_subprocess(script: str, *argv: str, cwd: Path | None = None, env: dict | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """`python jobs/SCRIPT ARGV` in a fresh interpreter: for the command-line contract itself (exit code,
    one line on stderr, no traceback), once per job."""
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *argv], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory, digits_dir):
    """A small DCGAN trained on the digits for a few hundred steps in-process, registered as a real model
    version (the champion) in a sqlite MLflow store. Built once; tests use a private copy (`digits_model`)."""

    from dcgan_dist import checkpoint, tracking
    from dcgan_dist.config import load_config
    from dcgan_dist.data.loader import make_batches, resolve_shards, to_model_input
    from dcgan_dist.step import GANStep
    from dcgan_dist.trainer import prepare_inputs, register

    tmp = tmp_path_factory.mktemp("digits-model")
    steps = 300
    cfg = prepare_inputs(load_config(overrides=tiny_overrides(tmp, digits_dir, **{
        "model.ngf": 16, "model.ndf": 16, "train.batch_size": 64, "train.steps": steps,
        "train.run_name": "digits-small"})))
    cfg.train.channels_last, cfg.train.precision = False, "fp32"  # the same model on every machine
    step = GANStep.from_config(cfg)
    batches = make_batches(resolve_shards(cfg.data.url), channels=cfg.model.nc, resolution=32, batch_size=64,
                           seed=0, shuffle_buffer=500)
    for _, images in zip(range(steps), batches):
        step(to_model_input(images, "cpu"))
    run_id, _ = tracking.start_run(cfg, "digits-small")
    state = checkpoint.training_state(step, steps, [checkpoint.rng_state()], {})
    version, _ = register(cfg, run_id, state)
    tracking.end_run(cfg, run_id)
    return tmp / "mlflow.db", f"models:/{cfg.tracking.model_name}/{version}"


@pytest.fixture
def digits_model(digits_store, tmp_path):
    """(tracking uri, model uri) of the trained digits model in a store of this test's own: a copy of the
    session's database, so the runs a test creates (and counts) are its own whatever ran before it."""
    db, model_uri = digits_store
    own = tmp_path / "store" / "mlflow.db"
    own.parent.mkdir()
    shutil.copy(db, own)
    return f"sqlite:///{own}", model_uri


def run_experiment(tracking_uri: str, model_uri: str, module, folder, **kwargs):
    """One experiment module in-process, as jobs/experiments.py runs it; returns (summary, ExperimentRun)."""
    from argparse import Namespace

    from dcgan_dist.config import load_config
    from dcgan_dist.experiments.common import ExperimentRun
    from dcgan_dist.networks import load_networks

    cfg = load_config(overrides=[f"tracking.uri={tracking_uri}"])
    nets = load_networks(tracking_uri, model_uri)
    args = Namespace(seed=kwargs.pop("seed", 0), **kwargs)
    out = ExperimentRun(cfg, nets, module.NAME, folder, vars(args))
    return module.run(args, nets, out), out


def experiments_job(tracking_uri: str, *argv: str, cwd: Path | None = None) -> JobResult:
    """`python jobs/experiments.py ARGV --set tracking.uri=...` as a user runs it (in-process); the default
    output folder (outputs/...) lands under `cwd`, never in the repository."""
    if cwd is None:
        raise ValueError("experiments_job needs a cwd: the default --out is relative to it")
    return run_job("experiments.py", *argv, "--set", f"tracking.uri={tracking_uri}", cwd=cwd)

