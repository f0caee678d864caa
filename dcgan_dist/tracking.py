"""MLflow: one run per training run name, rank-0 metric logging, sample grids, the model registry.

The driver owns the run (params, config, the final model); rank 0 of the workers logs metrics
and sample grids into it. Metrics are buffered and flushed when a checkpoint is saved, so after
a worker failure and resume no step appears twice in a metric's history.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from torchvision.utils import make_grid

from dcgan_dist.config import Config
from dcgan_dist.errors import TrackingError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "dcgan.run_name"
CHAMPION = "champion"


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute, so Ray workers in other folders find the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def redact(value: object) -> str:
    """Drop `user:password@` from URIs so credentials never reach MLflow params or logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(value))


def start_run(cfg: Config, run_name: str) -> tuple[str, bool]:
    """Create the MLflow run for `run_name`, or find it again when the run resumes. Returns (id, resumed)."""
    uri = cfg.tracking.uri
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    except MlflowException as e:
        raise TrackingError(f"tracking.uri {uri!r}: cannot reach MLflow ({e.message.splitlines()[0]})") from None
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.log_text(run_id, redact(cfg.to_yaml()), f"config-resumed-{int(time.time())}.yaml")
        return run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    run_id = run.info.run_id
    params = [mlflow.entities.Param(k, redact(v)) for k, v in cfg.flat().items()]
    client.log_batch(run_id, params=params)
    client.log_text(run_id, redact(cfg.to_yaml()), "config.yaml")
    return run_id, False


def end_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(cfg.tracking.uri).set_terminated(run_id, status)


class RunLogger:
    """Rank 0's handle on the run: buffered metrics, sample grids."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list[Metric] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        """Send buffered metrics; called right after a checkpoint is persisted."""
        for i in range(0, len(self.pending), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    def log_grid(self, step: int, images: torch.Tensor) -> None:
        """An 8x8 grid as `samples/step_NNNNNN.png` and in the run's image view (key `samples`)."""
        grid = make_grid(images.detach().float().cpu(), nrow=8, padding=2, normalize=True, value_range=(-1, 1))
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self.client.log_image(self.run_id, arr, artifact_file=f"samples/step_{step:06d}.png")
        self.client.log_image(self.run_id, arr, key="samples", step=step)


def log_generator(cfg: Config, run_id: str, generator: torch.nn.Module, step: int):
    """Log G as an MLflow pytorch model, register a new version; give it `champion` if none has it.

    Re-running a finished run does not register the same step twice: the existing version is returned.
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
    try:
        client.get_model_version_by_alias(name, CHAMPION)
    except (MlflowException, RestException):
        client.set_registered_model_alias(name, CHAMPION, version)
        log.info("%s version %s is the first: alias @%s set", name, version, CHAMPION)
    return version
