"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, PGGAN appendix D).

Protocol, as in progressive_growing_of_gans `metrics/sliced_wasserstein.py`:

1. Build a Laplacian pyramid of every image, from its full resolution down to `min_resolution`
   (5x5 binomial filter [1, 4, 6, 4, 1] / 16 in both directions, mirror padding, stride 2 down,
   zero-insertion + 4x the filter up, as cv2.pyrDown / pyrUp). The coarsest level is the blurred
   image itself, the others are band-pass residuals.
2. At each level take `patches_per_image` random 7x7 neighbourhoods per image; a descriptor is
   the flattened C x 7 x 7 patch.
3. Normalize descriptors per channel, then compare the two descriptor sets with the sliced
   Wasserstein distance: project on random unit directions, sort, mean absolute difference,
   averaged over `dir_repeats` batches of `dirs_per_repeat` directions.
4. Report each level and the mean over levels, multiplied by 1e3 (PGGAN's SWDx1e3).

Deviation from PGGAN: both descriptor sets are normalized with the *real* set's per-channel mean
and std. PGGAN normalizes each set by its own statistics, which makes the metric blind to a global
shift or scaling of a channel (a colour cast, brightness, contrast) of the generated images; with
shared statistics such a change shows up (a pure shift at the coarsest level: the band-pass
levels ignore constants).
Descriptor sets of different sizes are compared after subsampling the larger one (sorted
projections must pair up one to one).

Everything random (patch positions, subsampling, directions) comes from one seeded
`torch.Generator`, so a given seed and input give the same number on every run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

NHOOD = 7  # patch side, as in PGGAN
CHUNK = 128  # images per pyramid pass: small temporaries stay in cache (about 4x faster than all at once)


def _taps(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[1, 4, 6, 4, 1] / 16 along `dim` (valid part only) as shifted adds: much faster on CPU
    than a one-channel conv2d."""
    n = x.shape[dim] - 4
    t = [x.narrow(dim, i, n) for i in range(5)]
    return (t[0] + t[4] + 4.0 * (t[1] + t[3]) + 6.0 * t[2]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5x5 binomial filter with mirror padding (scipy 'mirror' = torch 'reflect')."""
    return _taps(_taps(F.pad(x, (2, 2, 2, 2), mode="reflect"), -1), -2)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def _pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x * 4.0  # 4x: three of four samples are zeros
    return _blur(up)[..., : size[0], : size[1]]


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """(N, C, H, W) float -> `num_levels` maps, finest first; each channel filtered on its own."""
    n, c, h, w = images.shape
    levels = [images.reshape(n * c, 1, h, w)]
    for _ in range(1, num_levels):
        levels.append(_pyr_down(levels[-1]))
        levels[-2] = levels[-2] - _pyr_up(levels[-1], levels[-2].shape[-2:])
    return [lv.reshape(n, c, *lv.shape[-2:]) for lv in levels]


def _descriptors(level: torch.Tensor, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """`per_image` random 7x7 neighbourhoods per image, fully inside it: (N * per_image, C * 49)."""
    n, _, s, _ = level.shape
    ys = torch.randint(0, s - NHOOD + 1, (n, per_image), generator=gen)  # top-left corners
    xs = torch.randint(0, s - NHOOD + 1, (n, per_image), generator=gen)
    windows = level.unfold(2, NHOOD, 1).unfold(3, NHOOD, 1).permute(0, 2, 3, 1, 4, 5)  # (N, y, x, C, 7, 7), a view
    return windows[torch.arange(n)[:, None], ys, xs].reshape(n * per_image, -1)


def _pyramids(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """Laplacian pyramids of uint8 images, built CHUNK images at a time into preallocated levels."""
    out: list[torch.Tensor] = []
    for i in range(0, len(images), CHUNK):
        levels = laplacian_pyramid(images[i:i + CHUNK].float(), num_levels)
        if not out:
            out = [level.new_empty((len(images),) + level.shape[1:]) for level in levels]
        for o, level in zip(out, levels):
            o[i:i + len(level)] = level
    return out


def _channel_std(desc: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel std over all descriptors and patch positions (two passes: exact in float32)."""
    x = desc.view(len(desc), channels, -1)
    mean = x.mean(0).mean(1)
    return (x - mean[:, None]).square_().mean(0).mean(1).sqrt()


def _sort_rows(x: np.ndarray) -> None:
    """In-place sort of each row. NumPy's SIMD sort is several times faster than torch.sort on
    CPU and releases the GIL, so blocks of rows are sorted on parallel threads."""
    workers = max(1, min(torch.get_num_threads(), len(x)))
    if workers == 1:
        x.sort(axis=1)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda block: block.sort(axis=1), np.array_split(x, workers)))


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dir_repeats: int,
                        dirs_per_repeat: int, gen: torch.Generator) -> float:
    """Mean |sorted(a.d) - sorted(b.d)| over random unit directions d; a, b: (n, dim), same n.

    Normalization happens on the fly: ((x - mean) * scale).d = x.(scale * d) - const, and the
    constant is the same for both sets, so it cancels in the difference of sorted values.
    """
    # (directions, n) buffers, reused: rows are contiguous for the sort, and fresh 100 MB
    # tensors per repeat would cost more in page faults than the matmul itself.
    pa = torch.empty(dirs_per_repeat, len(a))
    pb = torch.empty(dirs_per_repeat, len(b))
    results = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=gen)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True) * scale[:, None]).T
        torch.matmul(dirs, a.T, out=pa)
        torch.matmul(dirs, b.T, out=pb)
        _sort_rows(pa.numpy())
        _sort_rows(pb.numpy())
        results.append(pa.sub_(pb).abs_().mean().item())  # mean |difference|, in place
    return sum(results) / len(results)


def _check(name: str, x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise ValueError(f"swd: {name} must be uint8 (N, C, H, W) with C in (1, 3) and H == W, "
                         f"got {tuple(x.shape)} {x.dtype}")


def swd(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0, patches_per_image: int = 128,
        dir_repeats: int = 4, dirs_per_repeat: int = 128, min_resolution: int = 16) -> dict[str, float]:
    """SWD x 1e3 between two uint8 image sets: {"swd": mean over levels, "swd_<res>": each level}.

    Time grows with N * patches_per_image * levels, memory with N * patches_per_image (one level's
    descriptors at a time: about 0.8 GB in all for 2048 RGB 64x64 images per side).
    """
    _check("real", real)
    _check("fake", fake)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"swd: real {tuple(real.shape[1:])} and fake {tuple(fake.shape[1:])} differ in C, H, W")
    if len(real) == 0 or len(fake) == 0:
        raise ValueError("swd: needs at least one real and one fake image")
    if min_resolution < NHOOD or real.shape[-1] < min_resolution:
        raise ValueError(f"swd: need {NHOOD} <= min_resolution ({min_resolution}) <= image size ({real.shape[-1]})")
    sizes = [real.shape[-1]]
    while (sizes[-1] + 1) // 2 >= min_resolution:
        sizes.append((sizes[-1] + 1) // 2)

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    with torch.no_grad():
        for size, level_real, level_fake in zip(sizes, _pyramids(real, len(sizes)), _pyramids(fake, len(sizes))):
            dr = _descriptors(level_real, patches_per_image, gen)
            df = _descriptors(level_fake, patches_per_image, gen)
            # Per-channel std of the *real* descriptors scales both sets (see the module doc).
            std = _channel_std(dr, real.shape[1]).clamp_min(1e-8)
            scale = (1.0 / std).repeat_interleave(NHOOD * NHOOD)
            m = min(len(dr), len(df))
            if len(dr) > m:
                dr = dr[torch.randperm(len(dr), generator=gen)[:m]]
            if len(df) > m:
                df = df[torch.randperm(len(df), generator=gen)[:m]]
            out[f"swd_{size}"] = 1e3 * _sliced_wasserstein(dr, df, scale, dir_repeats, dirs_per_repeat, gen)
    return {"swd": sum(out.values()) / len(out), **out}
