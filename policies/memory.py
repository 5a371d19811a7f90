"""Keeping the C heap from holding freed memory between the phases of training (CPU, glibc).

On a CPU every activation of a small LM is an ordinary ``malloc`` block, and glibc keeps
freed blocks below its mmap threshold in its heaps (raising that threshold by itself, up
to 32 MB), so in a training run nearly every tensor ends up there: measured, this freed
memory was the largest item after the weights and the optimizer state
(``docs/benchmarks.md``, "Memory on a CPU"). The policy (``trim_memory``, on a CPU)
makes two calls of glibc's documented interface:

- ``trim_heap``: ``malloc_trim(0)``, every whole free page of the heaps back to the
  system: when an update and when a rollout starts (``"phases"``, the default), and
  with ``"steps"`` after every optimizer step too;
- ``keep_heap_small`` (``"steps"`` only): ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, glibc's
  own initial threshold, fixed, so that a new block of 128 KiB or more gets its own
  mapping, returned to the system when freed. Process-wide and once; left alone when
  ``MALLOC_MMAP_THRESHOLD_`` is set. Every large tensor then costs a fresh mapping whose
  pages fault in again: 1.3-1.5x slower training, which is why it is not the default.

Where the C library is not glibc (macOS, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h) and the value the policy fixes it at: glibc's
#: own initial threshold.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Return the heaps' free pages to the operating system (``malloc_trim(0)``); ``False``
    where the C library cannot (then nothing happens)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` (module doc), once per process.
    ``False`` (nothing changed) where the C library is not glibc, or where the user set
    ``MALLOC_MMAP_THRESHOLD_`` (their setting stands)."""
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
