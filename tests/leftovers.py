"""What a test session leaves behind: processes it started that still run, and new entries in /tmp.

Every process the session starts (Ray's daemons and workers, MLflow and moto servers, the bed's hosts, jobs) inherits
a marker in its environment, so it is found at the end whoever its parent was by then. `make test` gives each tier a
scratch TMPDIR of its own and removes it afterwards; what lands in /tmp itself came from a path written there by hand.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MARKER = "DCGAN_TEST_SESSION"
TMP = Path("/tmp")


def mark_session() -> tuple[str, set[str]]:
    """Mark this session's processes-to-be; return the marker and /tmp's entries now."""
    os.environ[MARKER] = uuid.uuid4().hex
    return os.environ[MARKER], set(os.listdir(TMP))


def marked_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of the live processes (not zombies) carrying `marker`, this one excepted, and its own
    multiprocessing resource tracker (which ends with it, by design)."""
    found, needle = {}, f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or a zombie
            continue
        if not (parent == os.getpid() and "multiprocessing.resource_tracker" in cmd):
            found[int(entry.name)] = cmd
    return found


def report(marker: str, tmp_before: set[str], grace_s: float = 30) -> list[str]:
    """Lines naming what the session left: processes still running after `grace_s` (then killed, so that the
    machine is clean for the next run) and new entries in /tmp (the scratch TMPDIR excepted)."""
    deadline = time.time() + grace_s
    while (left := marked_processes(marker)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    scratch = Path(os.environ.get("TMPDIR", "/tmp")).resolve()
    new = sorted(name for name in set(os.listdir(TMP)) - tmp_before if TMP / name != scratch)
    return ([f"process left running: {pid} {cmd[:200]}" for pid, cmd in sorted(left.items())]
            + [f"left in /tmp: {TMP / name}" for name in new])
