"""Minari -> offlab (import) and offlab -> Minari (export).

Minari stores T+1 observations per episode; offlab's `next_obs` of the last step is that final
observation, so nothing is lost either way: Minari -> offlab -> Minari gives identical arrays (at
the schema's float32 precision: Minari's MuJoCo observations and rewards are float64, offlab stores
float32), episode boundaries, terminations and truncations, and env spec (id, kwargs and the time
limit: a max_episode_steps other than the registered one travels in the card's env_kwargs).

Downloads: without a network the Minari hub cannot be reached; a quick connection check (a few
seconds at most) says so at once instead of waiting on the hub client's retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from offlab.data import store
from offlab.data.schema import Dataset, DatasetCard, check_env_shapes, coerce_columns
from offlab.errors import DatasetExists, DataValidationError, EnvError, OfflabError, SourceUnavailable

PROBE_TIMEOUT_S = 3.0
"""How long the connection check waits for the Minari hub before calling the network unreachable."""
REMOTE_HOSTS = {"hf": "huggingface.co", "gcp": "storage.googleapis.com"}
STAGING_FOLDER = ".offlab-staging"
"""Hidden folder inside the Minari store where exports are written before they are renamed into place."""

if TYPE_CHECKING:
    from offlab.data.registry import CatalogEntry


def _minari():
    import minari

    return minari


MINARI_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*-v\d+$")


def looks_like_minari_id(text: str) -> bool:
    """Whether `text` has the shape of a Minari dataset id, e.g. mujoco/hopper/medium-v0."""
    return bool(MINARI_ID.match(text))


def is_local(dataset_id: str) -> bool:
    try:
        return dataset_id in _minari().list_local_datasets()
    except Exception:  # a broken local store must not hide the other sources
        return False


def remote_host() -> str:
    """The host a Minari download talks to (MINARI_REMOTE, default the Hugging Face hub), or its proxy."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    host = REMOTE_HOSTS.get(remote.split("://", 1)[0], "huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    return urlparse(proxy).netloc or host if proxy else host


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (name lookup included)."""
    if ":" in host:
        host, _, p = host.rpartition(":")
        port = int(p) if p.isdigit() else port
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def download_unavailable(dataset_id: str) -> str | None:
    """Why downloading `dataset_id` cannot work here (one clause), or None when it may."""
    host = remote_host()
    if not _reachable(host):
        return f"there is no network connection to the Minari hub ({host})"
    try:
        import huggingface_hub  # noqa: F401  (minari's download client)
    except ImportError:
        if os.environ.get("MINARI_REMOTE", "hf://").startswith("hf://"):
            return "the Minari download client is missing (pip install 'minari[hf]')"
    return None


def load_minari(dataset_id: str, *, download: bool = False):
    """minari.load_dataset, with one-line errors for a missing id and for no network."""
    minari = _minari()
    entry = _catalog_entry_for(dataset_id, "")
    build_hint = (f"`offlab data get {entry.name}` builds its catalog equivalent in the simulator instead" if entry
                  else "`offlab data get <catalog name>` builds the catalog datasets in the simulator instead")
    if not is_local(dataset_id):
        if not download:
            raise SourceUnavailable(
                f"Minari dataset '{dataset_id}' is not in the local Minari store; run with a network to "
                f"download it, or {build_hint}"
            )
        reason = download_unavailable(dataset_id)
        if reason:
            raise SourceUnavailable(
                f"Minari dataset '{dataset_id}' is not in the local Minari store and {reason}; {build_hint}"
            )
        try:
            minari.download_dataset(dataset_id)
        except Exception as e:  # hub errors: no such id, incompatible version, connection lost
            raise SourceUnavailable(
                f"cannot download Minari dataset '{dataset_id}' ({_one_line(e)[:200]}); {build_hint}"
            ) from None
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:
        raise SourceUnavailable(f"cannot read Minari dataset '{dataset_id}': {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def import_minari(
    dataset_id: str,
    name: str,
    *,
    catalog_entry: CatalogEntry | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> Dataset:
    """Read a Minari dataset (local store, or downloaded) into the offlab store under `name`."""
    store.check_name(name)
    if store.exists(name) and not overwrite:
        raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it or choose another --name")
    md = load_minari(dataset_id, download=download)
    ds = minari_to_dataset(md, name)
    if catalog_entry is None:
        catalog_entry = _catalog_entry_for(dataset_id, ds.card.env_id)
    if catalog_entry is not None and ds.card.ref_min_score is None:
        ds = ds.with_card(ref_min_score=catalog_entry.ref_min_score, ref_max_score=catalog_entry.ref_max_score)
    if catalog_entry is not None and not ds.card.env_id:
        ds = ds.with_card(env_id=catalog_entry.env)
    return store.write_dataset(ds, name, overwrite=overwrite)


def _catalog_entry_for(dataset_id: str, env_id: str) -> CatalogEntry | None:
    """The catalog entry with this Minari id, else one for the same env (its D4RL reference scores)."""
    from offlab.data.registry import catalog

    entries = list(catalog().values())
    for e in entries:
        if e.minari_id == dataset_id:
            return e
    return next((e for e in entries if env_id and e.env == env_id), None)


def minari_to_dataset(md, name: str) -> Dataset:
    """A loaded MinariDataset as an offlab Dataset (flat Box observations, Box or Discrete actions)."""
    import gymnasium as gym

    if not isinstance(md.observation_space, gym.spaces.Box):
        raise DataValidationError(
            f"Minari dataset '{md.spec.dataset_id}' has {type(md.observation_space).__name__} observations; "
            f"offlab stores flat Box observations only (flatten them before importing)"
        )
    discrete = isinstance(md.action_space, gym.spaces.Discrete)
    if not discrete and not isinstance(md.action_space, gym.spaces.Box):
        raise DataValidationError(
            f"Minari dataset '{md.spec.dataset_id}' has {type(md.action_space).__name__} actions; "
            f"offlab stores Box or Discrete actions only"
        )
    obs, next_obs, act, rew, term, trunc, ep_ids, steps, costs = [], [], [], [], [], [], [], [], []
    has_cost = True
    for i, ep in enumerate(_episodes(md)):
        o = np.asarray(ep["observations"], dtype=np.float32).reshape(len(ep["observations"]), -1)
        n = len(ep["rewards"])
        obs.append(o[:-1])
        next_obs.append(o[1:])
        act.append(np.asarray(ep["actions"]))
        rew.append(np.asarray(ep["rewards"], dtype=np.float32))
        term.append(np.asarray(ep["terminations"], dtype=bool))
        trunc.append(np.asarray(ep["truncations"], dtype=bool))
        ep_ids.append(np.full(n, i, dtype=np.int64))
        steps.append(np.arange(n, dtype=np.int32))
        cost = ep.get("cost")
        if cost is not None and len(cost) == n + 1:  # DataCollector's infos: reset, then one per step
            cost = cost[1:]
        if cost is None or len(cost) != n:
            has_cost = False
        else:
            costs.append(np.asarray(cost, dtype=np.float32).reshape(n))
    if not rew:
        raise DataValidationError(f"Minari dataset '{md.spec.dataset_id}' has no episodes")
    env_spec = md.env_spec
    a_space = md.action_space
    card = DatasetCard(
        name=name,
        env_id=env_spec.id if env_spec is not None else "",
        env_kwargs=_env_kwargs(env_spec),
        obs_dim=int(np.prod(md.observation_space.shape)),
        action_dim=int(a_space.n) if discrete else int(np.prod(a_space.shape)),
        discrete_actions=discrete,
        action_low=None if discrete else a_space.low.reshape(-1).tolist(),
        action_high=None if discrete else a_space.high.reshape(-1).tolist(),
        ref_min_score=md.storage.metadata.get("ref_min_score"),
        ref_max_score=md.storage.metadata.get("ref_max_score"),
        source={
            "kind": "minari",
            "minari_id": md.spec.dataset_id,
            "algorithm_name": md.storage.metadata.get("algorithm_name"),
        },
    )
    return coerce_columns(
        card,
        episode=np.concatenate(ep_ids),
        step=np.concatenate(steps),
        obs=np.concatenate(obs),
        next_obs=np.concatenate(next_obs),
        action=np.concatenate(act),
        reward=np.concatenate(rew),
        terminated=np.concatenate(term),
        truncated=np.concatenate(trunc),
        cost=np.concatenate(costs) if has_cost and costs else None,
    )


EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


def _episodes(md):
    """Each episode as a dict of arrays (EPISODE_KEYS, plus 'cost' when the infos hold one).

    Minari's own reader decodes episode by episode through several layers; for its two storage
    formats with flat spaces this reads the files directly (the same arrays, several times faster).
    Anything else goes through `md.iterate_episodes()`.
    """
    from minari.dataset.minari_storage import is_image_space

    storage = md.storage
    kind = storage.metadata.get("data_format")
    flat = not is_image_space(md.observation_space) and not is_image_space(md.action_space)
    if flat and kind == "hdf5":
        return _hdf5_episodes(storage.data_path / "main_data.hdf5", md.episode_indices)
    if flat and kind == "arrow":
        return _arrow_episodes(storage.data_path, md.episode_indices)
    return (
        {**{k: getattr(ep, k) for k in EPISODE_KEYS},
         "cost": ep.infos.get("cost") if isinstance(ep.infos, dict) else None}
        for ep in md.iterate_episodes()
    )


def _hdf5_episodes(path: Path, indices):
    """Episodes of a Minari HDF5 file through h5py's low-level API (one call per array)."""
    import h5py

    def read(group, name: bytes) -> np.ndarray:
        dset = h5py.h5d.open(group, name)
        out = np.empty(dset.shape, dtype=dset.dtype)
        dset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return out

    with h5py.File(path, "r") as f:
        for i in indices:
            group = h5py.h5g.open(f.id, f"episode_{int(i)}".encode())
            ep = {k: read(group, k.encode()) for k in EPISODE_KEYS}
            cost = f.get(f"episode_{int(i)}/infos/cost")
            ep["cost"] = cost[()] if isinstance(cost, h5py.Dataset) else None
            yield ep


