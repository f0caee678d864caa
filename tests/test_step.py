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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_under_autocast_and_tracks_fp32(precision):
    """bf16/fp16: convolutions run at half width, weights and Adam stay fp32, and a few steps land
    close to the fp32 step from the same start (same noise, same batch)."""
    cfg, g, d = tiny()
    g32, d32 = copy.deepcopy(g), copy.deepcopy(d)
    half = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz, precision)
    full = GANStep(g32, d32, *make_optimizers(g32, d32, cfg.train), cfg.model.nz)
    seen = []
    hook = d.main[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    for _ in range(3):
        torch.manual_seed(3)
        out_half = half(real)
        torch.manual_seed(3)
        out_full = full(real)
    hook.remove()
    assert set(seen) == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert all(p.dtype == torch.float32 for p in [*g.parameters(), *d.parameters()])
    assert (half.scaler is not None) == (precision == "fp16")
    assert all(torch.isfinite(out_half[k]) for k in ("loss_d", "loss_g"))
    if precision == "bf16":
        for k in ("loss_d", "loss_g"):
            assert abs(out_half[k].item() - out_full[k].item()) < 0.05, (k, out_half[k], out_full[k])
        moved = [(a - b).abs().max().item() for a, b in zip(g.parameters(), g32.parameters())]
        assert max(moved) < 1e-2  # same trajectory up to rounding
    else:  # fp16: the scaler starts at 2**16 and skips the steps whose scaled gradients overflow
        assert half.scaler.get_scale() <= 2.0 ** 16


def test_fused_adam_is_used_when_asked_and_gives_the_same_update():
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8", "train.fused_adam=true"])
    _, g, d = tiny()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    fused = make_optimizers(g, d, cfg.train)
    plain = make_optimizers(g2, d2, load_config(overrides=["model.ngf=8", "model.ndf=8"]).train)
    assert fused[0].defaults["fused"] and not plain[0].defaults.get("fused")
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for step in (GANStep(g, d, *fused, cfg.model.nz), GANStep(g2, d2, *plain, cfg.model.nz)):
        torch.manual_seed(5)
        step(real)
    for a, b in zip(g.parameters(), g2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # same math, different summation order


def test_bad_precision_and_compression_are_named():
    from dcgan_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="train.precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        load_config(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="ray.grad_compression: must be none, bf16 or fp16"):
        load_config(overrides=["ray.grad_compression=int8"])


def test_compiled_step_matches_eager_and_keeps_checkpoint_keys():
    """train.compile: forward passes compiled in place (inductor on CPU here), same updates as eager."""
    from dcgan_dist.step import compile_models

    cfg, g, d = tiny()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    keys = list(g.state_dict())
    compile_models("default", g, d)
    compiled = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz)
    eager = GANStep(g2, d2, *make_optimizers(g2, d2, cfg.train), cfg.model.nz)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for i in range(2):
        torch.manual_seed(i)
        a = compiled(real)
        torch.manual_seed(i)
        b = eager(real)
        assert abs(a["loss_d"].item() - b["loss_d"].item()) < 1e-4
    assert g._compiled_call_impl is not None  # really compiled, not silently skipped
    assert list(g.state_dict()) == keys
    for x, y in zip(g.parameters(), g2.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_auto_precision_follows_the_hardware():
    from dcgan_dist.step import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    flags = open("/proc/cpuinfo").read()
    assert native_bf16(cpu) == (" amx_bf16" in flags or " avx512_bf16" in flags)
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert load_config().train.precision == "auto"
