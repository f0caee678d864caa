"""`ray job submit` against a real `ray start --head` cluster with token authentication on, as on a real cluster
(README: RAY_AUTH_MODE=token with the cluster's token), training into a real sqlite MLflow store."""

from __future__ import annotations

import json
import secrets
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import REPO, tiny_overrides
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.cluster  # starts its own cluster or hosts: the multi-host budget

UPLOAD_EXCLUDES = [".git", ".venv", "data", "mlflow.db", "mlruns", "mlartifacts", "ray_results", "outputs"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token = secrets.token_hex(32)
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the user's is read or written
    c = LocalRayCluster(num_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)},
                        ready_headers={"Authorization": f"Bearer {token}"})
    c.token = token
    c.client_env = {k: v for k, v in c.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    yield c
    c.stop()
    assert not c.leftovers(), "processes of the test cluster still running"


def submit(cluster, env: dict, entrypoint: list[str], *extra: str) -> subprocess.CompletedProcess:
    """`ray job submit`; retried while the head's job agent is still starting (the dashboard answers first)."""
    cmd = [str(cluster.bin / "ray"), "job", "submit", f"--address={cluster.dashboard}", *extra, "--", *entrypoint]
    deadline = time.time() + 60
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in r.stderr or time.time() > deadline:
            return r
        time.sleep(2)


def test_a_submit_without_the_token_or_with_a_wrong_one_is_refused(cluster):
    entry = ["python", "-c", "import ray; ray.init(address='auto'); print('cpus', ray.cluster_resources()['CPU'])"]
    no_token = {**cluster.client_env, "RAY_AUTH_MODE": "token"}
    wrong_token = {**no_token, "RAY_AUTH_TOKEN": "0" * 64}
    for env in (cluster.client_env, no_token, wrong_token):
        r = submit(cluster, env, entry)
        assert r.returncode != 0, r.stdout[-2000:]
        assert "auth" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-2000:]
    r = submit(cluster, {**no_token, "RAY_AUTH_TOKEN": cluster.token}, entry)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "cpus 2.0" in r.stdout


def test_ray_job_submit_trains_and_logs(cluster, tmp_path, digits_dir):
    overrides = tiny_overrides(tmp_path, digits_dir, **{"ray.address": "auto", "train.run_name": "submitted",
                                                         "ray.storage_path": f"file://{tmp_path / 'ray_results'}",
                                                         "train.steps": 6, "train.checkpoint_every": 3})
    env = {**cluster.client_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
    r = submit(cluster, env, ["python", "jobs/train.py", *[x for o in overrides for x in ("--set", o)]],
               f"--working-dir={REPO}", f"--runtime-env-json={json.dumps({'excludes': UPLOAD_EXCLUDES})}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "finished at step 6" in r.stdout and "succeeded" in r.stdout
    assert cluster.token not in r.stdout + r.stderr  # the token is never echoed into job logs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    assert [run.info.run_name for run in runs] == ["submitted"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_d")] == [2, 3, 4, 6]
    assert str(client.get_model_version_by_alias("dcgan-generator", "champion").version) == "1"
    # The job ran on this cluster (not on a fresh local Ray the driver might have started).
    status = subprocess.run([str(cluster.bin / "ray"), "job", "list", f"--address={cluster.dashboard}"], env=env,
                            capture_output=True, text=True)
    assert "SUCCEEDED" in status.stdout and "jobs/train.py" in status.stdout
