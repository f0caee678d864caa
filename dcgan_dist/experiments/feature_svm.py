"""Classifying with the discriminator's features (paper section 5.1, Table 1).

If D learned a useful representation of images, a linear classifier on its features should beat one on
raw pixels, and one on the features of an untrained D of the same architecture (random conv features are
a strong baseline). As in the paper: the output of every conv block of D (all but the final 1-logit conv)
is max-pooled to a 4x4 grid, flattened and concatenated, and an L2-regularized linear SVM is trained on
a few labeled examples per class. Each layer's block is scaled to unit norm first (see `balance`).

Label draws: per class, `--labels-per-class` images train the SVM and `--val-per-class` other images
pick C (the paper, too, picked hyperparameters on a separate validation set); every remaining image
(or `--test-size` of them) is the test set. Train, validation and test are disjoint, and every feature
set sees the same draws.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcgan_dist.data.loader import to_model_input
from dcgan_dist.errors import ConfigError
from dcgan_dist.experiments.common import read_labeled

NAME = "feature-svm"
HELP = "linear SVM on D's features (all layers, 4x4 max-pooled) vs random-D and pixel baselines, few labels"
PAPER = "paper: CIFAR-10 82.8% (D trained on ImageNet-1k); SVHN 22.48% error with 1,000 labels"
C_GRID = tuple(10.0 ** e for e in range(-3, 2))  # larger C: same accuracy on digits (near hard-margin)


def add_arguments(p) -> None:
    p.add_argument("--data", help="labeled shards (default: the data the model was trained on)")
    p.add_argument("--labels-per-class", type=int, default=10, help="labeled training images per class")
    p.add_argument("--val-per-class", type=int, default=10, help="images per class, not in training, that pick C")
    p.add_argument("--test-size", type=int, help="test images, drawn from the rest (default: all the rest)")
    p.add_argument("--draws", type=int, default=5, help="label draws to average over")
    p.add_argument("--max-images", type=int, default=10000, help="read at most this many labeled images")
    p.add_argument("--batch", type=int, default=256, help="images per D forward pass")


def d_layers(d: nn.Module) -> list[nn.Module]:
    """D's conv blocks whose outputs are features: all but the last conv, which maps 4x4 to the logit."""
    return list(d.main)[:-1]