def _arrow_episodes(data_path: Path, indices):
    """Episodes of a Minari Arrow store: one IPC file per episode, T+1 rows (the last row pads actions etc.)."""
    import pyarrow as pa

    for i in indices:
        files = sorted((data_path / str(int(i))).glob("*.arrow"))
        table = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in files])
        ep = {}
        for k in EPISODE_KEYS:
            col = table.column(k).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            else:
                values = col.to_numpy(zero_copy_only=False)
            ep[k] = values if k == "observations" else values[:-1]
        ep["cost"] = None
        if "infos" in table.column_names and "cost" in [f.name for f in table.column("infos").type]:
            cost = table.column("infos").combine_chunks().field("cost")
            ep["cost"] = cost.to_numpy(zero_copy_only=False)
        yield ep


def _env_kwargs(env_spec) -> dict:
    """gym.make kwargs that rebuild `env_spec`: its kwargs, plus max_episode_steps when not the registered one."""
    if env_spec is None:
        return {}
    kwargs = dict(env_spec.kwargs or {})
    import gymnasium as gym

    try:
        registered = gym.spec(env_spec.id).max_episode_steps
    except gym.error.Error:
        registered = None
    if env_spec.max_episode_steps is not None and env_spec.max_episode_steps != registered:
        kwargs["max_episode_steps"] = int(env_spec.max_episode_steps)
    return kwargs


