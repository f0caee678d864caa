import copy

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce_logits

from bench.canonical import CanonicalStep
from dcgan_dist.config import load_config
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers
from dcgan_dist.torch_utils import to_layout


def tiny(seed=0):
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8", "model.nc=1"])
    torch.manual_seed(seed)
    g, d = build_generator(cfg.model), build_discriminator(cfg.model)
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


def flat(*modules):
    return torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_under_autocast_and_tracks_fp32(precision):
    """bf16/fp16: convolutions run at half width, weights and Adam stay fp32; bf16 lands close to the fp32
    step from the same start (same noise, same batch); fp16 either applies a step or skips it and halves
    the loss scale (GradScaler's contract), step by step."""
    cfg, g, d = tiny()
    g32, d32 = copy.deepcopy(g), copy.deepcopy(d)
    start_g, start_d = flat(g), flat(d)
    half = GANStep(g, d, *make_optimizers(g, d, cfg.train), cfg.model.nz, precision)
    full = GANStep(g32, d32, *make_optimizers(g32, d32, cfg.train), cfg.model.nz)
    seen = []
    hook = d.main[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    applied = 0
    for _ in range(3):
        before, scale = flat(g, d), (half.scaler.get_scale() if half.scaler else None)
        torch.manual_seed(3)
        out_half = half(real)
        torch.manual_seed(3)
        out_full = full(real)
        changed = not torch.equal(flat(g, d), before)
        applied += changed
        if precision == "fp16":  # growth needs 2000 clean steps: a step keeps the scale or is skipped and halves it
            assert (changed, half.scaler.get_scale()) in {(True, scale), (False, scale / 2)}, (changed, scale)
    hook.remove()
    assert set(seen) == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert all(p.dtype == torch.float32 for p in [*g.parameters(), *d.parameters()])
    assert (half.scaler is not None) == (precision == "fp16")
    assert all(torch.isfinite(out_half[k]) for k in ("loss_d", "loss_g"))
    assert applied >= 1
    if precision == "bf16":
        assert applied == 3
        for k in ("loss_d", "loss_g"):
            assert abs(out_half[k].item() - out_full[k].item()) < 0.05, (k, out_half[k], out_full[k])
        # Same trajectory up to rounding: far closer to the fp32 weights than to the start (a step that
        # updated nothing, or in a wrong direction, would be at least as far from fp32 as the start is).
        for ours, ref, start in ((g, g32, start_g), (d, d32, start_d)):
            assert (flat(ours) - flat(ref)).norm() < 0.5 * (flat(ref) - start).norm()


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """An overflowing step changes no weight and halves the scale exactly; a sane scale applies the step
    and keeps the scale (it grows only after 2000 clean steps)."""
    cfg, g, d = tiny()
    opt_g, opt_d = make_optimizers(g, d, cfg.train)
    step = GANStep(g, d, opt_g, opt_d, cfg.model.nz, "fp16")
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    step.scaler.scale(torch.zeros(()))  # the scaler allocates its scale lazily
    assert step.scaler.get_scale() == 2.0 ** 16
    step.scaler.update(new_scale=2.0 ** 60)  # fp16 gradients scaled by 2**60 overflow whatever the batch
    g0, d0 = flat(g), flat(d)
    out = step(real)
    assert torch.equal(flat(g), g0) and torch.equal(flat(d), d0)  # both updates skipped
    assert not opt_g.state and not opt_d.state  # Adam never stepped
    assert step.scaler.get_scale() == 2.0 ** 59
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])  # the fp32 losses themselves are fine

    step.scaler.update(new_scale=2.0 ** 8)
    step(real)
    assert torch.isfinite(flat(g, d)).all()
    assert not torch.equal(flat(g), g0) and not torch.equal(flat(d), d0)
    assert step.scaler.get_scale() == 2.0 ** 8


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
    with pytest.raises(ConfigError, match="ray.grad_compression: must be one of none, bf16, fp16, got 'int8'"):
        load_config(overrides=["ray.grad_compression=int8"])


