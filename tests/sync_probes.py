"""Test support for what a GPU would show and a CPU does not: host syncs and the collectives each rank issues.

On a CPU a `.item()` costs nothing and a missing collective on one rank may still pair up with another; on a GPU the
first stalls the kernel queue and the second hangs NCCL for 30 minutes. These probes count both on a CPU run so a
test can hold them to what the GPU needs: no host read on an ordinary step, the same collectives on every rank.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops that read a device tensor's value back to the host (each a stream sync on CUDA): .item()/float()/bool(),
# truth tests, comparisons of whole tensors, and ops whose output size depends on the data.
HOST_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select, aten.unique_dim,
              aten._unique2, aten.allclose}


class HostSyncCounter(TorchDispatchMode):
    """Counts HOST_READS. Tensors that live on the host by design (non-fused Adam's step counters, which PyTorch keeps
    on the CPU even for GPU parameters) are not counted: `host_resident()` gives their ids at the time of a read
    (Adam makes them inside its first step)."""

    def __init__(self, host_resident=set):
        super().__init__()
        self.count, self.host_resident, self.seen = 0, host_resident, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_READS and not (args and id(args[0]) in self.host_resident()):
            self.count += 1
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def adam_step_counters(*optimizers) -> set[int]:
    return {id(s["step"]) for opt in optimizers for s in opt.state.values() if "step" in s}


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_object", "gather_object", "broadcast_object_list", "gather", "scatter", "barrier")


class CollectiveLog:
    """Wraps torch.distributed's collectives in this process; each call is logged as "name shape" under the current
    step (set by the caller). Calls made inside another logged call (the object collectives use tensor ones) are not
    logged twice."""

    def __init__(self):
        self.steps: list[list[str]] = [[]]
        self._depth = 0
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def logged(*args, **kwargs):
            if self._depth == 0:
                first = args[0] if args else None
                shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ""
                self.steps[-1].append(f"{name} {shape}")
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return logged


class CollectiveBatchNorm(nn.BatchNorm2d):
    """A CPU stand-in for SyncBatchNorm: in train mode across ranks it issues a collective (an all-reduce of the
    batch means; SyncBatchNorm all-gathers its statistics) and so needs every rank, as SyncBatchNorm does on a GPU.
    Its output is a plain batch norm's."""

    def forward(self, x):
        if self.training and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x.detach().mean(dim=(0, 2, 3)))
        return super().forward(x)


def to_collective_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """What nn.SyncBatchNorm.convert_sync_batchnorm does, with the stand-in."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = CollectiveBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            to_collective_batchnorm(child)
    return module


def probed_train_loop(loop_config: dict) -> None:
    """The real training loop with the probes on: SyncBatchNorm replaced by the stand-in (SyncBatchNorm itself runs on
    GPUs only), every collective logged, host reads counted per step. Writes rank<R>.json into
    loop_config["probe_dir"]: per step, the collectives and the host reads."""
    import ray.train

    from dcgan_dist import step as step_module
    from dcgan_dist.train_loop import train_loop_per_worker

    # train.sync_batchnorm=true, as the loop would run it on GPUs (validation refuses it on CPU workers)
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, m, process_group=None:
                                                          to_collective_batchnorm(m))
    from_config = step_module.GANStep.from_config.__func__
    step_module.GANStep.from_config = classmethod(lambda cls, cfg, device="cpu", sync_batchnorm=False:
                                                  from_config(cls, cfg, device, sync_batchnorm=True))
    optimizers = []
    collectives, syncs = CollectiveLog(), HostSyncCounter(lambda: adam_step_counters(*optimizers))
    counts = [0]
    original_call = step_module.GANStep.__call__

    def call(self, real, weight=1.0):  # a step starts: what came before belongs to the previous one
        collectives.steps.append([])
        counts.append(syncs.count)
        optimizers[:] = [self.opt_g, self.opt_d]
        return original_call(self, real, weight)

    step_module.GANStep.__call__ = call
    try:
        with syncs:
            train_loop_per_worker(loop_config)
    finally:
        step_module.GANStep.__call__ = original_call
        step_module.GANStep.from_config = classmethod(from_config)
    counts.append(syncs.count)
    rank = ray.train.get_context().get_world_rank()
    per_step = [b - a for a, b in zip(counts[1:], counts[2:])]
    out = {"collectives": collectives.steps, "host_reads": per_step, "reads": syncs.seen}
    Path(loop_config["probe_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(loop_config["probe_dir"]) / f"rank{rank}.json").write_text(json.dumps(out))
    os.sync()
