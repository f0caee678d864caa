"""Training state <-> one file, written atomically and read with `weights_only=True`.

A checkpoint from step N holds everything needed to run step N+1 exactly as an uninterrupted
run would: both networks, both optimizers, the step, and every rank's RNG states. The data
stream is re-seeded from (seed, rank, step), so the data position is a function of the step.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgan_dist.errors import CheckpointError
from dcgan_dist.files import write_atomic
from dcgan_dist.step import unwrap

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if present, Python)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """random.setstate wants nested tuples; a round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def training_state(g: nn.Module, d: nn.Module, opt_g, opt_d, step: int, rng: list[dict], config: dict,
                   ema: nn.Module | None = None, evaluation: dict | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> dict:
    """The dict a checkpoint holds; `rng` has one entry per rank (index = rank); `ema` = G's averaged copy;
    `evaluation` = {"values": {metric: value}, "protocols": {metric: protocol key}} when this step was scored;
    `scaler` = the fp16 loss scaler, so a resumed run does not relearn its scale by skipping steps."""
    return {
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "evaluation": evaluation or {},
        "step": step,
        "generator": unwrap(g).state_dict(),
        "discriminator": unwrap(d).state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "rng": rng,
        "config": config,
    }


def save(state: dict, directory: str | Path) -> Path:
    """Write `state.pt` into `directory` via a temp file + rename: never a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(directory / STATE_FILE, buf.getvalue())
    return directory / STATE_FILE


def final_generator_state(state: dict) -> dict:
    """The weights to evaluate and export: the EMA when the run kept one, else G."""
    return state.get("ema") or state["generator"]


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save` (tensors and plain containers only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint directory {directory}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def restore(state: dict, g: nn.Module, d: nn.Module, opt_g, opt_d, ema: nn.Module | None = None) -> None:
    """Load networks and optimizers in place (the RNG is restored per rank by the caller).

    An EMA missing from the checkpoint (EMA just switched on) starts from the restored G.
    """
    try:
        unwrap(g).load_state_dict(state["generator"])
        unwrap(d).load_state_dict(state["discriminator"])
        if ema is not None:
            ema.load_state_dict(state.get("ema") or state["generator"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match the model config (model.* keys): {e}") from None
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])


def restore_scaler(state: dict, scaler: torch.amp.GradScaler | None) -> None:
    """Load the fp16 loss scale; a checkpoint from another precision leaves the scaler at its default."""
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
