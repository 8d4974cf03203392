"""Datasets on disk (Parquet + card.json, written atomically) and `Transitions`, the sampling view.

A dataset is the folder `$OFFLAB_HOME/datasets/<name>/` holding `data-00000.parquet` (more parts for
large tables) and `card.json`; the card is also stored in each Parquet file's key-value metadata.
Writers build the folder under `$OFFLAB_HOME/.staging/` and rename it into place, so a dataset is
visible complete or not at all, whenever the writer is killed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from offlab import paths
from offlab.data.schema import (
    REQUIRED_COLUMNS,
    Dataset,
    DatasetCard,
    arrow_schema,
    finalize,
)
from offlab.errors import DatasetExists, DatasetNotFound, DataValidationError, OfflabError, did_you_mean

CARD_KEY = b"offlab.card"
ROWS_PER_FILE = 1_000_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise OfflabError(
            f"'{name}' is not a valid dataset name; use letters, digits, '.', '_' and '-' (e.g. my-hopper)"
        )
    return name


def dataset_path(name: str) -> Path:
    return paths.datasets_dir() / check_name(name)


def exists(name: str) -> bool:
    return (dataset_path(name) / "card.json").is_file()


def list_local() -> list[str]:
    root = paths.datasets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file())


def write_dataset(ds: Dataset, name: str | None = None, *, overwrite: bool = False) -> Dataset:
    """Validate `ds`, then write it under `name` (default: its card's name) atomically.

    Returns the dataset with its card completed (counts, content hash, version).
    """
    name = check_name(name or ds.card.name)
    ds = finalize(ds.with_card(name=name))
    target = dataset_path(name)
    if exists(name) and not overwrite:
        raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it or choose another --name")
    staging = paths.staging_dir()
    staging.mkdir(parents=True, exist_ok=True)
    _sweep_stale(staging)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging))
    try:
        _write_parquet(ds, tmp)
        _write_text(tmp / "card.json", ds.card.to_json())
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            trash = staging / f"{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ds


def _sweep_stale(staging: Path) -> None:
    """Remove staging folders left by writers that were killed (their pid is gone)."""
    for p in staging.iterdir():
        pid_file = p / ".pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_parquet(ds: Dataset, folder: Path) -> None:
    (folder / ".pid").write_text(str(os.getpid()))
    schema = arrow_schema(ds).with_metadata({CARD_KEY: ds.card.to_json().encode()})
    n = len(ds)
    for part, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows = slice(start, min(n, start + ROWS_PER_FILE))
        arrays = []
        for f in schema:
            a = getattr(ds, f.name)[rows]
            if pa.types.is_fixed_size_list(f.type):
                width = f.type.list_size
                flat = pa.array(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, width))
            else:
                arrays.append(pa.array(a, type=f.type))
        table = pa.Table.from_arrays(arrays, schema=schema)
        path = folder / f"data-{part:05d}.parquet"
        pq.write_table(table, path, row_group_size=256_000, compression="zstd")
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    (folder / ".pid").unlink()


def load_card(name: str) -> DatasetCard:
    path = dataset_path(name) / "card.json"
    if not path.is_file():
        raise DatasetNotFound(f"dataset '{name}' is not in {paths.datasets_dir()}{did_you_mean(name, list_local())}")
    return DatasetCard.from_json(path.read_text())


def load_dataset(name: str) -> Dataset:
    """Read a stored dataset. Raises DatasetNotFound or DataValidationError (corrupt files)."""
    card = load_card(name)
    folder = dataset_path(name)
    files = sorted(folder.glob("data-*.parquet"))
    if not files:
        raise DataValidationError(f"dataset '{name}' has no data files in {folder}; delete it and import it again")
    try:
        tables = [pq.read_table(f) for f in files]
    except (pa.ArrowException, OSError) as e:
        raise DataValidationError(
            f"dataset '{name}' has a truncated or corrupt Parquet file ({_one_line(e)}); "
            f"delete it (offlab data delete {name}) and import it again"
        ) from None
    return dataset_from_arrow(pa.concat_tables(tables), card)


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def dataset_from_arrow(table: pa.Table, card: DatasetCard) -> Dataset:
    """Columns of an offlab-schema Arrow table as numpy arrays (zero-copy where Arrow allows)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataValidationError(f"dataset '{card.name}' lacks required columns {missing}")
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks != 1 else col.chunk(0).flatten()
            cols[name] = flat.to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            cols[name] = col.to_numpy()
    fields = {c: cols.get(c) for c in REQUIRED_COLUMNS + ("cost", "behavior_logp")}
    return Dataset(card=card, **fields)


def delete_dataset(name: str) -> None:
    path = dataset_path(name)
    if not path.exists():
        raise DatasetNotFound(f"dataset '{name}' is not in {paths.datasets_dir()}{did_you_mean(name, list_local())}")
    # rename first so a reader never sees a half-deleted folder
    trash = paths.staging_dir() / f"{name}.deleted-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class Batch:
    """A batch of transitions as torch tensors. `terminated` is the only bootstrap mask (never truncated)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    def __repr__(self) -> str:
        return "Batch(" + ", ".join(f"{k}={list(v.shape)}" for k, v in self.__dict__.items()) + ")"

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.obs, self.action, self.reward, self.next_obs, self.terminated)))


class Transitions:
    """The sampling view of a dataset: torch tensors, uniform batches, episodes and segments.

    Tensors share memory with the dataset's numpy arrays where dtypes allow (no copies).
    `reward` and `terminated` are float32 vectors; `terminated` is the bootstrap mask source.
    """

    def __init__(self, ds: Dataset, device: torch.device | str = "cpu"):
        self.dataset = ds
        self.device = torch.device(device)

        def t(a: np.ndarray) -> torch.Tensor:
            with warnings.catch_warnings():  # Arrow-backed arrays are read-only; the view never writes
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        self.obs = t(ds.obs)
        self.next_obs = t(ds.next_obs)
        self.action = t(ds.action)
        self.reward = t(ds.reward.astype(np.float32, copy=False))
        self.terminated = t(ds.terminated.astype(np.float32))
        self.truncated = t(ds.truncated)
        self.cost = None if ds.cost is None else t(ds.cost)
        self.behavior_logp = None if ds.behavior_logp is None else t(ds.behavior_logp)
        self.episode_starts = ds.episode_starts
        self.episode_lengths = ds.episode_lengths
        obs64 = ds.obs.astype(np.float64)
        self.obs_mean = obs64.mean(axis=0).astype(np.float32)
        self.obs_std = obs64.std(axis=0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.reward)

    def __repr__(self) -> str:
        return (
            f"Transitions('{self.dataset.card.name}', n={len(self)}, episodes={len(self.episode_starts)}, "
            f"obs={list(self.obs.shape)}, action={list(self.action.shape)}, device={self.device})"
        )

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """A uniform batch of transitions (with replacement)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator, device="cpu").to(self.device)
        return self.batch(idx)

    def batch(self, idx: torch.Tensor) -> Batch:
        return Batch(
            self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx]
        )

    def episode(self, i: int) -> dict[str, torch.Tensor]:
        """All rows of episode i as tensors keyed by column."""
        s, n = int(self.episode_starts[i]), int(self.episode_lengths[i])
        out = {
            "obs": self.obs[s : s + n],
            "action": self.action[s : s + n],
            "reward": self.reward[s : s + n],
            "next_obs": self.next_obs[s : s + n],
            "terminated": self.terminated[s : s + n],
            "truncated": self.truncated[s : s + n],
        }
        if self.cost is not None:
            out["cost"] = self.cost[s : s + n]
        if self.behavior_logp is not None:
            out["behavior_logp"] = self.behavior_logp[s : s + n]
        return out

    def sample_segments(
        self, batch_size: int, length: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Batches of `length` consecutive steps from within single episodes (episodes >= length only).

        Returns tensors shaped [batch_size, length, ...] plus `start` (row index of each segment).
        """
        ok = np.flatnonzero(self.episode_lengths >= length)
        if not len(ok):
            raise OfflabError(
                f"no episode of '{self.dataset.card.name}' has {length} steps; use a shorter segment length"
            )
        starts = torch.from_numpy(self.episode_starts[ok])
        room = torch.from_numpy(self.episode_lengths[ok] - length + 1)
        pick = torch.randint(len(ok), (batch_size,), generator=generator)
        offset = (torch.rand(batch_size, generator=generator) * room[pick]).long()
        first = starts[pick] + offset
        rows = (first[:, None] + torch.arange(length)[None, :]).to(self.device)
        out = {
            "obs": self.obs[rows],
            "action": self.action[rows],
            "reward": self.reward[rows],
            "next_obs": self.next_obs[rows],
            "terminated": self.terminated[rows],
            "start": first,
        }
        if self.cost is not None:
            out["cost"] = self.cost[rows]
        return out

    def normalizer_stats(self, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """State mean and std (+eps) over the dataset's observations, as the learners normalise."""
        return self.obs_mean, self.obs_std + eps
