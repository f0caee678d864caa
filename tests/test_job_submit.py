"""`ray job submit` against a real `ray start --head` cluster, logging to a real sqlite MLflow store."""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient

from conftest import REPO, tiny_overrides
from ray_cluster import LocalRayCluster

UPLOAD_EXCLUDES = [".git", ".venv", "data", "mlflow.db", "mlruns", "mlartifacts", "ray_results", "outputs"]


@pytest.fixture
def cluster():
    c = LocalRayCluster(num_cpus=2)
    yield c
    c.stop()
    assert not c.leftovers(), "processes of the test cluster still running"


def test_ray_job_submit_trains_and_logs(cluster, tmp_path, digits_dir):
    overrides = tiny_overrides(tmp_path, digits_dir, **{"ray.address": "auto", "train.run_name": "submitted",
                                                         "train.steps": 6, "train.checkpoint_every": 3})
    r = cluster.submit(["python", "jobs/train.py", *[x for o in overrides for x in ("--set", o)]], REPO,
                       runtime_env={"excludes": UPLOAD_EXCLUDES})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "finished at step 6" in r.stdout
    assert "succeeded" in r.stdout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
    assert [run.info.run_name for run in runs] == ["submitted"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_d")] == [2, 3, 4, 6]
    assert str(client.get_model_version_by_alias("dcgan-generator", "champion").version) == "1"
    # Only our cluster's processes were started and are stopped by the fixture; the check below
    # runs before teardown to prove the job ran on it (not on a fresh local Ray).
    status = subprocess.run([str(cluster.env["PATH"].split(":")[0] + "/ray"), "job", "list",
                             f"--address={cluster.dashboard}"], env=cluster.env, capture_output=True, text=True)
    assert "SUCCEEDED" in status.stdout


def test_token_auth_rejects_a_submit_without_the_token_and_accepts_it_with(tmp_path):
    """Real clusters keep Ray's token auth on (README: `RAY_AUTH_TOKEN=$(ray get-auth-token)`)."""
    import secrets

    token = secrets.token_hex(32)
    home = tmp_path / "home"  # no ~/.ray/auth_token of the user's is read or written
    home.mkdir()
    c = LocalRayCluster(num_cpus=1, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)},
                        ready_headers={"Authorization": f"Bearer {token}"})
    try:
        entry = ["python", "-c", "import ray; ray.init(address='auto'); print('cpus', ray.cluster_resources()['CPU'])"]
        client = {k: v for k, v in c.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        cmd = [str(c.bin / "ray"), "job", "submit", f"--address={c.dashboard}", "--", *entry]
        no_token, wrong_token = {**client, "RAY_AUTH_MODE": "token"}, {**client, "RAY_AUTH_MODE": "token",
                                                                        "RAY_AUTH_TOKEN": "0" * 64}
        for env in (client, no_token, wrong_token):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode != 0, r.stdout[-2000:]
            assert "auth" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-2000:]
        r = subprocess.run(cmd, env={**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "cpus 1.0" in r.stdout
    finally:
        c.stop()
    assert not c.leftovers()
