"""The cluster path end to end on one machine: a head plus fake worker nodes (cluster/local_cluster.yaml),
`ray job submit` as in the README, data and checkpoints in a loopback S3, a real MLflow server whose
artifacts also live in that S3. A second submit of the same run resumes from the S3 checkpoint."""

from __future__ import annotations

import os
import re
import time

import boto3
import pytest
from mlflow import MlflowClient

from conftest import REPO, tiny_overrides
from dcgan_dist.data import s3, shards, sources
from dcgan_dist.bench.servers import MlflowServer, MotoServer, client_env
from ray_cluster import fake_multinode_cluster

pytestmark = pytest.mark.cluster  # starts its own cluster or hosts: the multi-host budget

UPLOAD_EXCLUDES = [".git", ".venv", "data", "mlflow.db", "mlruns", "mlartifacts", "ray_results", "outputs"]


@pytest.fixture
def s3_server():
    server = MotoServer()
    saved = {k: os.environ.get(k) for k in client_env("")}
    os.environ.update(client_env(server.url))
    s3._clients.clear()
    for bucket in ("data", "ckpt", "mlflow"):
        boto3.client("s3").create_bucket(Bucket=bucket)
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s3._clients.clear()


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def wait_for_workers(cluster, n: int, timeout: float = 90) -> None:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [x for x in list_nodes(address=cluster.dashboard) if x.state == "ALIVE" and not x.is_head_node]
        if len(alive) >= n:
            return
        time.sleep(1)
    raise AssertionError(f"fewer than {n} fake worker nodes came up in {timeout:.0f} s")


def train_worker_nodes(cluster) -> list[str]:
    """The node of every Ray Train worker actor this cluster ran (dead ones included)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    return [a.node_id for a in actors]


def test_submitted_job_trains_across_nodes_from_s3_and_a_resubmit_resumes(s3_server, tmp_path, digits_dir):
    shards.build_shards(sources.Digits(), "s3://data/digits-32/", resolution=32, encoding="png", shard_size=500,
                        workers=2, progress=False)
    mlflow_server = MlflowServer(tmp_path / "mlflow-server",
                                 env={"MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts"})
    # The nodes hold S3 credentials the way an instance profile gives them; the job carries no keys.
    cluster = fake_multinode_cluster(REPO / "cluster" / "local_cluster.yaml", tmp_path)
    try:
        wait_for_workers(cluster, 2)
        overrides = tiny_overrides(tmp_path, "unused", **{
            "data.url": "s3://data/digits-32/", "ray.address": "auto", "ray.num_workers": 2,
            "ray.cpus_per_worker": 1, "ray.storage_path": "s3://ckpt/ray", "tracking.uri": mlflow_server.url,
            "train.run_name": "on-the-cluster", "train.steps": 8, "train.checkpoint_every": 4,
            "train.eval_every": 4, "train.sample_every": 4})
        runtime_env = {"excludes": UPLOAD_EXCLUDES,
                       "env_vars": {"AWS_ENDPOINT_URL_S3": s3_server.url, "AWS_DEFAULT_REGION": "us-east-1"}}
        # Fake nodes share one runtime_resources folder, and each node re-extracts an uploaded working dir
        # over it, deleting the driver's cwd (cluster/local_cluster.yaml). `local://` uses the tree in place.
        workdir = f"local://{REPO}"

        def submit(*extra):
            sets = [x for o in [*overrides, *extra] for x in ("--set", o)]
            r = cluster.submit(["python", "jobs/train.py", *sets], workdir, runtime_env=runtime_env)
            assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
            return r.stdout

        first = submit()
        assert "finished at step 8" in first
        nodes = train_worker_nodes(cluster)
        assert len(nodes) == 2 and len(set(nodes)) == 2, f"2 workers on 2 nodes, got {nodes}"

        ckpts = keys("ckpt", "ray/on-the-cluster/")
        assert any(re.search(r"checkpoint_00000008/", k) for k in ckpts), ckpts[:20]
        assert not (tmp_path / "ray_results").exists()  # nothing went to a local storage path

        second = submit("train.steps=12")
        assert "finished at step 12" in second
        assert re.search(r"resumed from the checkpoint of step 8", second), second[-4000:]
        assert any("checkpoint_00000012/" in k for k in keys("ckpt", "ray/on-the-cluster/"))
    finally:
        cluster.stop()

    client = MlflowClient(mlflow_server.url)
    try:
        runs = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])
        assert [r.info.run_name for r in runs] == ["on-the-cluster"]  # the resubmit continued the same run
        history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_d")]
        assert history == sorted(set(history)) and history[-1] == 12 and 8 in history
        versions = client.search_model_versions("name='dcgan-generator'")
        assert versions, "no generator registered"
    finally:
        mlflow_server.stop()
    artifacts = keys("mlflow", "artifacts/")
    assert any(k.endswith(".png") for k in artifacts), artifacts[:20]  # sample grids went through the server to S3
    assert any("model" in k for k in artifacts), artifacts[:20]
    assert not cluster.leftovers(), "processes of the test cluster still running"
