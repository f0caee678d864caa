"""Both trained networks of a registered model version, as plain `nn.Module`s.

The registry holds G as an MLflow model (for serving). The paper's experiments also need D and G's
inner layers, so registration stores `networks/step_N.pt` (both state dicts + the model config) in
the run, and the version's `networks` tag points at it. `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dcgan_dist.config import ModelConfig
from dcgan_dist.errors import TrackingError
from dcgan_dist.evaluation import resolve_version
from dcgan_dist.models import Discriminator, Generator, build_discriminator, build_generator

NETWORKS_TAG = "networks"


@dataclass
class Networks:
    g: Generator
    d: Discriminator
    model: ModelConfig
    name: str
    version: str
    step: int
    run_id: str
    data_url: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def random_discriminator(self, seed: int = 0) -> Discriminator:
        """A D of the same architecture with the paper's random init: the experiments' baseline."""
        torch.manual_seed(seed)
        return build_discriminator(self.model).eval()


def log_networks(tracking_uri: str, run_id: str, name: str, version: str, generator_state: dict, state: dict,
                 model: ModelConfig, data_url: str) -> None:
    """Store G (as registered) and D of checkpoint `state` in the run; tag the version with the path."""
    path = f"networks/step_{state['step']}.pt"
    buf = io.BytesIO()
    torch.save({"generator": generator_state, "discriminator": state["discriminator"],
                "model": dataclasses.asdict(model), "step": state["step"], "data_url": data_url}, buf)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(path).name
        file.write_bytes(buf.getvalue())
        MlflowClient(tracking_uri).log_artifact(run_id, str(file), "networks")
    MlflowClient(tracking_uri).set_model_version_tag(name, version, NETWORKS_TAG, path)


def load_networks(tracking_uri: str, model_uri: str) -> Networks:
    """G and D (eval mode, CPU) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; errors name the URI."""
    mv = resolve_version(tracking_uri, model_uri)
    path = mv.tags.get(NETWORKS_TAG)
    if not path:
        raise TrackingError(f"{model_uri} (version {mv.version}) has no '{NETWORKS_TAG}' tag: it was registered "
                            "before discriminators were stored; register it again with jobs/train.py")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=path, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
            saved = torch.load(local, map_location="cpu", weights_only=True)
    except (MlflowException, OSError) as e:
        raise TrackingError(f"{model_uri}: cannot read {path} of run {mv.run_id}: {e}") from None
    model = ModelConfig(**saved["model"])
    g, d = build_generator(model), build_discriminator(model)
    g.load_state_dict(saved["generator"])
    d.load_state_dict(saved["discriminator"])
    return Networks(g.eval(), d.eval(), model, mv.name, str(mv.version), int(saved["step"]), mv.run_id,
                    saved["data_url"])
