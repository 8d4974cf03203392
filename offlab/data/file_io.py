"""Import the user's own logs: D4RL-style HDF5 files and Parquet/CSV tables.

Episode boundaries come from an `episode` column when there is one, else from `terminated` /
`truncated` (HDF5: `terminals` / `timeouts`). When `next_obs` is missing it is derived inside each
episode as `obs[t+1]`; the last transition of an episode then has no known next observation:
- if the episode ended in a true terminal, the transition is kept (the terminal signal matters and
  its next_obs is never bootstrapped) and its next_obs is a copy of obs, noted in the card;
- if the episode was cut (time limit, or the file ends mid-episode), that transition is dropped and
  the step before it becomes the episode's truncated last step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from offlab.data import store
from offlab.data.schema import Dataset, DatasetCard, check_env_shapes, coerce_columns, episodes_from_ends
from offlab.errors import DatasetExists, DataValidationError, SourceUnavailable

HDF5_REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")
TABLE_FIELDS = ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated",
                "cost", "behavior_logp")
TABLE_REQUIRED = ("obs", "action", "reward", "terminated")


@dataclass
class FlatLog:
    """Row-aligned arrays as read from a file, before episodes are made sound."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_obs: np.ndarray | None = None
    episode: np.ndarray | None = None
    step: np.ndarray | None = None
    cost: np.ndarray | None = None
    behavior_logp: np.ndarray | None = None


def import_file(
    path: str | Path,
    name: str,
    env_id: str,
    *,
    columns: dict[str, str] | None = None,
    overwrite: bool = False,
    env_kwargs: dict | None = None,
) -> Dataset:
    """Import an HDF5 (.hdf5/.h5), Parquet (.parquet/.pq) or CSV (.csv) file under `name`."""
    path = Path(path)
    store.check_name(name)
    if not path.exists():
        raise SourceUnavailable(f"file '{path}' does not exist; check the path")
    if store.exists(name) and not overwrite:
        raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it or choose another --name")
    suffix = path.suffix.lower()
    if suffix in (".hdf5", ".h5"):
        log, kind = read_hdf5(path), "hdf5"
    elif suffix in (".parquet", ".pq"):
        log, kind = read_table(path, columns or {}), "parquet"
    elif suffix == ".csv":
        log, kind = read_table(path, columns or {}), "csv"
    else:
        raise SourceUnavailable(
            f"cannot tell the format of '{path}'; use .hdf5/.h5 (D4RL), .parquet or .csv, or a Minari id"
        )
    ds = dataset_from_log(log, name, env_id, source={"kind": kind, "path": str(path.resolve())},
                          env_kwargs=env_kwargs or {})
    return store.write_dataset(ds, name, overwrite=overwrite)