def env_spec_of(card: DatasetCard):
    """The gymnasium EnvSpec the card's env id and kwargs describe (EnvError if the env is not installed)."""
    import dataclasses

    import gymnasium as gym

    if not card.env_id:
        raise EnvError(f"dataset '{card.name}' records no env id; Minari needs one (re-import with --env)")
    try:
        spec = gym.spec(card.env_id)
    except gym.error.Error as e:
        raise EnvError(f"env '{card.env_id}' of dataset '{card.name}' is not installed ({_one_line(e)})") from None
    kwargs = dict(card.env_kwargs or {})
    max_steps = kwargs.pop("max_episode_steps", spec.max_episode_steps)
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **kwargs}, max_episode_steps=max_steps)


def export_minari(name: str, dataset_id: str, *, overwrite: bool = False, author: str | None = None):
    """Write stored dataset `name` into the local Minari store as `dataset_id`; returns the MinariDataset."""
    import gymnasium as gym
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id

    from offlab.envs.make import quiet_gymnasium_model_warnings

    minari = _minari()
    try:
        parse_dataset_id(dataset_id)
    except Exception:
        raise OfflabError(
            f"'{dataset_id}' is not a Minari dataset id; use namespace/env/name-vN, e.g. offlab/hopper/mine-v0"
        ) from None
    if not dataset_id.rsplit("/", 1)[-1].rsplit("-v", 1)[-1].isdigit():
        raise OfflabError(f"Minari dataset id '{dataset_id}' needs a version suffix, e.g. {dataset_id}-v0")
    ds = store.load_dataset(name)
    card = ds.card
    spec = env_spec_of(card)
    quiet_gymnasium_model_warnings()
    try:
        env = gym.make(spec)
    except Exception as e:  # bad kwargs in the card
        raise EnvError(f"cannot make env {card.env_id} with {card.env_kwargs} ({_one_line(e)})") from None
    a_space = env.action_space
    discrete = isinstance(a_space, gym.spaces.Discrete)
    try:
        check_env_shapes(ds, tuple(env.observation_space.shape or ()),
                         int(a_space.n) if discrete else int(np.prod(a_space.shape)), discrete)
    except EnvError:
        env.close()
        raise
    if is_local(dataset_id) and not overwrite:
        env.close()
        raise DatasetExists(
            f"Minari dataset '{dataset_id}' already exists in the local Minari store; pass --overwrite "
            f"or bump its version (-v1)"
        )
    obs_dtype = getattr(env.observation_space, "dtype", None) or np.float32
    buffers = []
    starts, lengths = ds.episode_starts, ds.episode_lengths
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        rows = slice(int(s), int(s + n))
        observations = np.concatenate([ds.obs[rows], ds.next_obs[int(s + n - 1)][None]], axis=0).astype(obs_dtype)
        infos = {}
        if ds.cost is not None:
            infos["cost"] = ds.cost[rows]
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=observations,
                actions=ds.action[rows],
                rewards=ds.reward[rows],
                terminations=ds.terminated[rows],
                truncations=ds.truncated[rows],
                infos=infos,
            )
        )
    kwargs = {}
    if card.ref_min_score is not None and card.ref_max_score is not None:
        kwargs = {"eval_env": spec, "ref_min_score": card.ref_min_score, "ref_max_score": card.ref_max_score}
    try:
        with _minari_staging(dataset_id) as staged:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Minari warns about metadata offlab fills in on purpose
                minari.create_dataset_from_buffers(
                    dataset_id,
                    buffers,
                    env=spec,
                    observation_space=env.observation_space,
                    action_space=env.action_space,
                    algorithm_name=_algorithm_name(card),
                    author=author or "offlab",
                    author_email="offlab@localhost",
                    code_permalink="https://github.com/offlab/offlab",
                    description=f"Exported by offlab from dataset '{name}' (content hash {card.content_hash}).",
                    **kwargs,
                )
            staged.publish(overwrite=overwrite)
    finally:
        env.close()
    return minari.load_dataset(dataset_id)


