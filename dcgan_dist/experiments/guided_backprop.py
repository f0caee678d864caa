"""What D's features respond to (paper section 6.2, Fig. 5): guided backpropagation, trained D vs random D.

For each chosen feature (channel) of one of D's conv layers: the real images where it fires hardest,
and the gradient of that maximal activation with respect to the image, sent back through each ReLU /
LeakyReLU only where the forward input was positive and the gradient is positive (Springenberg et
al. 2014). What remains is the image part the feature responds to. The paper's point is the
contrast: a trained D's features pick out object parts (beds, windows), a random D's do not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.utils import make_grid

from dcgan_dist.data.loader import read_sample, resolve_shards, to_model_input
from dcgan_dist.errors import ConfigError, DataError
from dcgan_dist.experiments.common import parse_indices

NAME = "guided-backprop"
HELP = "guided-backprop images of the top activations of D's features, trained D beside a random one"


def add_arguments(p) -> None:
    p.add_argument("--layer", type=int, help="index among D's conv layers (default: the last hidden one)")
    p.add_argument("--features", help="channels of that layer, e.g. 0,5,9 (default: the --num-features most active)")
    p.add_argument("--num-features", type=int, default=6, help="features shown when --features is not given")
    p.add_argument("--top", type=int, default=6, help="top-activating images per feature")
    p.add_argument("--data", help="real images: shards URL (default: the model's training data)")
    p.add_argument("--max-images", type=int, default=512, help="real images searched for top activations")


def layer_end(d: nn.Module, layer: int) -> int:
    """Index in `d.main` just past conv layer `layer`'s block (conv, batch norm, activation)."""
    convs = [i for i, m in enumerate(d.main) if isinstance(m, nn.Conv2d)]
    if not 0 <= layer < len(convs):
        raise ConfigError(f"--layer {layer}: D has conv layers 0..{len(convs) - 1}")
    return convs[layer + 1] if layer + 1 < len(convs) else len(d.main)


def _guide(module, inputs, output) -> None:
    if output.requires_grad:
        positive = output > 0  # the input's sign, for ReLU and LeakyReLU alike
        output.register_hook(lambda grad: grad.clamp(min=0) * positive)


def guided(d: nn.Module) -> nn.Module:
    """A copy of D whose ReLU/LeakyReLU pass back only positive gradient where their input was positive.

    Zeroing the gradient at negative inputs also removes LeakyReLU's 0.2 slope there.
    """
    d = copy.deepcopy(d)
    for m in d.modules():
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            m.inplace = False  # the hook keeps the activation's output for the backward pass
            m.register_forward_hook(_guide)
    return d


@torch.no_grad()
def activations(d: nn.Module, images: torch.Tensor, end: int, batch: int = 256) -> torch.Tensor:
    """Each image's maximal activation of each feature, (N, C)."""
    return torch.cat([d.main[:end](images[i:i + batch]).flatten(2).amax(2) for i in range(0, len(images), batch)])


def gradients(d: nn.Module, images: torch.Tensor, end: int, channel: int) -> torch.Tensor:
    """d(max over positions of feature `channel`) / d(image), per image: the input's shape."""
    x = images.clone().requires_grad_(True)
    peak = d.main[:end](x)[:, channel].flatten(1).amax(1)  # backprop starts at the max position only
    (grad,) = torch.autograd.grad(peak.sum(), x)  # not .backward(): D's parameters get no .grad
    return grad


def visualize(d: nn.Module, images: torch.Tensor, end: int, features: list[int], top: int) -> torch.Tensor:
    """(len(features), top, C, H, W) guided gradients of each feature on its `top` most activating images."""
    acts = activations(d, images, end)
    net = guided(d)
    top = min(top, len(images))
    return torch.stack([gradients(net, images[acts[:, c].topk(top).indices], end, c) for c in features])


def concentration(grads: torch.Tensor, share: float = 0.05) -> float:
    """Mean fraction of a gradient image's |mass| in its top `share` of pixels: 1 = a few pixels, ~share = spread."""
    mass = grads.abs().sum(-3).flatten(-2)  # (..., pixels)
    k = max(1, int(share * mass.shape[-1]))
    return float((mass.topk(k).values.sum(-1) / mass.sum(-1).clamp(min=1e-12)).mean())


def _panel(ax, grads: torch.Tensor, features: list[int], title: str) -> None:
    """Gradients as images, gray = 0, each scaled to its own largest magnitude; one row per feature."""
    shown = grads.flatten(0, 1)
    shown = shown / shown.abs().amax((1, 2, 3), keepdim=True).clamp(min=1e-12) * 0.5 + 0.5
    grid = make_grid(shown, nrow=grads.shape[1], padding=2, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
    row = grads.shape[-2] + 2
    ax.set_yticks([2 + row * i + grads.shape[-2] / 2 for i in range(len(features))], [f"f{c}" for c in features])
    ax.set_xticks([])
    ax.set_title(title)


def run(args, nets, out) -> str:
    import matplotlib.pyplot as plt

    if args.top < 1 or args.num_features < 1 or args.max_images < 1:
        raise ConfigError("--top, --num-features and --max-images must be >= 1")
    layer = len([m for m in nets.d.main if isinstance(m, nn.Conv2d)]) - 2 if args.layer is None else args.layer
    end = layer_end(nets.d, layer)
    url = args.data or nets.data_url
    try:
        images = to_model_input(read_sample(resolve_shards(url), args.max_images, channels=nets.model.nc,
                                            resolution=nets.model.resolution), "cpu")
    except DataError as e:
        raise DataError(f"--data {url}: {e}") from None
    channels = activations(nets.d, images[:1], end).shape[1]
    chosen = parse_indices(args.features, "--features", channels) if args.features else None
    rows = len(chosen) if chosen else min(args.num_features, channels)

    fig, axes = plt.subplots(1, 2, figsize=(1.8 * min(args.top, len(images)) + 1, 0.9 * rows + 1))
    summary, metrics = [], {}
    for ax, (kind, d) in zip(axes, [("trained", nets.d), ("random", nets.random_discriminator(args.seed))]):
        # Default: each D's most active features on average (dead ones would show nothing).
        features = chosen or activations(d, images, end).mean(0).topk(rows).indices.tolist()
        grads = visualize(d, images, end, features, args.top)
        metrics[f"{kind}_concentration"] = concentration(grads)
        title = f"trained D (step {nets.step})" if kind == "trained" else f"random D (seed {args.seed})"
        _panel(ax, grads, features, title)
        summary.append(f"  {kind:7s} D: features {features}, gradient concentration "
                       f"(|mass| in top 5% pixels) {metrics[f'{kind}_concentration']:.3f}")
    fig.suptitle(f"guided backprop, D conv layer {layer}, top {min(args.top, len(images))} of {len(images)} images")
    fig.tight_layout()
    out.figure("guided_backprop.png", fig)
    out.metrics({**metrics, "layer": layer, "images": len(images)})
    return out.finish(f"guided backprop of D conv layer {layer} ({channels} features) on {len(images)} images "
                      f"from {url}\n" + "\n".join(summary) + f"\n  figure: {out.folder / 'guided_backprop.png'}")
