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
from dcgan_dist.step import GANStep

STATE_FILE = "state.pt"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: torch's CPU generator, Python's, and the CUDA generator of this rank's own GPU
    only (Ray lets a node's workers see every GPU of the node: a rank that resumes on another local GPU, or on a
    node with fewer GPUs, must restore its own generator, not a list indexed by GPU)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved. The states must be CPU ByteTensors, as `resume` loads them."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _as_tuple(x: Any) -> Any:
    """random.setstate wants nested tuples; a round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def training_state(step_fn: GANStep, step: int, rng: list[dict], config: dict, ema: nn.Module | None = None,
                   evaluation: dict | None = None) -> dict:
    """The dict a checkpoint holds: the step's own state (networks, optimizers, fp16 scale), `rng` with one entry
    per rank (index = rank), `ema` = G's averaged copy, and `evaluation` = {"values": {metric: value},
    "protocols": {metric: protocol key}} when this step was scored."""
    return {**step_fn.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "evaluation": evaluation or {}, "step": step, "rng": rng, "config": config}


def save(state: dict, directory: str | Path) -> Path:
    """Write `state.pt` into `directory` via a temp file + rename: never a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(directory / STATE_FILE, buf.getvalue())
    return directory / STATE_FILE


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save` (tensors and plain containers only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint directory {directory}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def restore(state: dict, step_fn: GANStep, ema: nn.Module | None = None, t=None) -> None:
    """Load networks, optimizers and the fp16 scale in place (the RNG is restored per rank by the caller); `t`,
    the run's TrainConfig, sets the learning rates. An EMA missing from the checkpoint (EMA just switched on)
    starts from the restored G."""
    step_fn.load_state_dict(state, t)
    if ema is not None:
        ema.load_state_dict(state.get("ema") or state["generator"])


def resume(directory: str | Path, step_fn: GANStep, ema: nn.Module | None = None, t=None) -> dict:
    """Load a checkpoint into the step (and the EMA) wherever they live, and return its state.

    Read onto the CPU, never straight onto the training device: `load_state_dict` moves weights and Adam's moments
    to their parameters' device, while what PyTorch wants on the host stays there: RNG states (`set_rng_state`
    takes only CPU ByteTensors: a GPU resume crashed on it) and non-fused Adam's step counters (on a GPU, Adam
    would read them back with one host sync per parameter per step)."""
    state = load(directory, map_location="cpu")
    restore(state, step_fn, ema, t)
    return state