class _StagedMinari:
    """A Minari dataset being written under a hidden staging root, then renamed into the real store."""

    def __init__(self, dataset_id: str, root: Path, staging_root: Path):
        self.dataset_id, self.root, self.staging_root = dataset_id, root, staging_root

    def publish(self, overwrite: bool) -> None:
        src = self.staging_root / self.dataset_id
        dst = self.root / self.dataset_id
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            if not overwrite:
                raise DatasetExists(f"Minari dataset '{self.dataset_id}' already exists; pass --overwrite")
            trash = self.root / STAGING_FOLDER / f"o{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dst, trash)
            os.rename(src, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(src, dst)


@contextlib.contextmanager
def _minari_staging(dataset_id: str):
    """Point Minari at a hidden staging root inside its store while it writes; remove the staging at the end.

    Minari skips hidden folders when it lists datasets, so a half-written export is never visible,
    and the staging root is on the store's filesystem, so publishing is a rename.
    """
    from minari.namespace import create_namespace, list_local_namespaces
    from minari.storage.datasets_root_dir import get_dataset_path

    root = Path(get_dataset_path())
    namespace = parse_namespace(dataset_id)
    if namespace and namespace not in list_local_namespaces():
        create_namespace(namespace)  # in the real store: Minari keeps namespace metadata beside the datasets
    base = root / STAGING_FOLDER
    base.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():  # leftovers of killed exports
        m = re.match(r"^[wo](\d+)-", p.name)
        if m is None or not store._alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f"w{os.getpid()}-", dir=base))
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging_root)
    try:
        yield _StagedMinari(dataset_id, root, staging_root)
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
        shutil.rmtree(staging_root, ignore_errors=True)


def parse_namespace(dataset_id: str) -> str | None:
    from minari.dataset.minari_dataset import parse_dataset_id

    return parse_dataset_id(dataset_id)[0]


def _algorithm_name(card: DatasetCard) -> str:
    policy = card.behavior_policy or {}
    return str(policy.get("algorithm") or card.source.get("kind") or "unknown")