def read_hdf5(path: Path) -> FlatLog:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataValidationError(f"'{path}' is not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    with f:
        missing = [k for k in HDF5_REQUIRED if k not in f]
        if missing:
            raise DataValidationError(
                f"HDF5 file '{path}' lacks required keys {missing}; D4RL files hold {list(HDF5_REQUIRED)}"
            )
        log = FlatLog(
            obs=f["observations"][:],
            action=f["actions"][:],
            reward=f["rewards"][:],
            terminated=f["terminals"][:].astype(bool),
            truncated=f["timeouts"][:].astype(bool),
            next_obs=f["next_observations"][:] if "next_observations" in f else None,
        )
        if "infos/cost" in f:
            log.cost = f["infos/cost"][:]
    _check_lengths(log, path)
    return log


def _resolve_column(names: list[str], field: str, mapping: dict[str, str]) -> list[str] | None:
    """The file's column(s) for `field`: one column, or a flattened family `<prefix>_0..k` / `<prefix>0..k`."""
    want = mapping.get(field, field)
    if want in names:
        return [want]
    pattern = re.compile(rf"^{re.escape(want)}_?(\d+)$")
    family = sorted(((int(m.group(1)), c) for c in names if (m := pattern.match(c))), key=lambda t: t[0])
    if family:
        idx = [i for i, _ in family]
        if idx != list(range(len(idx))):
            raise DataValidationError(f"columns {want}_0..{want}_{len(idx) - 1} are not numbered 0..k without gaps")
        return [c for _, c in family]
    return None


def read_table(path: Path, mapping: dict[str, str]) -> FlatLog:
    unknown = sorted(set(mapping) - set(TABLE_FIELDS))
    if unknown:
        raise DataValidationError(f"unknown field(s) {unknown} in the column mapping; fields are {list(TABLE_FIELDS)}")
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataValidationError(f"cannot read '{path}': {str(e).strip().splitlines()[0]}") from None
    names = table.column_names
    cols: dict[str, np.ndarray | None] = {}
    for field in TABLE_FIELDS:
        found = _resolve_column(names, field, mapping)
        if found is None:
            if field in TABLE_REQUIRED:
                hint = f" (map it with --column {field}=<your column>)"
                raise DataValidationError(
                    f"'{path}' lacks the required column '{mapping.get(field, field)}'{hint}; found {names[:12]}"
                )
            cols[field] = None
            continue
        arrays = [_column_numpy(table.column(c), c, path) for c in found]
        cols[field] = np.stack(arrays, axis=1) if len(found) > 1 else arrays[0]
    log = FlatLog(
        obs=cols["obs"],
        action=cols["action"],
        reward=cols["reward"],
        terminated=cols["terminated"].astype(bool),
        truncated=np.zeros(len(cols["reward"]), bool) if cols["truncated"] is None else cols["truncated"].astype(bool),
        next_obs=cols["next_obs"],
        episode=cols["episode"],
        step=cols["step"],
        cost=cols["cost"],
        behavior_logp=cols["behavior_logp"],
    )
    _check_lengths(log, path)
    return log


def _column_numpy(col: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    """A numeric column (or a list column of equal-width rows) as numpy; DataValidationError otherwise."""
    col = col.combine_chunks()
    if col.null_count:
        raise DataValidationError(f"'{path}': column '{name}' has {col.null_count} empty values; fill or drop them")
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataValidationError(
                f"'{path}': list column '{name}' has rows of different widths ({int(lengths[0])} in row 0, "
                f"{int(lengths[row])} in row {row}); every row must have the same width"
            )
        width = int(lengths[0]) if len(lengths) else 0
        values = col.flatten()
        if values.null_count or not _numeric(values.type):
            raise DataValidationError(f"'{path}': list column '{name}' must hold numbers without gaps")
        return values.to_numpy(zero_copy_only=False).reshape(len(col), width)
    if not _numeric(col.type):
        raise DataValidationError(f"'{path}': column '{name}' holds {col.type} values; it must hold numbers")
    return col.to_numpy(zero_copy_only=False)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _check_lengths(log: FlatLog, path: Path) -> None:
    n = len(log.reward)
    for k, v in log.__dict__.items():
        if v is not None and len(v) != n:
            raise DataValidationError(f"'{path}': '{k}' has {len(v)} rows but rewards have {n}")
    if n == 0:
        raise DataValidationError(f"'{path}' holds no transitions")


def dataset_from_log(log: FlatLog, name: str, env_id: str, *, source: dict, env_kwargs: dict) -> Dataset:
    """Make episodes sound (ids, steps, next_obs) and check shapes against the env."""
    from offlab.envs.make import env_spaces

    spaces = env_spaces(env_id, **env_kwargs)
    n = len(log.reward)
    ends = log.terminated | log.truncated
    if log.episode is not None:
        ep = np.asarray(log.episode)
        changes = np.r_[ep[1:] != ep[:-1], True]
        if len(np.unique(ep)) != int(changes.sum()):
            starts = np.r_[0, np.flatnonzero(changes[:-1]) + 1]  # first row of each run of equal ids
            _, first_run = np.unique(ep[starts], return_index=True)
            again = np.setdiff1d(np.arange(len(starts)), first_run)[0]  # first run of an id seen before
            row = int(starts[again])
            raise DataValidationError(
                f"episodes are not contiguous: episode {ep[row]} appears again at row {row} after other episodes' "
                f"rows; sort the rows by episode then step"
            )
        ends = changes
    if log.step is not None:
        episode, expected = episodes_from_ends(ends)
        if (np.asarray(log.step) != expected).any():
            row = int(np.flatnonzero(np.asarray(log.step) != expected)[0])
            raise DataValidationError(
                f"steps out of order in episode {int(episode[row])} (row {row} has step {int(log.step[row])}, "
                f"expected {int(expected[row])}); sort rows by episode then step"
            )
    keep = np.ones(n, dtype=bool)
    terminated = log.terminated.copy()
    truncated = log.truncated.copy()
    notes = ""
    if log.next_obs is None:
        next_obs = np.empty_like(log.obs, dtype=np.float32)
        next_obs[:-1] = log.obs[1:]
        last = np.flatnonzero(ends)
        last = np.union1d(last, [n - 1])
        term_last = last[terminated[last]]
        next_obs[term_last] = log.obs[term_last]  # never bootstrapped; see module docstring
        cut_last = last[~terminated[last]]
        keep[cut_last] = False
        # the step before a dropped transition becomes the episode's truncated end
        prev = cut_last - 1
        prev = prev[(prev >= 0) & ~np.isin(prev, last)]
        truncated[prev] = True
        notes = (
            "next_obs derived as obs[t+1] within episodes; last transitions of cut episodes dropped; "
            "terminal transitions keep next_obs = obs"
        )
    else:
        next_obs = log.next_obs
    episode_of_row, _ = episodes_from_ends(ends)
    kept_episode = episode_of_row[keep]
    episode, step = episodes_from_ends(np.r_[kept_episode[1:] != kept_episode[:-1], True]) if keep.any() else (
        kept_episode, kept_episode.astype(np.int32))
    obs = np.asarray(log.obs, dtype=np.float32).reshape(n, -1)
    card = DatasetCard(
        name=name,
        env_id=env_id,
        env_kwargs=env_kwargs,
        obs_dim=obs.shape[1],
        action_dim=spaces.action_dim,
        discrete_actions=spaces.discrete,
        action_low=list(spaces.action_low) if spaces.action_low else None,
        action_high=list(spaces.action_high) if spaces.action_high else None,
        source=source,
        notes=notes,
    )
    _add_reference_scores(card, env_id)
    ds = coerce_columns(
        card,
        episode=episode,
        step=step,
        obs=obs[keep],
        next_obs=np.asarray(next_obs, dtype=np.float32).reshape(n, -1)[keep],
        action=np.asarray(log.action)[keep] if not spaces.discrete else np.asarray(log.action).reshape(-1)[keep],
        reward=np.asarray(log.reward).reshape(-1)[keep],
        terminated=terminated[keep],
        truncated=truncated[keep],
        cost=None if log.cost is None else np.asarray(log.cost).reshape(-1)[keep],
        behavior_logp=None if log.behavior_logp is None else np.asarray(log.behavior_logp).reshape(-1)[keep],
    )
    if ds.action.ndim == 2 and ds.action.shape[1] == 1 and spaces.discrete:
        ds.action = ds.action.reshape(-1).astype(np.int64)
    check_env_shapes(ds, spaces.obs_shape, spaces.action_dim, spaces.discrete)
    return ds


def _add_reference_scores(card: DatasetCard, env_id: str) -> None:
    """D4RL reference scores from the catalog when the env is one of its envs."""
    from offlab.data.registry import catalog

    for e in catalog().values():
        if e.env == env_id:
            card.ref_min_score, card.ref_max_score = e.ref_min_score, e.ref_max_score
            return
