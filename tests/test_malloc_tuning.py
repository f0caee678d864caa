"""A training worker caps glibc's malloc arenas and, at checkpoints, returns free pages (what kept its memory growing in
the soak); the environment's own arena cap wins. Each in a fresh process: arenas counted by glibc itself
(malloc_stats) while 8 threads allocate; memory by the kernel's count of the process's resident pages."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

PROBE = """
import ctypes, sys, threading
from dcgan_dist.malloc_tuning import cap_malloc_arenas
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


TRIM_PROBE = """
import ctypes
from dcgan_dist.malloc_tuning import release_free_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(4096) for _ in range(100_000)]  # 400 MiB of small chunks, touched
for b in blocks:
    ctypes.memset(b, 1, 4096)
libc.malloc(4096)  # one live chunk above them: free() alone returns nothing (it trims only a heap's top)
for b in blocks:
    libc.free(b)
before = rss_mib()
print(release_free_memory(), before, rss_mib())
"""


def test_memory_freed_below_a_live_chunk_goes_back_to_the_system_after_a_release():
    r = subprocess.run([sys.executable, "-c", TRIM_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    released, before, after = r.stdout.split()
    assert released == "True" and int(before) >= 400 and int(after) < int(before) - 300, r.stdout
