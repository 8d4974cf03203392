"""Datasets on disk (Parquet + card.json, written atomically) and `Transitions`, the sampling view.

A dataset is the folder `$OFFLAB_HOME/datasets/<name>/` holding `data-00000.parquet` (more parts for
large tables) and `card.json`; the card is also stored in each Parquet file's key-value metadata.
Writers build the folder under `$OFFLAB_HOME/.staging/` and rename it into place, so a dataset is
visible complete or not at all, whenever the writer is killed. Staging folders carry their writer's
pid in their name (`<name>.w<pid>-<random>`); the next writer removes those whose process is gone.

Loading reads the Parquet files (memory-mapped, one row group per file, so columns arrive as single
chunks that numpy and torch share without copies), verifies the pages' CRC checksums, and checks
row counts and widths against the card; it does not re-run the schema validation, which every
writer ran before the rename.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from offlab import paths
from offlab.data.schema import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Dataset,
    DatasetCard,
    arrow_schema,
    finalize,
)
from offlab.errors import DatasetExists, DatasetNotFound, DataValidationError, OfflabError, did_you_mean

if TYPE_CHECKING:  # torch is imported where tensors are made, so the data commands start without it
    import torch

CARD_KEY = b"offlab.card"
ROWS_PER_FILE = 1_000_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STAGING_PATTERN = re.compile(r"\.[wod](\d+)-[A-Za-z0-9_]+$")
"""Staging entries end in .w<pid>-x (being written), .o<pid>-x (replaced) or .d<pid>-x (being deleted)."""
SMALL_COLUMNS = ["episode", "step", "terminated", "truncated"]
"""Columns that dictionary/run-length encoding shrinks; the float columns are written plain."""


def check_name(name: str) -> str:
    """`name` if it is a valid dataset name (a folder name, no path separators), else OfflabError."""
    if not NAME_PATTERN.match(name):
        raise OfflabError(
            f"'{name}' is not a valid dataset name; use letters, digits, '.', '_' and '-' (e.g. my-hopper)"
        )
    return name


def dataset_path(name: str) -> Path:
    """The folder of dataset `name` under $OFFLAB_HOME/datasets (whether it exists or not)."""
    return paths.datasets_dir() / check_name(name)


def exists(name: str) -> bool:
    """Whether dataset `name` is in the store (complete: its card.json is written last)."""
    return (dataset_path(name) / "card.json").is_file()


def list_local() -> list[str]:
    """Names of the datasets in the store, sorted."""
    root = paths.datasets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file())


def write_dataset(ds: Dataset, name: str | None = None, *, overwrite: bool = False) -> Dataset:
    """Validate `ds`, then write it under `name` (default: its card's name) atomically.

    Returns the dataset with its card completed (counts, content hash, version).
    """
    name = check_name(name or ds.card.name)
    if exists(name) and not overwrite:
        raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it or choose another --name")
    ds = finalize(ds.with_card(name=name))
    target = dataset_path(name)
    staging = _staging()
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.w{os.getpid()}-", dir=staging))
    try:
        _write_parquet(ds, tmp)
        _write_text(tmp / "card.json", ds.card.to_json())
        _fsync_dir(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if exists(name) and not overwrite:  # another writer got there first
                raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it")
            trash = staging / f"{name}.o{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ds


def _staging() -> Path:
    staging = paths.staging_dir()
    staging.mkdir(parents=True, exist_ok=True)
    _sweep_stale(staging)
    return staging


def _sweep_stale(staging: Path) -> None:
    """Remove staging entries left by writers that were killed (the pid in their name is gone)."""
    for p in staging.iterdir():
        m = STAGING_PATTERN.search(p.name)
        if m is None or not _alive(int(m.group(1))):
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_parquet(ds: Dataset, folder: Path) -> None:
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
        pq.write_table(table, path, row_group_size=ROWS_PER_FILE, compression="snappy",
                       use_dictionary=SMALL_COLUMNS, write_statistics=SMALL_COLUMNS, write_page_checksum=True)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def load_card(name: str) -> DatasetCard:
    """The card of stored dataset `name` (DatasetNotFound, or DataValidationError for a corrupt card)."""
    path = dataset_path(name) / "card.json"
    if not path.is_file():
        raise DatasetNotFound(f"dataset '{name}' is not in {paths.datasets_dir()}{did_you_mean(name, list_local())}")
    try:
        return DatasetCard.from_json(path.read_text())
    except (DataValidationError, OSError, TypeError) as e:
        raise DataValidationError(
            f"dataset '{name}' has a corrupt card.json ({_one_line(e)}); "
            f"delete it (offlab data delete {name}) and import it again"
        ) from None


def load_dataset(name: str) -> Dataset:
    """Read a stored dataset. Raises DatasetNotFound, or DataValidationError for truncated or corrupt files."""
    card = load_card(name)
    folder = dataset_path(name)
    files = sorted(folder.glob("data-*.parquet"))
    fix = f"delete it (offlab data delete {name}) and import it again"
    if not files:
        raise DataValidationError(f"dataset '{name}' has no data files in {folder}; {fix}")
    try:
        if len(files) == 1:
            tables = [_read_parquet(files[0])]
        else:
            with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1)) as pool:
                tables = list(pool.map(_read_parquet, files))
    except (pa.ArrowException, OSError) as e:
        raise DataValidationError(f"dataset '{name}' has a truncated or corrupt Parquet file ({_one_line(e)}); {fix}") \
            from None
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    if table.num_rows != card.n_steps:
        raise DataValidationError(
            f"dataset '{name}' holds {table.num_rows} rows but its card says {card.n_steps}; {fix}"
        )
    ds = dataset_from_arrow(table, card)
    action_width = ds.action.shape[1] if ds.action.ndim == 2 else (card.action_dim if card.discrete_actions else 1)
    if ds.obs.shape[1] != card.obs_dim or action_width != card.action_dim:
        raise DataValidationError(
            f"dataset '{name}' has obs/action widths {ds.obs.shape[1]}/{action_width} but its card says "
            f"{card.obs_dim}/{card.action_dim}; {fix}"
        )
    return ds


def _read_parquet(path: Path) -> pa.Table:
    return pq.ParquetFile(path, memory_map=True, page_checksum_verification=True).read(use_threads=True)


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def dataset_from_arrow(table: pa.Table, card: DatasetCard) -> Dataset:
    """Columns of an offlab-schema Arrow table as numpy arrays (zero-copy where Arrow allows)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataValidationError(f"dataset '{card.name}' lacks required columns {missing}")
    cols = {}
    for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        if col.null_count:
            raise DataValidationError(f"dataset '{card.name}': column '{name}' has {col.null_count} empty values")
        chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if pa.types.is_fixed_size_list(chunk.type):
            width = chunk.type.list_size
            cols[name] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            cols[name] = chunk.to_numpy(zero_copy_only=False)
    return Dataset(card=card, **cols)


def delete_dataset(name: str) -> None:
    """Remove dataset `name` from the store (renamed away first, so no reader sees half a folder)."""
    path = dataset_path(name)
    if not path.exists():
        raise DatasetNotFound(f"dataset '{name}' is not in {paths.datasets_dir()}{did_you_mean(name, list_local())}")
    # rename first so a reader never sees a half-deleted folder
    trash = _staging() / f"{name}.d{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    rows: torch.Tensor | None = None
    """Each transition's dataset row (long), -1 for one from elsewhere (the online replay); None when unknown."""

    def __repr__(self) -> str:
        return "Batch(" + ", ".join(f"{k}={list(v.shape)}" for k, v in self.__dict__.items() if v is not None) + ")"

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.obs, self.action, self.reward, self.next_obs, self.terminated)),
                     rows=None if self.rows is None else self.rows.to(device))


