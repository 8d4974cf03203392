"""The episode view every trajectory estimator shares: complete episodes as padded [n, H] arrays.

METRICS.md B.0: a terminated episode is padded with an absorbing state, zero reward from then on
and its importance weight frozen at its last value; padding carries log-ratio 0, so a cumulative
sum freezes the weight by itself. Episodes cut by the end of the data (neither terminated nor
truncated on their last row) are left out of the IS/DR estimators and counted; their transitions
still train FQE and the dynamics model, and their first states are still initial states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offlab.data.schema import Dataset
from offlab.errors import DataValidationError


@dataclass(repr=False)
class Episodes:
    """Complete episodes of a dataset, padded to the longest one (H steps)."""

    rows: np.ndarray
    """[n, H] dataset row of each step, -1 on padding."""
    mask: np.ndarray
    """[n, H] True on real steps."""
    reward: np.ndarray
    """[n, H] float64 rewards, 0 on padding."""
    lengths: np.ndarray
    """[n] steps of each episode."""
    terminated: np.ndarray
    """[n] True when the episode ended in a true terminal (absorbing padding follows)."""
    episode_ids: np.ndarray
    """[n] the dataset's episode id of each row of the view."""
    n_incomplete: int
    """Episodes of the dataset left out because the data ends inside them."""

    def __repr__(self) -> str:
        return (f"Episodes(n={self.n}, horizon={self.horizon}, terminated={int(self.terminated.sum())}, "
                f"incomplete_left_out={self.n_incomplete})")

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def horizon(self) -> int:
        return self.rows.shape[1]

    def discounts(self, gamma: float) -> np.ndarray:
        return gamma ** np.arange(self.horizon, dtype=np.float64)

    def returns(self, gamma: float) -> np.ndarray:
        """Discounted return of each episode, sum_t gamma^t r_t."""
        return self.reward @ self.discounts(gamma)

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Per-row values [N] (of the whole dataset) as [n, H] float64, 0 on padding."""
        out = np.zeros(self.rows.shape, np.float64)
        out[self.mask] = np.asarray(values, np.float64)[self.rows[self.mask]]
        return out

    @property
    def valid_rows(self) -> np.ndarray:
        """Dataset rows of all real steps, in [n, H] mask order."""
        return self.rows[self.mask]


def complete_episodes(ds: Dataset) -> Episodes:
    """The complete episodes of `ds` (last row terminated or truncated) as a padded view."""
    starts, lengths = ds.episode_starts, ds.episode_lengths
    last = starts + lengths - 1
    ended = ds.terminated[last] | ds.truncated[last]
    keep = np.flatnonzero(ended)
    if not len(keep):
        raise DataValidationError(
            f"dataset '{ds.card.name}' has no complete episode (none ends terminated or truncated); "
            f"importance-sampling and DR estimators need whole episodes, use fqe or mb"
        )
    lens = lengths[keep]
    horizon = int(lens.max())
    steps = np.arange(horizon)
    mask = steps[None, :] < lens[:, None]
    rows = np.where(mask, starts[keep][:, None] + steps[None, :], -1)
    reward = np.zeros(rows.shape, np.float64)
    reward[mask] = ds.reward[rows[mask]]
    return Episodes(rows=rows, mask=mask, reward=reward, lengths=lens, terminated=ds.terminated[last[keep]],
                    episode_ids=keep, n_incomplete=int(len(starts) - len(keep)))


def initial_rows(ds: Dataset) -> np.ndarray:
    """Row of every episode's first step (all episodes: each starts from a reset state)."""
    return ds.episode_starts


def episode_bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] counts of each episode in a with-replacement resample of n episodes."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (idx + np.arange(resamples)[:, None] * n).reshape(-1)
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaNs ignored)."""
    a = (1 - level) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    return float(np.percentile(finite, a)), float(np.percentile(finite, 100 - a))
