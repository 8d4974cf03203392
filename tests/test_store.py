"""The Parquet store: round trips, atomic writes (SIGKILL mid-write), corrupt files, and the Transitions view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from offlab import paths
from offlab.data import store
from offlab.data.schema import DatasetCard, coerce_columns
from offlab.data.store import Batch, Transitions, delete_dataset, load_dataset, write_dataset
from offlab.errors import DatasetExists, DatasetNotFound, DataValidationError, OfflabError

COLUMNS = ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated")


def synthetic(n_episodes=6, length=7, obs_dim=11, act_dim=3, seed=0, name="syn", extras=False, discrete=False):
    """Schema-valid episodes (obs chains); even episodes terminate, odd ones are truncated."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in COLUMNS + ("cost", "behavior_logp")}
    for i in range(n_episodes):
        n = length + i  # different lengths
        chain = rng.standard_normal((n + 1, obs_dim))
        end = np.zeros(n, bool)
        end[-1] = True
        for k, v in (("episode", np.full(n, i)), ("step", np.arange(n)), ("obs", chain[:-1]), ("next_obs", chain[1:]),
                     ("action", rng.integers(0, 4, n) if discrete else rng.uniform(-1, 1, (n, act_dim))),
                     ("reward", rng.standard_normal(n)), ("terminated", end & (i % 2 == 0)),
                     ("truncated", end & (i % 2 == 1)), ("cost", rng.uniform(0, 1, n)),
                     ("behavior_logp", rng.standard_normal(n))):
            cols[k].append(v)
    card = DatasetCard(name=name, env_id="Hopper-v5", obs_dim=obs_dim, action_dim=4 if discrete else act_dim,
                       discrete_actions=discrete, source={"kind": "test"})
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    if not extras:
        arrays.pop("cost"), arrays.pop("behavior_logp")
    return coerce_columns(card, **arrays)


def assert_same_table(a, b):
    assert a.columns() == b.columns()
    for c in a.columns():
        x, y = getattr(a, c), getattr(b, c)
        assert x.dtype == y.dtype and x.shape == y.shape, c
        np.testing.assert_array_equal(x, y, err_msg=c)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("extras,discrete", [(False, False), (True, False), (False, True)])
def test_write_then_load_gives_the_same_table(extras, discrete):
    ds = synthetic(extras=extras, discrete=discrete)
    written = write_dataset(ds, "rt")
    loaded = load_dataset("rt")
    assert_same_table(ds, loaded)
    assert loaded.card == written.card
    assert loaded.card.content_hash == ds.content_hash() == loaded.content_hash()
    assert loaded.card.n_steps == len(ds) and loaded.card.n_episodes == 6
    assert loaded.card.action_dim == (4 if discrete else 3)  # discrete: the number of actions


def test_dataset_is_a_folder_under_offlab_home_with_card_in_json_and_parquet(isolated_stores):
    write_dataset(synthetic(), "folder")
    folder = isolated_stores / "datasets" / "folder"
    assert paths.datasets_dir() == isolated_stores / "datasets"
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "data-00000.parquet"]
    card = json.loads((folder / "card.json").read_text())
    meta = pq.read_schema(folder / "data-00000.parquet").metadata[store.CARD_KEY]
    assert json.loads(meta) == card and card["name"] == "folder"
    schema = pq.read_schema(folder / "data-00000.parquet")
    obs_type = schema.field("obs").type
    assert obs_type.list_size == 11 and str(obs_type.value_type) == "float"
    assert str(schema.field("episode").type) == "int64" and str(schema.field("step").type) == "int32"
    assert str(schema.field("terminated").type) == "bool" and str(schema.field("truncated").type) == "bool"


def test_large_tables_are_split_into_parts(monkeypatch):
    monkeypatch.setattr(store, "ROWS_PER_FILE", 20)
    ds = synthetic()
    write_dataset(ds, "parts")
    assert len(list(store.dataset_path("parts").glob("data-*.parquet"))) == int(np.ceil(len(ds) / 20))
    assert_same_table(ds, load_dataset("parts"))


def test_existing_name_needs_overwrite_and_a_failed_write_keeps_the_old_data():
    first = write_dataset(synthetic(seed=0), "same")
    with pytest.raises(DatasetExists, match="already exists; pass --overwrite"):
        write_dataset(synthetic(seed=1), "same")
    bad = synthetic(seed=1)
    bad.reward[3] = np.nan
    with pytest.raises(DataValidationError):
        write_dataset(bad, "same", overwrite=True)
    assert load_dataset("same").card.content_hash == first.card.content_hash
    second = write_dataset(synthetic(seed=1), "same", overwrite=True)
    assert load_dataset("same").card.content_hash == second.card.content_hash != first.card.content_hash
    assert list(paths.staging_dir().iterdir()) == []


def test_invalid_name():
    with pytest.raises(OfflabError, match="not a valid dataset name"):
        write_dataset(synthetic(), "../escape")


