import pytest
import torch

from dcgan_dist import checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.errors import CheckpointError
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.step import GANStep, make_optimizers


def fresh(seed):
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8"])
    torch.manual_seed(seed)
    g, d = build_generator(cfg.model, 1), build_discriminator(cfg.model, 1)
    opt_g, opt_d = make_optimizers(g, d, cfg.train)
    return cfg, g, d, opt_g, opt_d


def test_round_trip_continues_bit_identically(tmp_path):
    cfg, g, d, opt_g, opt_d = fresh(0)
    step = GANStep(g, d, opt_g, opt_d, cfg.model.nz)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for _ in range(3):
        step(real)
    checkpoint.save(checkpoint.training_state(g, d, opt_g, opt_d, 3, [checkpoint.rng_state()], cfg.to_dict()), tmp_path)
    expected = [step(real) for _ in range(2)]

    _, g2, d2, og2, od2 = fresh(123)  # different weights and RNG until restored
    state = checkpoint.load(tmp_path)
    checkpoint.restore(state, g2, d2, og2, od2)
    checkpoint.set_rng_state(state["rng"][0])
    assert state["step"] == 3
    step2 = GANStep(g2, d2, og2, od2, cfg.model.nz)
    got = [step2(real) for _ in range(2)]
    for a, b in zip(expected, got):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for a, b in ((g, g2), (d, d2)):  # both networks, weights and batch-norm buffers
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for a, b in ((opt_g, og2), (opt_d, od2)):  # Adam moments and step counts continued, not restarted
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    cfg, g, d, opt_g, opt_d = fresh(0)
    state = checkpoint.training_state(g, d, opt_g, opt_d, 1, [checkpoint.rng_state()], cfg.to_dict())
    checkpoint.save(state, tmp_path)
    checkpoint.save(state, tmp_path)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_unreadable_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no state.pt"):
        checkpoint.load(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(tmp_path)
    cfg, g, d, opt_g, opt_d = fresh(0)
    checkpoint.save(checkpoint.training_state(g, d, opt_g, opt_d, 1, [], cfg.to_dict()), tmp_path)
    big = load_config(overrides=["model.ngf=16", "model.ndf=8"])
    g16 = build_generator(big.model, 1)
    with pytest.raises(CheckpointError, match=r"does not match the model config \(model\.\* keys\)"):
        checkpoint.restore(checkpoint.load(tmp_path), g16, d, *make_optimizers(g16, d, big.train))


def test_fp16_loss_scale_survives_a_resume(tmp_path):
    cfg, g, d, opt_g, opt_d = fresh(0)
    step = GANStep(g, d, opt_g, opt_d, cfg.model.nz, precision="fp16")
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for _ in range(2):
        step(real)
    step.scaler.update(new_scale=512.0)  # as if overflows had halved it from 2**16
    state = checkpoint.training_state(g, d, opt_g, opt_d, 2, [checkpoint.rng_state()], cfg.to_dict(),
                                      scaler=step.scaler)
    checkpoint.save(state, tmp_path)

    _, g2, d2, og2, od2 = fresh(1)
    resumed = GANStep(g2, d2, og2, od2, cfg.model.nz, precision="fp16")
    checkpoint.restore_scaler(checkpoint.load(tmp_path), resumed.scaler)
    assert resumed.scaler.get_scale() == 512.0
    assert resumed.scaler.state_dict() == step.scaler.state_dict()

    fp32_state = checkpoint.training_state(g, d, opt_g, opt_d, 2, [checkpoint.rng_state()], cfg.to_dict())
    fresh_scaler = GANStep(g2, d2, og2, od2, cfg.model.nz, precision="fp16").scaler
    checkpoint.restore_scaler(fp32_state, fresh_scaler)  # switched fp32 -> fp16: the default scale
    assert fresh_scaler.get_scale() == 2.0 ** 16
