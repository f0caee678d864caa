"""Vector arithmetic on face samples (paper section 6.3.2, Fig. 7): mean(z_a) - mean(z_b) + mean(z_c).

Step 1 (no --a/--b/--c): a numbered sample sheet to pick concepts from ("smiling woman", ...).
Step 2: the arithmetic on the picked indices. Averaging about three z per concept is what made the
paper's results stable. The result is shown with its +/- 0.25-scale neighbourhood (uniform noise
added to z), and beside the same arithmetic done on pixels, which does not work: that contrast is
the point of the figure. `inputs.json` holds everything needed to redraw it.
"""

from __future__ import annotations

import torch

from dcgan_dist.errors import ConfigError
from dcgan_dist.experiments.common import numbered_grid, parse_indices
from dcgan_dist.models import generate, latents

NAME = "vector-arithmetic"
HELP = "a numbered sample sheet, then mean(z_a) - mean(z_b) + mean(z_c) with its z neighbourhood"


def add_arguments(p) -> None:
    p.add_argument("--num", type=int, default=64, help="samples on the sheet (indices refer to it, with --seed)")
    p.add_argument("--a", help="sheet indices of the first concept, e.g. 3,7,12")
    p.add_argument("--b", help="sheet indices of the concept to subtract")
    p.add_argument("--c", help="sheet indices of the concept to add")
    p.add_argument("--neighbours", type=int, default=8, help="samples of the result's +/- scale neighbourhood")
    p.add_argument("--scale", type=float, default=0.25, help="half-width of the uniform noise added to the result")


def arithmetic(z: torch.Tensor, a: list[int], b: list[int], c: list[int]) -> torch.Tensor:
    return z[a].mean(0) - z[b].mean(0) + z[c].mean(0)


def run(args, nets, out) -> str:
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    given = [args.a, args.b, args.c]
    if any(given) and not all(given):
        raise ConfigError("vector-arithmetic: give all of --a, --b and --c (or none, for the sample sheet)")
    picks = [parse_indices(text, f"--{name}", args.num) for text, name in zip(given, "abc")] if all(given) else None
    z = latents(args.num, nets.model.nz, args.seed)
    samples = generate(nets.g, z)
    out.picture("sheet.png", numbered_grid(samples, nrow=8))
    if picks is None:
        return out.finish(f"sample sheet of {args.num} (seed {args.seed}): {out.folder / 'sheet.png'}\n"
                          "pick indices and run again with --a I,J,K --b ... --c ... (same --seed and --num)")
    a, b, c = picks
    y = arithmetic(z, a, b, c)
    noise = (torch.rand(args.neighbours, z.shape[1], generator=torch.Generator().manual_seed(args.seed + 1)) * 2 - 1)
    result = generate(nets.g, torch.cat([y[None], y[None] + args.scale * noise]))
    pixels = arithmetic(samples, a, b, c)  # the same sum on pixels: the contrast the figure shows

    # One figure, one row each: a's samples, b's, c's (padded to the same width), then G(y) with its
    # neighbourhood, then the pixel-space sum for comparison.
    width = max(len(a), len(b), len(c), 1 + args.neighbours)
    blank = torch.full_like(samples[:1], -1)
    rows = [samples[a], samples[b], samples[c], result, pixels.clamp(-1, 1)[None]]
    padded = [torch.cat([row, blank.expand(width - len(row), -1, -1, -1)]) for row in rows]
    out.images("arithmetic.png", torch.cat(padded), nrow=width)
    out.json("inputs.json", {"model": nets.uri, "seed": args.seed, "num": args.num, "a": a, "b": b, "c": c,
                             "scale": args.scale, "neighbours": args.neighbours, "z_result": y.tolist(),
                             "rows": ["a", "b", "c", "G(mean a - mean b + mean c) + neighbourhood", "pixel sum"]})
    spread = float((result[1:] - result[:1]).abs().mean())
    out.metrics({"neighbourhood_change": spread})
    return out.finish(f"mean(z[{a}]) - mean(z[{b}]) + mean(z[{c}]) (sheet seed {args.seed}, {args.num} samples)\n"
                      f"  arithmetic.png rows: a, b, c, result + {args.neighbours} neighbours "
                      f"(+/-{args.scale}), pixel-space sum\n"
                      f"  mean pixel change across the neighbourhood: {spread:.4f}")
