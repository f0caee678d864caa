import copy

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce_logits

from dcgan_dist.canonical import CanonicalStep
from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers, to_layout


def tiny(seed=0):
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8"])
    torch.manual_seed(seed)
    g, d = build_generator(cfg.model, 1), build_discriminator(cfg.model, 1)
    return cfg, g, d


def d_loss(d, real, fake):
    with torch.no_grad():
        lr, lf = d(real), d(fake)
        return (bce_logits(lr, torch.ones_like(lr)) + bce_logits(lf, torch.zeros_like(lf))).item()


def test_step_decreases_d_loss_on_a_fixed_batch():
    cfg, g, d = tiny()
    step = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz)
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    for _ in range(3):
        torch.manual_seed(7)
        with torch.no_grad():
            fake = g(torch.randn(16, cfg.model.nz))  # the fake batch the step will draw
        before = d_loss(d, real, fake)
        torch.manual_seed(7)
        out = step(real)
        assert abs(out["loss_d"].item() - before) < 1e-4  # the step saw exactly this batch
        assert d_loss(d, real, fake) < before
    assert all(p.requires_grad for p in d.parameters())  # D unfrozen again after the G update


def test_separate_learning_rates_and_betas():
    cfg = load_config(overrides=["train.lr_g=1e-3", "train.lr_d=5e-5", "train.beta1=0.3"])
    _, g, d = tiny()
    opt_g, opt_d = make_optimizers(g, d, cfg.train)
    assert opt_g.param_groups[0]["lr"] == 1e-3 and opt_d.param_groups[0]["lr"] == 5e-5
    assert opt_g.param_groups[0]["betas"] == (0.3, 0.999)


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_math_as_pytorch_examples(channels_last):
    """Our leaner step (logits, one D all-reduce, frozen D in the G update, NHWC) updates weights like the canonical one."""
    cfg, g, d = tiny()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    g, d = to_layout(channels_last, g, d)
    ours = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz)
    theirs = CanonicalStep(g2, d2, *make_optimizers(g2, d2, cfg.train), cfg.model.nz)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for _ in range(3):
        torch.manual_seed(1)
        a = ours(to_layout(channels_last, real)[0])
        torch.manual_seed(1)
        b = theirs(real)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for p, q in zip(list(g.parameters()) + list(d.parameters()), list(g2.parameters()) + list(d2.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_no_d_weight_gradient_in_the_g_update():
    cfg, g, d = tiny()
    step = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz)
    calls = {id(p): 0 for p in d.parameters()}
    for p in d.parameters():
        p.register_hook(lambda grad, key=id(p): calls.__setitem__(key, calls[key] + 1))
    step(torch.rand(8, 1, 32, 32) * 2 - 1)
    # Each D weight gets a gradient from the real and the fake backward, none from the G update.
    assert set(calls.values()) == {2}
