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


def test_the_onprem_yaml_runs_the_aws_commands_word_for_word_and_passes_rays_schema():
    aws, onprem = (yaml.safe_load((REPO / p).read_text()) for p in ("ray_cluster.yaml", "cluster/onprem.yaml"))
    for key in ("file_mounts", "rsync_exclude", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert onprem[key] == aws[key], f"cluster/onprem.yaml's {key} differ from ray_cluster.yaml's: change both"
    assert onprem["provider"]["type"] == "local" and "available_node_types" not in onprem
    # No node types on your own machines: the head's start command itself keeps training off it.
    assert "--num-cpus=0" in " ".join(onprem["head_start_ray_commands"])
    filled = copy.deepcopy(onprem)
    filled["provider"].update(head_ip="10.0.0.1", worker_ips=["10.0.0.2", "10.0.0.3"])
    filled["auth"]["ssh_user"] = "gpu"
    validate(filled)
    del filled["provider"]["head_ip"]
    with pytest.raises(Exception, match="head_ip"):  # the launcher's own refusal (a click error)
        validate(filled)


def test_the_aws_cluster_holds_no_credentials_and_turns_authentication_on():
    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_access_key_id" not in text.lower()
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    types = config["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"].split(".")[0] for t in types} >= {"g6", "p4d"}
    spot = [t for t in types.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(any("spot_notice.py" in c for c in t["worker_setup_commands"]) for t in spot)
    # A node type's own setup commands replace the shared ones: the project must still be installed there.
    assert all(set(config["setup_commands"]) <= set(t["worker_setup_commands"]) for t in spot)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "start_mlflow.sh" in start
    assert "MLFLOW_AUTH=basic" in start  # MLflow listens on the cluster network, so never without a login
    # Its admin password is made on the head, never shipped; the nodes' login is granted EDIT and nothing more.
    assert "MLFLOW_AUTH_ADMIN_PASSWORD_FILE=" in start and "umask 077" in start and "mlflow_access.py" in start
    assert not any("admin" in path for path in config["file_mounts"])
    for kind in ("head", "worker"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[f"{kind}_start_ray_commands"])
    # Secrets reach the nodes as files, from the user's machine, never through the repository or a job.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"


# The Kubernetes API schema the manifests are checked against: one that kubernetes-validate ships.
K8S_VERSION = "1.33"
GPU_IMAGE = "rayproject/ray:2.60.0"
TOKEN_SECRET, MLFLOW_SECRET = "dcgan-dist-ray-token", "dcgan-dist-mlflow"
SUBMITTER = {"dcgan-dist/submitter": "true"}
DASHBOARD = 8265
CONTAINER_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}


