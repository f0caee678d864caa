"""Sample grids laid out as torchvision's `make_grid(normalize=True, value_range=(-1, 1))` lays them out, without
importing torchvision: its import pulls in torch._dynamo and sympy, about 1.5 s of start-up for every Ray worker
that logs a grid, on each start of a training group."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (3, H', W') image in [0, 1]: `nrow` images a row, `padding` black pixels
    around each; gray images become RGB."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    out = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[:, top:top + h, left:left + w] = x[i]
    return out


def grid_pixels(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """The grid as (H', W', 3) uint8 pixels, 0-255."""
    return grid(images, nrow, padding).mul(255).round().byte().permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """The grid as a PNG file."""
    Image.fromarray(grid_pixels(images, nrow)).save(path)
