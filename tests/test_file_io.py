"""Importing the user's own logs: D4RL-style HDF5, Parquet and CSV (with column mapping), and their bad inputs."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offlab.data import store
from offlab.data.file_io import import_file
from offlab.errors import DatasetExists, DataValidationError, EnvError, SourceUnavailable
from tests.helpers import make_sim_dataset


@pytest.fixture(scope="module")
def sim():
    """1,500 random-action Hopper-v5 steps with a 50-step time limit: terminations, truncations, and a last
    episode cut by the step budget (neither flag)."""
    ds = make_sim_dataset("Hopper-v5", steps=1500, seed=1, name="sim", max_episode_steps=50)
    ends = ds.terminated | ds.truncated
    assert ds.terminated.any() and ds.truncated.any() and not ends[-1]
    return ds


def write_d4rl(path, ds, next_observations=True, drop=()):
    with h5py.File(path, "w") as f:
        for key, value in (("observations", ds.obs), ("actions", ds.action), ("rewards", ds.reward),
                           ("terminals", ds.terminated), ("timeouts", ds.truncated),
                           ("next_observations", ds.next_obs if next_observations else None)):
            if value is not None and key not in drop:
                f.create_dataset(key, data=value)


def assert_equal_to_source(got, src):
    for c in ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(got, c), getattr(src, c), err_msg=c)


def expected_without_next_obs(src):
    """The documented rule, written out episode by episode: next_obs = obs[t+1]; a terminal keeps its last
    transition (next_obs = obs); a cut episode loses its last transition and ends truncated one step earlier."""
    rows, next_obs, truncated = [], [], []
    for s, n in zip(src.episode_starts, src.episode_lengths, strict=True):
        r = np.arange(s, s + n)
        terminal = bool(src.terminated[r[-1]])
        keep = r if terminal else r[:-1]
        nxt = np.r_[src.obs[r[1:]], src.obs[r[-1:]]] if terminal else src.obs[r[1:]]
        trunc = np.zeros(len(keep), bool)
        if not terminal and len(keep):
            trunc[-1] = True
        rows.append(keep)
        next_obs.append(nxt[: len(keep)])
        truncated.append(trunc)
    return np.concatenate(rows), np.concatenate(next_obs), np.concatenate(truncated)


def test_hdf5_with_next_observations_equals_the_source(tmp_path, sim):
    write_d4rl(tmp_path / "d.hdf5", sim)
    got = import_file(tmp_path / "d.hdf5", "d4rl", "Hopper-v5")
    assert_equal_to_source(got, sim)
    assert got.card.source["kind"] == "hdf5" and got.card.env_id == "Hopper-v5"
    assert (got.card.ref_min_score, got.card.ref_max_score) == (-20.272305, 3234.3)
    assert_equal_to_source(store.load_dataset("d4rl"), sim)


def test_hdf5_without_next_observations_derives_them_within_episodes(tmp_path, sim):
    write_d4rl(tmp_path / "d.hdf5", sim, next_observations=False)
    got = import_file(tmp_path / "d.hdf5", "derived", "Hopper-v5")
    rows, next_obs, truncated = expected_without_next_obs(sim)
    np.testing.assert_array_equal(got.obs, sim.obs[rows])
    np.testing.assert_array_equal(got.action, sim.action[rows])
    np.testing.assert_array_equal(got.reward, sim.reward[rows])
    np.testing.assert_array_equal(got.terminated, sim.terminated[rows])
    np.testing.assert_array_equal(got.truncated, truncated)
    np.testing.assert_array_equal(got.next_obs, next_obs)
    cut = int((~sim.terminated[sim.episode_starts + sim.episode_lengths - 1]).sum())
    assert len(got) == len(sim) - cut
    # inside episodes the derived next_obs are the simulator's own
    inner = ~(got.terminated | got.truncated)
    np.testing.assert_array_equal(got.next_obs[inner], sim.next_obs[rows][inner])
    assert "dropped" in got.card.notes


def test_parquet_with_list_columns_equals_the_source(tmp_path, sim):
    table = pa.table({
        "episode": sim.episode, "step": sim.step,
        "obs": pa.array(list(sim.obs)), "next_obs": pa.array(list(sim.next_obs)), "action": pa.array(list(sim.action)),
        "reward": sim.reward, "terminated": sim.terminated, "truncated": sim.truncated,
    })
    pq.write_table(table, tmp_path / "log.parquet")
    got = import_file(tmp_path / "log.parquet", "pq", "Hopper-v5")
    assert_equal_to_source(got, sim)
    assert got.card.source["kind"] == "parquet"


def flattened_frame(ds, obs="state", next_obs="next_state", action="act"):
    cols = {}
    for prefix, a in ((obs, ds.obs), (next_obs, ds.next_obs), (action, ds.action)):
        for j in range(a.shape[1]):
            cols[f"{prefix}_{j}"] = a[:, j].astype(np.float64)
    cols.update(rew=ds.reward.astype(np.float64), done=ds.terminated, timeout=ds.truncated)
    return pd.DataFrame(cols)


MAPPING = {"obs": "state", "next_obs": "next_state", "action": "act", "reward": "rew", "terminated": "done",
           "truncated": "timeout"}


def test_csv_with_flattened_columns_and_a_column_mapping_equals_the_source(tmp_path, sim):
    flattened_frame(sim).sample(frac=1.0, axis=1, random_state=0).to_csv(tmp_path / "log.csv", index=False)
    got = import_file(tmp_path / "log.csv", "csv", "Hopper-v5", columns=MAPPING)
    assert_equal_to_source(got, sim)
    assert got.card.source["kind"] == "csv"


def test_parquet_with_flattened_columns_without_next_obs(tmp_path, sim):
    frame = flattened_frame(sim).drop(columns=[f"next_state_{j}" for j in range(11)])
    frame.to_parquet(tmp_path / "flat.parquet")
    mapping = {k: v for k, v in MAPPING.items() if k != "next_obs"}
    got = import_file(tmp_path / "flat.parquet", "flat", "Hopper-v5", columns=mapping)
    rows, next_obs, truncated = expected_without_next_obs(sim)
    np.testing.assert_array_equal(got.obs, sim.obs[rows])
    np.testing.assert_array_equal(got.next_obs, next_obs)
    np.testing.assert_array_equal(got.truncated, truncated)


# ---------------------------------------------------------------------------------------------- bad input


def parquet_log(path, ds, **changes):
    cols = {"episode": ds.episode, "step": ds.step, "obs": list(ds.obs), "next_obs": list(ds.next_obs),
            "action": list(ds.action), "reward": ds.reward, "terminated": ds.terminated, "truncated": ds.truncated}
    cols.update(changes)
    pq.write_table(pa.table({k: v for k, v in cols.items() if v is not None}), path)
    return path


def nothing_written(name="bad"):
    return not store.exists(name) and store.list_local() == []


@pytest.mark.parametrize("column", ["obs", "action", "reward"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf(tmp_path, sim, column, bad):
    a = getattr(sim, column).copy()
    row = int(sim.episode_starts[2] + 3)
    a.reshape(len(a), -1)[row, 0] = bad
    path = parquet_log(tmp_path / "x.parquet", sim, **{column: list(a) if a.ndim == 2 else a})
    with pytest.raises(DataValidationError, match=rf"'{column}' has NaN or inf at episode 2, step 3"):
        import_file(path, "bad", "Hopper-v5")
    assert nothing_written()


def test_widths_that_do_not_match_the_env(tmp_path, sim):
    path = parquet_log(tmp_path / "x.parquet", sim)
    with pytest.raises(EnvError, match="observations of width 11 but Walker2d-v5 expects 17"):
        import_file(path, "bad", "Walker2d-v5")
    path = parquet_log(tmp_path / "y.parquet", sim, action=list(sim.action[:, :2]))
    with pytest.raises(EnvError, match="actions of width 2 but Hopper-v5 expects 3"):
        import_file(path, "bad", "Hopper-v5")
    with pytest.raises(EnvError, match="not installed"):
        import_file(path, "bad", "Hoper-v5")
    assert nothing_written()


def test_episodes_not_contiguous(tmp_path, sim):
    episode = sim.episode.copy()
    s = int(sim.episode_starts[4])
    episode[s : s + 2] = 1  # episode 1's id comes back after episode 3
    with pytest.raises(DataValidationError, match=rf"episode 1 appears again at row {s}"):
        import_file(parquet_log(tmp_path / "x.parquet", sim, episode=episode), "bad", "Hopper-v5")
    assert nothing_written()


def test_steps_out_of_order(tmp_path, sim):
    step = sim.step.copy()
    s = int(sim.episode_starts[3])
    step[s + 1], step[s + 2] = step[s + 2], step[s + 1]
    with pytest.raises(DataValidationError, match=rf"steps out of order in episode 3 \(row {s + 1} has step 2"):
        import_file(parquet_log(tmp_path / "x.parquet", sim, step=step), "bad", "Hopper-v5")
    assert nothing_written()


def test_next_obs_not_the_next_obs_reports_the_first_episode_and_step(tmp_path, sim):
    next_obs = sim.next_obs.copy()
    next_obs[int(sim.episode_starts[5]) + 4] += 1.0
    next_obs[int(sim.episode_starts[2]) + 1] += 1.0
    path = parquet_log(tmp_path / "x.parquet", sim, next_obs=list(next_obs))
    with pytest.raises(DataValidationError, match=r"next_obs\[t\] != obs\[t\+1\] in episode 2 at step 1"):
        import_file(path, "bad", "Hopper-v5")
    assert nothing_written()


def test_missing_columns_and_keys(tmp_path, sim):
    with pytest.raises(DataValidationError, match="lacks the required column 'reward'.*--column reward="):
        import_file(parquet_log(tmp_path / "x.parquet", sim, reward=None), "bad", "Hopper-v5")
    with pytest.raises(DataValidationError, match="lacks the required column 'state'"):
        import_file(parquet_log(tmp_path / "x.parquet", sim), "bad", "Hopper-v5", columns={"obs": "state"})
    write_d4rl(tmp_path / "d.hdf5", sim, drop=("timeouts",))
    with pytest.raises(DataValidationError, match=r"lacks required keys \['timeouts'\]"):
        import_file(tmp_path / "d.hdf5", "bad", "Hopper-v5")
    assert nothing_written()


def test_unreadable_files(tmp_path, sim):
    parquet_log(tmp_path / "x.parquet", sim)
    data = (tmp_path / "x.parquet").read_bytes()
    (tmp_path / "x.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match="cannot read"):
        import_file(tmp_path / "x.parquet", "bad", "Hopper-v5")
    (tmp_path / "d.hdf5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataValidationError, match="not a readable HDF5 file"):
        import_file(tmp_path / "d.hdf5", "bad", "Hopper-v5")
    pd.DataFrame({"obs": ["a", "b"], "action": [1.0, 2.0], "reward": [0.0, 0.0], "terminated": [0, 1]}).to_csv(
        tmp_path / "text.csv", index=False)
    with pytest.raises(DataValidationError, match="column 'obs' holds string values"):
        import_file(tmp_path / "text.csv", "bad", "Hopper-v5")
    assert nothing_written()


def test_missing_path_unknown_format_and_existing_name(tmp_path, sim):
    with pytest.raises(SourceUnavailable, match="does not exist"):
        import_file(tmp_path / "nope.parquet", "bad", "Hopper-v5")
    (tmp_path / "log.txt").write_text("x")
    with pytest.raises(SourceUnavailable, match="cannot tell the format"):
        import_file(tmp_path / "log.txt", "bad", "Hopper-v5")
    assert nothing_written()
    path = parquet_log(tmp_path / "x.parquet", sim)
    first = import_file(path, "taken", "Hopper-v5")
    with pytest.raises(DatasetExists, match="pass --overwrite"):
        import_file(path, "taken", "Hopper-v5")
    assert import_file(path, "taken", "Hopper-v5", overwrite=True).card.content_hash == first.card.content_hash


def cartpole_log(steps=300, seed=0):
    """Random actions in CartPole-v1 (discrete actions) as flat columns."""
    import gymnasium as gym

    env = gym.make("CartPole-v1", max_episode_steps=40)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(steps):
        a = int(rng.integers(2))
        nxt, r, term, trunc, _ = env.step(a)
        rows.append((obs, nxt, a, r, term, trunc))
        obs = env.reset()[0] if term or trunc else nxt
    env.close()
    o, n, a, r, te, tr = (np.array(x) for x in zip(*rows, strict=True))
    return {**{f"obs_{j}": o[:, j] for j in range(4)}, **{f"next_obs_{j}": n[:, j] for j in range(4)},
            "action": a, "reward": r, "terminated": te, "truncated": tr}


def test_discrete_actions_from_csv(tmp_path):
    cols = cartpole_log()
    pd.DataFrame(cols).to_csv(tmp_path / "cp.csv", index=False)
    got = import_file(tmp_path / "cp.csv", "cartpole", "CartPole-v1")
    assert got.action.dtype == np.int64 and got.action.shape == (300,)
    np.testing.assert_array_equal(got.action, cols["action"])
    assert got.card.discrete_actions and got.card.action_dim == 2
    np.testing.assert_array_equal(store.load_dataset("cartpole").action, cols["action"])
    cols["action"] = np.where(np.arange(300) == 7, 2, cols["action"])
    pd.DataFrame(cols).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(EnvError, match="action 2 at row 7 but CartPole-v1 has 2 discrete actions"):
        import_file(tmp_path / "bad.csv", "bad", "CartPole-v1")
