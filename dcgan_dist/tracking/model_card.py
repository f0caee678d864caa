"""The model card: what a registered generator is, as the version's Markdown description in the MLflow registry.

A user who opens a version in `mlflow ui` reads the data it learned (URL, manifest sha256, image count), the
settings that differ from the defaults, how long it trained, its scores with their protocols, the run that
made it and where its 8x8 sample grid lies (a run artifact).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from dcgan_dist.config import Config
from dcgan_dist.grids import save_grid
from dcgan_dist.models import generate, latents
from dcgan_dist.tracking.uris import redact

# Keys that say where a run was, not what it learned: left out of the card's settings.
PLACE_KEYS = ("tracking.", "ray.address", "ray.storage_path", "train.run_name", "data.url")


def changed_settings(cfg: Config) -> dict[str, object]:
    defaults = Config().flat()
    return {k: v for k, v in cfg.flat().items() if v != defaults.get(k) and not k.startswith(PLACE_KEYS)}


def log_sample_grid(cfg: Config, run_id: str, generator: torch.nn.Module, step: int) -> str:
    """An 8x8 grid of G's samples (latent seed `metrics.seed`) in the run; returns its artifact path."""
    images = generate(generator.eval(), latents(64, cfg.model.nz, cfg.metrics.seed), batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"samples_step_{step}.png"
        save_grid(images, path, nrow=8)
        MlflowClient(cfg.tracking.uri).log_artifact(run_id, str(path), "model_card")
    return f"model_card/{path.name}"


def card_markdown(cfg: Config, run_id: str, state: dict, data: dict, grid: str, run_link: str) -> str:
    """The card's text. `data`: url, sha256, images (count) and resolution of the training data."""
    scored = state.get("evaluation") or {}
    global_batch = cfg.global_batch
    lines = [
        f"# DCGAN generator, step {state['step']}",
        "",
        "Input: latent vectors z, float32, shape (N, {nz}), drawn from N(0, I). Output: images, float32, shape "
        "(N, {nc}, {r}, {r}), values in [-1, 1].".format(nz=cfg.model.nz, nc=cfg.model.nc, r=cfg.model.resolution),
        "",
        "## Data",
        f"- url: `{redact(data['url'])}`",
        f"- manifest sha256: `{data['sha256']}`",
        f"- images: {data['images'] if data['images'] is not None else 'unknown (no manifest)'}",
        f"- resolution: {data['resolution']}",
        "",
        "## Training",
        f"- steps: {state['step']}, images seen: {state['step'] * global_batch:,} "
        f"(global batch {global_batch} = {cfg.train.batch_size} x {cfg.ray.max_workers} workers)",
        f"- run: `{run_id}` ({run_link})",
        "- settings that differ from the defaults:",
        *([f"  - `{k}` = `{redact(v)}`" for k, v in sorted(changed_settings(cfg).items())] or ["  - none"]),
        "",
        "## Quality",
    ]
    values, protocols = scored.get("values") or {}, scored.get("protocols") or {}
    for name in sorted(values):
        parent = name.rsplit("_", 1)[0]  # swd_16: one pyramid level of swd, measured with swd's protocol
        how = (f"protocol `{protocols[name]}`" if name in protocols
               else f"a part of {parent}" if parent in protocols else "no protocol recorded")
        lines.append(f"- {name}: {float(values[name]):.4f} ({how})")
    lines += [] if values else ["- not evaluated (set `metrics.every` to score checkpoints)"]
    lines += ["", "## Samples", f"An 8x8 grid (latent seed {cfg.metrics.seed}): run artifact `{grid}`."]
    return "\n".join(lines) + "\n"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A link to the run in the MLflow UI where the store is a server, else where to find it."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{redact(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"`mlflow ui --backend-store-uri {redact(tracking_uri)}`, experiment {experiment_id}"


def write_card(cfg: Config, run_id: str, version: str, generator: torch.nn.Module, state: dict, data: dict) -> str:
    """Log the sample grid and set the card as version `version`'s description; returns the card."""
    client = MlflowClient(cfg.tracking.uri)
    grid = log_sample_grid(cfg, run_id, generator, state["step"])
    link = run_link(cfg.tracking.uri, client.get_run(run_id).info.experiment_id, run_id)
    card = card_markdown(cfg, run_id, state, data, grid, link)
    client.update_model_version(cfg.tracking.model_name, version, description=card)
    client.set_model_version_tag(cfg.tracking.model_name, version, "card.grid", grid)
    return card
