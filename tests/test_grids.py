"""Our sample grids against torchvision's make_grid, the layout users know from pytorch/examples."""

from __future__ import annotations

import pytest
import torch
from torchvision.utils import make_grid

from conftest import imported_by
from dcgan_dist.grids import grid, grid_pixels


@pytest.mark.parametrize("n, channels, nrow", [(64, 1, 8), (10, 3, 4), (3, 3, 8)])
def test_a_grid_is_torchvisions_make_grid_of_the_same_images(n, channels, nrow):
    """Rows of `nrow`, 2 black pixels of padding, [-1, 1] mapped to [0, 1], gray made RGB, a short last row."""
    images = torch.randn(n, channels, 7, 5, generator=torch.Generator().manual_seed(n)).mul(1.5)  # some out of range
    theirs = make_grid(images, nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    assert torch.allclose(grid(images, nrow=nrow), theirs, atol=1e-6)
    pixels = grid_pixels(images, nrow=nrow)
    assert pixels.dtype.name == "uint8" and pixels.shape == (*theirs.shape[1:], 3)


def test_the_training_loop_imports_no_torchvision():
    """Every start of a training group imports the loop in each worker: torchvision (torch._dynamo and sympy with it)
    would add about 1.5 s to each."""
    assert imported_by("import dcgan_dist.train_loop", ["torchvision", "sympy"]) == []
