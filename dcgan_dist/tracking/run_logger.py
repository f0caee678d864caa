"""Rank 0's handle on a training run: buffered metrics, sample grids and tags, sent by one background thread so
that a slow or unreachable MLflow server never stalls or crashes training."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from dcgan_dist.grids import grid_pixels
from dcgan_dist.tracking.uris import redact

log = logging.getLogger(__name__)
BATCH_LIMIT = 1000  # metric values in one log_batch request: MLflow's limit
ITEM_TRIES = 3  # tries of a grid or tag the server answers for but refuses, before it is dropped


class Held(NamedTuple):
    """What rank 0 has not delivered yet: metrics in step order, and tags (a resize, a skipped checkpoint)."""
    metrics: list[Metric]
    tags: dict[str, str]


class RunLogger:
    """One background sender delivers everything in order (the module doc says why). While MLflow is down, items
    are held (beyond `max_held` metric values the oldest batches are dropped, with a warning) and retried every
    `retry_s`; `close` waits up to `close_timeout_s` for the rest and warns about anything undelivered.
    Held metrics and tags also travel in every checkpoint (`held`, `HELD_FILE`), so a rank 0 that dies or is
    stopped with them (a group torn down to resize) does not lose them: its successor, or the driver at the end,
    sends them (`take_over`, `deliver_held`). Metrics go in step order and skip steps the run already has, so each
    step lands exactly once.
    """

    def __init__(self, uri: str, run_id: str, *, max_held: int = 200_000, retry_s: float = 5.0,
                 close_timeout_s: float = 60.0, skip_logged: bool = False):
        self.client, self.run_id, self.uri = MlflowClient(uri), run_id, redact(uri)
        self.logged_until = 0  # steps up to here are already in the run and are not sent again
        self.pending: list[Metric] = []  # since the last checkpoint
        self._tags: dict[str, str] = {}
        self._unsent_tags: dict[str, str] = {}
        self.max_held, self.retry_s, self.close_timeout_s = max_held, retry_s, close_timeout_s
        self._outbox: collections.deque[tuple[list[Metric], Callable[[], None]]] = collections.deque()  # (metrics, send)
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0
        self.dropped_items = 0  # grids and tags given up on: the server answered, but never took them
        self.grids_logged: set[int] = set()  # steps whose grid the run has (a redone step's is not sent again)
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()
        if skip_logged:
            # A report can return before Ray's controller registers its checkpoint, so a crash in between
            # resumes from an older checkpoint and redoes steps whose metrics were already sent. Read where
            # the run stands first (in the sender, so an unreachable server stalls nothing).
            self._enqueue([], self._read_logged_until)

    def _read_logged_until(self) -> None:
        self.logged_until = logged_until(self.client, self.run_id)
        self.grids_logged = {int(a.path[-10:-4]) for a in self.client.list_artifacts(self.run_id, "samples")
                             if a.path.endswith(".png") and a.path[-10:-4].isdigit()}

    def _send_metrics(self, batch: list[Metric]) -> None:
        fresh = [m for m in batch if m.step > self.logged_until]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def _enqueue(self, metrics: list[Metric], send: Callable[[], None]) -> None:
        with self._cond:
            self._outbox.append((metrics, send))
            while sum(len(m) for m, _ in self._outbox) > self.max_held:  # over the limit: drop the oldest batch
                oldest = next(i for i, (m, _) in enumerate(self._outbox) if m)
                self.dropped += len(self._outbox[oldest][0])
                del self._outbox[oldest]
                log.warning("MLflow at %s unreachable: %d metric values dropped so far (over %d held)",
                            self.uri, self.dropped, self.max_held)
            self._cond.notify_all()

    def _send_loop(self) -> None:
        down_since, failures = None, 0
        while True:
            with self._cond:
                while not self._outbox and not self._closing:
                    self._cond.wait()
                if not self._outbox:
                    return
                entries = self._head()
                metrics = [m for batch, _ in entries for m in batch]
                send = entries[0][1] if len(entries) == 1 else (lambda b=metrics: self._send_metrics(b))
            try:
                send()
            except Exception as e:  # the server is down or refusing: hold everything, retry later
                # An item the server answers for but never takes (a grid a proxy refuses as too large): dropped
                # after a few tries, so it cannot hold back the metrics behind it for the rest of the run.
                failures += 1
                if not metrics and failures >= ITEM_TRIES and self._server_answers():
                    self._drop_head(entries[0], e)
                    failures = 0
                    continue
                if down_since is None:
                    down_since = time.time()
                    log.warning("MLflow at %s unreachable (%s): holding metrics and images, retrying every %.0f s",
                                self.uri, str(e).splitlines()[0][:200], self.retry_s)
                with self._cond:
                    self._cond.wait(self.retry_s)
                continue
            failures = 0
            with self._cond:
                for entry in entries:  # unless dropped meanwhile (over max_held) or abandoned
                    if self._outbox and self._outbox[0] is entry:
                        self._outbox.popleft()
                self._cond.notify_all()
            if down_since is not None:
                log.warning("MLflow at %s reachable again after %.0f s: delivering held items", self.uri,
                            time.time() - down_since)
                down_since = None

    def _head(self) -> list[tuple[list[Metric], Callable[[], None]]]:
        """The next item, or, when metric batches wait in a row (a server that falls behind), as many as fit in one
        request (MLflow's limit: 1000 values): a backlog is sent in fewer, larger requests, so a slow server (every
        request pays its login check) catches up instead of falling further behind."""
        head = [self._outbox[0]]
        size = len(head[0][0])
        for entry in itertools.islice(self._outbox, 1, None):
            if not head[0][0] or not entry[0] or size + len(entry[0]) > BATCH_LIMIT:
                break
            head.append(entry)
            size += len(entry[0])
        return head

    def _server_answers(self) -> bool:
        try:
            self.client.get_run(self.run_id)
            return True
        except Exception:  # noqa: BLE001 - down: the item is not the problem
            return False

    def _drop_head(self, entry, error: Exception) -> None:
        with self._cond:
            if self._outbox and self._outbox[0] is entry:
                self._outbox.popleft()
                self.dropped_items += 1
            self._cond.notify_all()
        log.warning("MLflow at %s refused an item (a grid or tag) %d times while answering others; dropped it "
                    "(%d so far): %s", self.uri, ITEM_TRIES, self.dropped_items, str(error).splitlines()[0][:200])

    def add(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        """Hand buffered metrics to the sender (the training loop does at every log step)."""
        self.resend(self.pending)
        self.pending = []

    def resend(self, metrics: list[Metric]) -> None:
        """Queue metrics for sending (steps the run already has are skipped when they go out)."""
        for i in range(0, len(metrics), BATCH_LIMIT):
            batch = metrics[i : i + BATCH_LIMIT]
            self._enqueue(batch, lambda b=batch: self._send_metrics(b))

    def take_over(self, held: Held) -> None:
        """Queue what a predecessor's checkpoint says it had not delivered."""
        self.resend(held.metrics)
        self.set_tags(held.tags)

    def held(self) -> Held:
        """Every metric and tag not yet known delivered, oldest first: what a checkpoint carries (`HELD_FILE`)."""
        with self._cond:
            return Held([m for batch, _ in self._outbox for m in batch] + list(self.pending), dict(self._unsent_tags))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the run; a tag is sent again only when its value changes."""
        new = {k: v for k, v in tags.items() if self._tags.get(k) != v}
        with self._cond:
            self._unsent_tags.update(new)
        for k, v in new.items():
            self._enqueue([], lambda k=k, v=v: self._send_tag(k, v))
        self._tags.update(new)

    def _send_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)
        with self._cond:
            if self._unsent_tags.get(key) == value:
                del self._unsent_tags[key]

    def set_protocols(self, protocols: dict[str, str]) -> None:
        """Tag the run with each metric's protocol (`protocol.swd` = its key)."""
        self.set_tags({f"protocol.{k}": v for k, v in protocols.items()})

    def log_grid(self, step: int, images: torch.Tensor) -> None:
        """An 8x8 grid as `samples/step_NNNNNN.png` and in the run's image view (key `samples`)."""
        arr = grid_pixels(images, nrow=8)
        self._enqueue([], lambda: self._send_grid(step, arr))

    def _send_grid(self, step: int, arr: np.ndarray) -> None:
        """Once per step across restarts: the file named by its step, written last, says the run has it."""
        if step in self.grids_logged:
            return
        self.client.log_image(self.run_id, arr, key="samples", step=step)
        self.client.log_image(self.run_id, arr, artifact_file=f"samples/step_{step:06d}.png")
        self.grids_logged.add(step)

    def abandon(self) -> int:
        """Send nothing more: another job took this run over (its lease) and resumes from the checkpoint that
        carries what is held here. Returns the metric values left unsent."""
        with self._cond:
            left = sum(len(m) for m, _ in self._outbox) + len(self.pending)
            self._outbox.clear()
            self._unsent_tags.clear()
            self.pending, self._closing = [], True
            self._cond.notify_all()
        return left

    def close(self) -> int:
        """Deliver what is held (waiting up to close_timeout_s); returns, and warns about, undelivered metric values."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._outbox, timeout=self.close_timeout_s)
            lost = self.dropped + sum(len(m) for m, _ in self._outbox)
            items = len(self._outbox)
        if items or self.dropped:
            log.warning("MLflow at %s: %d metric values and %d items (grids, tags) were not delivered",
                        self.uri, lost, items)
        return lost


HELD_FILE = "held_metrics.json"  # in a checkpoint folder: what rank 0 had not delivered when it was saved


def write_held(held: Held, directory: str) -> None:
    rows = [[m.key, m.value, m.timestamp, m.step] for m in held.metrics]
    with open(f"{directory}/{HELD_FILE}", "w") as f:
        json.dump({"metrics": rows, "tags": held.tags}, f)


def read_held(checkpoint) -> Held:
    """The held items of a `ray.train.Checkpoint`, read alone (not the whole checkpoint) from wherever it is."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HELD_FILE}") as f:
            saved = json.loads(f.read())
    except FileNotFoundError:
        return Held([], {})
    if isinstance(saved, list):  # a checkpoint of an earlier version: metrics only
        saved = {"metrics": saved, "tags": {}}
    return Held([Metric(k, v, ts, step) for k, v, ts, step in saved["metrics"]], saved["tags"])


def logged_until(client: MlflowClient, run_id: str) -> int:
    """The last step of `loss_d` in the run: metrics go out in step order, so every step up to it is there."""
    return max((m.step for m in client.get_metric_history(run_id, "loss_d")), default=0)


def deliver_held(uri: str, run_id: str, held: Held) -> int:
    """The driver's last resort after training: send what rank 0 could not (synchronously; raises if MLflow is
    unreachable, so a job never ends green with metrics missing). Returns how many metric values and tags it sent."""
    client = MlflowClient(uri)
    last = logged_until(client, run_id)
    fresh = [m for m in held.metrics if m.step > last]
    for i in range(0, len(fresh), BATCH_LIMIT):
        client.log_batch(run_id, metrics=fresh[i : i + BATCH_LIMIT])
    has = client.get_run(run_id).data.tags if held.tags else {}
    tags = {k: v for k, v in held.tags.items() if has.get(k) != v}
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    return len(fresh) + len(tags)
