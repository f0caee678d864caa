"""What would break on a GPU, caught on a CPU: collectives that only some ranks issue (NCCL hangs for 30 minutes)
and host reads on ordinary steps (each stalls the GPU's queue). The real training loop, 2 ranks on gloo, with the
probes of `sync_probes` (a collective-issuing stand-in for SyncBatchNorm, a collective log, a host-read counter)."""

from __future__ import annotations

import json

import pytest
import torch

import sync_probes
from conftest import REPO, tiny_overrides
from dcgan_dist import tracking
from dcgan_dist.config import load_config
from dcgan_dist.step import GANStep
from dcgan_dist.trainer import make_trainer, prepare_inputs, run_config


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_reads_nothing_back_to_the_host(precision):
    """GANStep alone, in every precision: no .item()-style read in a step (fp16's GradScaler read its inf check back
    at every step with plain Adam; with fused Adam it stays on the device)."""
    cfg = load_config(overrides=["model.ngf=8", "model.ndf=8", "model.nc=1", f"train.precision={precision}"])
    step = GANStep.from_config(cfg)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    step(real)  # Adam's state exists from here on
    counter = sync_probes.HostSyncCounter(lambda: sync_probes.adam_step_counters(step.opt_g, step.opt_d))
    with counter:
        for _ in range(2):
            step(real)
    assert counter.count == 0, counter.seen


@pytest.mark.timeout(180)  # a collective only one rank issues hangs until gloo's timeout: fail here instead
def test_every_rank_issues_the_same_collectives_and_ordinary_steps_read_nothing_back(local_ray, tmp_path, digits_dir):
    """2 ranks, SyncBatchNorm (its stand-in) and an EMA, a sample grid every 2 steps and no evaluation: rank 0 alone
    makes the grid's generator, which with a synchronized batch norm in the EMA recalibration issued collectives the
    other rank never joined (a 30-minute NCCL hang on GPUs). Per step, both ranks must issue the same collectives;
    steps 1 and 5 (no log, no grid, no checkpoint) must read nothing back to the host, and a log step only the
    metrics' one read."""
    cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir, **{
        "train.run_name": "probes", "train.steps": 6, "train.log_every": 3, "train.sample_every": 2,
        "train.checkpoint_every": 100, "train.eval_every": 0, "train.ema_decay": 0.9, "train.precision": "fp32",
        "ray.num_workers": 2}))
    cfg = prepare_inputs(cfg)
    run_id, _ = tracking.start_run(cfg, "probes")
    probe_dir = tmp_path / "probe"
    run_cfg = run_config(cfg, "probes")
    run_cfg.worker_runtime_env["env_vars"]["PYTHONPATH"] = str(REPO / "tests")  # the workers import sync_probes
    trainer = make_trainer(cfg, run_id, run_cfg, loop=sync_probes.probed_train_loop)
    trainer.train_loop_config["probe_dir"] = str(probe_dir)
    trainer.fit()
    tracking.end_run(cfg, run_id)

    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = [r["collectives"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 7  # setup, then steps 1-6
    for n, (a, b) in enumerate(zip(*steps)):
        assert a == b, f"step {n}: rank 0 issued {a}, rank 1 {b}"
    bn_channels = {f"all_reduce ({c},)" for c in (8, 16, 32)}  # the stand-in ran: G's and D's batch norms
    assert bn_channels <= set(steps[0][1]), steps[0][1]
    # Host reads per step: none on any step but the last, grid steps included (the EMA's batch-norm recalibration
    # read num_batches_tracked back in every layer of every batch: 48 reads a grid on rank 0); the log step's one
    # read is the metrics' .tolist(), which does not pass the dispatcher. The last step checkpoints: RNG states and
    # stream positions are gathered as objects (pickled, so read back).
    for r in ranks:
        assert r["host_reads"][:5] == [0, 0, 0, 0, 0], r["reads"]


def test_nccl_settings_reach_the_workers_and_scores_name_their_device(monkeypatch, tmp_path, digits_dir):
    """NCCL_* and TORCH_NCCL_* set where the job starts go to every worker (they pick the network interface and
    the timeouts of the collectives); no secret does. A score's protocol names the device it was measured on, so a
    CPU score and a GPU score are never compared as equals."""
    from dcgan_dist.data.loader import resolve_shards
    from dcgan_dist.metrics.evaluator import Evaluator, Protocol

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens5")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    cfg = load_config(overrides=tiny_overrides(tmp_path, digits_dir))
    env = run_config(cfg, "nccl").worker_runtime_env["env_vars"]
    assert env["NCCL_SOCKET_IFNAME"] == "ens5" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env

    evaluator = Evaluator(cfg.metrics, resolve_shards(str(digits_dir)), channels=1, resolution=32, device="cpu")
    key = evaluator.protocol("swd", 128).key
    assert Protocol.from_key(key).device == "cpu"
    assert Protocol.from_key(key.replace('"device": "cpu"', '"device": "cuda"')).key != key
