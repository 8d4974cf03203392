"""Dataset quality: TQ and SACo as the paper defines them, offlab's non-saturating coverage, the diagnostics.

Schweighofer, Dinu, Radler, Hofmarcher, Patil, Bitto-Nemling, Eghbal-zadeh & Hochreiter,
"A Dataset Perspective on Offline Reinforcement Learning", CoLLAs 2022, arXiv:2111.04714:
TQ (trajectory quality, normalised mean return) and SACo (state-action coverage, unique (s, a) pairs
relative to a reference dataset). The formulas, the authors' D4RL discretisation protocol and offlab's
continuous extensions are specified in METRICS.md Part A; section names below refer to it:

- A.1 TQ: (g(D) - g_random) / (g_expert - g_random), g = mean undiscounted episode return;
- A.1 `saco_paper`: first 100k transitions, np.digitize over 5 linspace edges from the reference's
  min/max, exact set count, u(D) / u(D_ref); flagged `saturated` when unique cells >= 95% of rows;
- A.1(a) `saco_grid`: the same count on standardised (and PCA-reduced) z in [-3, 3], B = 5 bins;
- A.1(b) `saco_h`: Kozachenko-Leonenko k-NN entropy difference, exp(dH) and exp(dH / p);
- A.1(c) coverage@k (Naeem et al. 2020), cov(r) at r0 * {0.5, 1, 2, 4}, its area, out-of-support;
- A.2 the standard diagnostics, including a BC entropy proxy and a Gaussian-vs-mixture NLL gap.

Everything here is a pure function of arrays or a `Dataset` (no files, no tracking); `report.py` renders.

Differs from the reference code:
- the paper's notebook evaluates D4RL v0/v2 data; offlab applies the recipe to whatever the reference is
  (the env's medium-replay by default, else a pooled reference, METRICS.md "Which reference");
- subsamples are chosen by a seeded hash of each (s, a) row's bytes (the rows with the n smallest
  hashes): uniform without replacement like a seeded permutation, but the same rows whatever the row
  order, so every measure except the paper's "first 100k rows" is invariant to row order;
- TQ averages complete episodes (ended by terminated or truncated) when there are any, as the authors'
  code splits episodes on `terminals OR timeouts`; a trailing episode cut by the collection budget is
  counted as `incomplete` and left out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import digamma, gammaln

from offlab import paths
from offlab.data.schema import Dataset
from offlab.errors import DataValidationError, EnvError
from offlab.threads import faiss_threads, helper_thread, usable_cores

# D4RL reference returns (REF_MIN_SCORE, REF_MAX_SCORE) as the authors' notebook uses them for TQ.
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
REFERENCE_KINDS = ("replay", "medium_replay", "pooled", "dataset")


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality measures; defaults are METRICS.md Part A's."""

    paper_rows: int = 100_000
    """saco_paper: the first this-many transitions of D and of the reference (the authors' protocol)."""
    paper_edges: int = 5
    """saco_paper: np.linspace edges per dimension (5 edges = 4 equal intervals + 2 outer indices)."""
    grid_rows: int = 100_000
    """saco_grid: subsample size N_sub = min(N, N_ref, grid_rows), the same for D and the reference."""
    grid_bins: int = 5
    """saco_grid: equal bins per dimension over z in [-grid_clip, grid_clip]."""
    grid_clip: float = 3.0
    """saco_grid: standardised values are clipped to +-grid_clip before binning."""
    saturation: float = 0.95
    """A count is flagged saturated when unique cells / rows >= this, for D or for the reference."""
    entropy_rows: int = 50_000
    """saco_h: subsample size for the k-NN entropy estimate (the same for D and the reference)."""
    entropy_k: int = 5
    """saco_h: k of the Kozachenko-Leonenko estimator."""
    coverage_rows: int = 100_000
    """coverage: subsample size of the dataset and of the reference sample (the same for both)."""
    coverage_queries: int = 10_000
    """coverage: M reference points queried against the dataset (and dataset points, for out-of-support)."""
    coverage_k: int = 5
    """coverage@k: a reference point is covered when a dataset point lies within its k-th NN radius."""
    radius_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """cov(r) is reported at r = r0 * each multiple; r0 = median 1-NN spacing of the reference."""
    pca_variance: float | None = 0.95
    """Keep the fewest principal axes of the standardised reference explaining this share (None: no PCA)."""
    pca_max_dims: int = 16
    """Cap on the number of principal axes p."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Each subsampled measure is repeated over these seeds and reported as mean and std."""
    reference_cache: bool = True
    """Keep the reference-side entropies and neighbour radii on disk (OFFLAB_HOME/quality/reference), keyed by
    a digest of the reference's rows and these settings: later reports against the same reference reuse them."""
    bc: bool = True
    """Fit the BC behaviour models (entropy proxy, Gaussian-vs-mixture NLL gap)."""
    bc_rows: int = 50_000
    """BC: training transitions (uniform subsample of the training episodes)."""
    bc_heldout_rows: int = 5_000
    """BC: held-out transitions (from the held-out 10% of episodes) for NLL, entropy and responsibilities."""
    bc_components: int = 5
    """BC: mixture components of the multi-modal model."""
    bc_epochs: float = 5.0
    """BC: passes over the training rows, clipped to [bc_min_steps, bc_max_steps] Adam steps."""
    bc_min_steps: int = 200
    bc_max_steps: int = 1_000
    bc_batch: int = 256
    bc_lr: float = 1e-3
    plot_rows: int = 2_000
    """Points kept per dataset for the 2-D projection and violin plots."""


