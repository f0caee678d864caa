"""Keep a training worker's memory from growing over a long run: glibc's malloc holds on to what it freed.

glibc gives threads their own arenas, up to 8 per core (768 on a 96-core GPU node). Each arena keeps the high-water
mark of the bursts it served (a checkpoint's serialization, an upload, a shard's bytes) and returns memory only from
its top, so a worker whose threads come and go (uploads, data streams, Ray's own) grew in steps for as long as the
soak ran (docs/performance.md, "A long run"). So a worker caps its arenas when it starts and, after each checkpoint,
hands the free pages inside its heaps back to the system (`malloc_trim`). The environment's own cap wins:
`MALLOC_ARENA_MAX` (or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`), e.g. in
`ray job submit --runtime-env-json '{"env_vars": {"MALLOC_ARENA_MAX": "8"}}'`. Elsewhere than glibc, nothing."""

from __future__ import annotations

import ctypes
import functools
import os

M_ARENA_MAX = -8  # mallopt's parameter number for the arena cap (glibc's malloc.h)
DEFAULT_CAP = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl, macOS: other allocators


@functools.cache  # once per process: Ray's pooled scoring worker calls it at every evaluation
def cap_malloc_arenas(cap: int = DEFAULT_CAP) -> str:
    """Cap this process's arenas at `cap` unless the environment chose; returns what holds, for the log."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"as the environment set ({os.environ.get('MALLOC_ARENA_MAX') or os.environ['GLIBC_TUNABLES']})"
    if _glibc() is None:
        return "not glibc: left alone"
    if _glibc().mallopt(M_ARENA_MAX, cap) != 1:
        return "mallopt refused: left alone"
    return f"capped at {cap}"


def release_free_memory() -> bool:
    """Return the whole free pages inside every arena to the system (not only a heap's top, as free() does).
    Tens of milliseconds (28 ms to return 400 MiB here): called at checkpoints, not per step. False where it is
    not glibc."""
    if _glibc() is None:
        return False
    _glibc().malloc_trim(0)
    return True
