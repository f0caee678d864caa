"""Forgetting to draw an object (paper section 6.3.1, Fig. 6): find G's feature maps for the boxed object and drop them.

The paper boxed windows on 150 bedroom samples, fit a logistic regression on G's second-highest layer
(positives: activations inside the boxes, negatives: the rest of the same images) and zeroed every
feature map with a positive weight: the same z then drew the scene without windows, often with
something else in their place. Here the boxes come from `label-boxes` (seed + num regenerate the same
samples), so this works on any model: box the strokes of some digits, or the windows of bedrooms.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from sklearn.linear_model import LogisticRegression

from dcgan_dist.errors import ConfigError
from dcgan_dist.models import generate, latents
from dcgan_dist.experiments.label_boxes import read_boxes

NAME = "forget"
HELP = "learn which of G's feature maps draw the boxed object (logistic regression) and generate without them"


def add_arguments(p) -> None:
    p.add_argument("--boxes", required=True, help="boxes JSON written by `label-boxes --box ... --write FILE`")
    p.add_argument("--threshold", type=float, default=0.0, help="drop the maps whose weight is above this")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression (sklearn C)")
    p.add_argument("--extra", type=int, default=8, help="unlabeled samples of the same sheet to show as well")


def feature_layer(g: torch.nn.Module) -> torch.nn.Module:
    """G's second-highest layer: the ReLU feeding the final ConvTranspose2d (half the image resolution)."""
    return g.main[-3]


@contextmanager
def hooked(module: torch.nn.Module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def features(g: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The second-highest layer's activations for z, (N, C, R/2, R/2)."""
    captured = []
    with hooked(feature_layer(g), lambda m, i, o: captured.append(o.clone())):
        generate(g, z)
    return torch.cat(captured)


def generate_without(g: torch.nn.Module, z: torch.Tensor, maps: list[int]) -> torch.Tensor:
    """G(z) with feature maps `maps` of the second-highest layer zeroed at every position."""
    def drop(module, inputs, output):
        keep = torch.ones(output.shape[1])
        keep[maps] = 0
        return output * keep[:, None, None]

    with hooked(feature_layer(g), drop):
        return generate(g, z)


def box_mask(boxes: dict[int, list[list[int]]], indices: list[int], size: int, factor: int = 1) -> torch.Tensor:
    """(len(indices), size, size) True inside the boxes, given in pixels of a `factor` times larger image.

    A feature position covers `factor` x `factor` pixels, so a box partly over it counts it in.
    """
    mask = torch.zeros(len(indices), size, size, dtype=torch.bool)
    for row, i in enumerate(indices):
        for x0, y0, x1, y1 in boxes[i]:
            mask[row, y0 // factor:-(-y1 // factor), x0 // factor:-(-x1 // factor)] = True
    return mask


def run(args, nets, out) -> str:
    if args.extra < 0:
        raise ConfigError(f"--extra must be >= 0, got {args.extra}")
    resolution = nets.model.resolution
    seed, num, boxes = read_boxes(args.boxes, resolution)
    labeled = sorted(i for i, b in boxes.items() if b)
    if not labeled:
        raise ConfigError(f"--boxes {args.boxes}: no boxes, so no positives to learn from")
    z = latents(num, nets.model.nz, seed)

    feats = features(nets.g, z[labeled])
    channels, size = feats.shape[1], feats.shape[2]
    inside = box_mask(boxes, labeled, size, resolution // size)
    if inside.all():
        raise ConfigError(f"--boxes {args.boxes}: the boxes cover the whole of every labeled sample: no negatives")
    x = feats.permute(0, 2, 3, 1).reshape(-1, channels).numpy()
    # Balanced classes: objects are usually a small part of the image.
    clf = LogisticRegression(C=args.C, class_weight="balanced", max_iter=2000).fit(x, inside.reshape(-1).numpy())
    weights = clf.coef_[0]
    dropped = [int(c) for c in (weights > args.threshold).nonzero()[0]]

    unlabeled = [i for i in range(num) if i not in boxes][:args.extra]
    shown = labeled + unlabeled
    original = generate(nets.g, z[shown])
    forgotten = generate_without(nets.g, z[shown], dropped)
    out.images("forget.png", torch.cat([original, forgotten]), nrow=len(shown))

    change = (forgotten[:len(labeled)] - original[:len(labeled)]).abs().mean(1)  # (N, R, R), per pixel
    pixels = box_mask(boxes, labeled, resolution)
    change_in, change_out = float(change[pixels].mean()), float(change[~pixels].mean())
    ratio = change_in / max(change_out, 1e-12)
    out.json("dropped.json", {"boxes": args.boxes, "seed": seed, "num": num, "labeled": labeled,
                              "shown": shown, "dropped_maps": dropped, "weights": weights.tolist()})
    out.metrics({"maps_dropped": len(dropped), "maps_total": channels, "change_inside": change_in,
                 "change_outside": change_out, "change_ratio": ratio,
                 "train_accuracy": clf.score(x, inside.reshape(-1).numpy())})
    return out.finish(f"dropped {len(dropped)} of {channels} feature maps (weight > {args.threshold}) learned from "
                      f"{len(labeled)} labeled sample(s)\n"
                      f"  mean |pixel change| inside the boxes {change_in:.4f}, outside {change_out:.4f} "
                      f"(ratio {ratio:.2f})\n"
                      f"  forget.png: top row original, bottom row without the maps "
                      f"({len(labeled)} labeled, then {len(unlabeled)} unlabeled)")
