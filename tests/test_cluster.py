"""The cluster path on one machine: a fake multi-node Ray cluster (cluster/local_cluster.yaml), `ray job
submit`, data and checkpoints in a loopback S3 server, tracking on a real `mlflow server` with S3 artifacts;
and the cluster YAMLs against Ray's own schema."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO, tiny_overrides
from dcgan_dist.data import s3, shards, sources
from dcgan_dist.devtools import MlflowServer, MotoServer, client_env
from ray_cluster import fake_multinode_cluster
from test_job_submit import UPLOAD_EXCLUDES

# What `ray job submit` passes to the job: endpoints, not credentials (on AWS those come from the instance profile).
PASS_THROUGH = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local_cluster.yaml"])
def test_cluster_yamls_pass_rays_schema_and_broken_copies_do_not(path):
    config = yaml.safe_load((REPO / path).read_text())
    validate(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head trains nothing
    bad_name = copy.deepcopy(config)
    bad_name["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate(bad_name)
    from dcgan_dist.cluster_check import check_cluster_config

    worker = next(k for k in config["available_node_types"] if k != config["head_node_type"])
    inverted = copy.deepcopy(config)
    inverted["available_node_types"][worker]["min_workers"] = 5
    inverted["available_node_types"][worker]["max_workers"] = 1
    with pytest.raises(ValueError, match=f"{worker}: min_workers 5 > max_workers 1"):
        check_cluster_config(inverted)
    check_cluster_config(config)


def test_the_aws_cluster_holds_no_credentials_and_binds_servers_to_loopback():
    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_access_key_id" not in text.lower()
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    types = config["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"].split(".")[0] for t in types} >= {"g6", "p4d"}
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "start_mlflow.sh" in start


def test_kuberay_manifests_have_the_right_shape():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob"} <= set(kinds)
    for d in docs:
        assert d["apiVersion"].startswith("ray.io/")
    cluster = kinds["RayCluster"]["spec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith("rayproject/ray:2.60.0")
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and workers["minReplicas"] <= workers["maxReplicas"]
    job = kinds["RayJob"]["spec"]
    assert "jobs/train.py" in job["entrypoint"] and "ray.address=auto" in job["entrypoint"]
    assert job["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == workers["groupName"]


@pytest.fixture
def s3_env(monkeypatch):
    server = MotoServer()
    for k, v in client_env(server.url).items():
        monkeypatch.setenv(k, v)
    s3._clients.clear()
    boto3.client("s3").create_bucket(Bucket="lake")
    yield server
    server.stop()
    s3._clients.clear()


@pytest.mark.timeout(900)
def test_job_on_a_multinode_cluster_trains_from_s3_checkpoints_to_s3_and_resumes_from_them(s3_env, tmp_path):
    shards.build_shards(sources.Digits(), "s3://lake/digits/", resolution=32, encoding="png", shard_size=500,
                        workers=2, progress=False)
    mlflow_server = MlflowServer(tmp_path / "mlflow", env={"MLFLOW_ARTIFACTS_DESTINATION": "s3://lake/mlflow"})
    cluster = fake_multinode_cluster(REPO / "cluster" / "local_cluster.yaml", tmp_path)
    try:
        overrides = tiny_overrides(tmp_path, "unused", **{
            "data.url": "s3://lake/digits/", "ray.address": "auto", "ray.cpus_per_worker": 1,
            "ray.storage_path": "s3://lake/checkpoints", "tracking.uri": mlflow_server.url,
            "train.run_name": "on-cluster", "train.steps": 8, "train.eval_every": 8})
        runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}}

        def submit(*extra):
            sets = [x for o in [*overrides, *extra] for x in ("--set", o)]
            r = cluster.submit(["python", "jobs/train.py", *sets], REPO, runtime_env=runtime_env)
            assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
            return r.stdout

        first = submit()
        assert "finished at step 8" in first
        from ray.util.state import list_actors

        workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        assert len({w.node_id for w in workers}) == 2  # one rank per fake worker node (the head has no CPUs)
        keys = s3.list_keys("s3://lake/checkpoints/on-cluster/")
        assert "checkpoints/on-cluster/checkpoint_00000008/state.pt" in keys

        second = submit("train.steps=12")  # same run name: continues from the S3 checkpoint of step 8
        assert "resumed from the checkpoint of step 8" in second and "finished at step 12" in second

        client = MlflowClient(mlflow_server.url)
        run = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])[0]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == [2, 4, 6, 8, 10, 12]
        assert run.data.params["ray.storage_path"] == "s3://lake/checkpoints"
        artifacts = s3.list_keys("s3://lake/mlflow/")
        assert any(k.endswith("config.yaml") for k in artifacts) and any("/samples/" in k for k in artifacts)
        assert any(k.endswith("MLmodel") for k in artifacts)  # the registered generator lives in S3 too
    finally:
        cluster.stop()
        mlflow_server.stop()
    assert not cluster.leftovers()
