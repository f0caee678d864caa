"""An exponential moving average of the generator's weights (`train.ema_decay`).

Averaged weights give smoother, usually better samples than the last step's (as in
progressive GANs and StyleGAN); when on, they are what gets evaluated and exported.
Batch-norm statistics do not average meaningfully, so `recalibrate_bn` recomputes them for the
averaged weights from fresh noise: G's input is only z, so no data is needed. The copy's batch norms are plain,
per-process ones even when G's are SyncBatchNorm: recalibration is deterministic, so each rank computes the same
statistics alone, and rank 0 can recalibrate by itself for a sample grid (a synchronized one would wait there for
ranks that never come).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcgan_dist.models import build_generator
from dcgan_dist.torch_utils import unwrap


class GeneratorEMA:
    """Holds `module`, a frozen copy of G whose parameters trail G's: p_ema <- decay * p_ema + (1 - decay) * p."""

    def __init__(self, generator: nn.Module, decay: float):
        self.decay = decay
        self.module = local_batchnorm(copy.deepcopy(unwrap(generator))).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        ema, live = list(self.module.parameters()), list(unwrap(generator).parameters())
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def local_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every batch norm of another kind (SyncBatchNorm, say) replaced by a plain BatchNorm2d holding
    the same weights and statistics: the same state_dict keys, no collective in train mode."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) is not nn.BatchNorm2d:
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers()).device)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            setattr(module, name, plain)
        else:
            local_batchnorm(child)
    return module


@torch.no_grad()
def recalibrate_bn(generator: nn.Module, nz: int, *, batches: int = 16, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """Reset and re-estimate every BatchNorm's running mean/var from `batches` of seeded noise.

    Deterministic for a given seed, so every rank computes the same statistics. Leaves G in eval mode.
    """
    bns = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    generator.train()
    for i in range(batches):
        # momentum 1/(i+1) keeps the cumulative average over the batches so far (what momentum=None does, but
        # that reads num_batches_tracked back to the host in every layer, a GPU sync each)
        for m in bns:
            m.momentum = 1.0 / (i + 1)
        generator(torch.randn(batch_size, nz, generator=rng).to(device))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return generator.eval()


def shown_generator(g: nn.Module, ema: nn.Module | None, nz: int, seed: int):
    """`evaluated_generator`'s forward, run eagerly even when G is compiled: the evaluation and the sample grid
    call it in eval mode at other batch sizes, which would make torch.compile recompile (and reduce-overhead
    capture new CUDA graphs) for a few calls each. (The EMA copy is never compiled: deepcopy drops that.)"""
    return evaluated_generator(g, ema, nz, seed).forward


def evaluated_generator(g: nn.Module, ema: nn.Module | None, nz: int, seed: int) -> nn.Module:
    """The generator that is evaluated, sampled and exported, in eval mode: the EMA (batch norm recalibrated)
    when the run keeps one, else G itself. Training, export and registration all go through here."""
    if ema is None:
        return unwrap(g).eval()
    return recalibrate_bn(ema, nz, seed=seed)


def generator_from_state(state: dict, model_cfg, seed: int) -> nn.Module:
    """G from a checkpoint's state, as training evaluates it (`evaluated_generator`): registration and the scoring
    task both take it from here."""
    g = build_generator(model_cfg)
    g.load_state_dict(state["generator"])
    ema = None
    if state.get("ema"):
        ema = build_generator(model_cfg)
        ema.load_state_dict(state["ema"])
    return evaluated_generator(g, ema, model_cfg.nz, seed)