def compiled_code_ran(fn) -> bool:
    """Whether calling fn ran a frame compiled by dynamo and a graph compiled by inductor: both mark
    their calls in the profiler ("Torch-Compiled Region: frame/version", "## Call CompiledFxGraph ... ##")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return (any(n.startswith("Torch-Compiled Region") for n in names)
            and any(n.startswith("## Call CompiledFxGraph") for n in names))


@pytest.fixture
def fresh_dynamo():
    """Dynamo as in a new process (no compiled code, zeroed counters), and its settings put back afterwards:
    compile_models turns on suppress_errors (a failed compile runs eagerly) for the whole process.
    (Not monkeypatch.setattr: torch's config module keeps its values outside __dict__, so pytest's undo
    would delete the setting instead of restoring it.) Yields dynamo's counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(suppress_errors=torch._dynamo.config.suppress_errors):
        torch._dynamo.reset()
        counters.clear()
        yield counters
        torch._dynamo.reset()


def test_compiled_step_matches_eager_and_keeps_checkpoint_keys(fresh_dynamo):
    """train.compile: forward passes compiled in place (inductor on CPU here), same updates as eager."""
    from dcgan_dist.torch_utils import compile_models

    counters = fresh_dynamo
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
    assert list(g.state_dict()) == keys
    for x, y in zip(g.parameters(), g2.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)

    # Really compiled, not an eager fallback: every frame dynamo took on became a graph (G, D, and D again
    # with frozen weights for the G update), without a graph break, and AOTAutograd compiled them.
    frames = counters["frames"].copy()
    assert frames["total"] == frames["ok"] >= 2, frames
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["aot_autograd"]["ok"] >= 2, dict(counters["aot_autograd"])
    # ... and calling each network runs inductor's code, with no new compile (same shapes, same grad mode).
    z = torch.randn(8, cfg.model.nz)
    assert compiled_code_ran(lambda: g(z))
    assert compiled_code_ran(lambda: d(real))
    assert counters["frames"] == frames
    # The loop's evaluation and sample grid (eval mode, other batch sizes), through `shown_generator` as the loop
    # calls it, run eagerly: no recompile (reduce-overhead would capture a CUDA graph per new shape), and the
    # training step after them reuses its graphs.
    from dcgan_dist.ema import GeneratorEMA, shown_generator

    for ema in (None, GeneratorEMA(g, 0.9).module):
        shown = shown_generator(g, ema, cfg.model.nz, seed=0)
        shown(torch.randn(64, cfg.model.nz)), shown(torch.randn(5, cfg.model.nz))
        g.train()
    compiled(real)
    assert counters["frames"] == frames and not counters["recompiles"], dict(counters["recompiles"])


def test_auto_precision_follows_the_hardware(monkeypatch):
    """Machines of this kind differ: some CPUs have AVX512-BF16 or AMX, others emulate bf16 (slower than fp32).
    `auto` takes bf16 only on the first; capping oneDNN below bf16 (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`) counts as
    the second, so each case is seen on either machine."""
    from dcgan_dist.torch_utils import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    # torch's own CPUID probes (cpuinfo library): AVX512-BF16, or AMX (whose tile unit comes with AMX-BF16).
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert native_bf16(cpu) == hardware
    assert resolve_precision("auto", cpu) == ("bf16" if hardware else "fp32")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not native_bf16(cpu) and resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16(cpu) == hardware
    assert load_config().train.precision == "auto"


def test_weight_scales_every_gradient_of_the_step():
    """Elastic ranks with uneven shares pass weight = share x ranks / global batch: with plain SGD, D's update at
    weight 0.5 is half its update at weight 1, and at weight 0 neither network moves."""
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    moved = {}
    for weight in (1.0, 0.5, 0.0):
        cfg, g, d = tiny()
        g0, d0 = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
        step = GANStep(g, d, torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1),
                       cfg.model.nz)
        torch.manual_seed(7)
        step(real, weight=weight)
        moved[weight] = ({k: d.state_dict()[k] - d0[k] for k, _ in d.named_parameters()},
                         max((g.state_dict()[k] - g0[k]).abs().max().item() for k, _ in g.named_parameters()))
    for k, full in moved[1.0][0].items():
        torch.testing.assert_close(moved[0.5][0][k], 0.5 * full, rtol=1e-4, atol=1e-7)
    assert moved[1.0][1] > 0 and moved[0.0][1] == 0
    assert all(v.abs().max() == 0 for v in moved[0.0][0].values())
