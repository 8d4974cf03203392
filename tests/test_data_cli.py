"""The `offlab data` commands: list/info/get/import/export/delete, and every bad input as one line, exit 2.

Most cases call the CLI's entry point `offlab.cli.main` in this process (the same code path as the
console script, much faster); `test_real_entry_point_*` run the same cases as subprocesses.
"""

from __future__ import annotations

import json
import os
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offlab import paths
from offlab.data import store
from tests.helpers import make_sim_dataset, run_cli

CATALOG_NAMES = 15


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `offlab ARGS...` through offlab.cli.main; returns (exit code, stdout, stderr)."""
    from offlab.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["offlab", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def sim():
    return make_sim_dataset("Hopper-v5", steps=600, seed=2, name="sim", max_episode_steps=50)


def log_file(path, ds, **changes):
    cols = {"episode": ds.episode, "step": ds.step, "obs": list(ds.obs), "next_obs": list(ds.next_obs),
            "action": list(ds.action), "reward": ds.reward, "terminated": ds.terminated, "truncated": ds.truncated}
    cols.update(changes)
    pq.write_table(pa.table({k: v for k, v in cols.items() if v is not None}), path)
    return str(path)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def assert_nothing_written(before=()):
    assert store.list_local() == sorted(before)
    staging = paths.staging_dir()
    assert not staging.exists() or list(staging.iterdir()) == []


# ----------------------------------------------------------------------------------------- behaviour


def test_list_json_shows_the_catalog_and_local_datasets(cli, tmp_path, sim):
    code, out, _ = cli("data", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == CATALOG_NAMES
    assert set(rows[0]) == {"name", "env", "in_catalog", "source", "on_disk", "n_steps", "n_episodes"}
    medium = next(r for r in rows if r["name"] == "hopper-medium")
    assert medium["env"] == "Hopper-v5" and "minari:mujoco/hopper/medium-v0" in medium["source"]
    assert not medium["on_disk"] and medium["in_catalog"]

    code, _, err = cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(cli("data", "list", "--json")[1])}
    assert len(rows) == CATALOG_NAMES + 1
    assert rows["mine"] == {"name": "mine", "env": "Hopper-v5", "in_catalog": False, "source": "parquet",
                            "on_disk": True, "n_steps": len(sim), "n_episodes": sim.n_episodes}
    code, out, _ = cli("data", "list")
    assert code == 0 and "mine" in out
    # piped (no terminal, no COLUMNS), the table is 160 columns wide: every name whole (rich's 80 clipped them: "…")
    piped = run_cli("data", "list", env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert piped.returncode == 0 and all(f" {name} " in piped.stdout for name in rows) and "…" not in piped.stdout


def test_every_data_command_that_makes_or_removes_a_dataset_prints_json(cli, tmp_path, sim):
    keys = {"name", "env", "n_steps", "n_episodes", "return_mean", "normalized_score", "content_hash", "source", "path"}
    code, out, _ = cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5",
                       "--json")
    imported = json.loads(out)
    assert code == 0 and set(imported) == keys | {"imported_from", "notes"}
    assert imported["n_steps"] == len(sim) and imported["n_episodes"] == sim.n_episodes
    assert imported["return_mean"] == pytest.approx(float(sim.episode_returns().mean()))
    assert imported["source"] == "parquet" and imported["path"] == str(store.dataset_path("mine"))

    code, out, _ = cli("data", "get", "mine", "--json")
    assert code == 0 and json.loads(out) == {k: imported[k] for k in keys}
    code, human, _ = cli("data", "get", "mine")
    assert imported["content_hash"] in human and f"{len(sim):,} transitions" in human

    code, out, err = cli("data", "build", "hopper-random", "--steps", "600", "--workers", "1", "--json")
    built = json.loads(out)  # stdout holds the JSON alone; the progress bar is on stderr
    assert code == 0 and set(built) == keys | {"seconds"} and built["seconds"] > 0
    assert built["n_steps"] == 600 and built["source"] == "built" and -10 < built["normalized_score"] < 10

    code, out, _ = cli("data", "export", "mine", "--minari", "offlab/hopper/mine-v0", "--json")
    assert code == 0 and json.loads(out) == {"name": "mine", "minari_id": "offlab/hopper/mine-v0",
                                             "n_episodes": sim.n_episodes, "n_steps": len(sim)}
    code, out, _ = cli("data", "delete", "mine", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"deleted": "mine"} and not store.exists("mine")


def test_info_json_of_a_stored_dataset_and_of_a_catalog_entry(cli, tmp_path, sim):
    cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5")
    code, out, _ = cli("data", "info", "mine", "--json")
    info = json.loads(out)
    assert code == 0
    assert {"name", "on_disk", "path", "env", "source", "n_steps", "n_episodes", "n_terminated", "n_truncated",
            "obs_dim", "action_dim", "episode_length_mean", "return_mean", "return_std", "return_se", "return_min",
            "return_max", "columns", "content_hash", "ref_min_score", "ref_max_score", "normalized_score_mean",
            "normalized_score_se"} <= set(info)
    returns = sim.episode_returns()
    assert info["n_steps"] == len(sim) and info["n_episodes"] == sim.n_episodes
    assert info["n_terminated"] == int(sim.terminated.sum()) and info["n_truncated"] == int(sim.truncated.sum())
    assert info["return_mean"] == pytest.approx(returns.mean(), rel=1e-6)
    assert info["normalized_score_mean"] == pytest.approx(100 * (returns.mean() + 20.272305) / (3234.3 + 20.272305))
    assert info["path"] == str(paths.datasets_dir() / "mine") and info["content_hash"] == sim.content_hash()

    code, out, _ = cli("data", "info", "hopper-medium", "--json")
    entry = json.loads(out)
    assert code == 0 and entry["on_disk"] is False and entry["minari_id"] == "mujoco/hopper/medium-v0"
    assert (entry["ref_min_score"], entry["ref_max_score"]) == (-20.272305, 3234.3)
    assert "offlab data get hopper-medium" in entry["hint"]
    code, out, _ = cli("data", "info", "mine")
    assert code == 0 and "content_hash" in out


def test_get_a_cached_dataset_and_delete_it(cli, tmp_path, sim):
    cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5")
    code, out, _ = cli("data", "get", "mine")
    assert code == 0 and f"{len(sim):,} transitions" in out
    code, out, _ = cli("data", "delete", "mine", "--yes")
    assert code == 0 and "deleted mine" in out
    assert store.list_local() == [] and not (paths.datasets_dir() / "mine").exists()


def test_get_without_network_or_build_says_what_is_missing(cli, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network, on any machine
    code, _, err = cli("data", "get", "hopper-medium", "--no-build")
    assert_one_line_error(code, err, "cannot get 'hopper-medium'", "no network", "offlab data import")
    assert_nothing_written()


def test_offlab_home_is_honoured(tmp_path, sim):
    home = tmp_path / "elsewhere"
    env = dict(os.environ, OFFLAB_HOME=str(home))
    r = run_cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5",
                env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "datasets" / "mine" / "card.json").is_file()
    assert store.list_local() == []  # the test's own OFFLAB_HOME is untouched
    r = run_cli("data", "list", "--json", env=env)
    assert any(row["name"] == "mine" and row["on_disk"] for row in json.loads(r.stdout))


# ----------------------------------------------------------------------------------------- bad input


def bad_log(tmp_path, sim, kind):
    """A file holding one kind of bad input, and the fragments its error must name."""
    s = int(sim.episode_starts[2])
    if kind in ("nan-obs", "inf-action", "nan-reward"):
        column = {"nan-obs": "obs", "inf-action": "action", "nan-reward": "reward"}[kind]
        a = getattr(sim, column).copy()
        a.reshape(len(a), -1)[s + 1, 0] = np.nan if kind.startswith("nan") else np.inf
        return log_file(tmp_path / "x.parquet", sim, **{column: list(a) if a.ndim == 2 else a}), \
            [f"'{column}' has NaN or inf at episode 2, step 1"]
    if kind == "not-contiguous":
        episode = sim.episode.copy()
        episode[int(sim.episode_starts[3])] = 0
        return log_file(tmp_path / "x.parquet", sim, episode=episode), ["not contiguous", "episode 0"]
    if kind == "steps-out-of-order":
        step = sim.step.copy()
        step[s], step[s + 1] = 1, 0
        return log_file(tmp_path / "x.parquet", sim, step=step), ["steps out of order in episode 2"]
    if kind == "next-obs-mismatch":
        next_obs = sim.next_obs.copy()
        next_obs[s + 2] += 1.0
        return log_file(tmp_path / "x.parquet", sim, next_obs=list(next_obs)), \
            ["next_obs[t] != obs[t+1] in episode 2 at step 2"]
    if kind == "missing-column":
        return log_file(tmp_path / "x.parquet", sim, terminated=None), ["lacks the required column 'terminated'"]
    if kind == "hdf5-missing-keys":
        with h5py.File(tmp_path / "x.hdf5", "w") as f:
            f["observations"], f["actions"], f["rewards"] = sim.obs, sim.action, sim.reward
        return str(tmp_path / "x.hdf5"), ["lacks required keys ['terminals', 'timeouts']"]
    raise ValueError(kind)


FILE_CASES = ["nan-obs", "inf-action", "nan-reward", "not-contiguous", "steps-out-of-order", "next-obs-mismatch",
              "missing-column", "hdf5-missing-keys"]


@pytest.mark.parametrize("kind", FILE_CASES)
def test_bad_files_are_one_line_exit_2_and_write_nothing(cli, tmp_path, sim, kind):
    path, fragments = bad_log(tmp_path, sim, kind)
    code, _, err = cli("data", "import", path, "--name", "bad", "--env", "Hopper-v5")
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written()


def test_width_not_matching_the_env(cli, tmp_path, sim):
    code, _, err = cli("data", "import", log_file(tmp_path / "x.parquet", sim), "--name", "bad", "--env", "Ant-v5")
    assert_one_line_error(code, err, "observations of width 11 but Ant-v5 expects")
    code, _, err = cli("data", "import", log_file(tmp_path / "y.parquet", sim, action=list(sim.action[:, :1])),
                       "--name", "bad", "--env", "Hopper-v5")
    assert_one_line_error(code, err, "actions of width 1 but Hopper-v5 expects 3")
    assert_nothing_written()


def test_unknown_names_suggest_the_closest(cli, tmp_path, sim):
    code, _, err = cli("data", "info", "hopper-mediun")
    assert_one_line_error(code, err, "'hopper-mediun'", "did you mean 'hopper-medium'")
    code, _, err = cli("data", "get", "halfcheeta-expert")
    assert_one_line_error(code, err, "did you mean 'halfcheetah-expert'")
    cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "my-hopper", "--env", "Hopper-v5")
    for args in (("delete", "my-hoper", "--yes"), ("export", "my-hoper", "--minari", "offlab/hopper/x-v0")):
        code, _, err = cli("data", *args)
        assert_one_line_error(code, err, "did you mean 'my-hopper'")
    assert_nothing_written(["my-hopper"])


def test_minari_id_not_local_without_network(cli, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    code, _, err = cli("data", "import", "mujoco/hopper/medium-v0", "--name", "m")
    assert_one_line_error(code, err, "'mujoco/hopper/medium-v0' is not in the local Minari store", "no network",
                          "`offlab data get hopper-medium` builds")
    assert_nothing_written()


def test_corrupt_parquet_in_the_store(cli, tmp_path, sim):
    cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5")
    f = paths.datasets_dir() / "mine" / "data-00000.parquet"
    f.write_bytes(f.read_bytes()[:-100])
    for args in (("info", "mine"), ("get", "mine"), ("export", "mine", "--minari", "offlab/hopper/mine-v0")):
        code, _, err = cli("data", *args)
        assert_one_line_error(code, err, "truncated or corrupt Parquet file", "offlab data delete mine")
    code, _, err = cli("data", "delete", "mine", "--yes")
    assert code == 0 and store.list_local() == []


def test_a_corrupt_card_is_listed_and_reported(cli, tmp_path, sim):
    cli("data", "import", log_file(tmp_path / "a.parquet", sim), "--name", "mine", "--env", "Hopper-v5")
    (paths.datasets_dir() / "mine" / "card.json").write_text("{")
    code, out, _ = cli("data", "list", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "mine")
    assert code == 0 and row["on_disk"] and "corrupt card" in row["source"]
    code, _, err = cli("data", "info", "mine")
    assert_one_line_error(code, err, "corrupt card.json", "offlab data delete mine")


def test_existing_name_without_overwrite(cli, tmp_path, sim):
    path = log_file(tmp_path / "a.parquet", sim)
    assert cli("data", "import", path, "--name", "mine", "--env", "Hopper-v5")[0] == 0
    before = (paths.datasets_dir() / "mine" / "card.json").read_text()
    code, _, err = cli("data", "import", path, "--name", "mine", "--env", "Hopper-v5")
    assert_one_line_error(code, err, "dataset 'mine' already exists; pass --overwrite")
    assert (paths.datasets_dir() / "mine" / "card.json").read_text() == before
    assert cli("data", "import", path, "--name", "mine", "--env", "Hopper-v5", "--overwrite")[0] == 0


def test_paths_that_do_not_exist_and_other_usage_errors(cli, tmp_path, sim):
    code, _, err = cli("data", "import", str(tmp_path / "nope.parquet"), "--name", "x", "--env", "Hopper-v5")
    assert_one_line_error(code, err, "nope.parquet' does not exist")
    code, _, err = cli("data", "import", "logs/nope.txt", "--name", "x")
    assert_one_line_error(code, err, "neither an existing file nor a Minari dataset id")
    path = log_file(tmp_path / "a.parquet", sim)
    code, _, err = cli("data", "import", path, "--name", "x")
    assert_one_line_error(code, err, "needs the env the data was logged in: add --env")
    code, _, err = cli("data", "import", path, "--name", "x", "--env", "Hopper-v5", "--column", "obs")
    assert_one_line_error(code, err, "--column 'obs' must look like field=column")
    code, _, err = cli("data", "import", path, "--name", "x", "--env", "Hopper-v5", "--column", "bogus=col")
    assert_one_line_error(code, err, "unknown field(s) ['bogus']")
    code, _, err = cli("data", "import", path, "--name", "../x", "--env", "Hopper-v5")
    assert_one_line_error(code, err, "not a valid dataset name")
    assert_nothing_written()


def test_column_mapping_through_the_cli(cli, tmp_path, sim):
    cols = {f"state_{j}": sim.obs[:, j] for j in range(11)}
    cols |= {f"next_state_{j}": sim.next_obs[:, j] for j in range(11)}
    cols |= {f"a{j}": sim.action[:, j] for j in range(3)}
    cols |= {"r": sim.reward, "done": sim.terminated, "timeout": sim.truncated}
    pq.write_table(pa.table(cols), tmp_path / "flat.parquet")
    code, out, err = cli("data", "import", str(tmp_path / "flat.parquet"), "--name", "flat", "--env", "Hopper-v5",
                         "--column", "obs=state", "--column", "next_obs=next_state", "--column", "action=a",
                         "--column", "reward=r", "--column", "terminated=done", "--column", "truncated=timeout")
    assert code == 0, err
    assert store.load_dataset("flat").content_hash() == sim.content_hash()


def test_messages_with_brackets_print_verbatim(cli, tmp_path, sim):
    # rich markup must not eat '[t+1]' or choke on '[/...]'
    path, _ = bad_log(tmp_path, sim, "next-obs-mismatch")
    code, _, err = cli("data", "import", path, "--name", "bad", "--env", "Hopper-v5")
    assert "next_obs[t] != obs[t+1]" in err
    d = tmp_path / "[" / "odd]"  # the path reads .../[/odd]/nope.parquet
    d.mkdir(parents=True)
    code, _, err = cli("data", "import", str(d / "nope.parquet"), "--name", "x", "--env", "Hopper-v5")
    assert_one_line_error(code, err, "[/odd]")


# ----------------------------------------------------------------------------------------- real entry point


@pytest.mark.parametrize("kind", ["nan-obs", "next-obs-mismatch", "hdf5-missing-keys"])
def test_real_entry_point_bad_files(tmp_path, sim, kind):
    path, fragments = bad_log(tmp_path, sim, kind)
    r = run_cli("data", "import", path, "--name", "bad", "--env", "Hopper-v5")
    assert_one_line_error(r.returncode, r.stderr, *fragments)
    assert_nothing_written()


def test_real_entry_point_unknown_name_and_no_network(tmp_path):
    r = run_cli("data", "info", "walker2d-mediun-expert")
    assert_one_line_error(r.returncode, r.stderr, "did you mean 'walker2d-medium-expert'")
    r = run_cli("data", "import", "mujoco/walker2d/expert-v0", "--name", "w",
                env=dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9"))
    assert_one_line_error(r.returncode, r.stderr, "no network", "offlab data get")
    assert_nothing_written()
