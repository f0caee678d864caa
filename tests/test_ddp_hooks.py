"""The DDP hook that times allreduces (and compresses gradients), on a real gloo process group."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan_dist.ddp_hooks import AllreduceTimer, busy_time


def test_busy_time_is_the_union_of_intervals():
    assert busy_time([]) == 0
    assert busy_time([(0, 2), (1, 3), (5, 6)]) == 4  # overlap counted once, the gap not at all
    assert busy_time([(5, 6), (0, 10)]) == 10


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


@pytest.mark.parametrize("compression", ["none", "bf16"])
def test_timer_reports_each_bucket_and_keeps_the_hooks_math(gloo_group, compression):
    x = torch.randn(32, 64)
    ref = _model()
    ref(x).square().mean().backward()
    model = DDP(_model(), bucket_cap_mb=0.1)  # ~330 KB of gradients: several buckets
    timer = AllreduceTimer(compression)
    timer.register(model)
    for step in range(4):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        timer.end_step()
        if step == 0:
            assert timer.collect()["allreduce_buckets"] == 1  # DDP's first step: one bucket, then rebuilt
    got = timer.collect()
    assert got["allreduce_buckets"] >= 2
    assert 0 < got["allreduce_ms"] < 1000
    assert timer.collect() == {}  # a window is reported once
    for p, q in zip(ref.parameters(), model.module.parameters()):
        want = p.grad if compression == "none" else p.grad.to(torch.bfloat16).float()  # sent at bf16 width
        assert torch.equal(q.grad, want)