def test_list_and_delete():
    write_dataset(synthetic(), "b-set")
    write_dataset(synthetic(), "a-set")
    assert store.list_local() == ["a-set", "b-set"]
    delete_dataset("a-set")
    assert store.list_local() == ["b-set"] and not store.dataset_path("a-set").exists()
    with pytest.raises(DatasetNotFound, match="did you mean 'b-set'"):
        delete_dataset("b-sett")
    with pytest.raises(DatasetNotFound, match="did you mean 'b-set'"):
        load_dataset("b-sat")


# ------------------------------------------------------------------------------------------ corrupt files


def stored_file(name="c") -> Path:
    write_dataset(synthetic(n_episodes=20, length=30), name)
    return store.dataset_path(name) / "data-00000.parquet"


def test_truncated_parquet_raises_data_validation_error():
    f = stored_file()
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match="truncated or corrupt Parquet file"):
        load_dataset("c")


def test_garbage_parquet_raises_data_validation_error():
    f = stored_file()
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
    with pytest.raises(DataValidationError, match="truncated or corrupt Parquet file"):
        load_dataset("c")


def test_flipped_bytes_inside_a_data_page_fail_the_page_checksum():
    f = stored_file()
    data = bytearray(f.read_bytes())
    meta = pq.ParquetFile(f).metadata.row_group(0)
    obs = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("obs"))
    middle = obs.data_page_offset + obs.total_compressed_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    f.write_bytes(bytes(data))
    with pytest.raises(DataValidationError, match="truncated or corrupt Parquet file"):
        load_dataset("c")


def test_corrupt_card_and_missing_data_files():
    stored_file("k")
    (store.dataset_path("k") / "card.json").write_text("{not json")
    with pytest.raises(DataValidationError, match="corrupt card.json"):
        load_dataset("k")
    f = stored_file("m")
    f.unlink()
    with pytest.raises(DataValidationError, match="no data files"):
        load_dataset("m")


def test_row_count_must_match_the_card():
    stored_file("r")
    card_path = store.dataset_path("r") / "card.json"
    card = json.loads(card_path.read_text())
    card["n_steps"] += 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(DataValidationError, match="rows but its card says"):
        load_dataset("r")


# ------------------------------------------------------------------------------------------ atomic writes

IMPORT_SCRIPT = """
import sys
from offlab.data.file_io import import_file
import_file(sys.argv[1], sys.argv[2], "Hopper-v5")
"""


def big_parquet(path: Path, n_episodes=600, length=1000) -> int:
    """A Hopper-shaped log file large enough that writing it to the store takes a while."""
    import pyarrow as pa

    ds = synthetic(n_episodes=n_episodes, length=length - n_episodes, seed=3)
    table = pa.table({
        "episode": ds.episode, "step": ds.step,
        "obs": pa.FixedSizeListArray.from_arrays(ds.obs.reshape(-1), 11),
        "next_obs": pa.FixedSizeListArray.from_arrays(ds.next_obs.reshape(-1), 11),
        "action": pa.FixedSizeListArray.from_arrays(ds.action.reshape(-1), 3),
        "reward": ds.reward, "terminated": ds.terminated, "truncated": ds.truncated,
    })
    pq.write_table(table, path, compression="none")
    return len(ds)


def test_import_killed_mid_write_leaves_nothing_visible_and_the_next_import_succeeds(tmp_path):
    src = tmp_path / "big.parquet"
    n = big_parquet(src)
    proc = subprocess.Popen([sys.executable, "-c", IMPORT_SCRIPT, str(src), "big"], env=dict(os.environ))
    staging = paths.staging_dir()
    deadline = time.monotonic() + 300
    seen = []
    while not seen and proc.poll() is None and time.monotonic() < deadline:
        seen = list(staging.glob(f"big.w{proc.pid}-*")) if staging.is_dir() else []
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, "the import finished before its staging folder was seen; make the file larger"
    assert seen[0].exists(), "the kill must land during the write (staging folder not yet renamed)"
    assert not store.exists("big") and "big" not in store.list_local()
    assert not store.dataset_path("big").exists()
    with pytest.raises(DatasetNotFound):
        load_dataset("big")

    from offlab.data.file_io import import_file

    ds = import_file(src, "big", "Hopper-v5")
    assert len(ds) == n and len(load_dataset("big")) == n
    assert list(staging.iterdir()) == [], "the killed writer's staging folder is swept by the next writer"


def test_sweep_keeps_live_writers_and_removes_dead_ones():
    staging = paths.staging_dir()
    staging.mkdir(parents=True)
    live = staging / f"x.w{os.getpid()}-abc"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = staging / f"x.w{dead_pid}-abc"
    junk = staging / "something-else"
    for p in (live, dead, junk):
        p.mkdir()
    write_dataset(synthetic(), "sweeper")
    assert live.exists() and not dead.exists() and not junk.exists()


