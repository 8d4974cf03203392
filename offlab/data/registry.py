"""Dataset names -> where the data comes from, and `get`, which resolves a name to a stored dataset.

Resolution order (DESIGN.md): local cache -> local Minari store -> Minari download (needs a
network) -> build in the simulator from the shipped behaviour policy (the catalog's recipe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offlab import paths
from offlab.data import store
from offlab.data.schema import Dataset
from offlab.errors import ConfigError, DatasetNotFound, DataValidationError, SourceUnavailable, did_you_mean


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    env: str
    ref_min_score: float
    ref_max_score: float
    minari_id: str | None = None
    recipe: dict[str, Any] | None = None
    notes: str = ""

    @property
    def env_family(self) -> str:
        return self.name.split("-")[0]

    @property
    def level(self) -> str:
        return self.name.split("-", 1)[1]


@functools.lru_cache(maxsize=4)
def _read_catalog(path: Path) -> dict[str, CatalogEntry]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the dataset catalog {path}: {str(e).splitlines()[0]}") from None
    entries = {}
    known = {f for f in CatalogEntry.__dataclass_fields__ if f != "name"}
    for name, fields in (raw.get("datasets") or {}).items():
        unknown = sorted(set(fields or {}) - known)
        missing = sorted({"env", "ref_min_score", "ref_max_score"} - set(fields or {}))
        if unknown or missing:
            what = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
            raise ConfigError(f"dataset catalog {path}: entry '{name}' has {what}; fields are {sorted(known)}")
        entries[name] = CatalogEntry(name=name, **fields)
    return entries


def catalog() -> dict[str, CatalogEntry]:
    return _read_catalog(paths.catalog_dir() / "catalog.yaml")


def entry(name: str) -> CatalogEntry | None:
    return catalog().get(name)


def score_range(name: str, card) -> tuple[float | None, float | None]:
    """The D4RL normalisation returns (REF_MIN_SCORE, REF_MAX_SCORE) of dataset `name`: its card's, else its
    catalog entry's, else None."""
    e = entry(name)
    ref_min = card.ref_min_score if card.ref_min_score is not None else (e.ref_min_score if e else None)
    ref_max = card.ref_max_score if card.ref_max_score is not None else (e.ref_max_score if e else None)
    return ref_min, ref_max


def known_names() -> list[str]:
    return sorted(set(catalog()) | set(store.list_local()))


def not_found(name: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"dataset '{name}' is neither in the catalog nor on disk{did_you_mean(name, known_names())}"
        f" (see `offlab data list`)"
    )


def buildable(e: CatalogEntry) -> bool:
    """True when the entry's recipe and the shipped policy files it needs are all present."""
    r = e.recipe or {}
    policies = paths.catalog_dir() / "policies"
    if r.get("kind") == "policy":
        return (policies / f"{r['policy']}.safetensors").is_file()
    if r.get("kind") == "replay":
        return any(policies.glob(r["snapshots"]))
    if r.get("kind") == "mix":
        return all(entry(p) is not None and buildable(entry(p)) for p in r["parts"])
    return False


def resolve_source(name: str) -> str:
    """Where `get` would take `name` from right now: 'cache', 'minari-local', 'minari-download' or 'build'."""
    if store.exists(name):
        return "cache"
    e = entry(name)
    if e is None:
        raise not_found(name)
    if e.minari_id:
        from offlab.data import minari_io

        if minari_io.is_local(e.minari_id):
            return "minari-local"
    if buildable(e):
        return "build"
    return "minari-download" if e.minari_id else "none"


def get(name: str, *, download: bool = True, build: bool = True, progress: bool = False) -> Dataset:
    """Return dataset `name`, fetching or building it into the cache when needed."""
    if store.exists(name):
        return store.load_dataset(name)
    e = entry(name)
    if e is None:
        raise not_found(name)
    # one process fetches or builds a missing dataset; others started beside it wait, then load its copy
    with paths.file_lock(paths.locks_dir() / f"dataset-{name}.lock"):
        if store.exists(name):
            return store.load_dataset(name)
        return _fetch_or_build(name, e, download=download, build=build, progress=progress)


