"""The paper's DCGAN generator and discriminator (Radford, Metz & Chintala 2015, section 3).

Strided (transposed) convolutions instead of pooling, batch norm everywhere except G's output
and D's input layer, no hidden fully connected layers, ReLU + Tanh in G, LeakyReLU(0.2) in D.
The depth follows the resolution: 4x4 at the bottom, one stride-2 layer per doubling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcgan_dist.config import ModelConfig


def _updown(kernel: int) -> dict:
    """Padding that makes a stride-2 layer exactly double (or halve) the size for kernel 4 or 5."""
    return {"kernel_size": kernel, "stride": 2, "padding": (kernel - 1) // 2}


def num_scales(resolution: int) -> int:
    """Stride-2 layers between 4x4 and the image: 3 for 32, 4 for 64, 5 for 128."""
    n = int(math.log2(resolution)) - 2
    if 2 ** (n + 2) != resolution or n < 1:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return n


class Generator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) -> images (N, nc, R, R) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, resolution: int = 64, kernel: int = 4):
        super().__init__()
        self.nz = nz
        n = num_scales(resolution)
        ch = ngf * 2 ** (n - 1)
        # "Project and reshape": a 4x4 transposed conv on a 1x1 input is the paper's first layer.
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        extra = {"output_padding": 1} if kernel % 2 else {}
        for _ in range(n - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, bias=False, **_updown(kernel), **extra),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, nc, bias=False, **_updown(kernel), **extra), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """images (N, nc, R, R) -> logits (N,). No sigmoid: train with BCEWithLogits (autocast-safe)."""

    def __init__(self, ndf: int = 64, nc: int = 3, resolution: int = 64, kernel: int = 4):
        super().__init__()
        n = num_scales(resolution)
        ch = ndf
        layers: list[nn.Module] = [nn.Conv2d(nc, ch, bias=False, **_updown(kernel)), nn.LeakyReLU(0.2, True)]
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, bias=False, **_updown(kernel)), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0, bias=False))  # 4x4 -> one logit, no FC layer
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).reshape(-1)


def _channels(m: ModelConfig) -> int:
    if not m.nc:
        raise ValueError("model.nc is 0 (from the data): resolve it from the manifest before building networks")
    return m.nc


def latents(n: int, nz: int, seed: int) -> torch.Tensor:
    """n latent vectors ~ N(0, I), the same for the same seed on every machine: sample grids, evaluation noise
    and the experiments all draw z here."""
    return torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(g, z: torch.Tensor, batch_size: int = 256, device=None, each=None) -> torch.Tensor:
    """G(z) in batches (G as it is: call .eval() first for batch norm's running statistics); `each` maps every
    batch's output (e.g. to uint8 on the CPU, so a large evaluation never holds all images on the GPU)."""
    out = [g(z[i:i + batch_size].to(device or z.device)) for i in range(0, len(z), batch_size)]
    return torch.cat([each(x) for x in out] if each else out)


def init_weights(module: nn.Module) -> None:
    """The paper's init: conv weights ~ N(0, 0.02); batch-norm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(m: ModelConfig) -> Generator:
    g = Generator(m.nz, m.ngf, _channels(m), m.resolution, m.kernel)
    g.apply(init_weights)
    return g


def build_discriminator(m: ModelConfig) -> Discriminator:
    d = Discriminator(m.ndf, _channels(m), m.resolution, m.kernel)
    d.apply(init_weights)
    return d
