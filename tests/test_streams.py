"""data.streams: the images of every global step are one set whatever the number of ranks, and a run resumed from
the stream positions at another size goes on with the same samples (what elastic training relies on)."""

from __future__ import annotations

import pytest

from dcgan_dist.config import DataConfig
from dcgan_dist.data.loader import resolve_shards
from dcgan_dist.data.streams import StreamBatches
from dcgan_dist.errors import DataError

STREAMS, GLOBAL = 8, 24  # a global batch that 8 streams and 1, 2 or 3 ranks do not all divide evenly


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from dcgan_dist.data import shards, sources

    out = tmp_path_factory.mktemp("streams") / "digits-32"
    shards.build_shards(sources.Digits(), str(out), resolution=32, encoding="png", shard_size=100, workers=2,
                        progress=False)
    return resolve_shards(str(out))


def rank_batches(shards, rank, world, start=1, positions=None, streams=STREAMS):
    return StreamBatches(shards, channels=1, resolution=32, global_batch=GLOBAL, seed=3, rank=rank, world=world,
                         start_step=start, positions=positions, limits=DataConfig(streams=streams))


def steps_of(shards, world, steps, start=1, positions=None):
    """{step: the multiset of keys all ranks took}, and every stream's position after the last step."""
    ranks = [rank_batches(shards, r, world, start, positions) for r in range(world)]
    taken, after = {}, {}
    for step in range(start, start + steps):
        keys = []
        for b in ranks:
            images = next(b)
            assert images.shape[0] == len(b.keys) and images.shape[1:] == (1, 32, 32)
            keys += b.keys
        taken[step] = sorted(keys)
    for b in ranks:
        after.update(b.positions)
    return taken, [after[s] for s in range(STREAMS)]


def test_each_step_takes_the_same_images_with_1_2_or_3_ranks_and_resumes_at_another_size(small_shards):
    one, positions_one = steps_of(small_shards, 1, 12)
    two, _ = steps_of(small_shards, 2, 12)
    three, _ = steps_of(small_shards, 3, 12)
    assert one == two == three
    assert all(len(keys) == GLOBAL for keys in one.values())
    # 12 steps x 24 images = 288 of 1797: no image twice so far, and the steps differ from each other.
    flat = [k for keys in one.values() for k in keys]
    assert len(set(flat)) == len(flat)
    assert positions_one == [36] * STREAMS  # no unreadable sample: each of the 8 streams gave 288 / 8 images
    # Two ranks to step 6, then one rank from their positions: the same images as one rank all along.
    first, positions = steps_of(small_shards, 2, 6)
    rest, _ = steps_of(small_shards, 1, 6, start=7, positions=positions)
    assert {**first, **rest} == one


def test_streams_need_a_manifest_enough_shards_and_matching_positions(small_shards):
    with pytest.raises(DataError, match="data.streams=64 needs at least that many shards; the data has 18"):
        rank_batches(small_shards, 0, 1, streams=64)
    with pytest.raises(DataError, match="holds 3 stream positions, data.streams is 8"):
        rank_batches(small_shards, 0, 1, positions=[0, 0, 0])
    bare = type(small_shards)(small_shards.urls, None)
    with pytest.raises(DataError, match="needs shards with a manifest.json"):
        rank_batches(bare, 0, 1)
