import pytest
import torch

from dcgan_dist import checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.errors import CheckpointError
from dcgan_dist.step import GANStep

TINY = ["model.ngf=8", "model.ndf=8", "model.nc=1", "train.channels_last=false", "train.precision=fp32"]


def fresh(seed, *overrides) -> tuple:
    cfg = load_config(overrides=[*TINY, f"train.seed={seed}", *overrides])
    return cfg, GANStep.from_config(cfg)


def test_round_trip_continues_bit_identically(tmp_path):
    cfg, step = fresh(0)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for _ in range(3):
        step(real)
    checkpoint.save(checkpoint.training_state(step, 3, [checkpoint.rng_state()], cfg.to_dict()), tmp_path)
    expected = [step(real) for _ in range(2)]

    _, step2 = fresh(123)  # different weights and RNG until restored
    state = checkpoint.load(tmp_path)
    checkpoint.restore(state, step2)
    checkpoint.set_rng_state(state["rng"][0])
    assert state["step"] == 3
    got = [step2(real) for _ in range(2)]
    for a, b in zip(expected, got):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for a, b in ((step.g, step2.g), (step.d, step2.d)):  # both networks, weights and batch-norm buffers
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for a, b in ((step.opt_g, step2.opt_g), (step.opt_d, step2.opt_d)):  # Adam moments continued, not restarted
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    cfg, step = fresh(0)
    state = checkpoint.training_state(step, 1, [checkpoint.rng_state()], cfg.to_dict())
    checkpoint.save(state, tmp_path)
    checkpoint.save(state, tmp_path)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_unreadable_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no state.pt"):
        checkpoint.load(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(tmp_path)
    cfg, step = fresh(0)
    checkpoint.save(checkpoint.training_state(step, 1, [], cfg.to_dict()), tmp_path)
    _, wider = fresh(0, "model.ngf=16")
    with pytest.raises(CheckpointError, match=r"does not match the model config \(model\.\* keys\)"):
        checkpoint.restore(checkpoint.load(tmp_path), wider)


def test_fp16_loss_scale_survives_a_resume_and_the_config_learning_rates_win(tmp_path):
    cfg, step = fresh(0, "train.precision=fp16")
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for _ in range(2):
        step(real)
    step.scaler.update(new_scale=512.0)  # as if overflows had halved it from 2**16
    checkpoint.save(checkpoint.training_state(step, 2, [checkpoint.rng_state()], cfg.to_dict()), tmp_path)

    cfg2, resumed = fresh(1, "train.precision=fp16", "train.lr_g=1e-3", "train.beta1=0.0")
    checkpoint.restore(checkpoint.load(tmp_path), resumed, t=cfg2.train)
    assert resumed.scaler.get_scale() == 512.0
    assert resumed.scaler.state_dict() == step.scaler.state_dict()
    assert resumed.opt_g.param_groups[0]["lr"] == 1e-3 and resumed.opt_g.param_groups[0]["betas"] == (0.0, 0.999)

    _, fp32 = fresh(0)
    fp32_state = checkpoint.training_state(fp32, 2, [checkpoint.rng_state()], cfg.to_dict())
    _, switched = fresh(1, "train.precision=fp16")
    checkpoint.restore(fp32_state, switched)  # switched fp32 -> fp16: the default scale
    assert switched.scaler.get_scale() == 2.0 ** 16


def test_resume_leaves_rng_states_and_adam_step_counters_where_pytorch_wants_them(tmp_path):
    """On a GPU the training device is not the CPU. The meta device stands in for it here: a checkpoint read
    straight onto the training device (map_location=device) put the RNG states there, and `torch.set_rng_state`
    takes only a CPU ByteTensor (every GPU resume crashed on it); it put non-fused Adam's step counters there too
    (one host sync per parameter per step on a GPU). `resume` must leave both on the CPU and the moments with
    their parameters."""
    cfg, step = fresh(0)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    step(real)
    checkpoint.save(checkpoint.training_state(step, 1, [checkpoint.rng_state()], cfg.to_dict()), tmp_path)

    elsewhere = GANStep.from_config(cfg, "meta")
    assert elsewhere.device.type == "meta"
    state = checkpoint.resume(tmp_path, elsewhere, t=cfg.train)
    rng = state["rng"][0]["torch"]
    assert rng.device.type == "cpu" and rng.dtype == torch.uint8
    checkpoint.set_rng_state(state["rng"][0], elsewhere.device)  # raised "RNG state must be a torch.ByteTensor"
    for opt in (elsewhere.opt_g, elsewhere.opt_d):
        states = list(opt.state.values())
        assert len(states) == len(opt.param_groups[0]["params"]) > 0
        assert all(s["step"].device.type == "cpu" for s in states)  # non-fused Adam keeps them on the host
        assert all(s["exp_avg"].device.type == "meta" and s["exp_avg_sq"].device.type == "meta" for s in states)