def layer_sizes(d: nn.Module) -> list[int]:
    """Feature dims per layer in `d_features`' output, in order: channels x 4 x 4."""
    return [m.out_channels * 16 for m in d_layers(d) if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def d_features(d: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, C, R, R) images, uint8 or float in [-1, 1] -> (N, sum(layer_sizes(d))) features, D in eval mode.

    The output of each conv block (after its LeakyReLU), max-pooled to 4x4: the paper's section 5.1.
    """
    d.eval()
    device = next(d.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = to_model_input(x, device) if x.dtype == torch.uint8 else x.to(device)
        feats = []
        for layer in d_layers(d):
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(F.adaptive_max_pool2d(x, 4).flatten(1))
        out.append(torch.cat(feats, 1).cpu())
    return torch.cat(out)


def balance(x: torch.Tensor, sizes: list[int], ref: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each layer's block of features to unit RMS norm over `ref` (default: x): every layer weighs the same.

    Not per-dimension standardization: that inflates near-constant dims (border pixels, dead channels) and
    weighs layers by width (on digits, pixels drop from ~89% to ~84%). One scale per block also keeps the
    C grid meaningful for every feature set, and it needs no labels.
    """
    ref = x if ref is None else ref
    scales = [b.square().sum(1).mean().sqrt().clamp_min(1e-12) for b in ref.split(sizes, 1)]
    return torch.cat([b / s for b, s in zip(x.split(sizes, 1), scales)], 1)


def feature_sets(nets, images: torch.Tensor, seed: int, batch: int = 256) -> dict[str, np.ndarray]:
    """The three representations compared, same images, same order, each layer balanced."""
    random_d = nets.random_discriminator(seed)
    pixels = to_model_input(images, "cpu").flatten(1)
    return {"trained D": balance(d_features(nets.d, images, batch), layer_sizes(nets.d)).numpy(),
            "random D": balance(d_features(random_d, images, batch), layer_sizes(random_d)).numpy(),
            "pixels": balance(pixels, [pixels.shape[1]]).numpy()}


def check_counts(labels: np.ndarray, per_class: int, val_per_class: int) -> None:
    """Every class needs its training and validation images, and something must be left to test on."""
    counts = Counter(labels.tolist())
    if len(counts) < 2:
        raise ConfigError(f"feature-svm: the data has {len(counts)} class(es); a classifier needs 2 or more")
    need = per_class + val_per_class
    cls, have = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if have < need:
        raise ConfigError(f"--labels-per-class {per_class} + --val-per-class {val_per_class} needs {need} images "
                          f"of every class; class {cls} has {have} (of {len(labels)} read; see --max-images)")
    if len(labels) == need * len(counts):
        raise ConfigError(f"--labels-per-class {per_class} + --val-per-class {val_per_class} leaves no test images")


def draw_split(labels: np.ndarray, per_class: int, val_per_class: int, test_size: int | None,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint (train, val, test) indices: per class `per_class` train and `val_per_class` val; test from the rest."""
    train, val, rest = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:per_class])
        val.append(idx[per_class:per_class + val_per_class])
        rest.append(idx[per_class + val_per_class:])
    rest = rng.permutation(np.concatenate(rest))
    return np.concatenate(train), np.concatenate(val), np.sort(rest[:test_size])


def fit_svm(x: np.ndarray, y: np.ndarray, train, val, test) -> dict:
    """Pick C on validation (the smallest of the best), report test accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    best = None
    for c in C_GRID:
        svm = LinearSVC(C=c, max_iter=5000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svm.fit(x[train], y[train])
        val_acc = float((svm.predict(x[val]) == y[val]).mean())
        if best is None or val_acc > best[0]:
            best = (val_acc, c, svm)
    val_acc, c, svm = best
    return {"acc": float((svm.predict(x[test]) == y[test]).mean()), "C": c, "val_acc": val_acc}


def evaluate(features: dict[str, np.ndarray], labels: np.ndarray, *, per_class: int, val_per_class: int,
             test_size: int | None, draws: int, seed: int) -> list[dict]:
    """Per draw: the split sizes and, per feature set, test accuracy, chosen C and validation accuracy."""
    results = []
    for i in range(draws):
        train, val, test = draw_split(labels, per_class, val_per_class, test_size, np.random.default_rng([seed, i]))
        results.append({"draw": i, "train": len(train), "val": len(val), "test": len(test),
                        **{name: fit_svm(x, labels, train, val, test) for name, x in features.items()}})
    return results


def summarize(features: dict[str, np.ndarray], draws: list[dict]) -> dict[str, dict]:
    """Per feature set: dims, mean and std of accuracy over draws, the most often chosen C."""
    out = {}
    for name, x in features.items():
        acc = np.array([r[name]["acc"] for r in draws])
        c, times = Counter(r[name]["C"] for r in draws).most_common(1)[0]
        out[name] = {"dims": x.shape[1], "mean": float(acc.mean()), "std": float(acc.std()), "C": c, "C_times": times}
    return out


def run(args, nets, out) -> str:
    if min(args.labels_per_class, args.val_per_class, args.draws, args.batch) < 1 or (args.test_size or 1) < 1:
        raise ConfigError("feature-svm: --labels-per-class, --val-per-class, --draws, --batch and --test-size "
                          "must be >= 1")
    url = args.data or nets.data_url
    images, labels = read_labeled(url, args.max_images, channels=nets.model.nc, resolution=nets.model.resolution)
    labels = labels.numpy()
    check_counts(labels, args.labels_per_class, args.val_per_class)
    features = feature_sets(nets, images, args.seed, args.batch)
    draws = evaluate(features, labels, per_class=args.labels_per_class, val_per_class=args.val_per_class,
                     test_size=args.test_size, draws=args.draws, seed=args.seed)
    table = summarize(features, draws)

    out.metrics({f"acc_{name.lower().replace(' ', '_')}{suffix}": row[key] for name, row in table.items()
                 for key, suffix in (("mean", ""), ("std", "_std"))})
    out.json("draws.json", {"data": url, "images": len(labels), "classes": len(np.unique(labels)),
                            "labels_per_class": args.labels_per_class, "val_per_class": args.val_per_class,
                            "c_grid": list(C_GRID), "summary": table, "draws": draws})
    _plot(table, args.labels_per_class, out)

    d = draws[0]
    lines = [f"{args.labels_per_class} labels/class ({d['train']} images), C picked on {d['val']} more, "
             f"test {d['test']}; {args.draws} draws, {len(labels)} images from {url}",
             f"  {'features':<10} {'dims':>6}  {'accuracy':>16}  C (chosen in n of {args.draws} draws)"]
    lines += [f"  {name:<10} {row['dims']:>6}  {100 * row['mean']:6.2f}% +/- {100 * row['std']:4.2f}%  "
              f"{row['C']:g} ({row['C_times']})" for name, row in table.items()]
    return out.finish("\n".join([*lines, f"  {PAPER}"]))


def _plot(table: dict, per_class: int, out) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    names = list(table)
    ax.bar(names, [100 * table[n]["mean"] for n in names], yerr=[100 * table[n]["std"] for n in names], capsize=4,
           color=["tab:blue", "tab:gray", "tab:orange"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"linear SVM, {per_class} labels per class")
    out.figure("accuracy.png", fig)
