"""Minari -> offlab (import) and offlab -> Minari (export).

Minari stores T+1 observations per episode; offlab's `next_obs` of the last step is that final
observation, so nothing is lost either way: Minari -> offlab -> Minari gives identical arrays,
episode boundaries, terminations and truncations, and env spec.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import numpy as np

from offlab.data import store
from offlab.data.schema import Dataset, DatasetCard, coerce_columns
from offlab.errors import DatasetExists, DataValidationError, OfflabError, SourceUnavailable

if TYPE_CHECKING:
    from offlab.data.registry import CatalogEntry


def _minari():
    import minari

    return minari


def is_local(dataset_id: str) -> bool:
    try:
        return dataset_id in _minari().list_local_datasets()
    except Exception:  # a broken local store must not hide the other sources
        return False


def load_minari(dataset_id: str, *, download: bool = False):
    """minari.load_dataset, with one-line errors for a missing id and for no network."""
    minari = _minari()
    if not is_local(dataset_id):
        if not download:
            raise SourceUnavailable(
                f"Minari dataset '{dataset_id}' is not in the local Minari store; run with a network to "
                f"download it, or build the catalog equivalent with `offlab data get`"
            )
        try:
            minari.download_dataset(dataset_id)
        except Exception as e:  # requests/HF hub errors: no network, no such id
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceUnavailable(
                f"cannot download Minari dataset '{dataset_id}' ({msg[:160]}); with no network, "
                f"`offlab data get <name>` builds the catalog datasets locally"
            ) from None
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:
        raise SourceUnavailable(f"cannot read Minari dataset '{dataset_id}': {str(e).splitlines()[0]}") from None


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
    if catalog_entry is not None:
        ds = ds.with_card(
            ref_min_score=catalog_entry.ref_min_score,
            ref_max_score=catalog_entry.ref_max_score,
            env_id=catalog_entry.env if not ds.card.env_id else ds.card.env_id,
        )
    return store.write_dataset(ds, name, overwrite=overwrite)


def minari_to_dataset(md, name: str) -> Dataset:
    """A loaded MinariDataset as an offlab Dataset (flat Box observations, Box or Discrete actions)."""
    import gymnasium as gym

    if not isinstance(md.observation_space, gym.spaces.Box):
        raise DataValidationError(
            f"Minari dataset '{md.spec.dataset_id}' has {type(md.observation_space).__name__} observations; "
            f"offlab stores flat Box observations only (flatten them before importing)"
        )
    discrete = isinstance(md.action_space, gym.spaces.Discrete)
    obs, next_obs, act, rew, term, trunc, ep_ids, steps, costs = [], [], [], [], [], [], [], [], []
    has_cost = True
    for i, ep in enumerate(md.iterate_episodes()):
        o = np.asarray(ep.observations, dtype=np.float32).reshape(len(ep.observations), -1)
        n = len(ep.rewards)
        obs.append(o[:-1])
        next_obs.append(o[1:])
        act.append(np.asarray(ep.actions))
        rew.append(np.asarray(ep.rewards, dtype=np.float32))
        term.append(np.asarray(ep.terminations, dtype=bool))
        trunc.append(np.asarray(ep.truncations, dtype=bool))
        ep_ids.append(np.full(n, i, dtype=np.int64))
        steps.append(np.arange(n, dtype=np.int32))
        cost = ep.infos.get("cost") if isinstance(ep.infos, dict) else None
        if cost is None or len(cost) != n:
            has_cost = False
        else:
            costs.append(np.asarray(cost, dtype=np.float32))
    if not rew:
        raise DataValidationError(f"Minari dataset '{md.spec.dataset_id}' has no episodes")
    env_spec = md.env_spec
    a_space = md.action_space
    card = DatasetCard(
        name=name,
        env_id=env_spec.id if env_spec is not None else "",
        env_kwargs=dict(env_spec.kwargs) if env_spec is not None else {},
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


def export_minari(name: str, dataset_id: str, *, overwrite: bool = False, author: str | None = None):
    """Write stored dataset `name` into the local Minari store as `dataset_id`; returns the MinariDataset."""
    import gymnasium as gym
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id

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
    if is_local(dataset_id):
        if not overwrite:
            raise DatasetExists(
                f"Minari dataset '{dataset_id}' already exists in the local Minari store; pass --overwrite "
                f"or bump its version (-v1)"
            )
        minari.delete_dataset(dataset_id)
    card = ds.card
    if not card.env_id:
        raise OfflabError(f"dataset '{name}' records no env id; Minari needs one (re-import with --env)")
    spec = gym.spec(card.env_id)
    if card.env_kwargs:
        spec = spec.copy() if hasattr(spec, "copy") else spec
        import dataclasses

        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, **card.env_kwargs})
    buffers = []
    starts, lengths = ds.episode_starts, ds.episode_lengths
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        rows = slice(int(s), int(s + n))
        observations = np.concatenate([ds.obs[rows], ds.next_obs[int(s + n - 1)][None]], axis=0)
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
    env = gym.make(spec)
    try:
        kwargs = {}
        if card.ref_min_score is not None and card.ref_max_score is not None:
            kwargs = {"eval_env": spec, "ref_min_score": card.ref_min_score, "ref_max_score": card.ref_max_score}
        try:
            md = minari.create_dataset_from_buffers(
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
        except BaseException:
            # nothing half-written: remove whatever Minari created for this id
            try:
                from minari.storage.local import get_dataset_path

                shutil.rmtree(get_dataset_path(dataset_id), ignore_errors=True)
            except Exception:
                pass
            raise
    finally:
        env.close()
    return md


def _algorithm_name(card: DatasetCard) -> str:
    policy = card.behavior_policy or {}
    return str(policy.get("algorithm") or card.source.get("kind") or "unknown")

