"""Data that does not depend on the number of workers (`data.streams` > 0): what elastic training needs.

The shards are dealt to S virtual streams (shard i to stream i mod S). A stream reads its shards in a seeded
order per epoch, each shard's samples in file order, so its k-th sample depends only on (seed, stream, k).
Global step t (from 1) takes the global batch of G samples n = (t-1)G ... tG-1, and sample n is the next sample of
stream n mod S. Rank r of W hosts the streams s with s mod W == r and takes from them its part of every global
batch. So the images of step t are one set whatever W is, and each rank reads only its own streams' shards.

A stream's state is one number, its position (samples of its sequence consumed, unreadable ones included);
checkpoints carry every stream's position, so a run resumed at another size goes on with the same samples.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator

import torch

from dcgan_dist.config import DataConfig
from dcgan_dist.data import s3
from dcgan_dist.data.loader import ShardSet, SkipLimit, decode_named
from dcgan_dist.errors import DataError

PREFETCH = 4  # batches assembled ahead by the reading thread


def positions_at(step: int, global_batch: int, streams: int) -> list[int]:
    """Every stream's position after `step` steps when no sample was unreadable (a fresh start: step 0)."""
    full, extra = divmod(step * global_batch, streams)
    return [full + (s < extra) for s in range(streams)]


class Stream:
    """One virtual stream: its shards, in a seeded order per epoch, samples in file order, from a position.
    `read(url, count)` yields a shard's samples (SkipLimit._shard: with the run's limits)."""

    def __init__(self, sid: int, urls: list[str], counts: list[int], seed: int, read):
        self.sid, self.urls, self.counts, self.seed, self.read = sid, urls, counts, seed, read
        self.epoch_len = sum(counts)

    def samples(self, position: int) -> Iterator[tuple[int, dict]]:
        """(the position after it, sample) from `position` on, forever; a short shard's missing samples are
        skipped over, so positions count the manifest's samples."""
        epoch, offset = divmod(position, self.epoch_len)
        while True:
            base, order = epoch * self.epoch_len, list(range(len(self.urls)))
            random.Random(f"{self.seed}/{self.sid}/{epoch}").shuffle(order)
            for i in order:
                if offset < self.counts[i]:
                    for k, sample in enumerate(self.read(self.urls[i], self.counts[i])):
                        if k >= offset:
                            yield base + k + 1, sample
                    offset = 0
                else:
                    offset -= self.counts[i]
                base += self.counts[i]
            epoch += 1


class StreamBatches(SkipLimit):
    """This rank's part of every global batch, from the streams it hosts; iterates like loader.Batches.

    `keys` holds the sample keys of the last batch, `positions` every hosted stream's position after it.
    """

    def __init__(self, shards: ShardSet, *, channels: int, resolution: int, global_batch: int, seed: int,
                 rank: int, world: int, start_step: int, positions: list[int] | None, limits: DataConfig):
        n_streams = limits.streams
        if not shards.manifest:
            raise DataError(f"data.streams={n_streams} needs shards with a manifest.json (sample counts per shard); "
                            f"{shards.urls[0]} has none: build them with jobs/prepare_data.py")
        if len(shards.urls) < n_streams:
            raise DataError(f"data.streams={n_streams} needs at least that many shards; the data has "
                            f"{len(shards.urls)} (rebuild with a smaller --shard-size, or lower data.streams)")
        if positions is not None and len(positions) != n_streams:
            raise DataError(f"the checkpoint holds {len(positions)} stream positions, data.streams is {n_streams}: "
                            "keep data.streams as the run started")
        super().__init__(shards, limits)
        self.channels, self.resolution = channels, resolution
        self.global_batch, self.rank, self.world, self.n_streams = global_batch, rank, world, n_streams
        counts = shards.counts
        start = positions or positions_at(start_step - 1, global_batch, n_streams)
        self.hosted = {}
        for s in range(rank, n_streams, world):
            urls = shards.urls[s::n_streams]  # shard i belongs to stream i mod S
            self.hosted[s] = Stream(s, urls, [counts[u] for u in urls], seed, self._shard).samples(start[s])
        self._read_to = {s: start[s] for s in self.hosted}  # the reading thread's, ahead by the prefetched batches
        self.positions = dict(self._read_to)
        self.keys: list[str] = []
        self._queue: queue.Queue = queue.Queue(PREFETCH)
        # A daemon: it blocks once PREFETCH batches wait, and ends with the process.
        threading.Thread(target=self._fill, args=(start_step,), name=f"streams-rank{rank}", daemon=True).start()

    @property
    def retries(self) -> int:
        return s3.retries()

    def _take(self, stream: int) -> tuple[torch.Tensor, str]:
        """The stream's next readable sample."""
        for position, sample in self.hosted[stream]:
            self._read_to[stream] = position
            try:
                image = decode_named(sample, self.channels, self.resolution)
            except DataError as e:
                self._skip(e)
                continue
            self._good()
            return image, sample["__key__"]
        raise AssertionError("streams never end")

    def _batch(self, step: int) -> tuple[torch.Tensor, list[str], dict[int, int]]:
        taken = [self._take(n % self.n_streams)
                 for n in range((step - 1) * self.global_batch, step * self.global_batch)
                 if n % self.n_streams % self.world == self.rank]
        images = torch.stack([img for img, _ in taken])
        if torch.cuda.is_available():  # page-locked here, in the reading thread, so the copy to the GPU overlaps
            images = images.pin_memory()
        return images, [key for _, key in taken], dict(self._read_to)

    def _fill(self, step: int) -> None:
        try:
            while True:
                self._queue.put(self._batch(step))
                step += 1
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        images, self.keys, self.positions = item
        return images
