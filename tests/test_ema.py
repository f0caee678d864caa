"""The generator EMA: its update rule, batch-norm recalibration, checkpoint round trip, config wins on resume."""

from __future__ import annotations

import torch

from dcgan_dist import checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.ema import GeneratorEMA, evaluated_generator, recalibrate_bn
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers


def setup(seed=0, *overrides):
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8", "model.nc=1", *overrides])
    torch.manual_seed(seed)
    g, d = build_generator(cfg.model), build_discriminator(cfg.model)
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


def test_checkpoint_keeps_the_ema_and_the_exported_generator_is_the_recalibrated_ema(tmp_path):
    cfg, g, d, opt_g, opt_d = setup()
    ema = GeneratorEMA(g, decay=0.5)
    step = GANStep(g, d, opt_g, opt_d, cfg.model.nz)
    for _ in range(2):
        step(torch.rand(8, 1, 32, 32) * 2 - 1)
        ema.update(g)
    checkpoint.save(checkpoint.training_state(step, 2, [checkpoint.rng_state()], cfg.to_dict(), ema.module), tmp_path)

    cfg2, g2, d2, og2, od2 = setup(1)
    ema2 = GeneratorEMA(g2, decay=0.5)
    loaded = checkpoint.load(tmp_path)
    checkpoint.restore(loaded, GANStep(g2, d2, og2, od2, cfg.model.nz), ema2.module)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        assert torch.equal(a, b)

    # What is evaluated and exported: the EMA's weights with batch norm recalibrated from noise, else G itself.
    from dcgan_dist.ema import generator_from_state

    exported = generator_from_state(loaded, cfg.model, cfg.metrics.seed)
    assert not exported.training
    for name, p in exported.named_parameters():
        assert torch.equal(p, loaded["ema"][name]) and not torch.equal(p, loaded["generator"][name])
    expected = recalibrate_bn(ema.module, cfg.model.nz, seed=cfg.metrics.seed)
    bn = "main.1.running_mean"
    assert torch.equal(exported.state_dict()[bn], expected.state_dict()[bn])
    assert not torch.equal(exported.state_dict()[bn], loaded["ema"][bn])
    assert evaluated_generator(g, None, cfg.model.nz, 0) is g and not g.training
    no_ema = dict(loaded, ema=None)
    plain = generator_from_state(no_ema, cfg.model, cfg.metrics.seed)
    assert all(torch.equal(v, loaded["generator"][k]) for k, v in plain.state_dict().items())


def test_the_ema_copy_of_a_synchronized_generator_has_local_batch_norms():
    """SyncBatchNorm in G (train.sync_batchnorm) must not reach the EMA: its recalibration runs on rank 0 alone for
    a sample grid, where a synchronized batch norm would wait for the other ranks."""
    cfg, g, *_ = setup()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(g)
    ema = GeneratorEMA(synced, decay=0.9)
    kinds = {type(m) for m in ema.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.BatchNorm2d}
    assert ema.state_dict().keys() == synced.state_dict().keys()
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in synced.state_dict().items())