def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay.yaml").read_text()) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def ray_templates(doc: dict) -> dict[str, dict]:
    """The Ray pod templates of a RayCluster or a RayJob's cluster, by group ("head" or the worker group)."""
    spec = ray_cluster_spec(doc)
    workers = {group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}
    return {"head": spec["headGroupSpec"]["template"], **workers}


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template in a KubeRay resource: the Ray pods, and a RayJob's submitter."""
    templates = ray_templates(doc)
    if "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def as_pod_template(template: dict) -> dict:
    """A KubeRay pod template as a core v1 PodTemplate, the nearest built-in kind with a schema."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}


def with_autoscaler(doc: dict) -> dict:
    """The head template with the autoscaler sidecar KubeRay adds from autoscalerOptions, when it is on."""
    spec = ray_cluster_spec(doc)
    head = copy.deepcopy(spec["headGroupSpec"]["template"])
    if spec.get("enableInTreeAutoscaling"):
        options = spec["autoscalerOptions"]
        fields = ("env", "envFrom", "resources", "securityContext", "volumeMounts", "imagePullPolicy")
        head["spec"]["containers"].append({"name": "autoscaler", "image": head["spec"]["containers"][0]["image"],
                                          **{k: options[k] for k in fields if k in options}})
    return head


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def assert_from_secret(container: dict, name: str, secret: str, key: str) -> None:
    entry = env_of(container).get(name)
    assert entry is not None, f"{container['name']}: no {name}"
    assert "value" not in entry, f"{container['name']}: {name} is a literal"
    assert entry["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, container["name"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def same_namespace_peer_selects(peer: dict, labels: dict) -> bool:
    return set(peer) == {"podSelector"} and selects(peer["podSelector"], labels)


def assert_policed(policies: list[dict], pod_labels: dict) -> None:
    """A NetworkPolicy selects these pods and lets in their own cluster's pods on any port, everyone it names
    besides only on the dashboard port, and no one it does not name; the submitter is among those named."""
    mine = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
    assert mine, f"no NetworkPolicy selects {pod_labels}"
    submitter_let_in = False
    for policy in mine:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source"
            own = all(same_namespace_peer_selects(peer, pod_labels) for peer in rule["from"])
            if not own:
                assert rule.get("ports") == [{"protocol": "TCP", "port": DASHBOARD}], policy["metadata"]["name"]
                submitter_let_in |= any(same_namespace_peer_selects(peer, SUBMITTER) for peer in rule["from"])
    assert submitter_let_in, f"the submitter cannot reach the dashboard of {pod_labels}"


def test_kuberay_manifests_have_the_right_shape_and_pass_the_kubernetes_schema():
    import kubernetes_validate

    docs = kuberay_docs()
    assert {"RayCluster", "RayJob", "Secret", "NetworkPolicy"} <= {d["kind"] for d in docs}
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            # No schema for KubeRay's kinds here: their pod templates are plain Kubernetes and are checked as such.
            for group, template in {**pod_templates(d), "head+autoscaler": with_autoscaler(d)}.items():
                try:
                    kubernetes_validate.validate(as_pod_template(template), K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise AssertionError(f"{d['kind']} {group}: {list(e.path)}: {e.message}") from None
        else:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)

    [cluster_doc], [job_doc] = by_kind(docs, "RayCluster"), by_kind(docs, "RayJob")
    cluster = cluster_doc["spec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith(GPU_IMAGE)
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and workers["minReplicas"] <= workers["maxReplicas"]
    job = job_doc["spec"]
    assert "jobs/train.py" in job["entrypoint"] and "ray.address=auto" in job["entrypoint"]
    assert job["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert job["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == workers["groupName"]
    for d in (cluster_doc, job_doc):
        for group, template in pod_templates(d).items():
            assert template["spec"]["containers"][0]["image"].startswith(GPU_IMAGE), (d["kind"], group)


def test_kuberay_manifests_turn_token_auth_on_and_lock_the_pods_down():
    docs = kuberay_docs()
    policies = by_kind(docs, "NetworkPolicy")
    for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayJob"):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        spec = ray_cluster_spec(doc)
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        templates = {**pod_templates(doc), "head": with_autoscaler(doc)}
        for group, template in templates.items():
            assert template["spec"]["securityContext"] == POD_SECURITY, (where, group)
            for container in template["spec"]["containers"]:
                # Every Ray process (the autoscaler and `ray job submit` included) speaks token auth, from the Secret.
                assert env_of(container)["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
                assert_from_secret(container, "RAY_AUTH_TOKEN", TOKEN_SECRET, "auth_token")
                assert container["securityContext"] == CONTAINER_SECURITY, (where, container["name"])
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), (where, container["name"], kind)
        for group, template in ray_templates(doc).items():
            ray = template["spec"]["containers"][0]
            # Drivers (on the head) and the training workers log to MLflow.
            assert_from_secret(ray, "MLFLOW_TRACKING_USERNAME", MLFLOW_SECRET, "username")
            assert_from_secret(ray, "MLFLOW_TRACKING_PASSWORD", MLFLOW_SECRET, "password")
            if group != "head":
                assert ray["resources"]["requests"]["nvidia.com/gpu"] == ray["resources"]["limits"]["nvidia.com/gpu"] >= 1
        # The pods as KubeRay labels them; a RayJob's cluster name is generated, so its templates carry the labels.
        if doc["kind"] == "RayCluster":
            assert_policed(policies, {"ray.io/cluster": doc["metadata"]["name"]})
        else:
            origin = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": doc["metadata"]["name"]}
            for group, template in ray_templates(doc).items():
                assert origin.items() <= template["metadata"]["labels"].items(), group
            assert_policed(policies, {**origin, "ray.io/cluster": "generated"})
            assert SUBMITTER.items() <= doc["spec"]["submitterPodTemplate"]["metadata"]["labels"].items()
            assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}  # the operator's own token

    [job] = by_kind(docs, "RayJob")
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    for service in by_kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") not in {"LoadBalancer", "NodePort"}
    # Nothing secret in the file: the Secrets hold placeholders only, and no env var carries a credential literally.
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    assert set(secrets) == {TOKEN_SECRET, MLFLOW_SECRET}
    assert set(secrets[TOKEN_SECRET]["stringData"]) == {"auth_token"}
    assert set(secrets[MLFLOW_SECRET]["stringData"]) == {"username", "password"}
    for secret in secrets.values():
        assert "data" not in secret and all(v.startswith("FILL_ME") for v in secret["stringData"].values())

    def env_entries(node):
        if isinstance(node, dict):
            if "name" in node and ("value" in node or "valueFrom" in node):
                yield node
            for v in node.values():
                yield from env_entries(v)
        elif isinstance(node, list):
            for v in node:
                yield from env_entries(v)

    for entry in env_entries(docs):
        if any(word in entry["name"] for word in ("TOKEN", "PASSWORD", "SECRET", "KEY", "USERNAME")):
            assert "value" not in entry, entry["name"]


def test_the_kubernetes_schema_check_fails_a_misspelled_field_and_a_wrong_type():
    import kubernetes_validate

    docs = kuberay_docs()
    [cluster] = by_kind(docs, "RayCluster")
    template = cluster["spec"]["workerGroupSpecs"][0]["template"]
    misspelled = copy.deepcopy(template)
    misspelled["spec"]["containers"][0]["securityContxt"] = misspelled["spec"]["containers"][0].pop("securityContext")
    wrong_type = copy.deepcopy(template)
    wrong_type["spec"]["securityContext"]["runAsUser"] = "1000"
    for broken, complaint in ((misspelled, "securityContxt"), (wrong_type, "not of type")):
        with pytest.raises(kubernetes_validate.ValidationError, match=complaint):
            kubernetes_validate.validate(as_pod_template(broken), K8S_VERSION, strict=True)
    kubernetes_validate.validate(as_pod_template(template), K8S_VERSION, strict=True)
    policy = copy.deepcopy(by_kind(docs, "NetworkPolicy")[0])
    policy["spec"]["policyTypes"] = "Ingress"  # a list in the API
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type"):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
