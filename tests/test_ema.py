"""The generator EMA: its update rule, batch-norm recalibration, checkpoint round trip, config wins on resume."""

from __future__ import annotations

import torch

from dcgan_dist import checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.ema import GeneratorEMA, recalibrate_bn
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, apply_hparams, make_optimizers


def setup(seed=0, *overrides):
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8", *overrides])
    torch.manual_seed(seed)
    g, d = build_generator(cfg.model, 1), build_discriminator(cfg.model, 1)
    return cfg, g, d, *make_optimizers(g, d, cfg.train)


def test_ema_trails_the_generator_by_the_decay_rule():
    cfg, g, d, opt_g, opt_d = setup()
    ema = GeneratorEMA(g, decay=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    GANStep(g, d, opt_g, opt_d, cfg.model.nz)(torch.rand(8, 1, 32, 32) * 2 - 1)
    ema.update(g)
    for e, b, p in zip(ema.module.parameters(), before, g.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
        assert not e.requires_grad
    assert any(not torch.equal(e, p) for e, p in zip(ema.module.parameters(), g.parameters()))


def test_recalibrated_batch_norm_matches_the_averaged_weights_and_is_deterministic():
    cfg, g, *_ = setup()
    bn = next(m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(5.0)  # stale statistics, as an EMA copy would carry
    recalibrate_bn(g, cfg.model.nz, batches=4, batch_size=32, seed=3)
    first = bn.running_mean.clone()
    assert not g.training and first.abs().max() < 5.0
    bn.running_mean.fill_(5.0)
    recalibrate_bn(g, cfg.model.nz, batches=4, batch_size=32, seed=3)
    assert torch.equal(bn.running_mean, first) and bn.momentum == 0.1  # same result, momentum restored


def test_checkpoint_keeps_the_ema_and_the_config_learning_rates_win_on_restore(tmp_path):
    cfg, g, d, opt_g, opt_d = setup()
    ema = GeneratorEMA(g, decay=0.5)
    step = GANStep(g, d, opt_g, opt_d, cfg.model.nz)
    for _ in range(2):
        step(torch.rand(8, 1, 32, 32) * 2 - 1)
        ema.update(g)
    state = checkpoint.training_state(g, d, opt_g, opt_d, 2, [checkpoint.rng_state()], cfg.to_dict(), ema.module)
    checkpoint.save(state, tmp_path)

    cfg2, g2, d2, og2, od2 = setup(1, "train.lr_g=1e-3", "train.beta1=0.0")
    ema2 = GeneratorEMA(g2, decay=0.5)
    loaded = checkpoint.load(tmp_path)
    checkpoint.restore(loaded, g2, d2, og2, od2, ema2.module)
    apply_hparams(og2, od2, cfg2.train)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        assert torch.equal(a, b)
    assert og2.param_groups[0]["lr"] == 1e-3 and og2.param_groups[0]["betas"] == (0.0, 0.999)
    assert checkpoint.final_generator_state(loaded) is loaded["ema"]
    no_ema = checkpoint.training_state(g, d, opt_g, opt_d, 2, [], {})
    assert checkpoint.final_generator_state(no_ema) is no_ema["generator"]