# ------------------------------------------------------------------------------ hashing, sampling

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised over uint64 (wrap-around arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _words(a: np.ndarray, n: int) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(n, -1)
    if a.dtype.itemsize not in (4, 8):
        a = a.astype(np.uint32)
    width = a.shape[1] * a.dtype.itemsize
    return a.view(np.uint64 if width % 8 == 0 else np.uint32)


def row_hashes(*arrays: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash of each row's bytes across `arrays` (equal rows, equal hash)."""
    n = len(arrays[0])
    start = ((seed + 1) * _GOLDEN) & _MASK64
    h = np.full(n, start, dtype=np.uint64)
    for a in arrays:
        w = _words(a, n)
        for j in range(w.shape[1]):
            h = _mix64(h ^ (w[:, j].astype(np.uint64) + np.uint64(_GOLDEN)))
    return h


def hash_order(x: np.ndarray, seed: int) -> np.ndarray:
    """Row indices sorted by seeded row hash: any prefix of length n is a uniform sample without
    replacement, and the same rows whatever order `x` is in."""
    h = row_hashes(x, seed=seed)
    return np.lexsort((np.arange(len(h)), h)) if len(h) else np.zeros(0, dtype=np.int64)


def count_unique_rows(cells: np.ndarray) -> int:
    """Exact number of distinct rows of a small-integer matrix."""
    if len(cells) == 0:
        return 0
    c = np.ascontiguousarray(cells)
    rows = c.view(np.dtype((np.void, c.dtype.itemsize * c.shape[1]))).reshape(-1)
    return int(len(np.unique(rows)))


# --------------------------------------------------------------------------------- the reference


def state_actions(ds: Dataset) -> np.ndarray:
    """concat(s, a) as float32, actions divided by the card's action_high when the box is not [-1, 1]."""
    obs = np.asarray(ds.obs, dtype=np.float32).reshape(len(ds), -1)
    act = np.asarray(ds.action, dtype=np.float32).reshape(len(ds), -1)
    high = ds.card.action_high
    if high is not None and not ds.card.discrete_actions and len(high) == act.shape[1]:
        high = np.asarray(high, dtype=np.float32)
        if not np.all(high == 1.0):
            act = act / np.where(np.isfinite(high) & (high > 0), high, 1.0)
    return np.concatenate([obs, act], axis=1)


@dataclass(frozen=True, repr=False)
class Reference:
    """The state-action sample that SACo and coverage are measured against (METRICS.md "Which reference")."""

    name: str
    """reference_id: a dataset name, or 'pooled:<env>' for the pooled reference."""
    kind: str
    """replay | medium_replay | pooled | dataset (a dataset the user chose)."""
    env_id: str
    obs_dim: int
    action_dim: int
    x: np.ndarray
    """[N_ref, obs_dim + action_dim] float32, actions in [-1, 1]."""
    constituents: tuple[str, ...] = ()
    """Every dataset that contributed rows (one for a plain reference)."""
    n_source_transitions: int = 0
    cache: dict = field(default_factory=dict, compare=False)
    """Memoised reference-side computations (standardiser, hash orders, entropies), keyed by settings."""

    def __repr__(self) -> str:
        return f"Reference('{self.name}', kind={self.kind}, env={self.env_id}, x={list(self.x.shape)})"

    def __len__(self) -> int:
        return len(self.x)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "kind": self.kind,
            "env_id": self.env_id,
            "constituents": list(self.constituents),
            "n_transitions": len(self.x),
            "n_source_transitions": self.n_source_transitions or len(self.x),
        }


def reference_from_dataset(ds: Dataset, kind: str | None = None) -> Reference:
    """A whole dataset as the reference. `kind` defaults from its name and card (medium-replay, replay)."""
    if len(ds) == 0:
        raise DataValidationError(f"reference dataset '{ds.card.name}' has no transitions; choose another --reference")
    if kind is None:
        bp = ds.card.behavior_policy or {}
        if ds.card.name.endswith("medium-replay"):
            kind = "medium_replay"
        elif bp.get("kind") == "replay" or ds.card.source.get("kind") == "replay":
            kind = "replay"
        else:
            kind = "dataset"
    return Reference(
        name=ds.card.name, kind=kind, env_id=ds.card.env_id, obs_dim=int(ds.obs.shape[1]),
        action_dim=int(ds.action.shape[1]) if ds.action.ndim == 2 else 1, x=state_actions(ds),
        constituents=(ds.card.name,), n_source_transitions=len(ds),
    )


def pooled_reference(datasets: list[Dataset], rows: int = 100_000, seed: int = 0) -> Reference:
    """The union of same-env datasets, each contributing an equal number of rows (METRICS.md A.1, 3.)."""
    datasets = [d for d in datasets if len(d)]
    if not datasets:
        raise DataValidationError("a pooled reference needs at least one non-empty dataset of the env")
    first = datasets[0]
    for d in datasets[1:]:
        check_compatible(d, first.card.env_id, first.obs.shape[1], state_actions(first).shape[1], "pooled reference")
    each = max(1, min(min(len(d) for d in datasets), rows // len(datasets)))
    parts = []
    for d in datasets:
        x = state_actions(d)
        parts.append(x[np.sort(hash_order(x, seed)[:each])])
    names = tuple(sorted(d.card.name for d in datasets))
    return Reference(
        name=f"pooled:{first.card.env_id}", kind="pooled", env_id=first.card.env_id,
        obs_dim=int(first.obs.shape[1]), action_dim=state_actions(first).shape[1] - int(first.obs.shape[1]),
        x=np.concatenate(parts), constituents=names, n_source_transitions=sum(len(d) for d in datasets),
    )


def check_compatible(ds: Dataset, env_id: str, obs_dim: int, width: int, what: str) -> None:
    """Raise EnvError when `ds` is from another env or has other state/action widths than `what`."""
    name = ds.card.name
    if ds.card.env_id != env_id:
        raise EnvError(
            f"dataset '{name}' is from {ds.card.env_id} but the {what} is from {env_id}; "
            f"compare datasets of the same env (e.g. pass a --reference logged in {ds.card.env_id})"
        )
    ds_width = int(ds.obs.shape[1]) + (int(ds.action.shape[1]) if ds.action.ndim == 2 else 1)
    if int(ds.obs.shape[1]) != obs_dim or ds_width != width:
        raise EnvError(
            f"dataset '{name}' has (state, action) widths ({ds.obs.shape[1]}, {ds_width - ds.obs.shape[1]}) but "
            f"the {what} has ({obs_dim}, {width - obs_dim}); pick a reference with the same spaces"
        )


def check_reference(ds: Dataset, ref: Reference) -> None:
    """Raise a one-line EnvError when `ref` cannot serve as the reference of `ds`."""
    check_compatible(ds, ref.env_id, ref.obs_dim, ref.obs_dim + ref.action_dim, f"reference '{ref.name}'")


def require_rows(ds: Dataset) -> None:
    if len(ds) == 0:
        raise DataValidationError(
            f"dataset '{ds.card.name}' has no transitions; a quality report needs at least one episode"
        )


# -------------------------------------------------------------------------------------------- TQ


def env_family(env_id: str) -> str:
    """'Hopper-v5' -> 'hopper'."""
    return env_id.split("/")[-1].split("-v")[0].lower()


def reference_scores(card) -> tuple[float, float, str] | None:
    """(random return, expert return, where from): the card's D4RL ref scores, else the D4RL table."""
    if card.ref_min_score is not None and card.ref_max_score is not None:
        return float(card.ref_min_score), float(card.ref_max_score), "dataset card (ref_min_score, ref_max_score)"
    fam = env_family(card.env_id)
    if fam in D4RL_REFERENCE_SCORES:
        lo, hi = D4RL_REFERENCE_SCORES[fam]
        return lo, hi, f"D4RL reference scores for {fam}"
    return None


def complete_episodes(ds: Dataset) -> np.ndarray:
    """Boolean per episode: it ends in terminated or truncated."""
    ends = ds.episode_starts[1:] - 1 if ds.n_episodes > 1 else np.zeros(0, dtype=np.int64)
    last = np.r_[ends, len(ds) - 1].astype(np.int64)
    return ds.terminated[last] | ds.truncated[last]


def tq_returns(ds: Dataset) -> np.ndarray:
    """The episode returns TQ averages: complete episodes when there are any, else all."""
    returns = ds.episode_returns()
    done = complete_episodes(ds)
    return returns[done] if done.any() else returns


def trajectory_quality(mean_return: float, random_return: float, expert_return: float) -> float:
    """TQ = (g(D) - g(D_random)) / (g(D_expert) - g(D_random)); can leave [0, 1]."""
    if expert_return == random_return:
        raise DataValidationError(
            f"TQ needs different random and expert reference returns, got {random_return} for both"
        )
    return float((mean_return - random_return) / (expert_return - random_return))


# ------------------------------------------------------------------------------------- SACo counts


def paper_cells(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, edges: int = 5) -> np.ndarray:
    """np.digitize of every dimension over np.linspace(lo_j, hi_j, edges), as the authors' notebook."""
    cells = np.empty(x.shape, dtype=np.int8)
    for j in range(x.shape[1]):
        cells[:, j] = np.digitize(x[:, j], np.linspace(lo[j], hi[j], num=edges))
    return cells


def saco_paper(x: np.ndarray, ref_x: np.ndarray, rows: int = 100_000, edges: int = 5,
               saturation: float = 0.95) -> dict[str, Any]:
    """SACo by the authors' D4RL protocol: first `rows` transitions, reference min/max, exact count."""
    lo, hi = ref_x.min(axis=0), ref_x.max(axis=0)
    xd, xr = x[:rows], ref_x[:rows]
    u = count_unique_rows(paper_cells(xd, lo, hi, edges))
    u_ref = count_unique_rows(paper_cells(xr, lo, hi, edges))
    occ, occ_ref = u / max(len(xd), 1), u_ref / max(len(xr), 1)
    return {
        "saco": u / u_ref,
        "unique": u,
        "unique_ref": u_ref,
        "rows": len(xd),
        "rows_ref": len(xr),
        "occupancy": occ,
        "occupancy_ref": occ_ref,
        "saturated": bool(occ >= saturation or occ_ref >= saturation),
        "log10_cells_available": x.shape[1] * math.log10(edges + 1),
    }


def grid_cells(z: np.ndarray, bins: int = 5, clip: float = 3.0) -> np.ndarray:
    """Cell id floor((z + clip) / (2 clip) * bins) per dimension, clipped to [0, bins - 1]."""
    c = np.floor((np.clip(z, -clip, clip) + clip) / (2 * clip) * bins)
    return np.clip(c, 0, bins - 1).astype(np.int8)


# ------------------------------------------------------------------------ standardised (s, a) space


@dataclass(frozen=True, repr=False)
class StateActionSpace:
    """z = (x - mean_ref) / (std_ref + 1e-8) over the kept dims, then the reference's principal axes."""

    mean: np.ndarray
    std: np.ndarray
    keep: np.ndarray
    """Dims whose reference std >= 1e-6 (the others are dropped)."""
    axes: np.ndarray | None
    """[p, d_kept] principal axes (rows), or None when PCA is off."""
    center: np.ndarray
    explained: float
    """Share of the reference's standardised variance the kept axes explain."""
    plane: np.ndarray
    """[2, d_kept] the top two principal axes, for the 2-D projection plot."""

    def __repr__(self) -> str:
        return f"StateActionSpace(d={len(self.mean)}, kept={int(self.keep.sum())}, p={self.p})"

    @property
    def p(self) -> int:
        return int(self.keep.sum()) if self.axes is None else int(self.axes.shape[0])

    def standardise(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / (self.std + 1e-8)
        return z[:, self.keep]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = self.standardise(x)
        return z if self.axes is None else (z - self.center) @ self.axes.T

    def project2d(self, x: np.ndarray) -> np.ndarray:
        return (self.standardise(x) - self.center) @ self.plane.T


def fit_space(ref_x: np.ndarray, variance: float | None = 0.95, max_dims: int = 16,
              fit_rows: int = 100_000) -> StateActionSpace:
    """Reference statistics (all rows) and principal axes (fit on a seeded sample of up to fit_rows)."""
    from sklearn.decomposition import PCA

    mean = ref_x.mean(axis=0, dtype=np.float64)
    std = ref_x.std(axis=0, dtype=np.float64)
    keep = std >= 1e-6
    if not keep.any():
        raise DataValidationError("the reference's states and actions are all constant; choose another reference")
    sample = ref_x[np.sort(hash_order(ref_x, seed=0)[:fit_rows])]
    z = ((sample.astype(np.float64) - mean) / (std + 1e-8))[:, keep]
    n_comp = min(z.shape[1], max(len(z) - 1, 1))
    pca = PCA(n_components=n_comp, svd_solver="full").fit(z)
    ratio = np.cumsum(pca.explained_variance_ratio_)
    center = pca.mean_
    plane = pca.components_[:2] if n_comp >= 2 else np.eye(z.shape[1])[:2]
    if plane.shape[0] < 2:  # a 1-D space: plot the axis against zero
        plane = np.vstack([plane, np.zeros((2 - plane.shape[0], z.shape[1]))])
    if variance is None:
        return StateActionSpace(mean, std, keep, None, center, 1.0, plane)
    p = int(min(np.searchsorted(ratio, variance - 1e-12) + 1, max_dims, n_comp))
    return StateActionSpace(mean, std, keep, pca.components_[:p].copy(), center, float(ratio[p - 1]), plane)


# ------------------------------------------------------------------------------- nearest neighbours


class NeighbourIndex:
    """Exact Euclidean k-NN over a fixed point set: scipy's cKDTree for p <= 15, an exact flat (brute-force)
    faiss index above, where KD-trees lose their advantage (METRICS.md budget).

    Differs from METRICS.md's budget: the brute-force search is faiss's `IndexFlatL2` instead of
    scikit-learn's `NearestNeighbors(algorithm="brute")`. Both are exact; faiss's float32 GEMM plus top-k
    runs a 50k-point self-query in 16-d 2.2-2.5x faster on this 2-core CPU (benchmarks/quality.md), the
    largest part of a 1M-transition report at p = 16. Its float32 distances are refined: it returns
    two spare candidates per query, whose distances are recomputed in float64 and re-sorted, so the
    numbers do not depend on float32 rounding (and match the KD-tree's to float64 precision).
    """

    SPARE = 2
    """Extra candidates per query taken from the float32 search before the float64 re-ranking."""

    def __init__(self, points: np.ndarray, brute_above: int = 15):
        self.points = points
        self.brute = points.shape[1] > brute_above
        if self.brute:
            import faiss

            self.index = faiss.IndexFlatL2(points.shape[1])
            self.index.add(np.ascontiguousarray(points, dtype=np.float32))
        else:
            from scipy.spatial import cKDTree

            self.tree = cKDTree(points, leafsize=40)

    def _brute_query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # all cores for the search, then torch's own thread count back (a training run that logged its
        # dataset's quality goes on with the threads it asked for)
        with faiss_threads(usable_cores()):
            c = min(k + self.SPARE, len(self.points))
            _, cand = self.index.search(np.ascontiguousarray(q, dtype=np.float32), c)
        d = np.sqrt(((self.points[cand].astype(np.float64) - q[:, None, :].astype(np.float64)) ** 2).sum(-1))
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)

    def query(self, q: np.ndarray, k: int, upper_bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices [m, k] of the k nearest indexed points to each query row.

        With `upper_bound`, neighbours farther than it come back as distance inf (index len(points)):
        the KD-tree then stops early on queries far from every point.
        """
        k = min(k, len(self.points))
        if self.brute:
            d, i = self._brute_query(q, k)
            if upper_bound is not None:
                far = d > upper_bound
                d[far], i[far] = np.inf, len(self.points)
            return d, i
        bound = np.inf if upper_bound is None else float(upper_bound)
        d, i = self.tree.query(q, k=k, workers=usable_cores(), distance_upper_bound=bound)
        return d.reshape(len(q), k), i.reshape(len(q), k)

    def kth_other(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Distance from indexed points `rows` to their k-th nearest *other* indexed point."""
        d, _ = self.query(self.points[rows], k + 1)
        return d[:, min(k, d.shape[1] - 1)]


def unit_ball_log_volume(p: int) -> float:
    """log c_p, c_p = pi^(p/2) / Gamma(p/2 + 1)."""
    return 0.5 * p * math.log(math.pi) - float(gammaln(0.5 * p + 1))


def kl_entropy(z: np.ndarray, k: int = 5) -> tuple[float, int]:
    """Kozachenko-Leonenko differential entropy (nats) of the rows of z, and the exact duplicates removed.

    H = psi(N) - psi(k) + log c_p + (p / N) sum_i log eps_i,k, eps floored at 1e-10.
    """
    u = np.unique(z, axis=0)
    dups = len(z) - len(u)
    n, p = u.shape
    if n <= k:
        raise DataValidationError(f"the k-NN entropy needs more than k={k} distinct (s, a) points, got {n}")
    idx = NeighbourIndex(u)
    eps = np.maximum(idx.kth_other(np.arange(n), k), 1e-10)
    h = float(digamma(n) - digamma(k) + unit_ball_log_volume(p) + p * np.mean(np.log(eps)))
    return h, dups


def coverage_curve(nn_dist: np.ndarray, r0: float, r_max_multiple: float = 4.0, n: int = 81
                   ) -> tuple[np.ndarray, np.ndarray]:
    """cov(r) on a grid r in [0, r_max_multiple * r0], r in units of r0."""
    r = np.linspace(0.0, r_max_multiple, n)
    s = np.sort(nn_dist / r0)
    return r, np.searchsorted(s, r, side="right") / max(len(s), 1)


# ----------------------------------------------------------------------------- coverage measures


def _ref_cached(ref: Reference, key: tuple, make):
    if key not in ref.cache:
        ref.cache[key] = make()
    return ref.cache[key]


REFERENCE_CACHE_VERSION = 1
"""Part of every on-disk reference key: raise it when a cached computation changes, so old files are not read."""


def _ref_persisted(ref: Reference, key: tuple, make, enabled: bool = True):
    """`_ref_cached`, and also on disk: a tuple of numbers and arrays, stored under a digest of the reference's
    rows and `key` (which must name every setting the value depends on). The value read back is bit-identical."""
    if key in ref.cache or not enabled:
        return _ref_cached(ref, key, make)
    from offlab import paths

    if "_digest" not in ref.cache:
        ref.cache["_digest"] = paths.digest(ref.x)
    value, reused = paths.cached_arrays("quality/reference",
                                        [REFERENCE_CACHE_VERSION, ref.cache["_digest"], list(ref.x.shape), *key], make)
    if reused:
        ref.cache.setdefault("_reused", set()).add(key[0])
    ref.cache[key] = value
    return value


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and std over seeds (std exactly 0 when every seed gave the same value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std()) if np.ptp(a) > 0 else 0.0


def coverage_measures(x: np.ndarray, ref: Reference, cfg: QualityConfig = QualityConfig()
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """saco_paper, saco_grid, saco_h and coverage of the rows x = concat(s, a) against `ref`.

    Returns (numbers, arrays): nested dicts of scalars for the report, and arrays for its plots.
    """
    if len(x) == 0 or len(ref.x) == 0:
        raise DataValidationError("coverage measures need a non-empty dataset and reference")
    out: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}

    t = time.perf_counter()
    out["saco_paper"] = saco_paper(x, ref.x, cfg.paper_rows, cfg.paper_edges, cfg.saturation)
    timing["saco_paper"] = time.perf_counter() - t

    t = time.perf_counter()
    space = _ref_cached(ref, ("space", cfg.pca_variance, cfg.pca_max_dims),
                        lambda: fit_space(ref.x, cfg.pca_variance, cfg.pca_max_dims, cfg.coverage_rows))
    p = space.p
    n, n_ref = len(x), len(ref.x)
    n_grid = min(n, n_ref, cfg.grid_rows)
    n_ent = min(n, n_ref, cfg.entropy_rows)
    n_cov = min(n, n_ref, cfg.coverage_rows)
    n_max = max(n_grid, n_ent, n_cov)
    m = min(cfg.coverage_queries, n_cov)
    k_cov = min(cfg.coverage_k, max(n_cov - 1, 1))
    space_key = (cfg.pca_variance, cfg.pca_max_dims, cfg.coverage_rows)  # what the space depends on, for disk keys
    timing["space"] = time.perf_counter() - t

    per_seed: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        per_seed.setdefault(key, []).append(float(value))

    for s_i, seed in enumerate(cfg.seeds):
        t = time.perf_counter()
        order = hash_order(x, seed)[:n_max]
        z = space(x[order])
        zr = _ref_cached(ref, ("z", id(space), n_max, seed), lambda seed=seed: space(ref.x[hash_order(ref.x, seed)[:n_max]]))
        timing["sample"] = timing.get("sample", 0.0) + time.perf_counter() - t

        # (a) grid count on the same N_sub
        t = time.perf_counter()
        u = count_unique_rows(grid_cells(z[:n_grid], cfg.grid_bins, cfg.grid_clip))
        u_ref = _ref_cached(ref, ("grid", id(space), n_grid, seed, cfg.grid_bins, cfg.grid_clip),
                            lambda zr=zr: count_unique_rows(grid_cells(zr[:n_grid], cfg.grid_bins, cfg.grid_clip)))
        add("grid_saco", u / u_ref)
        add("grid_unique", u)
        add("grid_unique_ref", u_ref)
        timing["saco_grid"] = timing.get("saco_grid", 0.0) + time.perf_counter() - t

        # (b) k-NN entropy difference
        t = time.perf_counter()
        h, dups = kl_entropy(z[:n_ent], cfg.entropy_k)
        h_ref, dups_ref = _ref_persisted(ref, ("entropy", *space_key, n_ent, seed, cfg.entropy_k),
                                         lambda zr=zr: kl_entropy(zr[:n_ent], cfg.entropy_k), cfg.reference_cache)
        add("h", h)
        add("h_ref", h_ref)
        add("delta_h", h - h_ref)
        add("saco_h", math.exp(min(h - h_ref, 700.0)))
        add("saco_h_pd", math.exp((h - h_ref) / p))
        add("duplicates_removed", dups)
        add("duplicates_removed_ref", dups_ref)
        timing["saco_h"] = timing.get("saco_h", 0.0) + time.perf_counter() - t

        # (c) coverage of the reference by the dataset, and the dataset's out-of-support share
        t = time.perf_counter()
        y = zr[:n_cov]
        ref_index = _ref_cached(ref, ("index", id(space), n_cov, seed), lambda y=y: NeighbourIndex(y))
        r_k, r_1 = _ref_persisted(ref, ("radii", *space_key, n_cov, seed, m, k_cov),
                                  lambda y=y, ref_index=ref_index: _reference_radii(ref_index, m, k_cov),
                                  cfg.reference_cache)
        r0 = float(np.median(r_1))
        data_index = NeighbourIndex(z[:n_cov])
        # every number below only needs d_NN up to max(4 r0, R_k(y)): bound the search, then finish the
        # few queries whose own R_k lies beyond the bound exactly
        bound = 4.0 * r0 if r0 > 0 else None
        d_nn = data_index.query(y[:m], 1, upper_bound=bound)[0][:, 0]
        open_ = ~np.isfinite(d_nn) & (r_k > (bound or 0.0))
        if open_.any():
            d_nn[open_] = data_index.query(y[:m][open_], 1)[0][:, 0]
        add("coverage_at_k", np.mean(d_nn <= r_k))
        add("r0", r0)
        for mult in cfg.radius_multiples:
            add(f"cov_r{mult:g}", np.mean(d_nn <= mult * r0))
        add("cov_auc", np.mean(np.clip(1.0 - d_nn / (4.0 * r0), 0.0, 1.0)) if r0 > 0 else 1.0)
        d_out, j_ref = ref_index.query(z[:m], 1)
        j_ref = j_ref[:, 0]
        uniq, inv = np.unique(j_ref, return_inverse=True)
        r_k_match = ref_index.kth_other(uniq, k_cov)[inv]
        add("out_of_support", np.mean(d_out[:, 0] > r_k_match))
        timing["coverage"] = timing.get("coverage", 0.0) + time.perf_counter() - t

        if s_i == 0:
            arrays["cov_curve_r"], arrays["cov_curve"] = coverage_curve(d_nn, r0) if r0 > 0 else (
                np.zeros(1), np.ones(1))
            arrays["data_to_ref_distance"] = d_out[:, 0] / r0 if r0 > 0 else d_out[:, 0]
            arrays["ref_to_data_distance"] = np.minimum(d_nn / r0, 4.0) if r0 > 0 else d_nn  # beyond 4 r0 at 4
            pr = min(cfg.plot_rows, n_cov)
            arrays["proj_data"] = space.project2d(x[order[:pr]])
            arrays["proj_ref"] = space.project2d(ref.x[hash_order(ref.x, seed)[:pr]])

    st = {k: _stats(v) for k, v in per_seed.items()}
    sat = cfg.saturation
    occ, occ_ref = st["grid_unique"][0] / n_grid, st["grid_unique_ref"][0] / n_grid
    out["saco_grid"] = {
        "saco": st["grid_saco"][0], "saco_std": st["grid_saco"][1],
        "unique": st["grid_unique"][0], "unique_ref": st["grid_unique_ref"][0],
        "rows": n_grid, "occupancy": occ, "occupancy_ref": occ_ref,
        "saturated": bool(occ >= sat or occ_ref >= sat),
        "bins": cfg.grid_bins, "log10_cells_available": p * math.log10(cfg.grid_bins),
    }
    out["saco_h"] = {
        "saco_h": st["saco_h"][0], "saco_h_std": st["saco_h"][1],
        "saco_h_pd": st["saco_h_pd"][0], "saco_h_pd_std": st["saco_h_pd"][1],
        "delta_h": st["delta_h"][0], "delta_h_std": st["delta_h"][1],
        "h": st["h"][0], "h_ref": st["h_ref"][0], "k": cfg.entropy_k, "rows": n_ent,
        "duplicates_removed": st["duplicates_removed"][0], "duplicates_removed_ref": st["duplicates_removed_ref"][0],
    }
    cov = {"coverage_at_k": st["coverage_at_k"][0], "coverage_at_k_std": st["coverage_at_k"][1], "k": k_cov,
           "rows": n_cov, "queries": m, "r0": st["r0"][0]}
    for mult in cfg.radius_multiples:
        cov[f"cov_r{mult:g}"], cov[f"cov_r{mult:g}_std"] = st[f"cov_r{mult:g}"]
    cov["cov_auc"], cov["cov_auc_std"] = st["cov_auc"]
    cov["out_of_support"], cov["out_of_support_std"] = st["out_of_support"]
    out["coverage"] = cov
    out["space"] = {
        "d": int(x.shape[1]), "dims_dropped": int((~space.keep).sum()), "p": p,
        "pca": cfg.pca_variance is not None, "pca_explained": space.explained,
        "neighbours": "faiss exact flat index (float32, re-ranked in float64)" if p > 15 else "scipy cKDTree",
        "seeds": list(cfg.seeds),
        "reference_cache": ("off" if not cfg.reference_cache else
                            "reused from disk" if ref.cache.get("_reused") else "computed and stored"),
    }
    out["_timing"] = timing
    return out, arrays


def _reference_radii(index: NeighbourIndex, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """R_k and R_1 of the first m points of the reference sample in `index` (excluding themselves)."""
    d, _ = index.query(index.points[:m], k + 1)
    return d[:, min(k, d.shape[1] - 1)], d[:, min(1, d.shape[1] - 1)]


# -------------------------------------------------------------------------------- diagnostics (A.2)


def episode_stats(ds: Dataset, max_episode_steps: int | None = None) -> dict[str, Any]:
    """Counts, episode lengths, and how episodes end (terminated, truncated, incomplete)."""
    lengths = ds.episode_lengths
    starts = ds.episode_starts
    last = np.r_[starts[1:] - 1, len(ds) - 1].astype(np.int64)
    term, trunc = ds.terminated[last], ds.truncated[last]
    out = {
        "n_episodes": int(ds.n_episodes),
        "n_transitions": int(len(ds)),
        "length_min": int(lengths.min()),
        "length_mean": float(lengths.mean()),
        "length_median": float(np.median(lengths)),
        "length_max": int(lengths.max()),
        "max_episode_steps": max_episode_steps,
        "frac_terminated": float(term.mean()),
        "frac_truncated": float((trunc & ~term).mean()),
        "frac_incomplete": float((~term & ~trunc).mean()),
    }
    out["frac_max_length"] = float((lengths == max_episode_steps).mean()) if max_episode_steps else None
    return out


def bimodality_coefficient(values: np.ndarray) -> float | None:
    """Sarle's bimodality coefficient (skew^2 + 1) / (excess kurtosis + 3 (n-1)^2 / ((n-2)(n-3)));
    above 5/9 ~ 0.555 hints at two modes."""
    from scipy.stats import kurtosis, skew

    n = len(values)
    if n < 4 or np.std(values) == 0:
        return None
    g = float(skew(values, bias=False))
    k = float(kurtosis(values, bias=False))
    return (g * g + 1.0) / (k + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def return_stats(ds: Dataset, scores: tuple[float, float, str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TQ section, return section): TQ from the reference scores, and the return distribution."""
    returns = tq_returns(ds)
    g = float(returns.mean())
    q = np.percentile(returns, [5, 25, 50, 75, 95])
    ret = {
        "episodes_used": int(len(returns)),
        "mean": g, "std": float(returns.std()), "min": float(returns.min()),
        "p5": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
        "max": float(returns.max()),
        "cv": float(returns.std() / abs(g)) if g != 0 else None,
        "bimodality": bimodality_coefficient(returns),
    }
    tq: dict[str, Any] = {"g": g, "episodes_used": int(len(returns))}
    if scores is None:
        tq.update(tq=None, random_return=None, expert_return=None,
                  scores_from="none: the card has no ref_min_score/ref_max_score and the env has no D4RL scores")
        ret["normalized_mean"] = None
    else:
        lo, hi, where = scores
        tq.update(tq=trajectory_quality(g, lo, hi), random_return=lo, expert_return=hi, scores_from=where)
        ret["normalized_mean"] = 100.0 * (g - lo) / (hi - lo)
        ret["normalized_std"] = 100.0 * float(returns.std()) / (hi - lo)
    return tq, ret


def action_stats(ds: Dataset, threshold: float = 0.99) -> dict[str, Any]:
    """Per-dim saturation |a| >= 0.99, overall saturation, out-of-bounds count, moments (actions in [-1, 1])."""
    a = state_actions(ds)[:, ds.obs.shape[1]:].astype(np.float64)
    sat = np.abs(a) >= threshold
    return {
        "saturation": sat.mean(axis=0).tolist(),
        "saturation_any": float(sat.any(axis=1).mean()),
        "saturation_mean": float(sat.mean()),
        "out_of_bounds": int((np.abs(a) > 1.0 + 1e-6).any(axis=1).sum()),
        "mean": a.mean(axis=0).tolist(), "std": a.std(axis=0).tolist(),
        "min": a.min(axis=0).tolist(), "max": a.max(axis=0).tolist(),
    }


def state_stats(ds: Dataset) -> dict[str, Any]:
    """Per-dim moments, constant dims (std < 1e-8) and the share of |z| > 10 values."""
    s = np.asarray(ds.obs, dtype=np.float64)
    mean, std = s.mean(axis=0), s.std(axis=0)
    constant = std < 1e-8
    z = np.abs(s - mean) / np.where(constant, 1.0, std)
    z[:, constant] = 0.0
    return {
        "mean": mean.tolist(), "std": std.tolist(), "min": s.min(axis=0).tolist(), "max": s.max(axis=0).tolist(),
        "constant_dims": np.flatnonzero(constant).tolist(),
        "outlier_rate": float((z > 10).mean()),
    }


def reward_stats(ds: Dataset) -> dict[str, Any]:
    r = np.asarray(ds.reward, dtype=np.float64)
    return {"mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()), "max": float(r.max()),
            "frac_zero": float((r == 0).mean())}


def duplicate_stats(ds: Dataset) -> dict[str, Any]:
    """Transitions whose (s, a, r, s') bytes repeat an earlier one, and repeated whole episodes (64-bit hashes)."""
    h = row_hashes(ds.obs, ds.action, ds.reward, ds.next_obs)
    n_unique = len(np.unique(h))
    # an order-sensitive episode hash: wrapping sum of row hashes mixed with their step index and length
    salted = _mix64(h ^ (np.asarray(ds.step, dtype=np.uint64) * np.uint64(_GOLDEN)))
    ep_hash = _mix64(np.add.reduceat(salted, ds.episode_starts) ^ ds.episode_lengths.astype(np.uint64))
    return {
        "frac_duplicate_transitions": float((len(h) - n_unique) / len(h)),
        "duplicate_transitions": int(len(h) - n_unique),
        "duplicate_episodes": int(len(ep_hash) - len(np.unique(ep_hash))),
    }


def nonfinite_counts(ds: Dataset) -> dict[str, int]:
    """NaN/inf count per field; any non-zero count fails the report."""
    out = {}
    for c in ("obs", "action", "reward", "next_obs"):
        a = getattr(ds, c)
        out[c] = int((~np.isfinite(a)).sum()) if np.issubdtype(a.dtype, np.floating) else 0
    return out


def discontinuities(ds: Dataset, tol: float = 1e-6) -> dict[str, Any]:
    """Episodes where some next_obs[t] differs from obs[t+1] by more than tol (infinity norm)."""
    n = len(ds)
    if n < 2:
        return {"count": 0, "episodes": []}
    same = ds.episode[1:] == ds.episode[:-1]
    gap = np.abs(np.asarray(ds.next_obs[:-1], np.float64) - np.asarray(ds.obs[1:], np.float64)).max(axis=1)
    bad_rows = np.flatnonzero(same & (gap > tol))
    eps = np.unique(ds.episode[bad_rows]).astype(int).tolist()
    return {"count": len(eps), "episodes": eps[:50]}


def source_policy_count(card) -> int | None:
    """Number of behaviour policies the card names (replay: warm-up + snapshots; mix: sum of parts)."""
    def count(bp) -> int | None:
        if not bp:
            return None
        kind = bp.get("kind")
        if kind == "replay":
            return 1 + len(bp.get("snapshots", []))
        if kind == "mix":
            parts = [count(p) or 1 for p in bp.get("parts", [])]
            return sum(parts) or None
        return 1
    return count(card.behavior_policy)


# -------------------------------------------------------------------- BC behaviour models (A.2, B.1)


def _bc_split(ds: Dataset, cfg: QualityConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row indices, split 90/10 by episode (by rows for a single episode)."""
    n_ep = ds.n_episodes
    if n_ep >= 2:
        held_eps = rng.choice(n_ep, size=max(1, int(round(0.1 * n_ep))), replace=False)
        held = np.isin(ds.episode, held_eps)
    else:
        held = np.arange(len(ds)) >= int(0.9 * len(ds))
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    if len(train) > cfg.bc_rows:
        train = np.sort(rng.choice(train, cfg.bc_rows, replace=False))
    if len(test) > cfg.bc_heldout_rows:
        test = np.sort(rng.choice(test, cfg.bc_heldout_rows, replace=False))
    return train, test


def behaviour_fit(ds: Dataset, cfg: QualityConfig = QualityConfig(), seed: int = 0
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit a tanh-Gaussian and a K-component tanh-Gaussian mixture BC policy (held-out 10% of episodes).

    Reports the entropy proxy mean_s sum_j 1/2 log(2 pi e sigma_j(s)^2) + E[sum_j log(1 - tanh(u_j)^2)]
    (16 samples), the residual action std std(a - E[a|s]), both held-out NLLs, dNLL = NLL_gauss - NLL_mdn
    and the mixture's effective component count exp(H(mean responsibilities)).
    """
    import torch

    from offlab.nets import (
        BATCHES,
        LOG_STD_MAX,
        TanhGaussianActor,
        mlp,
        stream_generator,
        tanh_gaussian_log_prob,
    )

    if len(ds) < 20 or ds.action.ndim != 2:
        return {"fitted": False, "reason": "needs at least 20 continuous-action transitions"}, {}
    rng = np.random.default_rng(seed)
    train, test = _bc_split(ds, cfg, rng)
    if len(test) == 0 or len(train) == 0:
        return {"fitted": False, "reason": "too few episodes to hold any out"}, {}
    obs = np.asarray(ds.obs, dtype=np.float32)
    act = state_actions(ds)[:, obs.shape[1]:]
    mu, sd = obs[train].mean(axis=0), obs[train].std(axis=0) + 1e-3
    s_tr = torch.from_numpy((obs[train] - mu) / sd)
    s_te = torch.from_numpy((obs[test] - mu) / sd)
    clip = 1.0 - 1e-6
    a_tr = torch.from_numpy(np.clip(act[train], -clip, clip))
    a_te = torch.from_numpy(np.clip(act[test], -clip, clip))
    obs_dim, act_dim, K = obs.shape[1], act.shape[1], cfg.bc_components
    steps = int(np.clip(cfg.bc_epochs * len(train) / cfg.bc_batch, cfg.bc_min_steps, cfg.bc_max_steps))
    gen = stream_generator(seed, BATCHES)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        gauss = TanhGaussianActor(obs_dim, act_dim, (256, 256), log_std_min=-5.0, log_std_max=LOG_STD_MAX)
        mixture = mlp(obs_dim, K * (1 + 2 * act_dim), (256, 256))

    def mixture_log_prob(s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = mixture(s)
        logits = out[:, :K]
        mean = out[:, K : K + K * act_dim].reshape(-1, K, act_dim)
        log_std = out[:, K + K * act_dim :].reshape(-1, K, act_dim).clamp(-5.0, LOG_STD_MAX)
        u = torch.atanh(a)[:, None, :]
        joint = torch.log_softmax(logits, dim=-1) + tanh_gaussian_log_prob(u, mean, log_std)
        return torch.logsumexp(joint, dim=-1), torch.softmax(joint, dim=-1)

    def fit(model: torch.nn.Module, log_prob) -> None:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.bc_lr)
        for _ in range(steps):
            idx = torch.randint(len(s_tr), (cfg.bc_batch,), generator=gen)
            loss = -log_prob(s_tr[idx], a_tr[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: extra threads only contend with the machine's other work
    try:
        fit(gauss, gauss.log_prob)
        fit(mixture, lambda s, a: mixture_log_prob(s, a)[0])
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        nll_gauss = float(-gauss.log_prob(s_te, a_te).mean())
        lp_mix, resp = mixture_log_prob(s_te, a_te)
        nll_mix = float(-lp_mix.mean())
        mean, log_std = gauss.distribution_params(s_te)
        std = log_std.exp()
        noise = torch.randn((16, *mean.shape), generator=gen)
        u = mean + std * noise
        log_det = 2.0 * (math.log(2.0) - u - torch.nn.functional.softplus(-2.0 * u))
        gauss_entropy = (0.5 * torch.log(2 * math.pi * math.e * std**2)).sum(-1)
        entropy = (gauss_entropy + log_det.sum(-1).mean(0)).numpy().astype(np.float64)
        mean_action = torch.tanh(u).mean(0)
        residual_std = (a_te - mean_action).std(dim=0).numpy()
        r_bar = resp.mean(0).numpy().astype(np.float64)
    r_bar = r_bar / r_bar.sum()
    eff = float(np.exp(-(r_bar * np.log(np.maximum(r_bar, 1e-300))).sum()))
    numbers = {
        "fitted": True, "steps": steps, "train_rows": int(len(train)), "heldout_rows": int(len(test)),
        "entropy_proxy": float(entropy.mean()),
        "residual_action_std": float(residual_std.mean()),
        "residual_action_std_per_dim": residual_std.astype(np.float64).tolist(),
        "nll_gauss": nll_gauss, "nll_mixture": nll_mix, "delta_nll": nll_gauss - nll_mix,
        "mixture_components": K, "effective_components": eff,
    }
    return numbers, {"bc_entropy": entropy}


# --------------------------------------------------------------------------------------- assembly


@dataclass(repr=False)
class QualityResult:
    """Every number of a quality report (nested sections of scalars and short lists) and the plot arrays."""

    numbers: dict[str, Any]
    arrays: dict[str, np.ndarray]
    problems: list[str]

    def __repr__(self) -> str:
        return f"QualityResult(sections={list(self.numbers)}, problems={len(self.problems)})"

    @property
    def ok(self) -> bool:
        return not self.problems


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def quality(ds: Dataset, reference: Reference | Dataset | None = None, cfg: QualityConfig = QualityConfig(),
            max_episode_steps: int | None = None) -> QualityResult:
    """TQ, SACo (paper protocol and offlab's measures, when a reference is given) and the diagnostics."""
    require_rows(ds)
    if isinstance(reference, Dataset):
        reference = reference_from_dataset(reference)
    if reference is not None:
        check_reference(ds, reference)
    if max_episode_steps is None:
        try:
            from offlab.envs.make import env_spaces

            max_episode_steps = env_spaces(ds.card.env_id, **ds.card.env_kwargs).max_episode_steps
        except Exception:  # an env that is not installed here: the diagnostic is left out
            max_episode_steps = None
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    numbers: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    numbers["tq"], numbers["returns"] = return_stats(ds, reference_scores(ds.card))
    numbers["episodes"] = episode_stats(ds, max_episode_steps)
    numbers["actions"] = action_stats(ds)
    numbers["states"] = state_stats(ds)
    numbers["rewards"] = reward_stats(ds)
    numbers["duplicates"] = duplicate_stats(ds)
    numbers["nonfinite"] = nonfinite_counts(ds)
    numbers["discontinuities"] = discontinuities(ds)
    numbers["policies"] = {"source_policies": source_policy_count(ds.card)}
    timing["diagnostics"] = time.perf_counter() - t0
    # The BC models (one torch thread) train on a helper thread while the neighbour searches run: the two
    # share no state, so the numbers are those of running them one after the other, in less wall time.
    bc_job = helper_thread("quality-bc").submit(_timed, behaviour_fit, ds, cfg) if cfg.bc else None
    if reference is not None:
        cov, cov_arrays = coverage_measures(state_actions(ds), reference, cfg)
        timing.update(cov.pop("_timing"))
        numbers.update(cov)
        numbers["reference"] = reference.describe()
        arrays.update(cov_arrays)
        headline = "saco_h" if (numbers["saco_grid"]["saturated"] or numbers["saco_paper"]["saturated"]) else "saco_grid"
        numbers["headline"] = headline
    if bc_job is not None:
        (numbers["behaviour"], bc_arrays), timing["behaviour"] = bc_job.result()
        arrays.update(bc_arrays)
    numbers["timing"] = timing
    problems = []
    bad = {k: v for k, v in numbers["nonfinite"].items() if v}
    if bad:
        problems.append("NaN/inf values: " + ", ".join(f"{k}={v}" for k, v in bad.items()))
    if numbers["actions"]["out_of_bounds"]:
        problems.append(f"{numbers['actions']['out_of_bounds']} transitions have actions outside the action box")
    if numbers["discontinuities"]["count"]:
        problems.append(f"{numbers['discontinuities']['count']} episodes have next_obs[t] != obs[t+1]")
    numbers["ok"] = not problems
    numbers["problems"] = problems
    return QualityResult(numbers, arrays, problems)


def flatten_metrics(numbers: dict[str, Any], prefix: str = "quality") -> dict[str, float]:
    """Scalar numbers as flat `quality/<section>/<key>` floats (booleans as 0/1; lists, None and timing left out)."""
    out: dict[str, float] = {}
    for section, values in numbers.items():
        if section in ("timing", "problems") or not isinstance(values, dict):
            continue
        for k, v in values.items():
            if isinstance(v, bool):
                out[f"{prefix}/{section}/{k}"] = float(v)
            elif isinstance(v, (int, float, np.integer, np.floating)) and v is not None and math.isfinite(float(v)):
                out[f"{prefix}/{section}/{k}"] = float(v)
    if "tq" in numbers and numbers["tq"].get("tq") is not None:
        out[f"{prefix}/tq"] = float(numbers["tq"]["tq"])
    for key, section, field_ in (("saco", "saco_paper", "saco"), ("saco_grid", "saco_grid", "saco"),
                                 ("saco_h_pd", "saco_h", "saco_h_pd"), ("coverage", "coverage", "coverage_at_k")):
        if section in numbers:
            out[f"{prefix}/{key}"] = float(numbers[section][field_])
    out[f"{prefix}/ok"] = float(bool(numbers.get("ok", True)))
    return out


def quality_metrics(ds: Dataset, reference: Reference | Dataset | None = None,
                    cfg: QualityConfig | None = None, *, coverage: bool = True) -> dict[str, float]:
    """Flat `quality/*` numbers of `ds` for MLflow; the training loop logs them on every run.

    With `reference=None` the default reference is looked up among the datasets already on disk
    (`offlab.data.report.default_reference`, never a build): the env's replay or medium-replay dataset,
    else every local dataset of the env pooled. `coverage=False` gives TQ and the diagnostics only.
    The default config leaves out the BC behaviour models (seconds of training); the report fits them.
    """
    cfg = cfg or QualityConfig(bc=False)
    if reference is None and coverage:
        from offlab.data.report import default_reference

        reference = default_reference(ds, exclude_build=True)
    if isinstance(reference, Dataset):
        reference = reference_from_dataset(reference)
    reference = reference if coverage else None

    def compute() -> tuple[np.ndarray, np.ndarray]:
        flat = flatten_metrics(quality(ds, reference, cfg).numbers)
        return np.array(list(flat), dtype=str), np.array(list(flat.values()), dtype=np.float64)

    (names, values), _ = paths.cached_arrays("quality/metrics", _metrics_key(ds, reference, cfg), compute)
    return dict(zip(names.tolist(), values.tolist(), strict=True))


def _metrics_key(ds: Dataset, reference: Reference | None, cfg: QualityConfig) -> list:
    """What `quality_metrics` depends on: this module's code, the dataset's card and rows, the reference's rows
    and the settings. Every `offlab fit` logs the numbers, and on a 1M-row dataset they take half a minute
    (the coverage's neighbour searches), so later runs on the same data read them back."""
    import dataclasses
    import json
    from pathlib import Path

    code = paths.digest(np.frombuffer(Path(__file__).read_bytes(), np.uint8))
    card = json.dumps(dataclasses.asdict(ds.card), sort_keys=True, default=str)
    ref = None if reference is None else [reference.name, reference.kind, paths.digest(reference.x)]
    return [1, code, card, ds.content_hash(), ref, dataclasses.asdict(cfg)]
