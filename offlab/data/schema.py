"""The trajectory table: one row per transition, episodes contiguous and in order, plus its card.

Columns (DESIGN.md): episode, step, obs, next_obs, action, reward, terminated, truncated, and the
optional cost and behavior_logp. `terminated` (a true terminal: no bootstrap) and `truncated`
(a time-limit cut: bootstrap from next_obs) are kept apart everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from offlab.errors import DataValidationError, EnvError

REQUIRED_COLUMNS = ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated")
OPTIONAL_COLUMNS = ("cost", "behavior_logp")
SCHEMA_VERSION = 1


@dataclass
class DatasetCard:
    """What a dataset is and where it came from; stored as card.json and as Parquet metadata."""

    name: str
    env_id: str
    obs_dim: int
    action_dim: int
    """Action width; for discrete actions, the number of actions."""
    discrete_actions: bool = False
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """gym.make keyword arguments, including max_episode_steps when it differs from the registered one."""
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    source: dict[str, Any] = field(default_factory=dict)
    """kind ('minari', 'hdf5', 'parquet', 'csv', 'built', 'collected') plus where it came from."""
    behavior_policy: dict[str, Any] | None = None
    n_episodes: int = 0
    n_steps: int = 0
    content_hash: str = ""
    offlab_version: str = ""
    schema_version: int = SCHEMA_VERSION
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetCard:
        """Parse a card; raises DataValidationError for text that is not a card."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataValidationError(f"dataset card is not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING] if isinstance(raw, dict) else ["name"]
        if missing:
            raise DataValidationError(f"dataset card lacks the fields {missing}")
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(repr=False)
class Dataset:
    """A whole trajectory table in memory as numpy columns, with its card."""

    card: DatasetCard
    episode: np.ndarray
    step: np.ndarray
    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    cost: np.ndarray | None = None
    behavior_logp: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.reward)

    def __repr__(self) -> str:
        cols = ", ".join(f"{c}={_shape(getattr(self, c))}" for c in self.columns())
        return f"Dataset('{self.card.name}', env={self.card.env_id}, episodes={self.n_episodes}, {cols})"

    def columns(self) -> list[str]:
        return [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if getattr(self, c) is not None]

    @property
    def n_episodes(self) -> int:
        return int(self.episode[-1]) + 1 if len(self.episode) else 0

    @property
    def episode_starts(self) -> np.ndarray:
        """Row index where each episode starts (length n_episodes)."""
        if not len(self.episode):
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.r_[True, self.episode[1:] != self.episode[:-1]])

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.r_[self.episode_starts, len(self.episode)])

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, in episode order."""
        return np.add.reduceat(self.reward.astype(np.float64), self.episode_starts) if len(self) else np.zeros(0)

    def content_hash(self) -> str:
        """A hash of the table's values (not of the file encoding): equal data, equal hash."""
        h = hashlib.blake2b(digest_size=16)
        for c in self.columns():
            a = np.ascontiguousarray(getattr(self, c))
            h.update(f"{c}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.data)
        return h.hexdigest()

    def with_card(self, **changes: Any) -> Dataset:
        return dataclasses.replace(self, card=dataclasses.replace(self.card, **changes))

    def select_rows(self, rows: np.ndarray) -> Dataset:
        """A new dataset from whole episodes' rows (episode ids renumbered densely from 0)."""
        cols = {c: getattr(self, c)[rows] for c in self.columns()}
        _, cols["episode"] = np.unique(cols["episode"], return_inverse=True)
        cols["episode"] = cols["episode"].astype(np.int64)
        return Dataset(card=self.card, **cols)


def _shape(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def finalize(ds: Dataset) -> Dataset:
    """Validate, then fill the card's counts, hash and version. Every writer calls this."""
    from offlab import __version__

    validate(ds)
    return ds.with_card(
        n_episodes=ds.n_episodes,
        n_steps=len(ds),
        content_hash=ds.content_hash(),
        offlab_version=__version__,
        obs_dim=int(ds.obs.shape[1]),
        action_dim=_action_dim(ds),
    )


def _action_dim(ds: Dataset) -> int:
    """The action width; for discrete actions (integer vector) the number of actions the card names."""
    if ds.action.ndim == 1:
        return int(ds.card.action_dim) if ds.card.discrete_actions else 1
    return int(ds.action.shape[1])


def validate(ds: Dataset) -> None:
    """Raise DataValidationError naming the first problem; return None when the table is sound."""
    name = ds.card.name
    n = len(ds.reward)
    if n == 0:
        raise DataValidationError(f"dataset '{name}' has no transitions; give it at least one episode")
    for c in ds.columns():
        a = getattr(ds, c)
        if len(a) != n:
            raise DataValidationError(f"dataset '{name}': column '{c}' has {len(a)} rows, expected {n}")
    if ds.obs.ndim != 2 or ds.next_obs.shape != ds.obs.shape:
        raise DataValidationError(
            f"dataset '{name}': obs {ds.obs.shape} and next_obs {ds.next_obs.shape} must both be [N, obs_dim]"
        )
    for c in ("obs", "next_obs", "action", "reward", "cost", "behavior_logp"):
        a = getattr(ds, c)
        if a is None or not np.issubdtype(a.dtype, np.floating):
            continue
        finite = np.isfinite(a)
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(n, -1).all(axis=1))[0])
            raise DataValidationError(
                f"dataset '{name}': column '{c}' has NaN or inf at episode {int(ds.episode[row])}, "
                f"step {int(ds.step[row])} (row {row}); clean or drop those transitions before importing"
            )
    ep = ds.episode
    if ep[0] != 0:
        raise DataValidationError(f"dataset '{name}': episode ids must start at 0, found {int(ep[0])}")
    d = np.diff(ep)
    if ((d != 0) & (d != 1)).any():
        row = int(np.flatnonzero((d != 0) & (d != 1))[0]) + 1
        raise DataValidationError(
            f"dataset '{name}': episodes are not contiguous and dense (episode {int(ep[row - 1])} is followed "
            f"by {int(ep[row])} at row {row}); sort rows by episode then step"
        )
    starts = ds.episode_starts
    lengths = ds.episode_lengths
    expected_step = np.arange(n) - np.repeat(starts, lengths)
    if (ds.step != expected_step).any():
        row = int(np.flatnonzero(ds.step != expected_step)[0])
        raise DataValidationError(
            f"dataset '{name}': steps out of order in episode {int(ep[row])} (row {row} has step "
            f"{int(ds.step[row])}, expected {int(expected_step[row])}); steps must run 0,1,2,... in each episode"
        )
    last = np.zeros(n, dtype=bool)
    last[starts[1:] - 1] = True
    last[-1] = True
    early_end = (ds.terminated | ds.truncated) & ~last
    if early_end.any():
        row = int(np.flatnonzero(early_end)[0])
        raise DataValidationError(
            f"dataset '{name}': episode {int(ep[row])} is terminated or truncated at step {int(ds.step[row])} "
            f"but continues; an episode must end at its terminal or time-limit step"
        )
    inner = ~last[:-1]
    # exact comparison first (cheap, and true for data logged by a simulator); tolerance only where it differs
    differs = np.flatnonzero((ds.next_obs[:-1] != ds.obs[1:]).any(axis=1) & inner)
    if len(differs):
        gap = np.abs(ds.next_obs[differs] - ds.obs[differs + 1])
        tol = 1e-5 * (1.0 + np.abs(ds.obs[differs + 1]))
        mismatch = (gap > tol).any(axis=1)
        if mismatch.any():
            row = int(differs[np.flatnonzero(mismatch)[0]])
            raise DataValidationError(
                f"dataset '{name}': next_obs[t] != obs[t+1] in episode {int(ep[row])} at step {int(ds.step[row])}; "
                f"rows of one episode must follow each other (or split the episode there)"
            )


