"""On an AWS spot node: pass the two-minute interruption notice on to Ray as a node drain for preemption.

AWS posts the notice in the instance metadata (spot/instance-action, about two minutes before it reclaims the
instance); Ray learns of a preemption only through a drain with that reason and a deadline. Ray Train then tells
the workers (ray.train.get_preemption_info), dcgan-dist saves a checkpoint at once, and the elastic group goes on
without this node. The spot node type's setup commands start this in the background (ray_cluster.yaml); off EC2
it finds no metadata service and exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

IMDS = os.environ.get("DCGAN_IMDS_URL", "http://169.254.169.254")  # tests point it at their own server
POLL_S = 5
TOKEN_REFRESH_S = 3600  # tokens are asked for 6 h; a node lives longer
LOCK = os.path.expanduser("~/spot_notice.lock")  # beside its log; holds the running watcher's pid


def _get(path: str, token: str) -> tuple[int, str]:
    request = urllib.request.Request(f"{IMDS}{path}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def imds_token() -> str:
    """An IMDSv2 session token (the metadata service refuses tokenless reads on current instances)."""
    request = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    with urllib.request.urlopen(request, timeout=2) as r:
        return r.read().decode()


def seconds_left(token: str, now: datetime | None = None) -> int | None:
    """Seconds until AWS takes the instance back, or None while there is no notice (404)."""
    status, body = _get("/latest/meta-data/spot/instance-action", token)
    if status != 200:
        return None
    when = datetime.strptime(json.loads(body)["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max(1, int((when - (now or datetime.now(timezone.utc))).total_seconds()))


def local_ipv4(token: str) -> str:
    """This instance's private address: the one its Ray node registered with (Ray finds it by the same route)."""
    status, body = _get("/latest/meta-data/local-ipv4", token)
    if status != 200:
        raise OSError(f"instance metadata local-ipv4: HTTP {status}")
    return body.strip()


def node_id_at(ip: str) -> str:
    """The ID of the live Ray node at `ip`. Named, not left to `ray drain-node`'s default, which takes any raylet it
    finds among the machine's processes and prefers a head's: where one machine runs several nodes, another one."""
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip]
    finally:
        ray.shutdown()
    if len(ids) != 1:
        raise RuntimeError(f"{len(ids)} live Ray nodes at {ip} (this instance's local-ipv4), expected 1")
    return ids[0]


def drain_command(seconds: int, node_id: str) -> list[str]:
    """`ray drain-node` of this node, for preemption, with the notice's deadline."""
    return ["ray", "drain-node", f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=AWS spot interruption notice", f"--deadline-remaining-seconds={seconds}"]


def is_watcher(pid: int) -> bool:
    """Whether `pid` is a spot_notice.py (a pid in the lock file may be a stale one, reused since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spot_notice.py" in f.read()
    except OSError:  # gone already
        return False


def take_over(path: str = LOCK):
    """Be this node's only watcher: end the one an earlier `ray up` started, and hold the lock until we exit. (Setup
    commands run again when a `ray up` brings changed files: two watchers would drain twice, one with old code.)"""
    lock = open(path, "a+")
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()  # the holder's pid, once it has written it (until then an older one's)
            if holder.isdigit() and is_watcher(int(holder)):
                print(f"ending the watcher started before, pid {holder}", flush=True)
                try:
                    os.kill(int(holder), signal.SIGTERM)
                except ProcessLookupError:  # it ended meanwhile
                    pass
            time.sleep(0.5)
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock  # the lock lasts as long as this open file


def main() -> int:
    try:
        token = imds_token()
        ip = local_ipv4(token)  # now: Ray may not be up yet (the node's setup commands run before `ray start`)
    except OSError as e:
        print(f"no EC2 instance metadata ({e}): not a spot instance, nothing to watch")
        return 0
    lock = take_over()  # noqa: F841 (held while this runs)
    fetched, left = time.monotonic(), None
    while left is None:
        time.sleep(POLL_S)
        try:
            if time.monotonic() - fetched > TOKEN_REFRESH_S:
                token, fetched = imds_token(), time.monotonic()
            left = seconds_left(token)
        except OSError as e:  # a metadata hiccup: ask again
            print(f"instance metadata: {e}", flush=True)
    noticed = time.monotonic()
    node = node_id_at(ip)
    left = max(1, left - round(time.monotonic() - noticed))  # what finding the node took of it
    print(f"spot interruption notice: the instance goes in {left} s; draining this Ray node ({node})", flush=True)
    return subprocess.run(drain_command(left, node), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
