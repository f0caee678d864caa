"""The cluster path on real hosts (network namespaces), with real faults: a killed process, a killed host, a cut
or degraded link, a crashed MLflow server, a lost head. One bed serves every scenario (bed_cluster.py says how it
is started: as `ray up ray_cluster.yaml` would). After each, MLflow is checked as a user would check it: every
logged step of `loss_d` there exactly once, `train.steps` reached, a generator registered.

Run only these: `.venv/bin/python -m pytest -q tests/test_chaos.py` (root and CAP_NET_ADMIN, as `make test`).
"""

from __future__ import annotations

import re
import time

import boto3
import pytest
from mlflow import MlflowClient

import netbed
from bed_cluster import BedCluster, wait_for
from dcgan_dist.data import shards, sources

pytestmark = pytest.mark.cluster

STEPS, LOG_EVERY, CKPT_EVERY = 16, 2, 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    netbed.require_capabilities()
    with netbed.Bed(["services", "head", "worker-1", "worker-2"]) as bed:
        c = BedCluster(bed)
        c.start_services()
        # The data, built on the laptop straight into the services host's S3 (README "Bring your own data").
        import os

        saved = os.environ.get("AWS_ENDPOINT_URL_S3")
        os.environ["AWS_ENDPOINT_URL_S3"] = c.s3_url
        try:
            from dcgan_dist.data import s3

            s3._clients.clear()
            shards.build_shards(sources.Digits(), "s3://data/digits-32/", resolution=32, encoding="png",
                                shard_size=500, workers=2, progress=False)
        finally:
            os.environ.pop("AWS_ENDPOINT_URL_S3") if saved is None else os.environ.__setitem__("AWS_ENDPOINT_URL_S3", saved)
            s3._clients.clear()
        c.start_head()
        for w in c.workers:
            c.start_worker(w)
        c.wait_for_workers(2)
        yield c


def overrides(run_name: str, **extra) -> list[str]:
    """README step 4's command, tiny: 2 workers on the 2 worker hosts (2 CPUs each), data and checkpoints in S3,
    `tracking.uri=http://127.0.0.1:5000` exactly as the README says."""
    values = {
        "ray.address": "auto", "ray.num_workers": 2, "ray.cpus_per_worker": 2,
        "data.url": "s3://data/digits-32/", "model.resolution": 32, "data.num_workers": 0, "data.shuffle_buffer": 200,
        "ray.storage_path": "s3://ckpt/runs", "train.run_name": run_name, "train.steps": STEPS,
        "tracking.uri": "http://127.0.0.1:5000",
        "model.ngf": 8, "model.ndf": 8, "train.batch_size": 16, "train.log_every": LOG_EVERY,
        "train.checkpoint_every": CKPT_EVERY, "train.sample_every": 8, "train.eval_every": 0,
        "metrics.num_images": 64,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def expected_steps(steps: int = STEPS) -> list[int]:
    return [s for s in range(1, steps + 1) if s % LOG_EVERY == 0 or s % CKPT_EVERY == 0]


def check_run(cluster: BedCluster, run_name: str, steps: int = STEPS) -> MlflowClient:
    """What a user checks afterwards in MLflow: every step once, all steps there, a registered version."""
    with cluster.mlflow_login():
        client = MlflowClient(cluster.mlflow_url)
        runs = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id],
                                  f"tags.`dcgan.run_name` = '{run_name}'")
        assert len(runs) == 1, [r.info.run_name for r in runs]
        history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_d")]
        assert sorted(history) == expected_steps(steps), f"loss_d steps {sorted(history)}"
        versions = client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")
        assert versions, "no generator registered"
        return client, runs[0]


def s3_keys(cluster: BedCluster, bucket: str, prefix: str = "") -> list[str]:
    s3 = boto3.client("s3", endpoint_url=cluster.s3_url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_happy_path_two_hosts_s3_and_mlflow_with_auth(cluster):
    r = cluster.submit(overrides("happy"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert f"finished at step {STEPS}" in out
    client, run = check_run(cluster, "happy")
    # Rank 0 ran on a worker host and still reached the server (the loopback URI seen from its node).
    nodes = sorted(set(re.findall(r"rank \d of 2 on node (\S+),", out)))
    assert nodes == sorted(w.ip for w in cluster.workers), nodes
    assert any(k.endswith(".png") for k in s3_keys(cluster, "mlflow", "artifacts/")), "no sample grid in S3"
    assert any("checkpoint_" in k for k in s3_keys(cluster, "ckpt", "runs/happy/"))
    # Secrets stay on the nodes: not in the job's runtime_env or logs, nor in MLflow params.
    jobs = cluster.api("/api/jobs/")
    assert cluster.mlflow_password not in str(jobs) + out and cluster.token not in str(jobs) + out
    assert cluster.mlflow_password not in str(run.data.params)
