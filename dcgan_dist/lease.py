"""One run name, one writer: a lease beside the run's checkpoints, so a second job with the same
`train.run_name` is refused instead of racing the first for its MLflow run and pruning its checkpoints.

In S3 (`ray.storage_path=s3://...`) the lease is an object created with `If-None-Match: *` and renewed with
`If-Match` on its own ETag: a compare-and-set, so two jobs can never both hold it. The holder renews it every
ttl/3; a lease not renewed for `ttl_s` (its holder died) is free to take, again by compare-and-set. Machines'
clocks must agree to within a small part of the ttl (NTP). In a folder (local, or `file://` mounted by every
node) it is an flock on a file, which the kernel releases when its holder dies.

The holder is the driver, but the writers are Ray's controller and the workers: a driver frozen or cut off past the
ttl loses the lease while its workers train on. So rank 0 reads the lease itself (`lost`) before every checkpoint
and every few seconds, and the group leaves without another write once it is no longer its driver's. A renewal is
bounded well inside ttl/3 (short timeouts, one retry), so a holder learns its lease lapsed before another job can
take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from dcgan_dist.data import s3
from dcgan_dist.errors import ConfigError, DataError, RunBusy

log = logging.getLogger(__name__)
TTL_S = 60.0
LEASE = ".lease"


RUN_HINT = "stop that job, wait for it, or choose another train.run_name"
NO_LOCKS_HINT = "use s3://..., or mount the folder on every node with working locks (NFS without nolock)"


def _try_lock(path: str) -> tuple[str, str]:
    """Run on another node by `check_every_node_sees_it`: how the lock another node holds on `path` looks here."""
    import ray

    node = ray.util.get_node_ip_address()
    if not os.path.exists(path):
        return node, "does not have"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return node, "held"
        except OSError as e:
            return node, f"cannot lock ({e})"
        fcntl.flock(f, fcntl.LOCK_UN)
        return node, "could lock"


def _busy(label: str, where: str, holder: dict, hint: str) -> RunBusy:
    until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
    return RunBusy(f"{label} by {holder.get('holder', '?')} (lease {where}, renewed until {until}): {hint}")


def _conflict(e: bex.ClientError) -> bool:
    """S3's answers when a conditional write loses: 412 PreconditionFailed, 409 ConditionalRequestConflict."""
    return _status(e) in (409, 412)


def _status(e: bex.ClientError) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


_clients: dict[tuple[int, float], object] = {}


def _client(ttl_s: float):
    """An S3 client whose every call ends well inside ttl/3 (the shared one may retry for minutes)."""
    if (key := (os.getpid(), ttl_s)) not in _clients:
        timeout = max(1.0, ttl_s / 12)
        _clients[key] = boto3.session.Session().client("s3", config=Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"mode": "standard", "total_max_attempts": 2}))
    return _clients[key]


def lost(fence: dict) -> str | None:
    """Why the lease `fence` names (RunLease.fence) is no longer its holder's, or None while it is, or while S3
    cannot say (a write then fails on its own). Read by rank 0 of the holder's workers."""
    bucket, key = s3.split(fence["where"])
    try:
        held = json.loads(_client(fence["ttl_s"]).get_object(Bucket=bucket, Key=key)["Body"].read())
    except bex.ClientError as e:
        return "its lease object is gone" if _status(e) == 404 else None
    except (bex.BotoCoreError, OSError, ValueError):
        return None
    if held.get("holder") != fence["holder"]:
        return f"{held.get('holder', '?')} took over its lease {fence['where']}"
    if held.get("expires", 0) < time.time():
        until = time.strftime("%H:%M:%S", time.localtime(held.get("expires", 0)))
        return f"its driver has not renewed its lease {fence['where']} since {until} (frozen or cut off?)"
    return None


class LeaseWatch:
    """Rank 0's view of its driver's lease (`fence`, None for none to watch): read again before every checkpoint,
    and at most every ttl/6 s otherwise."""

    def __init__(self, fence: dict | None):
        self.fence, self.checked = fence, 0.0

    def lost(self, before_a_write: bool) -> str | None:
        if self.fence is None or not (before_a_write or time.time() - self.checked >= self.fence["ttl_s"] / 6):
            return None
        self.checked = time.time()
        return lost(self.fence)


