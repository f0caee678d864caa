import pytest
import torch
from torch import nn

from dcgan_dist.config import load_config
from dcgan_dist.models import Discriminator, Generator, build_discriminator, build_generator


def cfg(res=64, preset="examples", nc=3):
    return load_config(overrides=[f"model.resolution={res}", f"model.preset={preset}", f"model.nc={nc}"]).model


def layers(module):
    return [m for m in module.modules() if not isinstance(m, (nn.Sequential, Generator, Discriminator))]


@pytest.mark.parametrize("res", [32, 64, 128])
@pytest.mark.parametrize("preset", ["examples", "paper"])
@pytest.mark.parametrize("nc", [1, 3])
def test_shapes_and_ranges(res, preset, nc):
    g, d = build_generator(cfg(res, preset, nc)), build_discriminator(cfg(res, preset, nc))
    x = g(torch.randn(3, 100))
    assert x.shape == (3, nc, res, res)
    assert x.min() >= -1 and x.max() <= 1
    assert g(torch.randn(3, 100, 1, 1)).shape == x.shape  # both z layouts
    logits = d(x)
    assert logits.shape == (3,)
    assert (logits.abs() > 0).all()


@pytest.mark.parametrize("res,n_up", [(32, 3), (64, 4), (128, 5)])
def test_paper_rules(res, n_up):
    g, d = build_generator(cfg(res)), build_discriminator(cfg(res))
    gl, dl = layers(g), layers(d)
    kinds = {type(m) for m in gl + dl}
    # No pooling, no fully connected layers, no dropout: only (transposed) convs, BN and activations.
    assert kinds <= {nn.ConvTranspose2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh}
    # G: ConvT -> BN -> ReLU blocks (first is the 4x4 projection), then ConvT -> Tanh, no BN at the output.
    convs = [m for m in gl if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == n_up + 1
    assert [type(m) for m in gl[-2:]] == [nn.ConvTranspose2d, nn.Tanh]
    for i, m in enumerate(gl[:-2]):
        expected = [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU][i % 3]
        assert isinstance(m, expected)
    assert all(c.stride == (2, 2) for c in convs[1:]) and convs[0].stride == (1, 1)
    # D: Conv -> LeakyReLU(0.2) with no BN first, then Conv -> BN -> LeakyReLU, then a conv to one logit.
    assert [type(m) for m in dl[:2]] == [nn.Conv2d, nn.LeakyReLU]
    for i, m in enumerate(dl[2:-1]):
        assert isinstance(m, [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU][i % 3])
    assert isinstance(dl[-1], nn.Conv2d) and dl[-1].out_channels == 1
    assert all(m.negative_slope == 0.2 for m in dl if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.Sigmoid) for m in dl)  # D returns logits
    assert [c.stride for c in dl if isinstance(c, nn.Conv2d)][:-1] == [(2, 2)] * n_up


def test_parameter_counts_examples_64():
    g, d = build_generator(cfg(64)), build_discriminator(cfg(64))
    assert sum(p.numel() for p in g.parameters()) == 3_576_704
    assert sum(p.numel() for p in d.parameters()) == 2_765_568


def test_paper_preset_is_1024_channels_at_4x4_with_5x5_kernels():
    g = build_generator(cfg(64, "paper"))
    first = g.main[0]
    assert first.out_channels == 1024
    assert all(m.kernel_size == (5, 5) for m in g.modules() if isinstance(m, nn.ConvTranspose2d) and m is not first)


def test_init_statistics():
    torch.manual_seed(0)
    g, d = build_generator(cfg(64)), build_discriminator(cfg(64))
    for net in (g, d):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 10_000:
                assert abs(m.weight.std().item() - 0.02) < 0.002
                assert abs(m.weight.mean().item()) < 0.002
            if isinstance(m, nn.BatchNorm2d):
                assert abs(m.weight.mean().item() - 1.0) < 0.01 and 0 < m.weight.std().item() < 0.05
                assert torch.all(m.bias == 0)
