"""The model registry: the generator logged as an MLflow model, a new version per registration, tagged with its
scores and their protocols. Who holds the `champion` alias is `champion.py`'s call."""

from __future__ import annotations

import logging

import mlflow
import torch
from mlflow import MlflowClient

from dcgan_dist.config import Config
from dcgan_dist.tracking.runs import RUN_NAME_TAG

log = logging.getLogger(__name__)

CHAMPION = "champion"


def log_generator(cfg: Config, run_id: str, generator: torch.nn.Module, step: int,
                  scores: dict[str, float] | None = None, protocols: dict[str, str] | None = None) -> str:
    """Log G as an MLflow pytorch model and register it as a new version, tagged with its scores.

    Tags: `step`, the run name, and for each metric `metric.NAME` (value) and `protocol.NAME` (how it
    was measured). Whether it becomes `champion` is `champion.promote_if_better`'s call. Re-running a
    finished run does not register the same step twice: the existing version is returned.
    """
    from mlflow.models import infer_signature

    client = MlflowClient(cfg.tracking.uri)
    name = cfg.tracking.model_name
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get("step") == str(step):
            log.info("%s version %s already holds step %d of this run", name, mv.version, step)
            return str(mv.version)

    generator = generator.cpu().eval()
    z = torch.randn(4, cfg.model.nz, generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = generator(torch.from_numpy(z)).numpy()
    torch_req = torch.__version__.split("+")[0]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator,
            name="generator",
            input_example=z,
            signature=infer_signature(z, out),
            pip_requirements=[f"torch=={torch_req}", "numpy"],
            registered_model_name=name,
            step=step,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, RUN_NAME_TAG, client.get_run(run_id).data.tags[RUN_NAME_TAG])
    client.set_model_version_tag(name, version, "step", str(step))
    tag_scores(cfg, version, scores or {}, protocols or {})
    return version


def tag_scores(cfg: Config, version: str, scores: dict[str, float], protocols: dict[str, str]) -> None:
    """Record measured metrics on a model version, each with its protocol."""
    client = MlflowClient(cfg.tracking.uri)
    for metric, key in protocols.items():
        if metric in scores:
            client.set_model_version_tag(cfg.tracking.model_name, version, f"metric.{metric}", repr(float(scores[metric])))
            client.set_model_version_tag(cfg.tracking.model_name, version, f"protocol.{metric}", key)
