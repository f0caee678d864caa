"""Generic PyTorch helpers with nothing GAN-specific in them: DDP unwrapping, memory layout, bf16 detection,
torch.compile. (As stylegan2-ada keeps such things in torch_utils/misc.py, apart from the training code.)"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel (or the module itself)."""
    return getattr(module, "module", module)


def to_layout(channels_last: bool, *items):
    """Put modules/tensors in NHWC (channels_last) or leave them as they are; returns them in order."""
    if not channels_last:
        return items
    return tuple(x.to(memory_format=torch.channels_last) if isinstance(x, nn.Module)
                 else x.contiguous(memory_format=torch.channels_last) for x in items)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 instructions: under them bf16 is emulated.
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls/convs in hardware: CUDA GPUs from Ampere on (compute capability 8+;
    `is_bf16_supported()` also counts emulation), CPUs with AMX or AVX512-BF16 that oneDNN is allowed to use
    (`ONEDNN_MAX_CPU_ISA=AVX512_CORE` keeps it off them, which is also how a test sees the other kind of CPU).
    Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISAS_WITHOUT_BF16:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision 'auto' -> bf16 where the hardware has it natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def compile_models(mode: str, *models: nn.Module) -> None:
    """torch.compile each module's forward in place (state_dict keys unchanged, so checkpoints stay portable), for
    the static shapes of training (each rank's batch is fixed). A compile failure (no C compiler for Triton or
    inductor, an unsupported op) raises instead of running eagerly behind the user's back: a benchmark of a silent
    fallback measured eager code."""
    if mode == "none":
        return
    for m in models:
        m.compile(mode=None if mode == "default" else mode, dynamic=False)


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
