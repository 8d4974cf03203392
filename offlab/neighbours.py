"""Exact nearest neighbours of state-action keys among a dataset's: PRDC's dataset constraint.

`NearestDatasetAction` finds, for queries [beta * s, a], the nearest dataset key [beta * s_i, a_i] (k = 1) and
returns a_i. On the host it is exact at every step and as fast as the keys allow:
- `StateNeighbours`: each dataset row's nearest states, found once and kept on disk, settle most queries asked at a
  row when the policy is near the data, with a certificate that no key off the list can be nearer;
- `VoronoiCells`: the queries they leave open (or all queries asked at a row, without the lists) scan only the
  k-means cells, and the shells of them, that can hold a nearer key than their candidate;
- a scipy KD-tree over the keys in their principal axes takes the rest (queries asked at no row);
- `SearchProcess`: with a core to spare, all of this runs in a process of its own beside the training step.
On CUDA an exact chunked search runs on the device; `ivf` (faiss's inverted file) is the opt-in approximate search.
The measurements behind each choice are in benchmarks/learner_speed.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from offlab import paths
from offlab.threads import SplitWork, faiss_threads, fresh_interpreter, fresh_interpreter_available


class PendingSearch:
    """A host neighbour search under way (NearestDatasetAction.start_search): on helper threads (`SplitWork`, whose
    remaining queries the calling thread takes when it asks) or in the search process (`SearchProcess`).
    `answer()` waits for the rows as a numpy array; `ready()` says, without waiting, whether nothing is left to search
    (the search process's answer has come; never, for a search the calling thread takes a part of)."""

    def __init__(self, answer: Callable[[], np.ndarray], device: torch.device,
                 ready: Callable[[], bool] = lambda: False):
        self.answer, self.device, self.ready = answer, device, ready

    def result(self) -> torch.Tensor:
        """The neighbours' row indices."""
        return torch.from_numpy(self.answer()).to(self.device)


class SearchProcess:
    """The host search (`NearestDatasetAction` with kdtree or ivf: the state neighbours, the Voronoi cells, the
    tree) in a worker process of its own, which answers one batch of queries at a time.

    Why a process: a helper thread shares the interpreter's lock with the training step, and the search's many
    small numpy calls hold it, so each torch op of the critic step beside it waits for the lock. On walker2d-medium
    a TD3+BC update on one thread took 9.4 -> 15.5 ms with a search thread beside it, and 10.4-11.6 -> 10.7-11.3 ms
    with the same search in a process (benchmarks/learner_speed.md, session 28). The process is a fresh
    interpreter (`python -c`: no OpenMP or lock state forked from a running trainer) holding its end of a socket
    pair (`threads.fresh_interpreter`: unlike multiprocessing's `spawn` it never imports the caller's `__main__`, so
    a script without an `if __name__ == "__main__":` guard works, and a multiprocessing pool's worker may start
    it). It gets the normalised states and actions once over the socket, and builds the same index from them and
    from the caches on disk (which the caller fills first, `NearestDatasetAction`), so its answers are the
    in-process search's. It ignores Ctrl-C (the trainer stops it), and it exits when the trainer's end of the
    socket closes, the trainer's death included.
    """

    def __init__(self, norm_obs: np.ndarray, actions: np.ndarray, settings: dict[str, Any]):
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                fresh_interpreter(f"from offlab.neighbours import _serve_searches; _serve_searches({theirs.fileno()})"),
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=self.environment())
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        weakref.finalize(self, SearchProcess._stop, self._conn, self._process)
        self._asked = False  # a batch sent and its answer not yet read
        self.seconds = 0.0  # wall seconds the process took to search the batch read last
        try:
            self._conn.send(settings | {"obs_shape": norm_obs.shape, "act_shape": actions.shape})
            self._conn.send_bytes(np.ascontiguousarray(norm_obs, dtype=np.float32))
            self._conn.send_bytes(np.ascontiguousarray(actions, dtype=np.float32))
        except OSError as e:
            raise self._stopped() from e

    BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")

    @classmethod
    def environment(cls) -> dict[str, str]:
        """The process's environment: this one's, with numpy's BLAS (and any OpenMP) on one thread, the process's
        one core. A numpy product past OpenBLAS's threshold would otherwise start a thread per core, which waits
        spinning beside torch's: one [166 x 23] x [23 x 1000] product per batch made halfcheetah-medium's first
        5,000 updates take 5.0x TD3+BC's time against 2.9x (session 36)."""
        return os.environ | dict.fromkeys(cls.BLAS_THREADS, "1")

    @staticmethod
    def available() -> bool:
        """Whether this platform can start it: a POSIX system (it inherits its end of a socket pair) and a known
        Python executable."""
        return os.name == "posix" and fresh_interpreter_available()

    def submit(self, query: np.ndarray, rows: np.ndarray | None) -> None:
        """Send one batch of float32 queries (and the dataset row each was asked at, or None); `result` reads its
        answer."""
        if self._asked:  # an answer nobody read (the caller dropped a search): read it, so the next one is ours
            self.result()
        query = np.ascontiguousarray(query, dtype=np.float32)
        rows = np.full(len(query), -1, np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        try:
            self._conn.send_bytes(np.array([len(query)], np.int64).tobytes() + query.tobytes() + rows.tobytes())
        except OSError as e:
            raise self._stopped() from e
        self._asked = True

    def result(self) -> np.ndarray:
        """The nearest key's row for each query of the batch sent last (waits for the process)."""
        self._asked = False
        try:
            reply = self._conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise self._stopped() from e
        if reply[:1] != b"A":
            raise RuntimeError(f"PRDC's search process failed: {reply[1:].decode()}")
        self.seconds = float(np.frombuffer(reply, np.float64, 1, offset=8)[0])
        return np.frombuffer(reply, np.int64, offset=16).copy()

    def answered(self) -> bool:
        """Whether the answer to the batch sent last has come (it may be read without waiting)."""
        try:
            return self._conn.poll()
        except OSError:
            return True  # the process is gone: `result` says so

    def cpu_seconds(self) -> float:
        """CPU seconds the search process has used so far (Linux; 0.0 elsewhere): for benchmarks, whose process
        time leaves it out."""
        try:
            with open(f"/proc/{self._process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return 0.0

    def _stopped(self) -> RuntimeError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        code = self._process.returncode
        if code is not None and code < 0:  # a signal: the kernel's out-of-memory killer sends SIGKILL
            how = f"killed by {signal.Signals(-code).name}" + ("; out of memory?" if -code == signal.SIGKILL else "")
        else:
            how = f"exit code {code}; its error, if it printed one, is above"
        return RuntimeError(f"PRDC's search process stopped ({how}); --set search_process=false searches in the "
                            f"training process")

    @staticmethod
    def _stop(conn, process) -> None:
        conn.close()  # the process sees the socket close and returns
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve_searches(fd: int) -> None:
    """The search process (`SearchProcess`), on its end `fd` of the socket pair: build the host index, then answer
    batches until the trainer's end closes. Replies: b"A" + 7 padding bytes + the search's seconds (float64) + int64
    rows, or b"E" + the error."""
    torch.set_num_threads(1)
    conn = Connection(fd)
    try:
        settings = conn.recv()
        # writable copies: torch.from_numpy warns on a read-only buffer
        norm_obs = np.frombuffer(conn.recv_bytes(), np.float32).reshape(settings.pop("obs_shape")).copy()
        actions = np.frombuffer(conn.recv_bytes(), np.float32).reshape(settings.pop("act_shape")).copy()
        index = NearestDatasetAction(torch.from_numpy(norm_obs), torch.from_numpy(actions),
                                     device=torch.device("cpu"), **settings)
        dim = norm_obs.shape[1] + actions.shape[1]
    except Exception as e:  # noqa: BLE001 - any failure goes back to the trainer, which raises it
        conn.send_bytes(b"E" + f"{type(e).__name__}: {e}".encode())
        return
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        n = int(np.frombuffer(request, np.int64, 1)[0])
        query = np.frombuffer(request, np.float32, n * dim, offset=8).reshape(n, dim)
        rows = np.frombuffer(request, np.int64, n, offset=8 + 4 * n * dim)
        start = time.perf_counter()
        try:
            found = index._host_index(query, rows if (rows >= 0).any() else None)
        except Exception as e:  # noqa: BLE001
            conn.send_bytes(b"E" + f"{type(e).__name__}: {e}".encode())
            return
        seconds = np.array([time.perf_counter() - start], np.float64)
        conn.send_bytes(b"A" + bytes(7) + seconds.tobytes() + found.astype(np.int64).tobytes())


def _in_principal_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, rotation (the covariance's eigenvectors) and the float64 points `x` in their principal axes,
    (x - mean) @ rotation: a rotation keeps every distance (so the neighbours are the same, up to float64 rounding)
    while a KD-tree's axis-aligned splits cut the correlated locomotion states better. The covariance is one
    product of the centred points (np.cov copies and transposes them: 1.6 s against 0.05 s for 1M x 23)."""
    mean = x.mean(axis=0)
    centred = x - mean
    if len(x) < 2:
        return mean, np.eye(x.shape[1]), centred
    rotation = np.linalg.eigh(centred.T @ centred / (len(x) - 1))[1]
    return mean, rotation, centred @ rotation


def _float32_outwards(lowest: np.ndarray, highest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 intervals [lowest, highest] in float32, each end rounded away from the interval's inside."""
    low, high = lowest.astype(np.float32), highest.astype(np.float32)
    low = np.where(low > lowest, np.nextafter(low, np.float32(-np.inf)), low)
    high = np.where(high < highest, np.nextafter(high, np.float32(np.inf)), high)
    return low, high


def _compiled_input(x: np.ndarray, dtype) -> np.ndarray:
    """`x` as the compiled search takes it: C-contiguous, of `dtype`, writable (numba compiles a read-only array,
    such as one read from the search process's socket, as another type: seconds more), copied only if need be."""
    return np.require(x, dtype, ["C", "W"])


def _build_progress(rows: int):
    """A progress bar on stderr for building the state neighbours of a large dataset; nothing for a small one."""
    if rows < 200_000:
        return contextlib.nullcontext(lambda n: None)
    from offlab.progress import progress_bar

    return progress_bar("PRDC: nearest states of each dataset row (once per dataset)", rows)


class StateNeighbours:
    """Each dataset row's `k` nearest dataset states (Euclidean, in the index's normalised states), nearest
    first, found once with a KD-tree over the states and kept on disk (OFFLAB_HOME/prdc/state_neighbours, keyed
    by a digest of the states and k).

    What they certify: a query q = [beta * s, a] asked at dataset row i, with e = |s - s_i| (0 when s is row
    i's state). Every key j off the first m states of row i's list has |s_i - s_j| >= r_i(m), the distance to
    its m-th state, so |q - key_j| >= beta * |s - s_j| >= beta * (r_i(m) - e). When the nearest of those m
    keys is nearer than that, it is the nearest of all keys: the tree is not needed. Near the data, where
    PRDC's constraint keeps the policy, the nearest key's state is among a few nearest states.

    Two stages: every query first looks at the `FIRST` nearest states (cheap, and enough for most queries once
    the policy is near the data); only the queries those leave open look at the whole list, whose larger
    radius settles most of the rest. The tree gets what is left.
    """

    CACHE_VERSION = 2
    FIRST = 32
    """States of the first stage (all of them when k is smaller)."""

    def __init__(self, states: np.ndarray, k: int, first: int = FIRST):
        states = np.ascontiguousarray(states, dtype=np.float32)
        self.k, self.first = k, first = self._sizes(len(states), k, first)
        self.obs_dim = states.shape[1]

        def build():
            x = _in_principal_axes(states.astype(np.float64))[2]  # as the key tree (see NearestDatasetAction)
            tree = cKDTree(x, balanced_tree=False)
            rows, radius = np.empty((len(x), k), np.int32), np.empty((len(x), 2))
            # all cores, in slices so that a long build (minutes on 1M walker2d states) shows its progress
            step = 20_000
            with _build_progress(len(x)) as advance:
                for i in range(0, len(x), step):
                    dist, idx = tree.query(x[i:i + step], k=k, workers=-1)
                    dist = dist.reshape(len(dist), -1)
                    rows[i:i + step], radius[i:i + step] = idx.reshape(len(dist), -1), dist[:, [first - 1, -1]]
                    advance(len(dist))
            return rows, radius

        (rows, radius), self.reused = paths.cached_arrays(
            "prdc/state_neighbours", self.cache_key(states, k, first), build)
        self.rows = _compiled_input(rows, np.int32)
        self.radius_first, self.radius = np.ascontiguousarray(radius[:, 0]), np.ascontiguousarray(radius[:, 1])
        self.nearest(np.zeros((0, states.shape[1]), np.float32), 1.0, np.zeros((0, states.shape[1]), np.float32),
                     np.zeros(0, np.int64), 0.0)  # compiled (or read from numba's cache) now, not in the first update

    @staticmethod
    def _sizes(rows: int, k: int, first: int) -> tuple[int, int]:
        """The list length and first stage kept for `rows` states: at least 1, at most the states (the stage at
        most the list)."""
        k = max(1, min(k, rows))
        return k, max(1, min(k, first))

    @classmethod
    def cache_key(cls, states: np.ndarray, k: int, first: int = FIRST) -> list:
        """What the lists of `states` (float32) are kept on disk under: everything they depend on."""
        return [cls.CACHE_VERSION, paths.digest(states), list(states.shape), *cls._sizes(len(states), k, first)]

    @classmethod
    def on_disk(cls, states: np.ndarray, k: int) -> bool:
        """Whether the lists of `states` were found before and are kept on disk (nothing is read)."""
        states = np.ascontiguousarray(states, dtype=np.float32)
        return paths.cached_path("prdc/state_neighbours", cls.cache_key(states, k)).is_file()

    def nearest(self, keys: np.ndarray, beta: float, query: np.ndarray, rows: np.ndarray, slack: float
                ) -> tuple[np.ndarray, np.ndarray]:
        """For queries asked at dataset `rows`: each one's nearest listed key (row index) and whether it is
        certified the nearest of all keys (see the class doc). keys: the index's float32 [beta * s_j, a_j];
        query: [n, obs + act]; slack: an absolute allowance for the keys' float32 rounding. Compiled
        (`neighbour_scan.listed_nearest`): stage 1 for every query, stage 2 for those it leaves open."""
        from offlab.neighbour_scan import listed_nearest

        return listed_nearest(_compiled_input(keys, np.float32), _compiled_input(query, np.float32),
                              _compiled_input(rows, np.int64), self.rows, self.first,
                              self.radius_first, self.radius, self.obs_dim, float(beta), float(slack))


KMEANS_CACHE_VERSION = 1


def kmeans_partition(keys: np.ndarray, cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """faiss's k-means over float32 `keys`: `cells` centroids (by default about sqrt(N), the inverted file's; at
    most one per 39 keys, the training points per cell faiss's k-means asks for) [cells, dim] float32, and each
    key's cell, that of its nearest centroid [N] int64.

    Kept on disk (OFFLAB_HOME/prdc/kmeans_cells, keyed by a digest of the keys), as the state neighbours are:
    computed, the k-means took 2-6 s of every fit on 1M keys."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    dim = keys.shape[1]
    cells = _kmeans_cell_count(len(keys), cells)

    def train():
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, cells)
        index.cp.seed = 0
        with faiss_threads(1):  # one thread: k-means sums in a fixed order, so the cells are reproducible
            index.train(keys)
            cell_of = index.quantizer.assign(keys, 1)[:, 0]  # what index.add would file each key under
        return index.quantizer.reconstruct_n(0, cells), cell_of

    (centroids, cell_of), _ = paths.cached_arrays("prdc/kmeans_cells", _kmeans_cache_key(keys, cells), train)
    return np.ascontiguousarray(centroids, dtype=np.float32), np.ascontiguousarray(cell_of, dtype=np.int64)


def _kmeans_cell_count(rows: int, cells: int | None = None) -> int:
    """`cells` (by default about sqrt(N)), with the >= 39 training points per cell faiss's k-means asks for."""
    return max(1, min(round(math.sqrt(rows)) if cells is None else cells, rows // 39))


def _kmeans_cache_key(keys: np.ndarray, cells: int | None = None) -> list:
    """What `kmeans_partition` of the float32 `keys` is kept on disk under: everything it depends on."""
    return [KMEANS_CACHE_VERSION, paths.digest(keys), list(keys.shape), _kmeans_cell_count(len(keys), cells)]


def kmeans_on_disk(keys: np.ndarray, cells: int | None = None) -> bool:
    """Whether `kmeans_partition` of the float32 `keys` was computed before and is kept on disk (nothing is read)."""
    return paths.cached_path("prdc/kmeans_cells", _kmeans_cache_key(keys, cells)).is_file()


def kmeans_cells(keys: np.ndarray):
    """faiss's inverted file over float32 `keys`, its cells those of `kmeans_partition`. Read back from disk, the
    same keys go into the same cells in the same order, so the index is the one built the first time."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    centroids, cell_of = kmeans_partition(keys)  # cell_of held here: swig_ptr keeps no reference
    quantizer = faiss.IndexFlatL2(keys.shape[1])
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, keys.shape[1], len(centroids))
    index.is_trained = True  # its quantizer holds the trained centroids
    with faiss_threads(1):
        index.add_core(len(keys), faiss.swig_ptr(keys), None, faiss.swig_ptr(cell_of))
    return index


class VoronoiCells:
    """The exact nearest key to queries that already have a candidate, by scanning only the keys of the k-means
    cells that can hold a nearer one: where the policy is far from the data, several times faster than the KD-tree
    on 1M keys.

    Every key is in the cell of its nearest centroid (`kmeans_partition`; `cell_count`: about 0.3 sqrt(N) cells).
    Two bounds on the distance from a query q to a key k of cell j (centroid c_j), both to beat the best distance d
    found so far:
    - the half-space bound (|q - c_j|^2 - |q - c_1|^2) / (2 |c_j - c_1|), c_1 the centroid nearest q: which cells
      to scan (5-9 of sqrt(N) per query on hopper-medium and walker2d-medium, the candidate being tight: it comes
      from the state neighbours, for the queries they found but could not certify; 39 of 300 for halfcheetah-medium's
      far queries). Each query's nearest cell is scanned
      first; then the others cell by cell over the batch (a cell's codes stay in cache for the queries after the
      first), each tested again against the query's best distance so far, which only shrinks;
    - the triangle inequality | |q - c_j| - |k - c_j| |: within a cell the keys are sorted by their distance to its
      centroid, so the keys to scan are one contiguous run, those in the shell |k - c_j| in |q - c_j| +- d (about
      half of the cell on walker2d-medium), found by bisecting the cell's marks (every MARK_EVERY-th key's
      distance; up to MARK_EVERY keys more at each end).
    The cells' bound allows for the keys' cell assignment having been made in float32.

    The scan (`neighbour_scan.cells_nearest`, compiled): the keys are stored cell by cell as their offsets
    r = k - c_j in the scan's axes (`_scan_axes`: the action first, then the state's principal axes), each component
    in one byte: r_d ~ step_d * code_d, the step 1/127 of the cell's largest |r_d|. The distance over the leading
    axes alone (`_lead_axes`, 16 of halfcheetah-medium's 23) is a lower bound on the whole, and it rules out all but
    about 16 of the ~30,000 keys a far query scans there. Where the CPU has AVX-512 BW or AVX2 (`interval_bounds`), a
    cheaper bound goes first (`_interval_codes`): on each leading axis a cell's offsets are cut into 16 intervals, and
    a key's 4-bit interval codes (8 bytes on halfcheetah-medium) bound its distance over those axes from below by the
    sum of the query's squared distances to its intervals: table lookups in bytes, 64 keys an instruction (32 with
    AVX2). That leaves about 120 of a far query's 48,000 keys, whose leading scores are then made from their codes (a
    row per key); the cells' part of a batch in a quarter less time than VNNI byte products of the codes (session
    38), and half the float32 scan's time. Elsewhere the leading axes' codes are transposed (one row per axis) with
    their -|r|^2 / 2 beside them in float32, and a run's scores (q - c_j).r - |r|^2 / 2 over them are vector
    instructions over contiguous memory. The rest of a key (its other codes and their -|r|^2 / 2) is one record,
    read only for the keys that pass. A code is off by at most the cell's `code_error`, so a score by at most
    sum_d |q - c_j|_d code_error_d; a key whose score comes within that (and the rounding of float32 and of the axes)
    of beating the best is compared in float64 from its float32 key, so the answer is the float64 nearest key (the
    candidate, then the first found, on an exact tie).
    """

    ROUNDING_PER_DIM = 2.0**-22
    """Relative error allowed for a float32 squared distance |q|^2 + |c|^2 - 2 q.c, per key dimension (float32's
    2^-24 four times over for each term of the sums): it bounds the keys' float32 cell assignment; an overestimate
    only widens the scan."""

    def __init__(self, keys: np.ndarray, action_dim: int = 0, interval_bounds: bool | None = None):
        from offlab.neighbour_scan import MARK_EVERY, interval_bounds_available

        self.interval_bounds = interval_bounds_available() if interval_bounds is None else interval_bounds
        self.keys = keys = _compiled_input(keys, np.float32)
        self.centroids, cell_of = kmeans_partition(keys, self.cell_count(len(keys)))
        cells, dim = self.centroids.shape
        cent = self.centroids.astype(np.float64)
        self.centroids_t = np.ascontiguousarray(cent.T)  # [dim, cells]: the scan's distances to all centroids
        self.centroid_sq = np.einsum("ij,ij->i", cent, cent)
        self.centroid_gap = np.sqrt(np.maximum(self.centroid_sq[:, None] + self.centroid_sq[None, :]
                                               - 2.0 * cent @ cent.T, 0.0))
        self.key_sq_max = float(np.einsum("ij,ij->i", keys, keys, dtype=np.float64).max())
        radius_sq = np.empty(len(keys))  # |k - c_j|^2, float64
        scatter = np.zeros((dim, dim))  # of the offsets k - c_j: their principal axes
        chunk = 65_536
        for i in range(0, len(keys), chunk):
            r = keys[i:i + chunk].astype(np.float64) - cent[cell_of[i:i + chunk]]
            radius_sq[i:i + chunk] = np.einsum("ij,ij->i", r, r)
            scatter += r.T @ r
        self.axes = self._scan_axes(scatter, action_dim)
        self.lead = self._lead_axes(dim)
        self.interval_bounds = self.interval_bounds and self.lead % 2 == 0  # two codes a byte: keys of 1 or 3 axes
        self.order = np.lexsort((radius_sq, cell_of))  # key rows: cell by cell, nearest the centroid first
        self.start = np.zeros(cells + 1, np.int64)  # cell j's keys are positions start[j]:start[j + 1] of order
        np.cumsum(np.bincount(cell_of, minlength=cells), out=self.start[1:])
        radius = np.sqrt(radius_sq[self.order])  # |k - c_j| by position: sorted within each cell
        # every MARK_EVERY-th key's |k - c_j| in each cell (the first included), cell j's from mark_start[j]
        counts = np.diff(self.start)
        marked = -(-counts // MARK_EVERY)
        self.mark_start = np.zeros(cells + 1, np.int64)
        np.cumsum(marked, out=self.mark_start[1:])
        self.marks = radius[np.repeat(self.start[:-1], marked)
                            + MARK_EVERY * (np.arange(self.mark_start[-1]) - np.repeat(self.mark_start[:-1], marked))]
        # the offsets r = key - its centroid in the scan's axes, as int8 codes, r_d ~ step[j, d] code_d: the cells'
        # largest |r_d| first
        self.centroids_axes = cent @ self.axes.T  # [cells, dim]: a cell's, in a row (read per (query, cell) pair)
        largest = np.zeros((cells, dim))
        for _, cell, runs, r in self._offsets(keys, cell_of, cent, chunk):
            largest[cell[runs]] = np.maximum(largest[cell[runs]], np.maximum.reduceat(np.abs(r), runs, axis=0))
        self.step = np.where(largest > 0, largest, 1.0) / 127.0
        # the leading axes' codes one row per axis (a run of keys is scanned axis by axis), the rest's a row per key
        # (looked up for the few keys that pass the leading axes: one cache line each, not one per axis)
        self.codes = np.empty((self.lead, len(keys)), np.int8)
        # a key's rest: its codes and -|r|^2 / 2 over the rest of the axes, in one record of whole 4-byte words
        rest = dim - self.lead
        record = np.zeros((len(keys), 4 * (-(-rest // 4) + 1)), np.int8)
        self.codes_rest = record[:, :rest]
        self.half_sq_rest = record[:, -4:].view(np.float32)[:, 0]
        self.code_error = np.zeros((cells, dim))  # the largest |r_d - step_d code_d| in each cell, <= step_d / 2
        # -|r|^2 / 2 by position, split at the leading dimensions: of those, and of the rest
        self.half_sq_lead = np.zeros(len(keys), np.float32)
        for positions, cell, runs, r in self._offsets(keys, cell_of, cent, chunk):
            code = np.clip(np.rint(r / self.step[cell]), -127, 127)
            self.codes[:, positions] = code[:, :self.lead].T
            self.codes_rest[positions] = code[:, self.lead:]
            error = np.maximum.reduceat(np.abs(r - code * self.step[cell]), runs, axis=0)
            self.code_error[cell[runs]] = np.maximum(self.code_error[cell[runs]], error)
            self.half_sq_lead[positions] = -0.5 * np.einsum("ij,ij->i", r[:, :self.lead], r[:, :self.lead])
            self.half_sq_rest[positions] = -0.5 * np.einsum("ij,ij->i", r[:, self.lead:], r[:, self.lead:])
        self.intervals = None
        self.lowest = self.highest = np.zeros((0, 0, 0), np.float32)
        if self.interval_bounds:
            self._interval_codes(keys, cent)
            self.codes = np.ascontiguousarray(self.codes.T)  # a row per key: read for the few keys the bounds leave
        self.nearest(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))  # compiled now, not in an update

    def _interval_codes(self, keys: np.ndarray, cent: np.ndarray) -> None:
        """Each key's offset on each leading axis as the 4-bit index of an interval (`interval_bins`, per cell and
        axis), two to a byte, block by block of 64 positions ([blocks, lead / 2, 64]), and each interval's smallest
        and largest offset ([cells, lead, 16] each, float32 rounded outwards)."""
        from offlab.neighbour_scan import INTERVALS, interval_bins

        cells = len(cent)
        # block by block of 64 keys, so that a run's codes are one stream: [blocks, axes / 2, 64], 64-byte aligned
        blocks = -(-len(keys) // 64)
        pairs = self.lead // 2
        memory = np.zeros(blocks * pairs * 64 + 64, np.uint8)
        skip = (-memory.ctypes.data) % 64
        self.intervals = memory[skip:skip + blocks * pairs * 64].reshape(blocks, pairs, 64)
        by_position = np.zeros((pairs, blocks * 64), np.uint8)
        self.lowest = np.empty((cells, self.lead, INTERVALS))
        self.highest = np.empty((cells, self.lead, INTERVALS))
        lead_axes = self.axes[:self.lead].T
        for j in range(cells):
            a, b = self.start[j], self.start[j + 1]
            offsets = (keys[self.order[a:b]].astype(np.float64) - cent[j]) @ lead_axes
            codes, self.lowest[j], self.highest[j] = interval_bins(np.ascontiguousarray(offsets), INTERVALS)
            by_position[:, a:b] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).T
        self.intervals[:] = by_position.reshape(pairs, blocks, 64).transpose(1, 0, 2)
        # in float32, rounded outwards: an interval only widens (the tables are made in float32)
        self.lowest, self.highest = _float32_outwards(self.lowest, self.highest)

    @staticmethod
    def cell_count(rows: int) -> int:
        """How many k-means cells the keys are split into: about 0.3 sqrt(N), 300 for 1M keys. Fewer, larger cells
        than the inverted file's sqrt(N) cost fewer (query, cell) pairs, each a fixed cost (the weights, the shell's
        bisections), for more keys scanned, each cheap: at 1M keys, 300 cells took 35-40% less time than 1,000 on
        halfcheetah-medium's far batches (updates 1,000 and 10,000) and 20% less on hopper-medium's at update 3,000
        (150-600 within a few percent of it; 2,000 and 4,000 took twice and three times as long; the float32 scan:
        15% and 12% less; session 37)."""
        return _kmeans_cell_count(rows, round(0.3 * math.sqrt(rows)))

    def lead_codes(self) -> np.ndarray:
        """The leading axes' codes as int8 [lead, N], whichever layout the scan reads."""
        return np.ascontiguousarray(self.codes.T) if self.interval_bounds else self.codes

    @staticmethod
    def _lead_axes(dim: int) -> int:
        """How many axes the scan scores every key of a shell in (`neighbour_scan._scan_shell`; the rest only for
        the keys that pass): about two thirds, in whole passes of four. The fewer, the less each key costs and the
        more keys pass: 8 of hopper-medium's 14 and 16 of halfcheetah-medium's 23 took the least time (session 36:
        12 and 20 on halfcheetah-medium, 4 and 12 on hopper-medium took 3-18% more)."""
        return min(dim, max(4, 4 * round(dim * 0.65 / 4)))

    @staticmethod
    def _scan_axes(scatter: np.ndarray, action_dim: int) -> np.ndarray:
        """The orthonormal axes [dim, dim] (one a row) the offsets are coded and scanned in: the keys' last
        `action_dim` components (PRDC's action) as they are, first, then the rest's principal axes by decreasing
        second moment about the centroids (of all components when `action_dim` is 0). A query is far from the data mostly in its action
        (the policy's; its state is a dataset state), and the offsets vary most along the first principal axes, so
        a key's distance over the leading axes alone is most of it: the scan drops most keys after those."""
        dim = len(scatter)
        state = dim - action_dim
        axes = np.zeros((dim, dim))
        axes[np.arange(action_dim), state + np.arange(action_dim)] = 1.0
        if state:
            values, vectors = np.linalg.eigh(scatter[:state, :state])
            axes[action_dim:, :state] = vectors[:, np.argsort(values)[::-1]].T
        return axes

    def nearest(self, query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """Row index of each query's nearest key, given a candidate key row for each (any key: the nearer it is,
        the fewer keys are scanned). query: float32 [n, obs + act]."""
        from offlab.neighbour_scan import cells_nearest

        return cells_nearest(_compiled_input(query, np.float32), _compiled_input(candidate, np.int64), self.keys,
                             self.codes, self.codes_rest, self.step, self.code_error, self.half_sq_lead,
                             self.half_sq_rest, self.lead, self.order, self.start, self.marks, self.mark_start,
                             self.centroids_t, self.axes, self.centroids_axes, self.centroid_gap, self.centroid_sq,
                             self.key_sq_max, self.ROUNDING_PER_DIM, self.intervals, self.lowest, self.highest)

    def _offsets(self, keys: np.ndarray, cell_of: np.ndarray, cent: np.ndarray, chunk: int):
        """For chunks of `chunk` positions: the positions, their cells, where each cell's run starts in the chunk
        (positions go cell by cell) and r = key - centroid in float64 in the scan's axes [chunk, dim]."""
        for i in range(0, len(keys), chunk):
            positions = slice(i, min(i + chunk, len(keys)))
            cell = cell_of[self.order[positions]]
            runs = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
            yield positions, cell, runs, (keys[self.order[positions]].astype(np.float64) - cent[cell]) @ self.axes.T


class SearchLayout:
    """Which way of placing PRDC's search trains faster on this machine, timed as training goes (`switch_layout`).

    - "process": the search process on a core of its own, beside the critic steps, and torch on the other cores.
      The search costs no wall time while it ends within the critic steps, but torch has a core fewer.
    - "inline": the search in the training process's copy of the index, after the critic step, and torch on every
      core.

    Lending (`lend`, `searching`): in the process layout torch takes the process's core too while the process has
    nothing to search, and gives it back when a search begins. That alone took PRDC from 1.48x TD3+BC's time to
    1.20x on the 100k hopper data below, and from 1.47x to 1.31x on halfcheetah-medium at update 60,000, as fast as
    timing the layouts (session 32): PRDC times them only when asked (`switch_layout`).

    Which wins depends on the machine and on the search's cost, which changes during a run. On an Intel Xeon
    (AVX-512; session 31) torch took a TD3+BC update in 3.2 ms on two threads against 4.7 on one. On the 100k
    hopper benchmark data, updates 800-3,500, the search took little enough that inline won (1.28x TD3+BC
    against 1.49x); on 1M hopper-medium's first 5,500 updates the process won; where the policy is far from the
    data (halfcheetah's first ~25,000 updates, ~90 ms per search) the process wins by far
    (benchmarks/learner_speed.md).

    So the layout is timed: the median wall time per update over blocks of BLOCK updates (the median leaves out
    an evaluation between two updates; the first SETTLE updates after a switch are left out, the caller's copy
    of the index being built in one of them). Each layout's cost is the median of its current stint's last KEEP
    blocks (a trial lasts TRIAL_BLOCKS), so that one slow block does not decide, and the blocks of an earlier
    stint, when the search may have cost more, do not count. The faster stays. The slower is timed again after RETRY blocks times how
    many times slower it was, doubled for each trial in a row that it lost after the first (at most RETRY_MAX
    blocks): the trials cost a few percent of the time at most. The first trial of "inline" comes after
    FIRST_TRIAL updates, and only if torch computes the learner's update with the same bits on both thread
    counts (`same_numbers`, checked once): the neighbours are exact in both layouts, so the run's numbers never
    depend on the layout or its timing. No trial of "inline" is made while its search alone (`inline_floor`: the
    search process's recent seconds per batch, per update) would take longer than an update in the process
    (halfcheetah's transient): that spares the trial and the caller's copy of the index (about 1 GB for 1M rows).
    """

    BLOCK = 100
    SETTLE = 10
    FIRST_TRIAL = 500
    RETRY = 10
    RETRY_MAX = 200
    KEEP = 3
    TRIAL_BLOCKS = 2

    def __init__(self, index: NearestDatasetAction, same_numbers: Callable[[tuple[int, ...], Any], bool],
                 usable: Callable[[], int], inline_floor: Callable[[], float] | None = None, switch: bool = True,
                 lend: bool = False):
        self.index, self.same_numbers, self.usable = index, same_numbers, usable
        self.inline_floor = inline_floor  # seconds per update the inline layout cannot beat (its search alone)
        self.switch = switch  # time the layouts and keep the faster (else: the process throughout)
        self.lend = lend  # in the process layout, torch takes the process's core while it has nothing to search
        self.lent = False  # torch has the process's core now (lending)
        self.layout = "process"
        self.cost: dict[str, float] = {}  # seconds per update of each layout: the median of its last KEEP blocks
        self._recent: dict[str, list[float]] = {}  # those blocks' medians
        self.times: list[float] = []  # this block's seconds per update
        self.updates = 0
        self.since_trial = 0  # blocks in the faster layout since the slower was last timed
        self.lost_trials = 0  # trials in a row that the slower layout lost
        self.on_trial = False  # this block times the layout that was slower
        self._settle = 0  # updates after a switch still to leave out
        self.process_threads = 0  # torch's threads in the process layout: the caller's count (first tick)
        self.whole_threads = 0  # one more, within the usable cores: inline's and lending's count
        self.inline_allowed: bool | None = None  # None: not checked yet
        self.switches = 0
        self._last: float | None = None
        self._batch = None

    def tick(self, batch, now: float | None = None) -> None:
        """Call at the start of each update, with its batch: times the update before, and switches the layout after a
        block."""
        self._batch = batch
        if not self.process_threads:  # the caller's count, before any switch or lending changed it
            self.process_threads = torch.get_num_threads()
            self.whole_threads = max(self.process_threads, min(self.process_threads + 1, self.usable()))
        if not self.switch:
            return
        now = time.perf_counter() if now is None else now
        if self._settle > 0:
            self._settle -= 1
        elif self._last is not None:
            self.times.append(now - self._last)
        self._last = now
        self.updates += 1
        if len(self.times) >= self.BLOCK:
            median = float(np.median(self.times))
            self.times.clear()
            nxt = self.next_layout(median)
            if nxt is not None:
                self._switch(nxt)
                self._settle = self.SETTLE

    def next_layout(self, median: float) -> str | None:
        """Record a block of the current layout at `median` seconds per update; the layout to switch to, or None."""
        layout = self.layout
        recent = self._recent.setdefault(layout, [])
        recent[:] = [*recent[-(self.KEEP - 1):], median]
        self.cost[layout] = float(np.median(recent))
        other = "inline" if layout == "process" else "process"
        if self.updates < self.FIRST_TRIAL:
            return None
        if other not in self.cost:
            return self._trial(other)
        fast, slow = sorted(self.cost, key=self.cost.get)
        if self.on_trial:  # the trial's blocks: it won (stay) or lost (back)
            if len(recent) < self.TRIAL_BLOCKS:
                return None
            self.on_trial, self.since_trial = False, 0
            self.lost_trials = 0 if layout == fast else self.lost_trials + 1
            return None if layout == fast else fast
        if layout == slow:  # the other was faster when last timed: time it again
            return self._trial(other)
        self.since_trial += 1
        wait = self.RETRY * self.cost[slow] / self.cost[fast] * 2.0 ** max(self.lost_trials - 1, 0)
        return self._trial(slow) if self.since_trial >= min(wait, self.RETRY_MAX) else None

    def _trial(self, layout: str) -> str | None:
        """Switch to `layout` for a block (None: inline is not allowed here, or its search alone would take longer
        than an update in the process: no trial, and no copy of the index built for it)."""
        if layout == "inline" and self.inline_floor is not None and "process" in self.cost and \
                self.inline_floor() >= self.cost["process"]:
            return None
        if layout == "inline" and not self._inline_ok():
            return None
        self.on_trial, self.since_trial = True, 0
        return layout

    def searching(self, busy: bool) -> None:
        """Lending (`lend`), in the process layout: torch's thread count for the work ahead, with the search process
        `busy` or idle. While it searches, torch stays off its core; while it has nothing to search (PRDC: the
        actor step, once its neighbours have come, and critic steps with no search beside them) torch takes that
        core too. Only where torch gives the same bits on both thread counts (the same check as inline's)."""
        if not self.lend or self.layout != "process" or not self._inline_ok():
            return
        torch.set_num_threads(self.process_threads if busy else self.whole_threads)
        self.lent = not busy and self.whole_threads > self.process_threads

    def rest(self) -> None:
        """Between updates torch has the process layout's count again (evaluations, and a caller's own torch work,
        see the count it set)."""
        if self.lent:
            torch.set_num_threads(self.process_threads)
            self.lent = False

    def _inline_ok(self) -> bool:
        if self.inline_allowed is None:
            self.inline_allowed = bool(self.same_numbers((self.process_threads, self.whole_threads), self._batch))
        return self.inline_allowed

    def _switch(self, layout: str) -> None:
        if layout == "inline":
            torch.set_num_threads(self.whole_threads)
            self.index.inline = True
        else:
            torch.set_num_threads(self.process_threads)
            self.index.inline = False
        self.layout = layout
        self._recent[layout] = []  # a stint's cost is its own blocks': the last stint's are out of date
        self.switches += 1


class NearestDatasetAction:
    """Exact nearest neighbour of [beta * s, a] among all dataset keys [beta * s_i, a_i]; returns a_i.

    Built once from the whole dataset. `kdtree` queries a scipy cKDTree on the host, one thread per call
    (an inline search with torch on n threads shares a long tree query out over n threads);
    `exact` computes all distances on the keys' device in chunks (the choice for a GPU, where a host
    round trip costs more than the arithmetic). `ivf` is approximate: faiss's inverted file splits the
    keys into about sqrt(N) k-means cells and scans only the `ivf_probe` cells nearest each query.
    """

    SPLIT_ROWS = 32
    """Queries per chunk of an overlapped search (start_search): 8 chunks for PRDC's 256-row batch."""
    SHARE_TREE_ROWS = 16
    """An inline search with torch on several threads shares its queries with helper threads from this many on (in
    shares of at least half as many)."""

    def __init__(self, norm_obs: torch.Tensor, actions: torch.Tensor, beta: float, search: str,
                 device: torch.device, chunk_rows: int = 65_536, ivf_probe: int = 8, state_neighbours: int = 0,
                 search_process: bool = False, share_search: bool = True):
        self.beta = float(beta)
        self.search = search
        self.chunk_rows = chunk_rows
        self.actions = actions.to(device=device, dtype=torch.float32)
        keys = torch.cat([self.beta * norm_obs.float(), actions.float()], dim=1)
        host_keys = None  # the host indexes' copy of the keys, brought over once
        if search in ("kdtree", "ivf"):
            host_keys = np.ascontiguousarray(keys.cpu().numpy(), dtype=np.float32)
        self.neighbours: StateNeighbours | None = None
        self.cells: VoronoiCells | None = None
        self.process: SearchProcess | None = None
        self.inline = False  # with the search process: `SearchLayout` chose the search inline, in the caller's copy
        if search_process and host_keys is not None:
            # The process builds the index itself; what is kept on disk is made here first (the state
            # neighbours' build shows its progress, and is not repeated), so the process only reads it back.
            states = norm_obs.cpu().numpy()
            if search == "kdtree" and state_neighbours > 0 and len(keys) > 1 and \
                    not StateNeighbours.on_disk(states, state_neighbours):
                StateNeighbours(states, state_neighbours)
            if search == "ivf" or (search == "kdtree" and len(keys) > 1):
                # the inverted file's sqrt(N) cells, or the Voronoi cells' fewer
                cells = None if search == "ivf" else VoronoiCells.cell_count(len(host_keys))
                if not kmeans_on_disk(host_keys, cells):
                    kmeans_partition(host_keys, cells)
            settings = {"beta": beta, "search": search, "ivf_probe": ivf_probe, "state_neighbours": state_neighbours}
            self.process = SearchProcess(states, actions.cpu().numpy(), settings)
            # the caller's share of each batch (`_balance`), searched in an index of its own built from the same
            # data and settings as the process's, when first needed
            self.caller_share = 0
            self.share_search = share_search
            self._share_estimate = 0.0
            self._searches = 0
            self.batch_seconds = 0.0  # the search process's seconds per batch lately (`_balance`)
            self._local: NearestDatasetAction | None = None
            self._local_args = (norm_obs, actions, settings)
            return
        if search == "kdtree" and len(keys) > 1:
            if state_neighbours > 0:
                self.neighbours = StateNeighbours(norm_obs.cpu().numpy(), state_neighbours)
                self.keys32 = host_keys
                # |q - key_j| as computed from float32 keys may differ from the exact one by the keys' rounding
                self.slack = 4.0 * math.sqrt(keys.shape[1]) * float(np.abs(self.keys32).max()) * 2.0**-24
            # a query asked at a dataset row comes with a candidate, the nearest listed key (or, without the lists,
            # the row's own key): the cells beside the tree (see _open_search)
            self.cells = VoronoiCells(host_keys, action_dim=actions.shape[1])
            self.open_cost: dict[str, float] = {}  # seconds per open query of each, recent searches weighted more
            self._since_retime = 0  # open searches since the slower of the two was last timed
        if search == "kdtree":
            # The tree holds the keys in their principal axes (`_in_principal_axes`). With sliding-midpoint
            # splits (balanced_tree=False) queries cost ~25% less than with scipy's default tree
            # (benchmarks/learner_speed.md).
            self.key_mean, self.rotation, rotated = _in_principal_axes(host_keys.astype(np.float64))
            self.tree = cKDTree(rotated, balanced_tree=False)
        elif search == "ivf":
            self.ivf = self._build_ivf(host_keys, ivf_probe)
        else:
            self.keys = keys.to(device)
            self.key_sq_norms = (self.keys**2).sum(dim=1)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def in_process(self) -> bool:
        """The searches go to the search process now (it exists, and `SearchLayout` has not chosen inline)."""
        return self.process is not None and not self.inline

    @property
    def on_host(self) -> bool:
        """The search runs in scipy or faiss on the CPU, outside torch (kdtree, ivf): it can overlap a torch step."""
        return self.search in ("kdtree", "ivf")

    def _query(self, norm_obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.beta * norm_obs.detach(), action.detach()], dim=1)

    @staticmethod
    def _build_ivf(keys: np.ndarray, probe: int):
        index = kmeans_cells(keys)
        index.nprobe = min(probe, index.nlist)
        return index

    def _host_index(self, query: np.ndarray, rows: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """Row index of each query's nearest key (float32 queries; `rows`: the dataset row each was asked at,
        -1 for none), on one core: it may run beside the critic step. `threads` > 1 (the caller has no torch
        work beside it): the queries are shared out in up to `threads` shares, helper threads searching all but
        one (the whole search with the cells; the inverted file's)."""
        if self.search == "kdtree" and threads > 1:
            # the whole search (lists, cells, tree) in shares of the batch's positions, one per thread: its compiled
            # loops and the tree release the interpreter's lock, so the shares run side by side (1.8x on two cores,
            # session 34)
            return self._in_shares(lambda at: self._host_index(query[at], None if rows is None else rows[at]),
                                   np.arange(len(query)), threads)
        if self.search == "kdtree":
            out = np.empty(len(query), dtype=np.int64)
            todo = np.ones(len(query), dtype=bool)
            if self.cells is not None and rows is not None:
                at = np.flatnonzero((rows >= 0) & (rows < len(self.actions)))
                if self.neighbours is not None:
                    found, certain = self.neighbours.nearest(self.keys32, self.beta, query[at], rows[at], self.slack)
                    out[at[certain]] = found[certain]
                    todo[at[certain]] = False
                    at, found = at[~certain], found[~certain]  # found, not certified: a close upper bound
                else:  # the row's own key: a looser upper bound than the lists' nearest
                    found = rows[at]
                if len(at):
                    out[at] = self._open_search(query[at], found)
                    todo[at] = False
            if todo.any():  # the rest from the tree over all keys, in their principal axes
                out[todo] = self._tree_index(query[todo])
            return out
        return self._in_shares(self._ivf_index, np.ascontiguousarray(query, dtype=np.float32), threads)

    def _tree_index(self, query: np.ndarray) -> np.ndarray:
        """The tree's answer, on this thread (`_host_index` shares a batch out over several)."""
        rotated = (query.astype(np.float64) - self.key_mean) @ self.rotation
        return self.tree.query(rotated, k=1, workers=1)[1]

    OPEN_RETRY = 50
    OPEN_RETRY_MAX = 1000
    """The slower of the tree and the cells is timed again after OPEN_RETRY open searches times how many times
    slower it was (at most OPEN_RETRY_MAX): the retiming costs about 1 / OPEN_RETRY of the search time, however
    slow the other is (the tree took 3-6 times the cells' time on walker2d-medium)."""
    OPEN_TRIAL_QUERIES = 16
    """How many of a batch's open queries time the other search (the rest go to the faster): the tree's cost per
    query does not depend on how many it takes (the cells' falls a little with more, as queries share cells, so a
    trial of 16 errs against them, by less than the 3-200 times between the two measured). Timed on whole batches, the tree's trials (about 1 s each, 200 times the
    cells' time on halfcheetah-medium's far queries, every OPEN_RETRY_MAX searches) took 10% of PRDC's time over
    its first 6,000 updates there (session 37)."""

    def _open_search(self, query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """The exact neighbours of queries the state neighbours left open, from the KD-tree or the Voronoi cells
        (`VoronoiCells`), whichever took less time per query lately: the cells are several times faster where the
        policy is far from 1M keys (walker2d-medium, hopper-medium), the tree can be on 100k keys. Both give the
        exact neighbour (the same one, up to float64 ties), so the choice changes the speed, never the numbers."""
        self._since_retime += 1
        cost = self.open_cost
        faster = None  # the other search, when this one is a trial of the slower (or untried) one
        if len(cost) < 2:
            method = "cells" if "cells" not in cost else "tree"
            faster = next(iter(cost), None)
        else:
            method, other = sorted(cost, key=cost.get)
            since = self._since_retime
            if since >= self.OPEN_RETRY_MAX or since * cost[method] >= self.OPEN_RETRY * cost[other]:
                faster, method, self._since_retime = method, other, 0
        trial = len(query) if faster is None else min(len(query), self.OPEN_TRIAL_QUERIES)
        start = time.perf_counter()
        out = self._open_by(method, query[:trial], candidate[:trial])
        per_query = (time.perf_counter() - start) / trial
        cost[method] = per_query if method not in cost else 0.8 * cost[method] + 0.2 * per_query
        if trial < len(query):
            out = np.concatenate([out, self._open_by(faster, query[trial:], candidate[trial:])])
        return out

    def _open_by(self, method: str, query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """The exact neighbours of open queries by the cells (on this thread: with several, each has a share of the
        batch, `_host_index`) or the tree."""
        return self.cells.nearest(query, candidate) if method == "cells" else self._tree_index(query)

    def _in_shares(self, search, query: np.ndarray, threads: int) -> np.ndarray:
        """`search(query)`; with `threads` > 1 and at least SHARE_TREE_ROWS queries, split into up to `threads`
        equal shares of at least SHARE_TREE_ROWS / 2 queries, one per thread: the caller searches one and helper
        threads the others (the same answers: each query is searched on its own)."""
        shares = min(threads, len(query) // (self.SHARE_TREE_ROWS // 2))
        if shares < 2:
            return search(query)
        return np.concatenate(SplitWork("prdc-search", search, np.array_split(query, shares), helpers=shares - 1
                                        ).result())

    def _ivf_index(self, query: np.ndarray) -> np.ndarray:
        """faiss's inverted file on one thread: the nearest key among each query's `ivf_probe` nearest cells."""
        import faiss

        with faiss_threads(1):
            _, idx = self.ivf.search(query, 1)
            idx = idx[:, 0]
            empty = idx < 0  # every probed cell was empty: search them all
            if empty.any():
                everywhere = faiss.SearchParametersIVF(nprobe=self.ivf.nlist)
                idx[empty] = self.ivf.search(query[empty], 1, params=everywhere)[1][:, 0]
        return idx.astype(np.int64)

    @torch.no_grad()
    def _exact_index(self, query: torch.Tensor) -> torch.Tensor:
        query = query.to(self.keys.device)
        best_dist = best_idx = None
        for start in range(0, len(self.keys), self.chunk_rows):
            keys = self.keys[start:start + self.chunk_rows]
            # ||q - k||^2 up to the query's own norm, which does not change the argmin
            dist = self.key_sq_norms[start:start + self.chunk_rows] - 2.0 * query @ keys.T
            d, i = dist.min(dim=1)
            if best_dist is None:
                best_dist, best_idx = d, i
            else:
                better = d < best_dist
                best_dist = torch.where(better, d, best_dist)
                best_idx = torch.where(better, i + start, best_idx)
        return best_idx

    @staticmethod
    def _host_rows(rows: torch.Tensor | None) -> np.ndarray | None:
        return None if rows is None else rows.cpu().numpy().astype(np.int64)

    def nearest_index(self, norm_obs: torch.Tensor, action: torch.Tensor, rows: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Row index of each query's nearest dataset key, as a long tensor on the actions' device. `rows`, the
        dataset row each query's state comes from (-1: none), lets the state neighbours answer (same answer)."""
        if self.process is not None:
            if self.inline:
                return self._local_index().nearest_index(norm_obs, action, rows)
            return self.start_search(norm_obs, action, rows).result()
        query = self._query(norm_obs, action)
        if self.on_host:
            threads = torch.get_num_threads()  # torch waits for the answer: its cores are free
            return torch.from_numpy(self._host_index(query.cpu().numpy(), self._host_rows(rows), threads)
                                    ).to(self.actions.device)
        return self._exact_index(query)

    def start_search(self, norm_obs: torch.Tensor, action: torch.Tensor, rows: torch.Tensor | None = None
                     ) -> PendingSearch:
        """Begin a host search in the search process, or else on the helper thread, and return at once;
        `.result()` gives `nearest_index`'s answer. On the helper thread, the caller's thread takes the remaining
        queries when it asks (so both cores finish them)."""
        if self.process is not None and self.inline:
            return self._local_index().start_search(norm_obs, action, rows)
        query, host_rows = self._query(norm_obs, action).cpu().numpy(), self._host_rows(rows)
        if self.process is not None:
            return self._start_in_process_and_here(query, host_rows)
        chunks = [(query[i:i + self.SPLIT_ROWS], None if host_rows is None else host_rows[i:i + self.SPLIT_ROWS])
                  for i in range(0, len(query), self.SPLIT_ROWS)]
        work = SplitWork("prdc-search", lambda chunk: self._host_index(*chunk), chunks)
        return PendingSearch(lambda: np.concatenate(work.result()), self.actions.device)

    MIN_SHARE = 32
    """The smallest share the caller takes, an eighth of a batch: a smaller one saves the caller a millisecond or two a
    search, and its copy of the index (about 6 s to build on 1M keys, once) would take tens of thousands of updates
    to pay back. On halfcheetah-medium's first 20,000 updates, whose search barely outlasts the critic steps since
    session 38 (a share of about 10), PRDC took 1.48x TD3+BC's time with the share against 1.36x without."""
    BALANCE_AFTER = 1000
    """Searches before the caller's share is balanced (`_balance`): the freshly initialised policy is far from the
    data everywhere, and only a search that stays slow is worth a second copy of the index in the caller. On
    walker2d-medium searches 500-600 still outlasted the critic steps, as halfcheetah's do, and from about 750 on
    they ended within them (session 30)."""

    def _start_in_process_and_here(self, query: np.ndarray, rows: np.ndarray | None) -> PendingSearch:
        """Send the batch but its last `caller_share` queries to the search process; those the caller searches
        itself when it asks for the answer, while the process searches the rest."""
        mine = min(self.caller_share, len(query) - 1)
        cut = len(query) - mine
        self.process.submit(query[:cut], None if rows is None else rows[:cut])
        sent = time.perf_counter()

        def answer() -> np.ndarray:
            asked = time.perf_counter()
            own, own_seconds = np.empty(0, np.int64), 0.0
            if mine:
                local = self._local_index()
                start = time.perf_counter()
                own = local._host_index(query[cut:], None if rows is None else rows[cut:], torch.get_num_threads())
                own_seconds = time.perf_counter() - start
            theirs = self.process.result()
            self._balance(len(query), mine, self.process.seconds, asked - sent, own_seconds)
            return np.concatenate([theirs, own])

        return PendingSearch(answer, self.actions.device, ready=lambda: not mine and self.process.answered())

    def _balance(self, n: int, mine: int, process_s: float, before_s: float, own_s: float) -> None:
        """Choose the caller's share of the next batches, so that both finish together.

        The caller asks for the answer `before_s` after sending the batch (PRDC: two critic steps later). The process
        searched n - mine queries in `process_s`, the caller its `mine` in `own_s`. Both finish together when
        (n - m) * p = before_s + m * p_own, p and p_own the seconds per query of each: m = (n * p - before_s) /
        (p + p_own), 0 when the process finishes within before_s alone (hopper-medium and walker2d-medium, whose
        search takes less than the two critic steps). Where the policy is far from the data (halfcheetah-medium's
        first ~25,000 updates) the caller, which would only wait, searches about half of each batch. Smoothed over
        searches; it changes the time, never the answer (each query's neighbour is exact wherever it is searched)."""
        self._searches += 1
        per_query = process_s / (n - mine)
        batch_seconds = n * per_query  # the whole batch at the process's pace (`SearchLayout`'s inline floor)
        self.batch_seconds = batch_seconds if self._searches == 1 else 0.9 * self.batch_seconds + 0.1 * batch_seconds
        if not self.share_search or self._searches <= self.BALANCE_AFTER or n < 2:
            return
        own_per_query = own_s / mine if mine else per_query
        target = (n * per_query - before_s) / max(per_query + own_per_query, 1e-12)
        # averaged before the share is clipped at 0, so that a search that seldom outlasts the critic steps
        # averages to none; a share of a few queries would not pay for the second index
        self._share_estimate = 0.95 * self._share_estimate + 0.05 * min(max(target, -n), n)
        share = min(round(self._share_estimate), n - 1)
        self.caller_share = share if share >= self.MIN_SHARE else 0

    def _local_index(self) -> NearestDatasetAction:
        """The caller's own copy of the host index (its caches read back from disk), for its share of the
        batches."""
        if self._local is None:
            norm_obs, actions, settings = self._local_args
            self._local = NearestDatasetAction(norm_obs, actions, device=torch.device("cpu"), **settings)
        return self._local

    def __call__(self, norm_obs: torch.Tensor, action: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The nearest dataset action a_j for each query (a constant: no gradient)."""
        return self.actions[self.nearest_index(norm_obs, action, rows)]
