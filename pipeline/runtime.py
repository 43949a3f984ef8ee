"""Process-wide memory policy: what the allocators do with freed memory.

The CLI, the catalog's model workers and the bench call :func:`keep_freed_memory` once, at their
start; a process that separates in threads it did not start (a Ray actor's task threads) is
started with :data:`ONE_ARENA_ENV` in its environment instead, since the arena limit only holds
for threads made after it is set. A driver planning a large library does the opposite with
Arrow's allocator: :func:`release_arrow_memory` after each step that made large temporary tables.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# The environment of a process that separates in threads it did not start (a Ray actor's task
# threads): with one malloc arena from its start, every thread allocates where keep_freed_memory
# keeps freed memory. mallopt can only limit the arenas made after it is called.
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory for reuse (glibc only; once per process).

    Every window's forward allocates and frees the same large activations. glibc serves blocks of
    more than 32 MB with ``mmap`` and unmaps them when freed (and trims the heap's free top), so
    each window touched fresh pages that the kernel had to zero: a tenth of the CPU time of the
    shipped model, more for bfloat16. Here large blocks come from the heap and freed memory stays
    there for the next window: the process keeps its peak resident size until it ends, and the
    peak itself is higher (measured: +7% for the shipped model, +20% for the paper model in
    float32, +1% in bfloat16). Threads made after this call allocate from the same arena, so
    it holds in them too (threads made before keep their own arenas: see ``ONE_ARENA_ENV``).
    Returns whether the settings were applied."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no tunable allocator)
        return False
    trim_threshold, mmap_max, arena_max = -1, -4, -8  # M_TRIM_THRESHOLD etc. of <malloc.h>
    # One arena for the threads to come: a thread's own arena lives in 64 MB heaps that glibc
    # unmaps as soon as they are empty, whatever the trim threshold, so a separation called from
    # a thread (a server's worker) touched fresh pages again.
    return all(
        mallopt(option, value)
        for option, value in ((trim_threshold, 2**31 - 1), (mmap_max, 0), (arena_max, 1))
    )


def release_arrow_memory() -> None:
    """Give back to the system the pages Arrow's allocator (mimalloc) keeps after large tables
    were freed: a million-track plan otherwise holds hundreds of MB of them from step to step."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
