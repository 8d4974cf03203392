"""Minari in and out, on datasets collected in the real MuJoCo simulator with Minari's DataCollector."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari import DataCollector

from offlab.data import minari_io, registry, store
from offlab.data.schema import DatasetCard, coerce_columns
from offlab.errors import DatasetExists, EnvError, OfflabError, SourceUnavailable
from tests.helpers import run_cli

SOURCE_ID = "test/hopper/random-v0"


def collect(root: Path, dataset_id: str, steps: int = 3000, seed: int = 0, max_episode_steps: int = 50,
            env_id: str = "Hopper-v5", data_format: str = "hdf5"):
    """Random actions in Hopper-v5 (time limit 50 so some episodes are truncated), recorded by DataCollector."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        env = DataCollector(gym.make(env_id, max_episode_steps=max_episode_steps), data_format=data_format)
        env.reset(seed=seed)
        env.action_space.seed(seed)
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env.create_dataset(dataset_id, algorithm_name="random", author="offlab tests",
                               author_email="tests@localhost", code_permalink="tests/test_minari_io.py",
                               description="random Hopper-v5 actions")
        env.close()
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old or ""


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minari_source")
    collect(root, SOURCE_ID)
    return root


@pytest.fixture
def source(collected, isolated_stores):
    """The collected dataset, copied into this test's (empty) Minari store; returns the MinariDataset."""
    dst = Path(os.environ["MINARI_DATASETS_PATH"])
    shutil.copytree(collected, dst, dirs_exist_ok=True)
    return minari.load_dataset(SOURCE_ID)


def episodes(md):
    return list(md.iterate_episodes())


def test_collected_data_has_terminations_and_truncations(source):
    eps = episodes(source)
    assert source.total_steps >= 3000 - 50
    assert any(e.terminations[-1] for e in eps)
    assert any(e.truncations[-1] and not e.terminations[-1] and len(e.rewards) == 50 for e in eps)


def test_import_keeps_every_step_and_the_final_observation(source):
    ds = minari_io.import_minari(SOURCE_ID, "imported")
    eps = episodes(source)
    assert ds.n_episodes == len(eps) and len(ds) == source.total_steps
    for i, ep in enumerate(eps):
        rows = ds.episode == i
        np.testing.assert_array_equal(ds.obs[rows], ep.observations[:-1].astype(np.float32))
        np.testing.assert_array_equal(ds.next_obs[rows], ep.observations[1:].astype(np.float32))
        np.testing.assert_array_equal(ds.action[rows], ep.actions)
        np.testing.assert_array_equal(ds.reward[rows], ep.rewards.astype(np.float32))
        np.testing.assert_array_equal(ds.terminated[rows], ep.terminations)
        np.testing.assert_array_equal(ds.truncated[rows], ep.truncations)
    card = ds.card
    assert card.env_id == "Hopper-v5" and card.env_kwargs == {"max_episode_steps": 50}
    assert card.source == {"kind": "minari", "minari_id": SOURCE_ID, "algorithm_name": "random"}
    assert (card.ref_min_score, card.ref_max_score) == (-20.272305, 3234.3)  # D4RL's, from the catalog
    assert card.action_low == [-1.0] * 3 and card.action_high == [1.0] * 3


def test_minari_to_offlab_to_minari_through_the_cli_is_identical(source):
    r = run_cli("data", "import", SOURCE_ID, "--name", "x")
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "export", "x", "--minari", "offlab/hopper/x-v0")
    assert r.returncode == 0, r.stderr
    back = minari.load_dataset("offlab/hopper/x-v0")
    src_eps, back_eps = episodes(source), episodes(back)
    assert back.total_episodes == source.total_episodes and back.total_steps == source.total_steps
    for a, b in zip(src_eps, back_eps, strict=True):
        # offlab stores float32 (the schema); Minari's MuJoCo observations and rewards are float64
        np.testing.assert_array_equal(b.observations, a.observations.astype(np.float32).astype(a.observations.dtype))
        assert b.observations.dtype == a.observations.dtype
        np.testing.assert_array_equal(b.actions, a.actions)
        np.testing.assert_array_equal(b.rewards, a.rewards.astype(np.float32))
        np.testing.assert_array_equal(b.terminations, a.terminations)
        np.testing.assert_array_equal(b.truncations, a.truncations)
    spec_a, spec_b = source.env_spec, back.env_spec
    assert (spec_b.id, spec_b.kwargs, spec_b.max_episode_steps, spec_b.entry_point) == (
        spec_a.id, spec_a.kwargs, spec_a.max_episode_steps, spec_a.entry_point)
    assert spec_b.max_episode_steps == 50
    assert back.observation_space == source.observation_space and back.action_space == source.action_space
    meta = back.storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-20.272305, 3234.3)
    assert "x" in meta["description"]
    # and back again: the second import is the same table as the first
    again = minari_io.import_minari("offlab/hopper/x-v0", "again")
    assert again.content_hash() == store.load_dataset("x").content_hash()


