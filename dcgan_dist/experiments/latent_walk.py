"""Walking in the latent space (paper section 6.1, Fig. 4).

If G has memorized images, a path between two latent points jumps from one training image to the
next; if it has learned a representation, the images change smoothly. We draw paths between random
endpoints, linearly and along the great circle (slerp: the Gaussian's mass lies near a sphere, so
slerp keeps intermediate points as "typical" as the endpoints), and measure the per-step change.
"""

from __future__ import annotations

import torch
from PIL import Image

from dcgan_dist.errors import ConfigError
from dcgan_dist.grids import grid_pixels
from dcgan_dist.models import generate, latents

NAME = "latent-walk"
HELP = "interpolations between random latent points (linear and spherical), a grid, a GIF and a smoothness figure"


def add_arguments(p) -> None:
    p.add_argument("--paths", type=int, default=8, help="paths (grid rows) between random endpoints")
    p.add_argument("--steps", type=int, default=10, help="images per path, endpoints included")
    p.add_argument("--gif-keyframes", type=int, default=6, help="latent points the GIF loops through")
    p.add_argument("--gif-frames", type=int, default=12, help="frames between two keyframes")


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return z0 + (z1 - z0) * t


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Great-circle interpolation (falls back to lerp for nearly parallel vectors)."""
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True))
    omega = cos.clamp(-1, 1).acos()
    so = omega.sin()
    safe = so.abs() > 1e-6
    out = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.where(safe, so, torch.ones_like(so))
    return torch.where(safe, out, lerp(z0, z1, t))


def paths(z0: torch.Tensor, z1: torch.Tensor, steps: int, how) -> torch.Tensor:
    """(P, nz) endpoints -> (P * steps, nz), path-major: row p of the grid is path p."""
    t = torch.linspace(0, 1, steps).reshape(1, steps, 1)
    return how(z0[:, None], z1[:, None], t).reshape(-1, z0.shape[1])


def smoothness(images: torch.Tensor, n_paths: int) -> dict[str, float]:
    """Mean absolute pixel change per step, and how far the largest step stands out (max / mean, per path).

    A smooth walk has a ratio near 1; a jump between memorized images shows as a ratio well above it.
    """
    x = images.reshape(n_paths, -1, *images.shape[1:])
    step = (x[:, 1:] - x[:, :-1]).abs().flatten(2).mean(-1)  # (paths, steps - 1)
    ratio = step.max(1).values / step.mean(1).clamp_min(1e-12)
    return {"step_change_mean": float(step.mean()), "step_change_max": float(step.max()),
            "max_over_mean": float(ratio.mean()), "max_over_mean_worst": float(ratio.max())}


def run(args, nets, out) -> str:
    if args.paths < 1 or args.steps < 3 or args.gif_keyframes < 2 or args.gif_frames < 1:
        raise ConfigError("latent-walk: need --paths >= 1, --steps >= 3, --gif-keyframes >= 2, --gif-frames >= 1")
    nz = nets.model.nz
    ends = latents(2 * args.paths, nz, args.seed)
    z0, z1 = ends[: args.paths], ends[args.paths:]
    lines, figures = [], {}
    for name, how in (("linear", lerp), ("slerp", slerp)):
        images = generate(nets.g, paths(z0, z1, args.steps, how))
        out.images(f"walk_{name}.png", images, nrow=args.steps)
        figures[name] = stats = smoothness(images, args.paths)
        out.metrics({f"{name}_{k}": v for k, v in stats.items()})
        lines.append(f"  {name:<7} mean change/step {stats['step_change_mean']:.4f}  max/mean per path "
                     f"{stats['max_over_mean']:.2f} (worst {stats['max_over_mean_worst']:.2f})")

    # The GIF: a loop through keyframes, 16 walks side by side (each tile its own loop).
    tiles = 16
    keys = latents(args.gif_keyframes * tiles, nz, args.seed + 1).reshape(args.gif_keyframes, tiles, nz)
    t = torch.arange(args.gif_frames).float().div(args.gif_frames).reshape(-1, 1, 1)
    z = torch.cat([slerp(keys[k][None], keys[(k + 1) % len(keys)][None], t) for k in range(len(keys))])
    images = generate(nets.g, z.reshape(-1, nz))
    frames = images.reshape(len(z), tiles, *images.shape[1:])

    gif = [Image.fromarray(grid_pixels(f, nrow=4)) for f in frames]
    out.picture("walk.gif", gif)
    _plot(figures, out)
    return out.finish("\n".join([f"{args.paths} paths x {args.steps} steps (seed {args.seed}); "
                                 "max/mean near 1 = smooth, well above = sharp transitions", *lines,
                                 f"  walk.gif: {len(gif)} frames through {args.gif_keyframes} keyframes"]))


def _plot(figures: dict, out) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    names = list(figures)
    ax.bar(names, [figures[n]["max_over_mean"] for n in names], color=["tab:blue", "tab:orange"])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("largest step / mean step")
    ax.set_title("latent walk smoothness")
    out.figure("smoothness.png", fig)