class Transitions:
    """The sampling view of a dataset: torch tensors, uniform batches, episodes and segments.

    Tensors share memory with the dataset's numpy arrays where dtypes allow (no copies); treat them
    as read-only. `reward` and `terminated` are float32 vectors; `terminated` is the only bootstrap
    mask (a truncated episode's last step still bootstraps from its next_obs). The observation
    statistics are computed on first use.
    """

    def __init__(self, ds: Dataset, device: torch.device | str = "cpu"):
        import torch

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

    @functools.cached_property
    def _obs_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and (population) std of obs, accumulated in float64 chunk by chunk."""
        obs = self.dataset.obs
        mean = obs.mean(axis=0, dtype=np.float64)
        sq = np.zeros_like(mean)
        for s in range(0, len(obs), 1 << 16):
            sq += np.square(obs[s : s + (1 << 16)] - mean).sum(axis=0)
        return mean.astype(np.float32), np.sqrt(sq / max(len(obs), 1)).astype(np.float32)

    @property
    def obs_mean(self) -> np.ndarray:
        """Mean of the observations over all transitions, float32 [obs_dim]."""
        return self._obs_stats[0]

    @property
    def obs_std(self) -> np.ndarray:
        """Standard deviation (ddof=0) of the observations over all transitions, float32 [obs_dim]."""
        return self._obs_stats[1]

    def __len__(self) -> int:
        return len(self.reward)

    def __repr__(self) -> str:
        return (
            f"Transitions('{self.dataset.card.name}', n={len(self)}, episodes={len(self.episode_starts)}, "
            f"obs={list(self.obs.shape)}, action={list(self.action.shape)}, device={self.device})"
        )

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """A uniform batch of transitions (with replacement)."""
        import torch

        idx = torch.randint(len(self), (batch_size,), generator=generator, device="cpu").to(self.device)
        return self.batch(idx)

    def batch(self, idx: torch.Tensor | np.ndarray) -> Batch:
        """The transitions at row indices `idx` (1-D integers: a tensor, best int64 on the view's device)."""
        import torch

        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        return Batch(*(t.index_select(0, idx) for t in (self.obs, self.action, self.reward, self.next_obs,
                                                         self.terminated)), rows=idx)

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
        import torch

        ok = np.flatnonzero(self.episode_lengths >= length)
        if not len(ok):
            raise OfflabError(
                f"no episode of '{self.dataset.card.name}' has {length} steps; use a shorter segment length"
            )
        starts = torch.from_numpy(self.episode_starts[ok])
        room = torch.from_numpy(self.episode_lengths[ok] - length + 1)
        pick = torch.randint(len(ok), (batch_size,), generator=generator)
        offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * room[pick]).long()
        offset = torch.minimum(offset, room[pick] - 1)
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
