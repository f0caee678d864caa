"""End to end on a real local Ray cluster with 2 DDP workers, real shards and a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from mlflow import MlflowClient

from conftest import EXIT_BUSY, checkpoint_steps, tiny_overrides
from dcgan_dist.config import load_config
from dcgan_dist.tracking import find_run
from dcgan_dist.trainer import train


def history(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_worker_run_with_the_fast_options_tracks_and_registers_the_best_checkpoint(
        local_ray, tmp_path, digits_dir):
    """2 DDP ranks with DataLoader worker processes, bf16 autocast, fused Adam, small DDP buckets, bf16-compressed
    gradients (gloo), a generator EMA and evaluations: ranks stay identical; MLflow run, metrics, grids, allreduce
    times; the best scored checkpoint registered with its model card as champion. (A rerun that continues the run,
    in another precision: the resumes test.)"""
    base = tiny_overrides(tmp_path, digits_dir, **{
        "train.run_name": "e2e", "train.steps": 8, "data.num_workers": 1, "train.eval_every": 4,
        "train.ema_decay": 0.9, "train.precision": "bf16", "train.fused_adam": "true", "ray.ddp_bucket_mb": 1,
        "ray.grad_compression": "bf16", "train.check_replicas": "true"})
    cfg = load_config(overrides=base)
    out = train(cfg)
    assert out.step == 8 and out.model_version == "1"
    digests = out.metrics["g_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # compressed allreduce: both ranks get the same mean

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8" and run.data.params["model.ngf"] == "8"
    assert run.data.params["model.nc"] == "1"  # resolved from the manifest before logging
    assert run.data.tags["precision"] == "bf16"
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "allreduce_ms"):
        assert history(client, out.run_id, key) == [2, 4, 6, 8], key
    assert run.data.metrics["images_per_s"] > 0 and run.data.metrics["data_skipped"] == 0
    # MLflow's system metrics, one monitor per node (one node here), named by its address.
    node = ray.util.get_node_ip_address()
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage"):
        assert f"system/{node}/{name}" in run.data.metrics, [k for k in run.data.metrics if k.startswith("system")]
    # allreduce time per step, measured by the comm hook on every rank: buckets from G and D (at least one
    # each), and inside the step's time
    assert out.metrics["allreduce_buckets"] >= 2
    assert 0 < out.metrics["allreduce_ms"] < 1e3 * cfg.train.batch_size * 2 / out.metrics["images_per_s"]
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert "config.yaml" in artifacts
    samples = {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert samples == {"samples/step_000006.png", "samples/step_000008.png"}

    swd = {m.step: m.value for m in client.get_metric_history(out.run_id, "swd")}
    assert sorted(swd) == [4, 8]  # every eval_every steps and at the end
    assert {m.step for m in client.get_metric_history(out.run_id, "swd_16")} == {4, 8}
    best_step = min(swd, key=swd.get)
    assert out.best_step == best_step and out.best_scores["swd"] == pytest.approx(swd[best_step])
    mv = client.get_model_version(cfg.tracking.model_name, out.model_version)
    assert mv.tags["step"] == str(best_step) and float(mv.tags["metric.swd"]) == pytest.approx(swd[best_step])
    protocol = client.get_run(out.run_id).data.tags["protocol.swd"]
    assert mv.tags["protocol.swd"] == protocol and '"num_fake": 128' in protocol
    assert out.champion  # the first version in this registry
    # The model card: the data by its manifest sha256, the scores with their protocol, the sample grid artifact.
    from dcgan_dist.data.loader import resolve_shards

    card, grid = mv.description, mv.tags["card.grid"]
    assert f"manifest sha256: `{resolve_shards(cfg.data.url).fingerprint}`" in card
    assert f"swd: {swd[best_step]:.4f} (protocol `{protocol}`)" in card and f"steps: {best_step}," in card
    assert "`train.ema_decay` = `0.9`" in card and f"artifact `{grid}`" in card
    assert grid in {a.path for a in client.list_artifacts(out.run_id, "model_card")}

    # The registered (EMA) generator scores what training measured for that step (same noise, same protocol),
    # and serves images through MLflow's pyfunc.
    from dcgan_dist import evaluation
    from dcgan_dist.trainer import prepare_inputs

    measured = evaluation.measurer(prepare_inputs(load_config(overrides=base)))(out.model_version)
    assert measured[0]["swd"] == pytest.approx(swd[best_step], rel=1e-3)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model("models:/dcgan-generator@champion")
    images = model.predict(np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32))
    assert images.shape == (5, 1, 32, 32)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0


def wait_for_logged_step(cfg, run_name: str, step: int, running=lambda: True, timeout: float = 180) -> None:
    """Until MLflow has `loss_d` at `step` for the run (or the job is gone, or the timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline and running():
        try:
            if step in history(MlflowClient(cfg.tracking.uri), find_run(cfg, run_name), "loss_d"):
                return
        except Exception:  # the database or the run not made yet
            pass
        time.sleep(0.2)


def ray_job(*argv: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job ARGV`. The job server answers "No available agent to submit job, please try again later" while its
    node's agent is not (yet) registered: tried again, as it says, for up to a minute (no job was made)."""
    import sys

    deadline = time.time() + 60
    while True:
        r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *argv], capture_output=True, text=True,
                           env=env, timeout=timeout)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            return r
        time.sleep(2)


def processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of the machine's processes."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            found.append((int(p.name), (p / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]))
        except (ValueError, OSError):
            continue
    return found


def live_train_workers() -> list[int]:
    """The pids of this cluster's live Ray Train worker processes."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # ours, not another Ray on the machine
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def staged() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("dcgan-ckpt-*"))


def test_one_run_meets_a_killed_worker_then_the_tracking_server_and_s3_going_down_and_ends_with_every_step_once(
        local_ray, tmp_path, digits_dir):
    """One 2-worker run from S3 (moto on loopback), tracked on a real server (cluster/start_mlflow.sh), with
    checkpoints uploaded beside training (as on GPUs), meets in turn:
    - a training worker's process SIGKILLed once step 8 is logged (a real crash): Ray Train restarts the group, which
      resumes right after a checkpoint, not from step 1;
    - then, once the new group has checkpointed, the tracking server killed: steps trained while it is down are held
      and reach it once it is back, with the time they were measured;
    - meanwhile S3 stopped for 3 s and brought back (its data put back: moto keeps none): the new group's streams
      retry (data_retries) instead of skipping or failing.
    Checked once at the end: every logged step once, the run FINISHED with one registered version, Ray kept the last
    two checkpoints, and the node's temp folder keeps no staging folder, not even one left by a worker killed while
    staging."""
    import boto3

    from conftest import moto_server
    from dcgan_dist.data import shards, sources
    from servers import MlflowServer

    dead = subprocess.Popen(["true"])  # a folder of a worker SIGKILLed while staging (its pid is gone)
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"dcgan-ckpt-{dead.pid}-orphan"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"half")
    before = staged() - {orphan}
    url = "s3://data/train-digits/"
    steps = 80
    with moto_server("data") as moto, contextlib.ExitStack() as stack:
        def put_data():
            shards.build_shards(sources.Digits(), url, resolution=32, encoding="png", shard_size=100, workers=2,
                                progress=False)

        put_data()
        server = MlflowServer(tmp_path / "server")
        stack.callback(server.stop)
        overrides = tiny_overrides(tmp_path, "unused", **{
            "data.url": url, "data.shuffle_buffer": 32, "tracking.uri": server.url, "train.run_name": "campaign",
            "train.steps": steps, "train.checkpoint_every": 2, "train.eval_every": 0, "ray.keep_checkpoints": 2,
            "train.checkpoint_upload": "async",
            # moto comes back empty: until the data is put back every shard fails at once (NoSuchBucket), not
            # slowly by retries as in a real outage; don't let that count as bad data here
            "data.max_bad_shards": 10**6})
        folder = tmp_path / "ray_results" / "campaign"
        client = MlflowClient(server.url)
        cfg = load_config(overrides=overrides)
        faults, done = {}, threading.Event()

        def saved() -> set[int]:
            return checkpoint_steps(p.name for p in folder.glob("*"))

        def checkpointed(step: int) -> bool:
            return max(saved(), default=0) >= step

        def wait(condition, what: str) -> None:
            while not condition():
                assert not done.is_set(), f"training ended before {what}"
                time.sleep(0.05)

        def campaign():
            wait(lambda: checkpointed(4), "its first checkpoints")
            wait_for_logged_step(cfg, "campaign", 8, running=lambda: not done.is_set())
            pids = live_train_workers()
            assert len(pids) == 2, pids
            os.kill(pids[-1], signal.SIGKILL)
            # The new group's first checkpoint: one past every checkpoint there once neither old worker is alive.
            wait(lambda: len(live := live_train_workers()) == 2 and not set(live) & set(pids), "the group restarted")
            newest = max(saved(), default=0)
            wait(lambda: checkpointed(newest + 2), "the new group checkpointed")
            server.stop()
            faults["tracking_down_at"] = time.time()
            moto.stop()
            time.sleep(3)
            assert not done.is_set(), "training ended during the S3 outage"
            moto.start()
            boto3.client("s3").create_bucket(Bucket="data")
            put_data()
            server.start()
            faults["tracking_back_at"] = time.time()

        def run_campaign():
            try:
                campaign()
            except BaseException as e:  # reported by the test's thread
                faults["error"] = e

        watcher = threading.Thread(target=run_campaign, daemon=True)
        watcher.start()
        try:
            out = train(cfg)
        finally:
            done.set()
            watcher.join(timeout=120)
        assert "error" not in faults, faults
        assert out.step == steps and out.model_version == "1"
        # The killed worker: the second group started right after a checkpoint, past step 1.
        start = out.metrics["start_step"]
        assert start > 1 and (start - 1) % 2 == 0, start
        # S3: the new group's streams retried through the outage.
        assert out.metrics["data_retries"] > 0, {k: out.metrics[k] for k in ("data_retries", "data_skipped")}
        # The tracking server: steps measured while it was down arrived after it came back.
        logged = {m.step: m.timestamp / 1000 for m in client.get_metric_history(out.run_id, "loss_d")}
        assert sorted(logged) == list(range(2, steps + 1, 2))  # none lost, none twice
        assert any(faults["tracking_down_at"] < t < faults["tracking_back_at"] for t in logged.values()), faults
        assert client.get_run(out.run_id).info.status == "FINISHED"
        assert saved() == {steps - 2, steps}  # Ray's retention: the last two
        assert staged() - before == set()
        assert not orphan.exists()


def test_a_second_job_on_a_busy_run_name_is_refused_and_sigterm_stops_the_first_cleanly(local_ray, tmp_path,
                                                                                         digits_dir):
    """A second job with a running job's run name is refused at once. Then what `ray job stop` does to the first:
    SIGTERM to its driver. Its 2 workers save a checkpoint at their next log step and leave; the MLflow run is
    KILLED with every step up to there; the job exits 143 naming the step."""
    import re
    import sys

    from conftest import REPO, run_job, sets

    overrides = tiny_overrides(tmp_path, digits_dir, **{"train.run_name": "stopped", "train.steps": 100000,
                                                         "train.checkpoint_every": 100000, "train.sample_every": 0,
                                                         "tracking.register": "false",
                                                         # RAY_ADDRESS counts as a cluster: a folder it shares
                                                         "ray.storage_path": f"file://{tmp_path / 'ray_results'}"})
    cfg = load_config(overrides=overrides)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *sets(overrides)], cwd=tmp_path,
                            env={**os.environ, "RAY_ADDRESS": local_ray}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_logged_step(cfg, "stopped", 6, running=lambda: proc.poll() is None)
        # A second job with the same run name meanwhile: refused at once, naming the holder; the first goes on.
        t0 = time.time()
        second = run_job("train.py", *sets(overrides), cwd=tmp_path)
        assert second.returncode == EXIT_BUSY and time.time() - t0 < 30, second.stderr[-2000:]
        assert "train.run_name 'stopped' is being trained by" in second.stderr.strip().splitlines()[-1]
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-4000:]
    step = int(re.search(r"stopped: run stopped stopped at step (\d+), its checkpoint in", out).group(1))
    assert step >= 6 and (tmp_path / "ray_results" / "stopped" / f"checkpoint_{step:08d}" / "state.pt").is_file()
    client = MlflowClient(cfg.tracking.uri)
    run_id = find_run(cfg, "stopped")
    assert client.get_run(run_id).info.status == "KILLED"
    assert history(client, run_id, "loss_d") == list(range(2, step + 1, 2))


def test_a_full_storage_disk_ends_the_run_in_one_line_and_the_checkpoint_before_stays_whole(local_ray, tmp_path,
                                                                                             digits_dir):
    """ray.storage_path on a small tmpfs (a real filesystem of its own, root only) that fills up after the first
    checkpoint: the job ends with one line naming the folder and the space, the checkpoint exit code, the MLflow
    run FAILED, and the checkpoint before still loads."""
    import shutil
    import sys

    from conftest import EXIT_CHECKPOINT, REPO, sets
    from dcgan_dist import checkpoint

    storage = tmp_path / "small"
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(storage)], check=True)
    try:
        overrides = tiny_overrides(tmp_path, digits_dir, **{
            "train.run_name": "full", "train.steps": 1000, "train.checkpoint_every": 50, "train.sample_every": 0,
            "tracking.register": "false", "ray.storage_path": f"file://{storage}"})
        job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *sets(overrides)], cwd=tmp_path,
                               env={**os.environ, "RAY_ADDRESS": local_ray}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            first = storage / "full" / "checkpoint_00000050"
            # A worker copies its checkpoint to storage inside its report: once step 56 is logged, step 50's is whole.
            wait_for_logged_step(load_config(overrides=overrides), "full", 56, running=lambda: job.poll() is None)
            assert (first / "state.pt").exists(), "no first checkpoint"
            (storage / "filler").write_bytes(b"\0" * (shutil.disk_usage(storage).free - (256 << 10)))
            out, _ = job.communicate(timeout=180)
        finally:
            job.kill()
        assert job.returncode == EXIT_CHECKPOINT, out[-4000:]
        last = out.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: ray.storage_path file://{storage}: 0\.\d MiB free, the checkpoint of step 100 "
                            r"needs \d+\.\d MiB: .*", last), out[-3000:]
        cfg = load_config(overrides=overrides)
        assert MlflowClient(cfg.tracking.uri).get_run(find_run(cfg, "full")).info.status == "FAILED"
        assert checkpoint.load(str(first))["step"] == 50
    finally:
        subprocess.run(["umount", str(storage)], check=True)


def test_after_ray_job_stop_the_next_job_trains_on_and_one_whose_driver_froze_past_its_lease_is_taken_over(
        local_ray, tmp_path, digits_dir):
    """Two things users meet on one run, every job through the real job server with the S3 settings in its
    runtime_env (Ray Train's controller, which writes to S3 too, gets only that):
    - `ray job stop` with Ray's default 3 s between SIGTERM and SIGKILL: the driver dies before any clean-up of its
      own. Its stop request must die with it: the next job trains on past its first log step (a request left in
      Ray's key-value store stopped it there, exit 0 "finished").
    - That next job's driver frozen (SIGSTOP) past the lease's ttl, as a stalled or cut-off driver would be: its
      workers must stop writing (no checkpoint, no metric) once the lease lapsed; the same submit again takes the
      lease over, resumes from the last checkpoint and trains to train.steps; the frozen job, thawed, fails with the
      busy exit code naming the lost lease and registers nothing.
    MLflow has every logged step once, one run, FINISHED, one version."""
    import json
    import sys
    import urllib.request

    import boto3

    from conftest import REPO, moto_server, sets
    from servers import client_env

    ttl = 6
    with moto_server("ckpt") as moto:
        overrides = tiny_overrides(tmp_path, digits_dir, **{
            "train.run_name": "handed", "train.steps": 100000, "train.checkpoint_every": 4, "train.sample_every": 0,
            "train.lease_ttl_s": ttl, "ray.storage_path": "s3://ckpt/runs"})
        cfg = load_config(overrides=overrides)
        client = MlflowClient(cfg.tracking.uri)
        dashboard = os.environ["DCGAN_TEST_DASHBOARD"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

        def submit(*more: str, wait: bool) -> subprocess.CompletedProcess:
            runtime_env = json.dumps({"env_vars": client_env(moto.url)})
            entry = ["--", sys.executable, str(REPO / "jobs" / "train.py"), *sets([*overrides, *more])]
            return ray_job("submit", "--address", dashboard, f"--runtime-env-json={runtime_env}",
                           *([] if wait else ["--no-wait"]), *entry, env=env)

        def submitted(r: subprocess.CompletedProcess) -> str:
            assert r.returncode == 0, r.stdout + r.stderr
            return re.search(r"Job '([^']+)' submitted successfully", r.stdout + r.stderr).group(1)

        def logged() -> list[int]:
            return history(client, find_run(cfg, "handed"), "loss_d")

        def written() -> tuple[set[int], list[int]]:
            """The steps of the run's whole checkpoints in S3, and its logged steps in MLflow."""
            pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix="runs/handed/")
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
            whole = (k.removeprefix("runs/handed/").removesuffix("/state.pt") for k in keys if k.endswith("/state.pt"))
            return checkpoint_steps(whole), logged()

        def job(job_id: str) -> dict:
            with urllib.request.urlopen(f"{dashboard}/api/jobs/{job_id}", timeout=10) as r:
                return json.load(r)

        def running(job_id: str) -> bool:
            return job(job_id)["status"] in ("PENDING", "RUNNING")

        # `ray job stop` with the default wait, then the next job.
        stopped_id = submitted(submit(wait=False))
        wait_for_logged_step(cfg, "handed", 6, running=lambda: running(stopped_id))
        stop = ray_job("stop", "--address", dashboard, stopped_id, env=env, timeout=120)
        assert stop.returncode == 0 and "stopped" in (stop.stdout + stop.stderr).lower(), stop.stdout + stop.stderr
        stopped_at = max(logged())
        time.sleep(ttl + 1)  # a driver SIGKILLed before its clean-up leaves its lease to lapse
        frozen_id = submitted(submit(wait=False))
        # Its first log step is at most stopped_at + 4 (a step the stopped job's workers logged late, then the
        # checkpoint before it): two log steps past that, it still runs.
        wait_for_logged_step(cfg, "handed", stopped_at + 8, running=lambda: running(frozen_id))
        assert job(frozen_id)["status"] == "RUNNING", job(frozen_id)
        assert stopped_at + 8 in logged()

        # Its driver frozen past the lease's ttl, then the same submit again.
        (driver,) = [pid for pid, argv in processes() if argv[1:2] == [str(REPO / "jobs" / "train.py")]
                     and "train.run_name=handed" in argv]  # the job's python, not the shell the job server ran
        os.kill(driver, signal.SIGSTOP)
        try:
            # The lease lapses at most ttl after the freeze; rank 0 reads it every ttl/6 s and before each write.
            time.sleep(ttl + 3)
            fenced = written()
            time.sleep(3)
            # No new checkpoint, no new metric. (Ray's controller may still prune an older checkpoint of the group's
            # as it closes its run: its retention, no new state.)
            later = written()
            assert later[1] == fenced[1] and later[0] <= fenced[0], ("the workers of a job that lost its lease "
                                                                     "went on writing", fenced, later)
            steps = max(fenced[1]) + 8
            last = submit(f"train.steps={steps}", wait=True)
            out = last.stdout + last.stderr
            assert last.returncode == 0, out[-3000:]
            assert "taking over the lease" in out and f"finished at step {steps}" in out, out[-3000:]
        finally:
            os.kill(driver, signal.SIGCONT)
        deadline = time.time() + 120
        while running(frozen_id) and time.time() < deadline:
            time.sleep(0.5)
        info = job(frozen_id)
        logs = ray_job("logs", "--address", dashboard, frozen_id, env=env, timeout=60).stdout
        assert info["status"] == "FAILED" and info.get("driver_exit_code") == EXIT_BUSY, (info, logs[-3000:])
        assert re.search(r"error: run 'handed': .* lease .*; this job stopped writing at step \d+$", logs.strip()), \
            logs[-2000:]
        run = client.get_run(find_run(cfg, "handed"))
        assert run.info.status == "FINISHED"
        assert history(client, run.info.run_id, "loss_d") == list(range(2, steps + 1, 2))
        assert steps in written()[0]
        assert len(client.search_model_versions(f"run_id = '{run.info.run_id}'")) == 1


def test_resumes_take_an_unrecorded_checkpoint_skip_a_truncated_one_and_refuse_changed_data(local_ray, tmp_path,
                                                                                             digits_dir):
    """One run resumed by the same command after each thing a crash or a user leaves behind (one worker, six
    starts where one test per case took nine):
    - a checkpoint uploaded but not recorded by Ray (the head lost between the upload and Ray's record, made by
      putting back Ray's own record file as it was before): resumed from, not from Ray's latest, and removed at the
      run's end (Ray's retention never deletes a folder it does not know);
    - the newest checkpoint cut short (a full disk, an upload that died) and shards added since the one before it
      (its stream positions would point at other samples): the newest is skipped for the newest that reads back
      whole, named in the MLflow run (every resubmit failed on it before); that one's data changed, so the resume is
      refused at once in one line naming both datasets, whatever ray.max_failures says; with
      data.allow_changed=true resumed;
    - no checkpoint left that reads back, with ray.max_failures=-1: the run ends at once, FAILED.
    Every step is logged once throughout."""
    import shutil

    from dcgan_dist.data import shards, sources
    from dcgan_dist.data.loader import resolve_shards
    from dcgan_dist.errors import CheckpointError, DataError

    data = tmp_path / "digits"
    shutil.copytree(digits_dir, data)
    overrides = tiny_overrides(tmp_path, data, **{"train.run_name": "resumed", "train.steps": 8,
                                                   "ray.num_workers": 1, "tracking.register": "false",
                                                   "ray.keep_checkpoints": 10, "train.precision": "fp32"})

    def run(steps: int, *more: str):
        return train(load_config(overrides=[*overrides, f"train.steps={steps}", *more]))

    client = MlflowClient(load_config(overrides=overrides).tracking.uri)
    folder = tmp_path / "ray_results" / "resumed"
    record = folder / "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints

    # Unrecorded: the step-12 upload landed, its record did not.
    run(8)
    before = record.read_bytes()
    run(12)
    assert (folder / "checkpoint_00000012").is_dir()
    record.write_bytes(before)
    out = run(16, "train.precision=bf16")  # a rerun may change precision: fp32 checkpoints, bf16 from here
    assert out.step == 16 and out.metrics["start_step"] == 13, out.metrics  # not 9: four steps redone
    assert client.get_run(out.run_id).data.tags["precision"] == "bf16"
    assert history(client, out.run_id, "loss_d") == list(range(2, 17, 2))  # none lost, none twice
    assert sorted(p.name for p in folder.glob("checkpoint_0*")) == [
        "checkpoint_00000004", "checkpoint_00000008", "checkpoint_00000016"]

    # Truncated, and the data changed since: the newest checkpoint is skipped for the one before (named in the run);
    # that one's data differs, so the resume is refused in one line, not restarted for ever; allowed when asked for.
    newest = folder / "checkpoint_00000016" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    first = resolve_shards(str(data)).fingerprint
    shutil.rmtree(data)
    shards.build_shards(sources.Digits(), str(data), resolution=32, encoding="png", shard_size=300, progress=False)
    t0 = time.time()
    with pytest.raises(DataError, match=r"the checkpoint of step 8 was trained on data \w{12} \(4 shards\), "
                                        r"data.url .* is now \w{12} \(6 shards\): .* --set data.allow_changed=true"):
        run(20, "ray.max_failures=-1")
    assert time.time() - t0 < 180  # not ray.max_failures=-1's restarts for ever (two group starts at most)
    assert client.get_run(out.run_id).info.status == "FAILED"
    out = run(20, "data.allow_changed=true")
    assert out.step == 20 and out.metrics["start_step"] == 9
    skipped = client.get_run(out.run_id).data.tags["dcgan.resume.skipped.step_00000009"]
    assert skipped.startswith("checkpoint_00000016: ") and "cannot be read" in skipped
    assert history(client, out.run_id, "loss_d") == list(range(2, 21, 2))  # steps 10-16 redone, logged once
    # Lineage: both datasets are the run's inputs in MLflow, each named by its manifest's digest.
    inputs = client.get_run(out.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.digest for i in inputs) == sorted([first[:32], resolve_shards(str(data)).fingerprint[:32]])
    assert all(json.loads(i.dataset.source)["uri"] == str(data) and i.dataset.source_type == "local" for i in inputs)

    # None readable, with ray.max_failures=-1 (restart for ever): no restart can fix that; one line naming them.
    for state in folder.glob("checkpoint_*/state.pt"):
        state.write_bytes(state.read_bytes()[:1000])
    t0 = time.time()
    with pytest.raises(CheckpointError, match=r"no checkpoint of the run in .* can be read: checkpoint_00000020: "):
        run(24, "data.allow_changed=true", "ray.max_failures=-1")
    assert time.time() - t0 < 180  # two group starts on a busy 2-core machine; restarts for ever would not end
    assert client.get_run(out.run_id).info.status == "FAILED"