def check_env_shapes(ds: Dataset, obs_shape: tuple[int, ...], action_dim: int, discrete: bool) -> None:
    """Raise EnvError when the table's widths do not match the env's spaces."""
    width = int(np.prod(obs_shape)) if len(obs_shape) else 1  # offlab stores observations flattened
    if ds.obs.shape[1] != width:
        raise EnvError(
            f"dataset '{ds.card.name}' has observations of width {ds.obs.shape[1]} but {ds.card.env_id} "
            f"expects {width}; pass the env the data was logged in (--env)"
        )
    if discrete:
        if ds.action.ndim != 1 or not np.issubdtype(ds.action.dtype, np.integer):
            raise EnvError(
                f"dataset '{ds.card.name}' has {ds.action.dtype} actions of shape {list(ds.action.shape[1:])} but "
                f"{ds.card.env_id} has discrete actions (integers 0..{action_dim - 1}); pass the env the data was "
                f"logged in (--env)"
            )
        bad = (ds.action < 0) | (ds.action >= action_dim)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise EnvError(
                f"dataset '{ds.card.name}' has action {int(ds.action[row])} at row {row} but {ds.card.env_id} "
                f"has {action_dim} discrete actions (0..{action_dim - 1}); pass the env the data was logged in (--env)"
            )
        return
    width = 1 if ds.action.ndim == 1 else ds.action.shape[1]
    if ds.action.ndim != 2 or width != action_dim:
        raise EnvError(
            f"dataset '{ds.card.name}' has actions of width {width} but {ds.card.env_id} expects "
            f"{action_dim}; pass the env the data was logged in (--env)"
        )


