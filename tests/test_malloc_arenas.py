"""A training worker caps glibc's malloc arenas (what kept its memory growing in the soak), unless the environment
chose a cap of its own. Counted by glibc itself (malloc_stats) in a fresh process whose 8 threads all allocate."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

PROBE = """
import ctypes, sys, threading
from dcgan_dist.malloc_arenas import cap_malloc_arenas
if sys.argv[1] == "cap":
    print(cap_malloc_arenas(), flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
both = threading.Barrier(9)
def work():  # a thread's first malloc takes a fresh arena while glibc's cap allows
    libc.malloc(1000)
    both.wait()
    both.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
both.wait()
libc.malloc_stats()  # to stderr, one "Arena N:" line per arena
both.wait()
[t.join() for t in threads]
"""


def arenas(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env={**clean, **env}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip(), sum(line.startswith("Arena ") for line in r.stderr.splitlines())


def test_a_worker_caps_its_arenas_at_two_and_the_environment_overrides_the_cap():
    assert arenas("none") == ("", 9)  # glibc's default: one per thread here (up to 8 per core)
    assert arenas("cap") == ("capped at 2", 2)
    assert arenas("cap", MALLOC_ARENA_MAX="4") == ("as the environment set (4)", 4)