@pytest.mark.parametrize("data_format", ["hdf5", "arrow"])
@pytest.mark.parametrize("env_id", ["Hopper-v5", "CartPole-v1"])
def test_direct_readers_equal_minaris_own_for_both_storage_formats(isolated_stores, env_id, data_format):
    root = Path(os.environ["MINARI_DATASETS_PATH"])
    collect(root, "test/direct/read-v0", steps=300, seed=1, env_id=env_id, data_format=data_format)
    md = minari.load_dataset("test/direct/read-v0")
    assert md.storage.metadata["data_format"] == data_format
    ours, theirs = list(minari_io._episodes(md)), episodes(md)
    assert len(ours) == len(theirs) > 3
    for a, b in zip(ours, theirs, strict=True):
        for k in minari_io.EPISODE_KEYS:
            assert a[k].dtype == getattr(b, k).dtype, k
            np.testing.assert_array_equal(a[k], getattr(b, k), err_msg=k)
    # and through the store and back to Minari, in the same format family
    minari_io.import_minari("test/direct/read-v0", "direct")
    back = minari_io.export_minari("direct", "test/direct/back-v0")
    for a, b in zip(theirs, episodes(back), strict=True):
        np.testing.assert_array_equal(b.actions, a.actions)
        np.testing.assert_array_equal(b.observations, a.observations.astype(np.float32).astype(a.observations.dtype))
        np.testing.assert_array_equal(b.terminations, a.terminations)
        np.testing.assert_array_equal(b.truncations, a.truncations)


def test_export_without_reference_scores_stores_none_and_carries_costs():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((13, 11)), rng.standard_normal((9, 11))  # 12 + 8 steps
    card = DatasetCard(name="costly", env_id="Hopper-v5", obs_dim=11, action_dim=3, source={"kind": "test"})
    ds = coerce_columns(card, episode=np.r_[np.zeros(12), np.ones(8)], step=np.r_[np.arange(12), np.arange(8)],
                        obs=np.r_[a[:-1], b[:-1]], next_obs=np.r_[a[1:], b[1:]],
                        action=rng.uniform(-1, 1, (20, 3)), reward=rng.standard_normal(20),
                        terminated=np.r_[np.zeros(11), 1, np.zeros(8)], truncated=np.r_[np.zeros(19), 1],
                        cost=rng.uniform(0, 1, 20))
    store.write_dataset(ds, "costly")
    md = minari_io.export_minari("costly", "offlab/hopper/costly-v0")
    assert "ref_min_score" not in md.storage.metadata
    ep = next(md.iterate_episodes())
    np.testing.assert_array_equal(ep.infos["cost"], ds.cost[:12])
    back = minari_io.import_minari("offlab/hopper/costly-v0", "costly-back")
    np.testing.assert_array_equal(back.cost, ds.cost)
    np.testing.assert_array_equal(back.next_obs, ds.next_obs)


def test_export_over_an_existing_minari_id_needs_overwrite(source):
    minari_io.import_minari(SOURCE_ID, "a")
    with pytest.raises(DatasetExists, match="already exists in the local Minari store"):
        minari_io.export_minari("a", SOURCE_ID)
    half = store.load_dataset("a").select_rows(np.flatnonzero(store.load_dataset("a").episode < 5))
    store.write_dataset(half, "half")
    md = minari_io.export_minari("half", SOURCE_ID, overwrite=True)
    assert md.total_episodes == 5 and minari.load_dataset(SOURCE_ID).total_episodes == 5
    staging = Path(os.environ["MINARI_DATASETS_PATH"]) / minari_io.STAGING_FOLDER
    assert list(staging.iterdir()) == []
    assert sorted(minari.list_local_datasets()) == [SOURCE_ID]


def test_bad_minari_ids():
    store.write_dataset(coerce_columns(
        DatasetCard(name="one", env_id="Hopper-v5", obs_dim=11, action_dim=3), episode=[0], step=[0],
        obs=np.zeros((1, 11)), next_obs=np.ones((1, 11)), action=np.zeros((1, 3)), reward=[0.0],
        terminated=[True], truncated=[False]), "one")
    for bad in ("offlab/hopper/one", "no spaces allowed-v0 !"):
        with pytest.raises(OfflabError, match="is not a Minari dataset id|needs a version suffix"):
            minari_io.export_minari("one", bad)
    card_path = store.dataset_path("one") / "card.json"
    card_path.write_text(card_path.read_text().replace('"Hopper-v5"', '"Walker2d-v5"'))
    with pytest.raises(EnvError, match="width 11 but Walker2d-v5 expects 17"):
        minari_io.export_minari("one", "offlab/walker2d/one-v0")
    assert minari.list_local_datasets() == {}
    assert not minari_io.looks_like_minari_id("logs.txt") and minari_io.looks_like_minari_id("mujoco/hopper/medium-v0")


def test_minari_id_not_local_without_network_says_so_and_points_to_get(monkeypatch):
    # an unreachable proxy is a network that is down, on any machine
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(SourceUnavailable, match=r"no network connection.*offlab data get"):
        minari_io.import_minari("mujoco/hopper/medium-v0", "m", download=True)
    assert not store.exists("m")


def test_minari_id_not_local_on_this_machine():
    if minari_io._reachable(minari_io.remote_host()):
        pytest.skip("this machine reaches the Minari hub")
    with pytest.raises(SourceUnavailable, match=r"not in the local Minari store and there is no network.*offlab data get"):
        minari_io.import_minari("mujoco/hopper/medium-v0", "m", download=True)


def test_get_resolves_a_catalog_name_from_the_local_minari_store(isolated_stores):
    collect(Path(os.environ["MINARI_DATASETS_PATH"]), "mujoco/hopper/medium-v0", steps=400)
    assert registry.resolve_source("hopper-medium") == "minari-local"
    ds = registry.get("hopper-medium", download=False, build=False)
    assert ds.card.source["minari_id"] == "mujoco/hopper/medium-v0"
    assert (ds.card.ref_min_score, ds.card.ref_max_score) == (-20.272305, 3234.3)
    assert registry.resolve_source("hopper-medium") == "cache"
    assert store.load_dataset("hopper-medium").content_hash() == ds.content_hash()
