"""Keeping the C heap from holding freed memory between the phases of training (CPU, glibc).

On a CPU every activation of a small LM is an ordinary ``malloc`` block, and glibc keeps
freed blocks below its mmap threshold in its heaps instead of returning them to the
operating system; after a large block is freed it raises that threshold by itself (up to
32 MB), so in a training run nearly every tensor ends up in the heaps. Measured on
SmolLM2-135M-Instruct (``scripts/bench/memory_breakdown.py``: PPO, 8 episodes x 8 tokens
after a 48-token chat prompt, 2 threads): glibc held 0.5 GB (full fine-tune, 2 epochs)
to 1.5 GB (LoRA r=8, 4 epochs) of freed memory at the peak, the largest item after the
weights and the optimizer state. Returning it after each optimizer step was not enough
for LoRA: peft's adapters leave enough temporaries inside one forward pass that its
freed blocks were not reused by the same pass (0.5 GB more at its end).

Two calls of glibc's documented interface, made by the policy (``trim_memory=True``, its
default, on a CPU):

- ``keep_heap_small``: ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, glibc's own initial
  threshold, fixed, so that it no longer rises: a new block of 128 KiB or more (an
  activation, a gradient) that the heap's free space cannot hold gets its own mapping,
  returned to the system when it is freed, instead of growing the heap. Process-wide and
  once; left alone when ``MALLOC_MMAP_THRESHOLD_`` is set.
- ``trim_heap``: ``malloc_trim(0)``, every whole free page of the heaps back to the
  system (in the middle of every arena too, since glibc 2.8): after every optimizer step
  and when an update starts.

A page handed back costs a page fault when it is used again (the side-by-side figures
are in ``scripts/benchmark.py --workloads R``). Where the C library is not glibc (macOS,
musl) both do nothing.
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