def _fetch_or_build(name: str, e: CatalogEntry, *, download: bool, build: bool, progress: bool) -> Dataset:
    from offlab.data import minari_io

    if e.minari_id and minari_io.is_local(e.minari_id):
        return minari_io.import_minari(e.minari_id, name, catalog_entry=e)
    errors = []
    if download and e.minari_id:
        reason = minari_io.download_unavailable(e.minari_id)
        if reason:
            errors.append(f"its Minari copy '{e.minari_id}' is not local and {reason}")
        else:
            try:
                return minari_io.import_minari(e.minari_id, name, catalog_entry=e, download=True)
            except SourceUnavailable as err:
                errors.append(str(err))
    if build and buildable(e):
        from offlab.data import build as builder

        return builder.build_dataset(name, progress=progress)
    if errors:
        reason = errors[0]
    elif e.minari_id:
        reason = f"its Minari copy '{e.minari_id}' is not in the local Minari store and downloads are off"
    else:
        reason = "it has no Minari equivalent"
    no_build = "building is off (drop --no-build)" if buildable(e) else "no build recipe ships for it yet"
    raise SourceUnavailable(
        f"cannot get '{name}': {reason}; and {no_build} (or import a copy with `offlab data import`)"
    )


def list_datasets() -> list[dict[str, Any]]:
    """Every catalog name and every local dataset: env, where it comes from, whether it is on disk."""
    rows = []
    local = set(store.list_local())
    for name in sorted(set(catalog()) | local):
        e = entry(name)
        try:
            card = store.load_card(name) if name in local else None
        except DataValidationError:  # a damaged dataset is listed, not fatal to the listing
            rows.append({"name": name, "env": e.env if e else None, "in_catalog": e is not None,
                         "source": f"corrupt card (offlab data delete {name})", "on_disk": True,
                         "n_steps": None, "n_episodes": None})
            continue
        if e is not None:
            sources = []
            if e.minari_id:
                sources.append(f"minari:{e.minari_id}")
            if buildable(e):
                sources.append("build")
            source = " | ".join(sources) or "import only"
        else:
            source = card.source.get("kind", "local") if card else "local"
        rows.append({
            "name": name,
            "env": (card.env_id if card else None) or (e.env if e else None),
            "in_catalog": e is not None,
            "source": source,
            "on_disk": card is not None,
            "n_steps": card.n_steps if card else None,
            "n_episodes": card.n_episodes if card else None,
        })
    return rows


def describe(name: str) -> dict[str, Any]:
    """Card and summary statistics of a stored dataset, or the catalog entry of one not on disk."""
    import numpy as np

    from offlab.envs.make import normalized_score

    if not store.exists(name):
        e = entry(name)
        if e is None:
            raise not_found(name)
        return {
            "name": name,
            "on_disk": False,
            "env": e.env,
            "minari_id": e.minari_id,
            "buildable": buildable(e),
            "ref_min_score": e.ref_min_score,
            "ref_max_score": e.ref_max_score,
            "hint": f"not on disk; run `offlab data get {name}`",
        }
    ds = store.load_dataset(name)
    c = ds.card
    returns = ds.episode_returns()
    out: dict[str, Any] = {
        "name": name,
        "on_disk": True,
        "path": str(store.dataset_path(name)),
        "env": c.env_id,
        "source": c.source,
        "n_steps": len(ds),
        "n_episodes": ds.n_episodes,
        "n_terminated": int(ds.terminated.sum()),
        "n_truncated": int(ds.truncated.sum()),
        "obs_dim": c.obs_dim,
        "action_dim": c.action_dim,
        "episode_length_mean": float(ds.episode_lengths.mean()),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_se": float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else 0.0,
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "columns": ds.columns(),
        "content_hash": c.content_hash,
        "offlab_version": c.offlab_version,
    }
    if c.ref_min_score is not None and c.ref_max_score is not None:
        out["ref_min_score"], out["ref_max_score"] = c.ref_min_score, c.ref_max_score
        out["normalized_score_mean"] = float(normalized_score(returns.mean(), c.ref_min_score, c.ref_max_score))
        out["normalized_score_se"] = float(100 * out["return_se"] / (c.ref_max_score - c.ref_min_score))
    if c.behavior_policy:
        out["behavior_policy"] = c.behavior_policy
    if c.notes:
        out["notes"] = c.notes
    return out