# ------------------------------------------------------------------------------------------ Transitions


@pytest.fixture
def transitions():
    write_dataset(synthetic(n_episodes=8, length=10, extras=True), "tr")
    return Transitions(load_dataset("tr"))


def test_batch_shapes_dtypes_and_values(transitions):
    g = torch.Generator().manual_seed(0)
    b = transitions.sample(64, g)
    assert isinstance(b, Batch)
    assert [f for f in b.__dataclass_fields__] == ["obs", "action", "reward", "next_obs", "terminated", "rows"]
    assert b.obs.shape == (64, 11) and b.next_obs.shape == (64, 11) and b.action.shape == (64, 3)
    assert b.reward.shape == (64,) and b.terminated.shape == (64,)
    assert all(t.dtype == torch.float32 for t in (b.obs, b.action, b.reward, b.next_obs, b.terminated))
    idx = torch.randint(len(transitions), (64,), generator=torch.Generator().manual_seed(0)).numpy()
    ds = transitions.dataset
    np.testing.assert_array_equal(b.obs.numpy(), ds.obs[idx])
    np.testing.assert_array_equal(b.next_obs.numpy(), ds.next_obs[idx])
    np.testing.assert_array_equal(b.action.numpy(), ds.action[idx])
    np.testing.assert_array_equal(b.reward.numpy(), ds.reward[idx])
    np.testing.assert_array_equal(b.rows.numpy(), idx)  # the dataset rows (PRDC's state neighbours use them)
    assert b.rows.dtype == torch.long and b.to("cpu").rows is not None


def test_terminated_is_the_only_mask_truncated_steps_bootstrap(transitions):
    ds = transitions.dataset
    rows = torch.arange(len(transitions))
    b = transitions.batch(rows)
    np.testing.assert_array_equal(b.terminated.numpy(), ds.terminated.astype(np.float32))
    truncated_rows = np.flatnonzero(ds.truncated)
    assert len(truncated_rows) and (b.terminated.numpy()[truncated_rows] == 0).all()
    assert not hasattr(b, "truncated") and not hasattr(b, "done")


def test_same_generator_seed_same_batches(transitions):
    a = transitions.sample(32, torch.Generator().manual_seed(7))
    b = transitions.sample(32, torch.Generator().manual_seed(7))
    c = transitions.sample(32, torch.Generator().manual_seed(8))
    assert torch.equal(a.obs, b.obs) and not torch.equal(a.obs, c.obs)


def test_segments_stay_within_episodes(transitions):
    ds = transitions.dataset
    seg = transitions.sample_segments(500, 12, torch.Generator().manual_seed(0))
    assert seg["obs"].shape == (500, 12, 11) and seg["action"].shape == (500, 12, 3)
    assert seg["reward"].shape == (500, 12) and seg["cost"].shape == (500, 12)
    rows = seg["start"].numpy()[:, None] + np.arange(12)
    assert (ds.episode[rows] == ds.episode[rows[:, :1]]).all(), "a segment crosses an episode boundary"
    np.testing.assert_array_equal(seg["obs"].numpy(), ds.obs[rows])
    np.testing.assert_array_equal(seg["next_obs"][:, :-1].numpy(), seg["obs"][:, 1:].numpy())
    # every long-enough episode and both ends of an episode can be drawn
    assert set(np.unique(ds.episode[rows[:, 0]])) == set(np.flatnonzero(ds.episode_lengths >= 12))
    ends = transitions.episode_starts + transitions.episode_lengths
    assert np.isin(rows[:, -1] + 1, ends).any() and np.isin(rows[:, 0], transitions.episode_starts).any()
    with pytest.raises(OfflabError, match="shorter segment"):
        transitions.sample_segments(4, 100)


def test_whole_episodes(transitions):
    ds = transitions.dataset
    ep = transitions.episode(3)
    rows = ds.episode == 3
    np.testing.assert_array_equal(ep["obs"].numpy(), ds.obs[rows])
    np.testing.assert_array_equal(ep["truncated"].numpy(), ds.truncated[rows])
    assert ep["truncated"][-1] and not ep["terminated"][-1]  # odd episodes are truncated
    assert set(ep) >= {"obs", "action", "reward", "next_obs", "terminated", "truncated", "cost", "behavior_logp"}


def test_normaliser_statistics(transitions):
    obs = transitions.dataset.obs.astype(np.float64)
    np.testing.assert_allclose(transitions.obs_mean, obs.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(transitions.obs_std, obs.std(0), rtol=1e-6)
    mean, std = transitions.normalizer_stats(eps=1e-3)
    np.testing.assert_allclose(std, obs.std(0) + 1e-3, rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == (11,)


def test_view_shares_memory_with_the_loaded_columns(transitions):
    assert transitions.obs.data_ptr() == transitions.dataset.obs.__array_interface__["data"][0]
