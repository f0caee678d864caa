"""Stop the rest of a worker node's Ray once its raylet is gone (a worker start command runs it in the background).

Why: when the head goes (`ray down` on your own machines stops Ray on the head only; Ray's on-premises provider
never logs in to the workers to stop theirs), a worker's raylet exits after 60 s without the head, but its log
monitor and agents stay, waiting on the head forever. A node without a raylet is no node: `ray stop` ends the rest.
Harmless on AWS, where `ray down` terminates the instances.
"""

import subprocess
import time
from pathlib import Path

POLL_S = 5
START_GRACE_S = 60    # a raylet that is still starting is not a dead one
RESTART_GRACE_S = 20  # `ray up` restarts a node with `ray stop` then `ray start`, which starts its own follower


def raylets() -> set[int]:
    """Pids of this machine's raylets (Linux /proc: Ray's nodes run on Linux; psutil is not always importable)."""
    found = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "raylet":
                found.add(int(comm.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return found


def main() -> None:
    deadline = time.monotonic() + START_GRACE_S
    while not (ours := raylets()):
        if time.monotonic() > deadline:
            print("no raylet on this node; nothing to follow")
            return
        time.sleep(1)
    while raylets() & ours:
        time.sleep(POLL_S)
    time.sleep(RESTART_GRACE_S)
    if raylets():
        print("the raylet was restarted: its own follower takes over")
        return
    print("the raylet is gone: ray stop")
    subprocess.run(["ray", "stop"], check=False)


if __name__ == "__main__":
    main()
