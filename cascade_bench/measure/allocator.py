"""Keep freed host memory in the process so timed passes do not pay page faults for it.

glibc's ``malloc`` serves a large block (a stage batch, a chunk of logits) with a fresh ``mmap`` and
unmaps it on free, and trims the heap top once enough is free; every later pass then faults the same
megabytes back in, page by page, zero-filled by the kernel. On the default run's stages (hidden 128,
vocabulary 1,024, 8 x 128 tokens, 2 CPU threads) that is about 2,000 minor faults per pass, and it
falls unevenly: routed early exit allocates more short-lived blocks per token than the full pass
(two exit heads, the gathered batches), so the faults inflate its wall time more than the full
pass's (docs/benchmarks.md, "Where the time goes").

``retain_freed_memory`` raises the mmap threshold to glibc's maximum and the trim threshold far
above any pass, so freed blocks are reused from the heap; it is the measurement commands' setting
(``cascade-bench`` calls it before any command, and every record names it in its conditions).
``CASCADE_BENCH_MALLOC=system`` keeps the C library's defaults. Elsewhere than glibc (macOS,
musl) nothing changes and the conditions say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit builds (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_BYTES = 32 << 20
#: free memory kept at the heap top before it is returned to the OS
TRIM_THRESHOLD_BYTES = 1 << 30
ENV_VARIABLE = "CASCADE_BENCH_MALLOC"
MODES = ("retain", "system")

_applied: str = ""


def _glibc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(mode: "str | None" = None) -> str:
    """Apply ``mode`` ("retain" or "system"; default: the ``CASCADE_BENCH_MALLOC`` variable, else
    "retain") once per process and return the description records carry (``allocator_setting``)."""
    global _applied
    mode = mode if mode is not None else os.environ.get(ENV_VARIABLE, "retain")
    if mode not in MODES:
        raise ValueError(f"{ENV_VARIABLE}={mode!r}: expected one of {list(MODES)}")
    if mode == "system":
        _applied = _applied or "system malloc defaults (CASCADE_BENCH_MALLOC=system)"
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = "system malloc defaults (not glibc: nothing to set)"
        return _applied
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    _applied = (
        f"glibc malloc retains freed memory (mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, "
        f"trim threshold {TRIM_THRESHOLD_BYTES >> 20} MiB)"
        if done
        else "system malloc defaults (glibc refused mallopt)"
    )
    return _applied


def allocator_setting() -> str:
    """What this process's allocator was set to, for a record's conditions."""
    return _applied or "system malloc defaults (not set by cascade_bench)"
