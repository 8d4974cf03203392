"""Importance-sampling estimators: trajectory IS, per-decision IS and their self-normalised forms.

Precup, Sutton & Singh, "Eligibility Traces for Off-Policy Policy Evaluation", ICML 2000 (IS,
PDIS, weighted IS); formulas as METRICS.md B.2, with w_{0:t} = prod_{t' <= t} pi(a|s)/mu(a|s):

    is     (TIS)   V = (1/n) sum_i w^i_{0:T-1} G^i_gamma
    wis    (SNTIS) V = sum_i w^i_{0:T-1} G^i_gamma / sum_i w^i_{0:T-1}
    pdis           V = (1/n) sum_i sum_t gamma^t w^i_{0:t} r^i_t
    wpdis  (SNPDIS)V = sum_t gamma^t sum_i w^i_{0:t} r^i_t / sum_i w^i_{0:t}   (ended episodes stay in
                       the denominator with their frozen weight)
    wpdis_alive    policy_eval's variant: at each step divide by the mean weight of the episodes
                   still alive, then average the per-episode sums.

Weight stabilisation [METRICS B.2]: the per-step log-ratio is clipped to [-6, 2] (policy_eval), and
weights are kept in log space with a per-step max offset: w_{i,t} = exp(m_t) * w~_{i,t}, m_t the
largest log-weight at step t. Self-normalised estimators never need exp(m_t); the unnormalised
ones multiply it back (and may overflow to inf: then they are flagged unreliable).

Every estimator is linear in the episode counts of a resample (ratios of linear forms for the
self-normalised ones), so the episode bootstrap is a handful of matrix products: `values(counts)`
evaluates all estimators for a [B, n] count matrix at once (counts = ones: the point estimate).

Differs from the reference code: none of the formulas; policy_eval's `wpdis_alive` is kept beside
the WPDIS of the formula above because the two differ once episodes end at different times.
"""

from __future__ import annotations

import numpy as np

from offlab.evaluation.ope.episodes import Episodes, episode_bootstrap_counts, percentile_interval

LOG_RATIO_CLIP = (-6.0, 2.0)
IS_ESTIMATORS = ("is", "wis", "pdis", "wpdis", "wpdis_alive")
UNRELIABLE_ESS_FRACTION = 0.01


