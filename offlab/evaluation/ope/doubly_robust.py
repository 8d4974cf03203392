"""Doubly robust OPE: per-decision importance sampling with a learned critic as control variate.

Jiang & Li, "Doubly Robust Off-policy Value Evaluation for Reinforcement Learning", ICML 2016
(arXiv:1511.03722, Eq. 10); weighted DR from Thomas & Brunskill, "Data-Efficient Off-Policy Policy
Evaluation for Reinforcement Learning", ICML 2016 (arXiv:1604.00923, Eq. 12). METRICS.md B.2:

    dr   V = (1/n) sum_i sum_t gamma^t [ w^i_{0:t} r^i_t - ( w^i_{0:t} Q(s^i_t, a^i_t) - w^i_{0:t-1} V(s^i_t) ) ]
    wdr  the same with w^i_{0:t} / n replaced by w^i_{0:t} / sum_j w^j_{0:t} (and likewise for w_{0:t-1})

Q is FQE's critic and V(s) = E_{a ~ pi(s)} Q(s, a). With the true Q and deterministic dynamics the
correction terms cancel exactly and DR returns the mean of V(s_0): tests/test_ope_doubly_robust.py.
Padding after a terminal is an absorbing state with r = Q = V = 0 and a frozen weight. offlab's
default DR in summaries is `wdr` (METRICS: "offlab's default DR is this one").

The weights come from `importance.ImportanceWeights` (same clipping, same log-space offsets), and
both estimators are linear (wdr: ratios of linear forms) in episode counts, so their episode
bootstrap holds the critic fixed and costs a few matrix products.
"""

from __future__ import annotations

import numpy as np

from offlab.evaluation.ope.episodes import episode_bootstrap_counts, percentile_interval
from offlab.evaluation.ope.importance import ImportanceWeights, _ratio, _safe_sum

DR_ESTIMATORS = ("dr", "wdr")


class DoublyRobust:
    """DR and WDR for one set of weights and critic values on the same padded episodes."""

    def __init__(self, weights: ImportanceWeights, q: np.ndarray, v: np.ndarray):
        """`q`, `v`: [n, H] Q(s_t, a_t) and V(s_t) on real steps (padding is set to 0 here)."""
        mask = weights.mask
        self.weights = weights
        self.q = np.where(mask, q, 0.0)
        self.v = np.where(mask, v, 0.0)

    def values(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        c = np.atleast_2d(counts)
        n = c.sum(axis=1)
        w = self.weights
        disc = w.discount
        residual = w.reward - self.q  # r_t - Q(s_t, a_t)
        with np.errstate(over="ignore", invalid="ignore"):
            scale, scale_prev = np.exp(w.offset), np.exp(w.offset_prev)
            a = c @ (w.w * residual)  # [B, H]
            b = c @ (w.w_prev * self.v)
            dr = _safe_sum(disc * (scale * a + scale_prev * b)) / n
            wdr = _safe_sum(disc * (_ratio(a, c @ w.w) + _ratio(b, c @ w.w_prev)))
        return {"dr": dr, "wdr": wdr}

    def point(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.values(np.ones((1, self.weights.n))).items()}

    def bootstrap(self, resamples: int, rng: np.random.Generator, chunk: int = 200) -> dict[str, np.ndarray]:
        reps: dict[str, list[np.ndarray]] = {}
        for start in range(0, resamples, chunk):
            counts = episode_bootstrap_counts(self.weights.n, min(chunk, resamples - start), rng)
            for k, v in self.values(counts).items():
                reps.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in reps.items()}


def dr_estimates(dr: DoublyRobust, names: list[str], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, dict]:
    """Point estimate, episode-bootstrap CI (critic held fixed) and weight diagnostics for dr / wdr."""
    point = dr.point()
    reps = dr.bootstrap(resamples, np.random.default_rng(seed)) if resamples else {}
    diag = dr.weights.diagnostics()
    out = {}
    for name in names:
        lo, hi = percentile_interval(reps[name], level) if resamples else (float("nan"), float("nan"))
        out[name] = {"value": point[name], "ci": [lo, hi],
                     "ci_method": f"episode bootstrap, {resamples} resamples, percentile {int(level * 100)}% "
                                  f"(FQE critic held fixed)",
                     **diag, "unreliable": bool(diag["unreliable"] or not np.isfinite(point[name]))}
    return out
