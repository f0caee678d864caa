"""The model registry: the generator logged as an MLflow model, a new version per registration, tagged with its
scores and their protocols. Who holds the `champion` alias is `champion.py`'s call."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from dcgan_dist.config import Config
from dcgan_dist.models import latents
from dcgan_dist.tracking.runs import RUN_NAME_TAG

log = logging.getLogger(__name__)

CHAMPION = "champion"


def log_generator(cfg: Config, run_id: str, generator: torch.nn.Module, step: int,
                  scores: dict[str, float] | None = None, protocols: dict[str, str] | None = None) -> str:
    """Log G as an MLflow pyfunc (`generator_model.py`, a torch.export program inside) and register it as a new
    version, tagged with its scores.

    Tags: `step`, the run name, and for each metric `metric.NAME` (value) and `protocol.NAME` (how it was
    measured). Re-running a finished run does not register the same step twice: it returns the existing version.
    """
    client = MlflowClient(cfg.tracking.uri)
    name = cfg.tracking.model_name
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get("step") == str(step):
            log.info("%s version %s already holds step %d of this run", name, mv.version, step)
            return str(mv.version)

    generator = generator.cpu().eval()
    z = latents(4, cfg.model.nz, seed=0)
    with torch.no_grad():
        out = generator(z)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.model.nz))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        program = Path(tmp) / "generator.pt2"
        torch.export.save(torch.export.export(generator, (z,), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                          program)
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(Path(__file__).with_name("generator_model.py")),
            artifacts={"generator": str(program)},
            model_config={"nz": cfg.model.nz},
            input_example=z.numpy(),
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", f"mlflow=={mlflow.__version__}"],
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


def load_generator(model_uri: str, tracking_uri: str | None = None):
    """The registered generator for code that needs tensors (evaluation, sampling, the experiments): an object with
    `.generator` (a torch module z -> images, CPU) and `.nz`. `models:/` URIs resolve through `tracking_uri`, which
    becomes the process's tracking URI (default: the one already set)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
