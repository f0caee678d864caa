"""Bound glibc's malloc arenas in a training worker, so its memory stops growing over a long run.

glibc gives threads their own arenas, up to 8 per core (768 on a 96-core GPU node). Each arena keeps the high-water
mark of the bursts it served (a checkpoint's serialization, an upload, a shard's bytes) and returns memory only from
its top, so a worker whose threads come and go (uploads, data streams, Ray's own) grows in steps for hours as fresh
arenas meet their first burst. Capped, the arenas are soon all warm and the sum stops (docs/performance.md, "A long
run"). The environment's own setting wins: `MALLOC_ARENA_MAX` (or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`),
e.g. in `ray job submit --runtime-env-json '{"env_vars": {"MALLOC_ARENA_MAX": "8"}}'`."""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # mallopt's parameter number for the arena cap (glibc's malloc.h)
DEFAULT_CAP = 2


def cap_malloc_arenas(cap: int = DEFAULT_CAP) -> str:
    """Cap this process's arenas at `cap` unless the environment chose; returns what holds, for the log."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"as the environment set ({os.environ.get('MALLOC_ARENA_MAX') or os.environ['GLIBC_TUNABLES']})"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: no per-thread arenas to cap
        return "not glibc: left alone"
    if libc.mallopt(M_ARENA_MAX, cap) != 1:
        return "mallopt refused: left alone"
    return f"capped at {cap}"
