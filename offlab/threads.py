"""Helper threads that overlap independent work with the main thread's (numpy, scipy, faiss and torch release
the GIL in their kernels, so two such computations run on two cores).

Used by PRDC (the neighbour search beside the critic step) and the quality report (the BC models beside the
neighbour searches). One single-thread pool per purpose and process, created on first use.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, ThreadPoolExecutor] = {}


def helper_thread(purpose: str) -> ThreadPoolExecutor:
    """The process's one-thread pool for `purpose` (its threads are named after it)."""
    if purpose not in _POOLS:
        _POOLS[purpose] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=purpose)
    return _POOLS[purpose]