class RunLease:
    """`with RunLease(storage_path, run_name):` holds the lease for the block, or raises RunBusy (after waiting
    up to `wait_s` for it to be free)."""

    def __init__(self, storage_path: str, run_name: str, ttl_s: float = TTL_S, wait_s: float = 0,
                 label: str | None = None, hint: str = RUN_HINT):
        self.ttl_s, self.wait_s, self.hint = ttl_s, wait_s, hint
        self.label = label or f"train.run_name {run_name!r} is being trained"
        self.where = f"{storage_path.rstrip('/')}/{run_name}/{LEASE}"
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self._stop = threading.Event()
        self._etag, self._file, self._thread = None, None, None
        self._renewed = 0.0

    def __enter__(self) -> "RunLease":
        deadline = time.time() + self.wait_s
        while True:
            try:
                self._acquire()
                break
            except RunBusy:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        log.info("holding the lease %s", self.where)
        return self

    def _acquire(self) -> None:
        if s3.is_s3(self.where):
            self._acquire_s3()
            self._thread = threading.Thread(target=self._renew_s3, daemon=True, name="run-lease")
            self._thread.start()
        else:
            self._acquire_file()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
            with contextlib.suppress(bex.ClientError, bex.BotoCoreError, DataError):
                bucket, key = s3.split(self.where)
                current = s3.client().head_object(Bucket=bucket, Key=key)
                if current["ETag"] == self._etag:  # still ours: free it now rather than at expiry
                    s3.client().delete_object(Bucket=bucket, Key=key)
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def fence(self) -> dict | None:
        """What the workers need to check the lease is still their driver's (`lost`); None for a folder's flock,
        which no one else can take while the driver's process lives."""
        return {"where": self.where, "holder": self.holder, "ttl_s": self.ttl_s} if self._thread else None

    def still_held(self) -> bool:
        """Checked just before a write the lease guards (a fencing check): an flock holds while this process lives;
        an S3 lease is ours while the object still has the ETag of our last write and has not expired."""
        if not self._thread:
            return self._file is not None
        bucket, key = s3.split(self.where)
        try:
            current = s3.client().get_object(Bucket=bucket, Key=key)
            held = json.loads(current["Body"].read())
        except (bex.ClientError, bex.BotoCoreError, OSError, ValueError):
            return False
        return current["ETag"] == self._etag and held.get("expires", 0) > time.time()

    # --- a folder: flock -------------------------------------------------------------------------------------
    def _acquire_file(self) -> None:
        path = Path(self.where.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = json.loads(self._file.read() or "{}")
            self._file.close()
            self._file = None
            raise _busy(self.label, self.where, {**holder, "expires": time.time()}, self.hint) from None
        except OSError as e:  # a FUSE mount, say, that has no locks at all
            self._file.close()
            self._file = None
            raise ConfigError(f"ray.storage_path: {path.parent.parent} cannot be locked ({e}), so it cannot guard a "
                              f"run against a second writer: {NO_LOCKS_HINT}") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"holder": self.holder}))
        self._file.flush()

    def check_every_node_sees_it(self, timeout_s: float = 60) -> None:
        """A folder's flock excludes a job on another node only if that node sees the lock: true of one machine and
        of a shared file system with working locks, not of NFS mounted `nolock`, whose locks stay on each node.
        Every other live node of the Ray cluster tries to take the lock this process holds; one that gets it, or
        finds no such file (the folder is not shared), means the folder cannot guard the run: refused at start.
        An S3 lease needs no check."""
        if self._file is None:
            return
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
        if not others:
            return
        probe = ray.remote(num_cpus=0, max_retries=0)(_try_lock)
        path = self._file.name
        try:
            answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                               .remote(path) for node in others], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"ray.storage_path: could not check within {timeout_s:.0f} s that every node sees the "
                              f"lock on {path}") from None
        for node, answer in answers:
            if answer != "held":
                raise ConfigError(f"ray.storage_path: node {node} {answer} {path}, which this node holds locked: "
                                  f"the folder cannot guard the run against a second writer; {NO_LOCKS_HINT}")

    # --- S3: conditional writes --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl_s}).encode()

    def _put(self, client=None, **condition) -> str:
        bucket, key = s3.split(self.where)
        etag = (client or s3.client()).put_object(Bucket=bucket, Key=key, Body=self._body(), **condition)["ETag"]
        self._renewed = time.time()
        return etag

    def _acquire_s3(self) -> None:
        bucket, key = s3.split(self.where)
        with s3.errors(self.where, "take the run's lease at"):
            try:
                self._etag = self._put(IfNoneMatch="*")
                return
            except bex.ClientError as e:
                if not _conflict(e):
                    raise
            current = s3.client().get_object(Bucket=bucket, Key=key)
            holder = json.loads(current["Body"].read())
            if holder.get("expires", 0) > time.time():
                raise _busy(self.label, self.where, holder, self.hint)
            log.warning("%s: taking over the lease of %s, not renewed since its expiry", self.where,
                        holder.get("holder"))
            try:
                self._etag = self._put(IfMatch=current["ETag"])
            except bex.ClientError as e:
                if _conflict(e):  # another job took it in between
                    raise _busy(self.label, self.where, holder, self.hint) from None
                raise

    def _ours_after_all(self, client) -> bool:
        """A 412 on a retried renewal whose first try did land (its answer lost on a bad link): the ETag moved, but
        to our own write. Adopt it when the object still names this holder."""
        bucket, key = s3.split(self.where)
        try:
            current = client.get_object(Bucket=bucket, Key=key)
            if json.loads(current["Body"].read()).get("holder") != self.holder:
                return False
        except (bex.ClientError, bex.BotoCoreError, OSError, ValueError):
            return False
        self._etag, self._renewed = current["ETag"], time.time()
        return True

    def _renew_s3(self) -> None:
        client = _client(self.ttl_s)
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._etag = self._put(client, IfMatch=self._etag)
                continue
            except bex.ClientError as e:
                if _status(e) == 412 and not self._ours_after_all(client):  # another job took the lease over
                    log.error("lost the lease at %s to another job: the workers stop writing", self.where)
                    return
                problem = e  # 409 ConditionalRequestConflict included: AWS says to retry it
            except (bex.BotoCoreError, OSError) as e:
                problem = e
            late = time.time() - self._renewed
            if late > self.ttl_s:
                log.error("the lease at %s lapsed %.0f s ago (%s): the workers stop writing", self.where,
                          late - self.ttl_s, problem)
            else:
                log.warning("could not renew the lease at %s (%s); trying again", self.where, problem)
