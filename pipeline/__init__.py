"""metasep's pipeline: audio I/O, the separation engine, catalog jobs and the CLI."""

import os

# PyTorch's CPU allocator returns large tensors to the system and maps fresh pages for the next
# one; every first touch of a page is a fault. With transparent huge pages for allocations of
# 2 MB and more (read by torch once, so set before it is imported), the engine's forward passes,
# which allocate hundreds of MB per window, ran about 1.5x faster on a 2-core Xeon. An explicit
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
