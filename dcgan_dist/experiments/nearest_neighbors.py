"""Has G memorized its training images? Generated samples next to their nearest training images.

A generator that copies training images puts its samples much closer to the training set than new real
images are. So we hold some real images out of the search set and compare nearest-neighbor distances:
generated -> train against held-out real -> train, in pixel space (L2) and in D's feature space (the
feature-svm features, each layer balanced). A ratio near (or above) 1 is what a model that generalizes
gives; a ratio well below 1 suggests memorization. The figures show what the numbers measure.
"""

from __future__ import annotations

import torch

from dcgan_dist.data.loader import read_sample, resolve_shards, to_model_input
from dcgan_dist.errors import ConfigError
from dcgan_dist.models import generate, latents
from dcgan_dist.experiments.feature_svm import balance, d_features, layer_sizes

NAME = "nearest-neighbors"
HELP = "memorization check: generated samples beside their nearest training images (pixels and D features)"


def add_arguments(p) -> None:
    p.add_argument("--data", help="training shards to search (default: the data the model was trained on)")
    p.add_argument("--num", type=int, default=8, help="generated samples shown (figure rows)")
    p.add_argument("--k", type=int, default=5, help="nearest training images shown per sample")
    p.add_argument("--holdout", type=int, default=200,
                   help="real images kept out of the search set for the baseline (as many generated are measured)")
    p.add_argument("--max-images", type=int, default=5000, help="read at most this many real images")
    p.add_argument("--batch", type=int, default=256, help="images per D forward pass")


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, ...) and (B, ...) -> distances and indices into `bank` of the k nearest per query, nearest first.

    Exact L2 (no matrix-product shortcut), so an image finds itself at distance 0.
    """
    dist = torch.cdist(queries.flatten(1).float(), bank.flatten(1).float(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.topk(k, dim=1, largest=False)


def run(args, nets, out) -> str:
    if min(args.num, args.k, args.holdout, args.batch) < 1:
        raise ConfigError("nearest-neighbors: --num, --k, --holdout and --batch must be >= 1")
    url = args.data or nets.data_url
    images = read_sample(resolve_shards(url), args.max_images, channels=nets.model.nc,
                         resolution=nets.model.resolution)
    if len(images) < args.holdout + args.k:
        raise ConfigError(f"--holdout {args.holdout} + --k {args.k} needs at least {args.holdout + args.k} images; "
                          f"read {len(images)} from {url} (--max-images {args.max_images})")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train = images[order[:args.holdout]], images[order[args.holdout:]]
    fake = generate(nets.g, latents(max(args.num, args.holdout), nets.model.nz, args.seed))

    pixels = {"train": to_model_input(train, "cpu"), "held": to_model_input(held, "cpu"), "fake": fake}
    sizes = layer_sizes(nets.d)
    feats = {k: d_features(nets.d, v, args.batch) for k, v in pixels.items()}
    feats = {k: balance(v, sizes, ref=feats["train"]) for k, v in feats.items()}

    results, metrics = {}, {}
    for space, x in (("pixels", pixels), ("d_features", feats)):
        fake_dist, fake_idx = nearest(x["fake"], x["train"], args.k)
        held_dist, _ = nearest(x["held"], x["train"], 1)
        gen, real = float(fake_dist[:args.holdout, 0].mean()), float(held_dist[:, 0].mean())
        results[space] = {"generated_nearest_mean": gen, "heldout_nearest_mean": real, "ratio": gen / real,
                          "samples": [{"image_index": order[args.holdout + idx].tolist(), "distance": dist.tolist()}
                                      for dist, idx in zip(fake_dist[:args.num], fake_idx[:args.num])]}
        metrics.update({f"nn_{space}_generated": gen, f"nn_{space}_heldout": real, f"nn_{space}_ratio": gen / real})
        rows = [torch.cat([fake[i:i + 1], pixels["train"][fake_idx[i]]]) for i in range(args.num)]
        out.images(f"neighbors_{space}.png", torch.cat(rows), nrow=args.k + 1)
    out.metrics(metrics)
    out.json("neighbors.json", {"data": url, "images": len(images), "holdout": args.holdout, "k": args.k,
                                "spaces": results})

    lines = [f"{args.num} generated samples and their {args.k} nearest of {len(train)} training images "
             f"({len(images)} read from {url}, {args.holdout} held out)",
             f"  {'space':<11} {'generated->train':>16} {'held-out->train':>16} {'ratio':>6}"]
    lines += [f"  {space:<11} {r['generated_nearest_mean']:16.4f} {r['heldout_nearest_mean']:16.4f} {r['ratio']:6.2f}"
              for space, r in results.items()]
    lines.append(f"  mean nearest distance over {args.holdout} images each; ratio << 1 suggests memorization")
    return out.finish("\n".join(lines))
