"""The cluster configurations: Ray's own schema for the cluster YAMLs, our extra checks, the KubeRay manifests."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO


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
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_config", REPO / "cluster" / "check_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_cluster_config = module.check_cluster_config

    worker = next(k for k in config["available_node_types"] if k != config["head_node_type"])
    inverted = copy.deepcopy(config)
    inverted["available_node_types"][worker]["min_workers"] = 5
    inverted["available_node_types"][worker]["max_workers"] = 1
    with pytest.raises(ValueError, match=f"{worker}: min_workers 5 > max_workers 1"):
        check_cluster_config(inverted)
    check_cluster_config(config)


def test_the_aws_cluster_holds_no_credentials_and_turns_authentication_on():
    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_access_key_id" not in text.lower()
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    types = config["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"].split(".")[0] for t in types} >= {"g6", "p4d"}
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "start_mlflow.sh" in start
    assert "MLFLOW_AUTH=basic" in start  # MLflow listens on the cluster network, so never without a login
    for kind in ("head", "worker"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[f"{kind}_start_ray_commands"])
    # Secrets reach the nodes as files, from the user's machine, never through the repository or a job.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"


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
