"""Helper threads that overlap independent work with the main thread's (numpy, scipy, faiss and torch release
the GIL in their kernels, so two such computations run on two cores), and faiss's thread count.

Used by PRDC (the neighbour search beside the critic step) and the quality report (the BC models beside the
neighbour searches). One single-thread pool per purpose and process, created on first use.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, ThreadPoolExecutor] = {}


def helper_thread(purpose: str) -> ThreadPoolExecutor:
    """The process's one-thread pool for `purpose` (its threads are named after it)."""
    if purpose not in _POOLS:
        _POOLS[purpose] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=purpose)
    return _POOLS[purpose]


@contextlib.contextmanager
def faiss_threads(n: int):
    """Within the block, faiss (on the calling thread) uses n OpenMP threads; the count is restored after.

    faiss and torch share one OpenMP runtime (libgomp.so.1 loads once), so faiss's thread count is torch's
    intra-op count too: a search that set it and left it would change the threads of the training run around it.
    """
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