class ImportanceWeights:
    """Cumulative importance weights of complete episodes, in log space with a per-step offset."""

    def __init__(self, episodes: Episodes, log_ratio: np.ndarray, gamma: float,
                 clip: tuple[float, float] | None = LOG_RATIO_CLIP):
        """`log_ratio`: [n, H] log pi(a_t|s_t) - log mu(a_t|s_t) on real steps (padding is ignored)."""
        mask = episodes.mask
        lr = np.where(mask, np.asarray(log_ratio, np.float64), 0.0)
        if clip is not None:
            clipped = mask & ((lr < clip[0]) | (lr > clip[1]))
            lr = np.clip(lr, *clip)
        else:
            clipped = np.zeros_like(mask)
        self.episodes = episodes
        self.gamma = gamma
        self.mask = mask
        self.reward = episodes.reward
        self.discount = episodes.discounts(gamma)
        self.clipped_fraction = float(clipped.sum() / max(1, mask.sum()))
        self.mean_log_ratio = float(lr[mask].mean())
        self.log_w = np.cumsum(lr, axis=1)  # log w_{0:t}; frozen after an episode ends
        self.offset = self.log_w.max(axis=0)  # m_t
        self.w = np.exp(self.log_w - self.offset)  # w~_{i,t} in (0, 1]
        # w_{0:t-1}: 1 at t = 0
        self.log_w_prev = np.concatenate([np.zeros((len(lr), 1)), self.log_w[:, :-1]], axis=1)
        self.offset_prev = self.log_w_prev.max(axis=0)
        self.w_prev = np.exp(self.log_w_prev - self.offset_prev)

    @property
    def n(self) -> int:
        return self.episodes.n

    def weights(self, t: int | None = None) -> np.ndarray:
        """w_{0:t} of every episode (default: the final weight), unscaled (may overflow to inf)."""
        t = self.episodes.horizon - 1 if t is None else t
        with np.errstate(over="ignore"):
            return np.exp(self.log_w[:, t])

    def ess(self, t: int | None = None) -> float:
        """(sum w)^2 / sum w^2 of w_{0:t} (scale-free, computed from the offset weights)."""
        t = self.episodes.horizon - 1 if t is None else t
        w = self.w[:, t]
        return float(w.sum() ** 2 / (w**2).sum())

    def diagnostics(self) -> dict[str, float]:
        mid = self.episodes.horizon // 2
        ess = self.ess()
        return {"ess": ess, "ess_mid": self.ess(mid), "ess_fraction": ess / self.n, "episodes": self.n,
                "clipped_fraction": self.clipped_fraction, "mean_log_ratio": self.mean_log_ratio,
                "unreliable": bool(ess < UNRELIABLE_ESS_FRACTION * self.n)}

    def values(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """All IS estimators for each row of `counts` [B, n] (episode multiplicities): name -> [B]."""
        c = np.atleast_2d(counts)
        n = c.sum(axis=1)
        disc = self.discount
        last = self.episodes.horizon - 1
        w_final = self.w[:, last]
        g = self.episodes.returns(self.gamma)
        wr = c @ (self.w * self.reward)  # [B, H]: sum_i c_i w~_it r_it
        ws = c @ self.w  # [B, H]: sum_i c_i w~_it
        alive = c @ (self.w * self.mask)
        n_alive = c @ self.mask.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scale = np.exp(self.offset)  # exp(m_t); inf when the weights overflow
            out = {
                "is": scale[last] * (c @ (w_final * g)) / n,
                "wis": (c @ (w_final * g)) / (c @ w_final),
                "pdis": _safe_sum(scale * disc * wr) / n,
                "wpdis": _safe_sum(disc * _ratio(wr, ws)),
                # policy_eval: divide w_t by the mean weight of the episodes alive at t
                "wpdis_alive": _safe_sum(disc * _ratio(wr, _ratio(alive, n_alive))) / n,
            }
        return out

    def point(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.values(np.ones((1, self.n))).items()}

    def bootstrap(self, resamples: int, rng: np.random.Generator, chunk: int = 200) -> dict[str, np.ndarray]:
        """Episode-bootstrap replicates of every estimator: name -> [resamples]."""
        reps: dict[str, list[np.ndarray]] = {}
        for start in range(0, resamples, chunk):
            counts = episode_bootstrap_counts(self.n, min(chunk, resamples - start), rng)
            for k, v in self.values(counts).items():
                reps.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in reps.items()}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where both are 0 (a step no resampled episode reaches)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _safe_sum(x: np.ndarray) -> np.ndarray:
    """Sum over steps, counting inf * 0 terms (an overflowing offset on an all-zero step) as 0."""
    return np.where(np.isnan(x), 0.0, x).sum(axis=-1)


def importance_estimates(weights: ImportanceWeights, names: list[str], resamples: int = 2000,
                         seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Point estimate, percentile bootstrap CI and weight diagnostics for each IS estimator in `names`."""
    point = weights.point()
    reps = weights.bootstrap(resamples, np.random.default_rng(seed)) if resamples else {}
    diag = weights.diagnostics()
    out = {}
    for name in names:
        lo, hi = percentile_interval(reps[name], level) if resamples else (float("nan"), float("nan"))
        value = point[name]
        out[name] = {
            "value": value, "ci": [lo, hi],
            "ci_method": f"episode bootstrap, {resamples} resamples, percentile {int(level * 100)}%",
            **diag, "unreliable": bool(diag["unreliable"] or not np.isfinite(value)),
        }
    return out
