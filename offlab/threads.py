"""Helper threads that overlap independent work with the main thread's (numpy, scipy, faiss and torch release
the GIL in their kernels, so two such computations run on two cores), and faiss's thread count.

Used by PRDC (the neighbour search beside the critic step, `SplitWork`) and the quality report (the BC models
beside the neighbour searches). One pool per purpose and process, created on first use.

Also the OpenMP waiting policy the CLI sets before any OpenMP runtime loads (`openmp_defaults`; `openmp_for_training`
for `offlab fit`), the flush of subnormal floats while a run trains (`denormals_flushed`), and the command
of a fresh interpreter for work in a process of its own (`fresh_interpreter`: PRDC's search process, the dataset
builder's workers).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_POOLS: dict[str, tuple[ThreadPoolExecutor, int]] = {}


def helper_thread(purpose: str, threads: int = 1) -> ThreadPoolExecutor:
    """The process's pool of helper threads for `purpose` (named after it), with room for at least `threads` at
    once: created on first use, replaced by a larger one when more are asked for (the old one's threads finish
    what they run, then exit)."""
    pool, size = _POOLS.get(purpose, (None, 0))
    if pool is None or size < threads:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=purpose)
        _POOLS[purpose] = pool, threads
    return pool


class SplitWork:
    """Independent chunks of work, started at once on `helpers` helper threads of `purpose`, which take chunks
    from the front; `result()` has the calling thread take chunks from the back until all meet, then returns the
    outputs in order.

    So work that outlasts what the caller did meanwhile is finished on every thread, not one. Which thread ran
    a chunk never changes its output: the chunks must not depend on each other.
    """

    def __init__(self, purpose: str, fn: Callable[[Any], Any], chunks: list, helpers: int = 1):
        self.fn, self.chunks = fn, chunks
        self.out: list = [None] * len(chunks)
        self.lock = threading.Lock()
        self.front, self.back = 0, len(chunks) - 1
        pool = helper_thread(purpose, helpers)
        self.helpers = [pool.submit(self._drain, True) for _ in range(helpers)]

    def _take(self, from_front: bool) -> int | None:
        with self.lock:
            if self.front > self.back:
                return None
            if from_front:
                self.front += 1
                return self.front - 1
            self.back -= 1
            return self.back + 1

    def _drain(self, from_front: bool) -> None:
        while (i := self._take(from_front)) is not None:
            self.out[i] = self.fn(self.chunks[i])

    def result(self) -> list:
        self._drain(from_front=False)
        for helper in self.helpers:
            helper.result()  # the chunk a helper is still on (and its exception, if it raised)
        return self.out


# libgomp's spin count before an idle OpenMP thread sleeps (the time depends on the CPU's pause instruction: about
# 0.1 ms on the Xeon of session 32, where libgomp's own default spun 0.25 and 3.7 ms in two probes;
# OMP_WAIT_POLICY=PASSIVE is 0). Long spins let idle pool threads take the core of a helper thread (a report's BC models); no spin makes
# every parallel op of a training step wake its threads from sleep, which halved TD3+BC's speed on two threads
# (benchmarks/d3rlpy_speed.md, session 19). `offlab fit` trains under a longer one (`openmp_for_training`).
# LLVM's OpenMP (torch's on macOS) ignores it; its block time, in ms, defaults to 200: 1 is its shortest.
SPIN_COUNT = "10000"
TRAINING_SPIN_COUNT = "30000"
"""libgomp's spin count while `offlab fit` trains (`openmp_for_training`): about 0.3 ms on the Xeon of session 33."""
BLOCK_TIME_MS = "1"
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The environment variables that set how idle OpenMP threads wait (the ones `openmp_defaults` reads and sets)."""


_SET_HERE: set[str] = set()
"""The variables offlab set in os.environ (not the user's): the ones `openmp_for_training` may change."""

OPENMP_LIBRARIES = ("torch", "faiss", "sklearn")
"""Modules whose import loads an OpenMP runtime, which reads the wait variables once, then."""


def openmp_defaults(environ=os.environ) -> None:
    """Set the short spin unless the user chose a wait policy or spin time. Call before torch/faiss/sklearn load."""
    if "OMP_WAIT_POLICY" in environ:
        return
    for var, value in (("GOMP_SPINCOUNT", SPIN_COUNT),  # GNU OpenMP (Linux wheels of torch, faiss, scikit-learn)
                       ("KMP_BLOCKTIME", BLOCK_TIME_MS)):  # LLVM/Intel OpenMP
        if var not in environ:
            environ[var] = value
            if environ is os.environ:
                _SET_HERE.add(var)


def openmp_for_training(environ=os.environ) -> list[str]:
    """In a process about to train, before torch loads: libgomp's spin `TRAINING_SPIN_COUNT` in place of the short
    one `openmp_defaults` set, and LLVM OpenMP's own block time (a user's setting of either stays). Returns the
    variables changed (none once an OpenMP runtime has loaded: it has read them).

    Why: between the ops of an update torch's pool threads wait for the next parallel op; after the short spin
    they sleep, and the next op waits for them to wake. On an Intel Xeon (session 32) TD3+BC took 3.22-3.35 ms
    per update on two threads under the short spin and 3.04 ms under libgomp's own (300,000 spins, several ms).
    A tenth of that (session 33) trains TD3+BC as fast (3.68 ms median per update under both, twelve rounds each
    in alternating processes), and PRDC faster: when a neighbour search begins, torch drops to one thread fewer,
    and its idle thread spins on the core the search process needs until its spin runs out (PRDC 1.20-1.21x TD3+BC
    on the 100k hopper benchmark data against 1.27x, benchmarks/learner_speed.md). The quality report's helper
    threads keep the short spin (`offlab data report`)."""
    if any(name in sys.modules for name in OPENMP_LIBRARIES):
        return []
    changed = []
    short_spin_here = "GOMP_SPINCOUNT" in _SET_HERE and environ.get("GOMP_SPINCOUNT") == SPIN_COUNT
    if "OMP_WAIT_POLICY" not in environ and ("GOMP_SPINCOUNT" not in environ or short_spin_here):
        environ["GOMP_SPINCOUNT"] = TRAINING_SPIN_COUNT
        _SET_HERE.add("GOMP_SPINCOUNT")
        changed.append("GOMP_SPINCOUNT")
    if "KMP_BLOCKTIME" in _SET_HERE and environ.get("KMP_BLOCKTIME") == BLOCK_TIME_MS:
        environ.pop("KMP_BLOCKTIME")
        _SET_HERE.discard("KMP_BLOCKTIME")
        changed.append("KMP_BLOCKTIME")
    return changed


def flushes_denormals(threads: int = 1) -> bool:
    """Whether torch's CPU kernels treat subnormal floats as zero, on the calling thread alone (`threads=1`) or
    on `threads` of its OpenMP threads: a probe op over subnormal inputs leaves no nonzero bit."""
    import torch

    # one thread's share of an elementwise op is at least at::internal::GRAIN_SIZE (32768) elements
    n = 16 if threads <= 1 else (1 << 16) * threads
    subnormal = torch.full((n,), 1e-40, dtype=torch.float32)
    return not torch.count_nonzero((subnormal * 1.0).view(torch.int32)).item()


_OPENMP_RUNTIME = None  # found once (`_openmp_runtime`): a loaded library stays loaded


def _openmp_runtime():
    """The OpenMP runtime this process has loaded (libgomp, or LLVM's libomp/libiomp) as a ctypes library; None
    before one is loaded, or off Linux."""
    global _OPENMP_RUNTIME
    if _OPENMP_RUNTIME is None:
        _OPENMP_RUNTIME = _find_openmp_runtime()
    return _OPENMP_RUNTIME


def _find_openmp_runtime():
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line or ".dylib" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp")):
            with contextlib.suppress(OSError, AttributeError):
                runtime = ctypes.CDLL(path)
                runtime.omp_pause_resource_all  # OpenMP 5.0  # noqa: B018
                return runtime
    return None


def set_flush_denormals(on: bool) -> bool:
    """Flush subnormal floats to zero (or stop) on the calling thread and torch's OpenMP threads; False where the
    CPU has no such mode. OpenMP threads take the floating-point mode of the thread that starts them and keep it,
    so the runtime's threads are released (`omp_pause_resource_all(omp_pause_hard)`, about 0.5 ms): its next
    parallel op starts new ones from this thread."""
    import torch

    if not torch.set_flush_denormal(on):
        return False
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_pause_resource_all(2)
    return True


@contextlib.contextmanager
def denormals_flushed():
    """Within the block, the CPU flushes subnormal floats (|x| < 1.2e-38 in float32) to zero on the calling thread
    and torch's OpenMP threads (x86's FTZ and DAZ); after it, it does not again. Where the CPU cannot, or the
    calling thread already flushes them (the caller's choice, kept), a no-op.

    Why: Adam's first moment of a weight whose gradient is zero (a dead ReLU unit's) decays by beta1 = 0.9 a
    step into the subnormal range and stays there: 0.9 times a few units of the last place rounds back to
    itself. Subnormal arithmetic takes a slow path on x86 (a hundred cycles and more per op on Intel cores), and
    the count grows as units die: after 2,000 TD3+BC updates on hopper 17,000 of the critic's first moments were
    subnormal, and its Adam steps took 2.7x as long (benchmarks/d3rlpy_speed.md, session 33). Flushed, they are
    zero. No learner depends on values below 1e-38; the numbers differ from an unflushed run's only where one
    arose."""
    import torch

    if flushes_denormals():  # the caller's choice: kept, and given to torch's threads too
        if not flushes_denormals(torch.get_num_threads()):
            set_flush_denormals(True)
        yield
        return
    if not set_flush_denormals(True):
        yield
        return
    try:
        yield
    finally:
        set_flush_denormals(False)


def runqueue_seconds() -> float | None:
    """Seconds this process's threads have spent ready to run but waiting for a core, summed over its threads
    (Linux's per-thread schedstat); None where the kernel does not say."""
    total, read = 0.0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # not Linux
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
            read = True
        except (OSError, IndexError, ValueError):  # a thread that ended since, or a kernel without schedstat
            continue
    return total if read else None


class CoreWait:
    """How many cores' worth of this process's threads waited for a core, on average, since the last `sample`: near
    0 when the process has its cores to itself, near its thread count over the cores' number when it shares them
    (two two-thread trainings on two cores wait about one core's worth each)."""

    def __init__(self):
        self._last = (time.perf_counter(), runqueue_seconds())

    def sample(self) -> float | None:
        now, waited = time.perf_counter(), runqueue_seconds()
        (then, before), self._last = self._last, (now, waited)
        if waited is None or before is None or now <= then:
            return None
        return (waited - before) / (now - then)


def torch_threads_beside(learner, cores: int) -> int:
    """torch's thread count on `cores` cores beside `learner`, which keeps its `side_cores` of them busy (PRDC's
    search process): at least one."""
    return max(1, cores - getattr(learner, "side_cores", 0))


def same_bits_on_thread_counts(counts: tuple[int, ...], compute: Callable[[], list]) -> bool:
    """Whether `compute()` returns bit-identical tensors with torch on each of the thread counts `counts` (torch's
    count restored after). A learner that may change its thread count during a run asks first, so that the run's
    numbers cannot depend on when it changed: a kernel's order of summation is set by the shapes and the thread
    count, not the values, so one batch through the learner's own computation answers for all of them."""
    import torch

    before = torch.get_num_threads()
    results = []
    try:
        for n in dict.fromkeys(counts):
            torch.set_num_threads(n)
            results.append([t.detach().clone() for t in compute()])
    finally:
        torch.set_num_threads(before)
    first = results[0]
    return all(len(r) == len(first) and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                                            for a, b in zip(r, first, strict=True)) for r in results[1:])


def usable_cores() -> int:
    """The cores this process may run on: a container's or taskset's share, not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


def fresh_interpreter_available() -> bool:
    """Whether `fresh_interpreter` can be started: this Python knows its executable (an embedding may not)."""
    return bool(sys.executable)


def fresh_interpreter(statement: str) -> list[str]:
    """The command line of a fresh Python that runs `statement` with this process's `sys.path` (as multiprocessing
    gives its children), so it imports offlab and its dependencies from where this process does.

    Unlike multiprocessing's `spawn`, the child never imports the caller's `__main__`: a script that trains or
    builds at import time, without an `if __name__ == "__main__":` guard, is not run again in it (where it would
    fail trying to start processes of its own). And a daemonic process, such as a multiprocessing pool's worker,
    may start it. The child ignores Ctrl-C from its first line on, before its imports: Ctrl-C reaches the whole
    process group, and the caller, which gets it too, stops its children."""
    path = [os.fspath(p) for p in sys.path]
    return [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            f"sys.path[:] = {path!r}; {statement}"]
