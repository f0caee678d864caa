"""The scaling model's arithmetic, and a real gloo allreduce measured between two local processes."""

from __future__ import annotations

import pytest
import torch

from bench import scaling


def test_ring_allreduce_cost_and_efficiency_bounds():
    mb = 25e6
    assert scaling.comm_seconds(mb, 1, 100) == 0
    # 2 ranks move 1x the bytes each way: 25 MB at 12.5 GB/s = 2 ms, plus 2 latency hops.
    assert scaling.comm_seconds(mb, 2, 100, latency_s=0) == pytest.approx(2e-3)
    assert scaling.comm_seconds(mb, 64, 400, latency_s=0) == pytest.approx(2 * 63 / 64 * mb / 50e9)
    rows = scaling.efficiency_table(3e-3, mb, mb / 2)
    assert len(rows) == 2 * 2 * len(scaling.RANKS)
    for r in rows:
        assert 0 < r["eff_no_overlap"] <= r["eff_full_overlap"] <= 1
    by = {(r["link_gbps"], r["gradients"], r["ranks"]): r for r in rows}
    assert by[(100, "bf16 hook", 8)]["comm_ms"] < by[(100, "fp32", 8)]["comm_ms"]
    assert by[(400, "fp32", 64)]["eff_no_overlap"] > by[(100, "fp32", 64)]["eff_no_overlap"]
    assert [by[(100, "fp32", n)]["eff_no_overlap"] for n in scaling.RANKS] == sorted(
        [by[(100, "fp32", n)]["eff_no_overlap"] for n in scaling.RANKS], reverse=True)


def test_gradient_bytes_count_both_networks():
    assert scaling.gradient_bytes(64, "examples") == 4 * (3_576_704 + 2_765_568)


def test_gloo_allreduce_is_measured_between_two_processes():
    assert 0 < scaling.measure_allreduce(1 << 20, repeats=3) < 10
    assert 0 < scaling.measure_allreduce(1 << 20, dtype=torch.bfloat16, repeats=3) < 10