def arrow_schema(ds: Dataset) -> pa.Schema:
    obs_dim = ds.obs.shape[1]
    if ds.action.ndim == 1:
        action_type = pa.int64()
    else:
        action_type = pa.list_(pa.float32(), ds.action.shape[1])
    fields = [
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("obs", pa.list_(pa.float32(), obs_dim), nullable=False),
        pa.field("next_obs", pa.list_(pa.float32(), obs_dim), nullable=False),
        pa.field("action", action_type, nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("terminated", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    if ds.cost is not None:
        fields.append(pa.field("cost", pa.float32(), nullable=False))
    if ds.behavior_logp is not None:
        fields.append(pa.field("behavior_logp", pa.float32(), nullable=False))
    return pa.schema(fields)


def coerce_columns(
    card: DatasetCard,
    *,
    episode,
    step,
    obs,
    next_obs,
    action,
    reward,
    terminated,
    truncated,
    cost=None,
    behavior_logp=None,
) -> Dataset:
    """Build a Dataset with the schema's dtypes from array-likes (no validation: call finalize)."""
    action = np.asarray(action)
    action = action.astype(np.int64) if np.issubdtype(action.dtype, np.integer) and action.ndim == 1 else (
        action.astype(np.float32).reshape(len(action), -1)
    )
    return Dataset(
        card=card,
        episode=np.asarray(episode, dtype=np.int64),
        step=np.asarray(step, dtype=np.int32),
        obs=np.asarray(obs, dtype=np.float32).reshape(len(obs), -1),
        next_obs=np.asarray(next_obs, dtype=np.float32).reshape(len(next_obs), -1),
        action=action,
        reward=np.asarray(reward, dtype=np.float32).reshape(-1),
        terminated=np.asarray(terminated, dtype=bool).reshape(-1),
        truncated=np.asarray(truncated, dtype=bool).reshape(-1),
        cost=None if cost is None else np.asarray(cost, dtype=np.float32).reshape(-1),
        behavior_logp=None if behavior_logp is None else np.asarray(behavior_logp, dtype=np.float32).reshape(-1),
    )


def episodes_from_ends(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode ids and steps for rows where `ends[i]` marks the last row of an episode."""
    n = len(ends)
    starts = np.r_[0, np.flatnonzero(ends[:-1]) + 1] if n else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.r_[starts, n])
    episode = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    step = (np.arange(n) - np.repeat(starts, lengths)).astype(np.int32)
    return episode, step
