"""Built D4RL-style datasets and `collect`: real simulator, shipped policies, small step counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offlab.data import build, registry, store
from offlab.envs.make import make_env, normalized_score
from offlab.errors import DatasetExists, EnvError, OfflabError, PolicyError
from offlab.paths import catalog_dir
from tests.helpers import run_cli

POLICIES = catalog_dir() / "policies" / "hopper"
needs_hopper = pytest.mark.skipif(
    not (POLICIES / "expert.safetensors").is_file(), reason="hopper behaviour policies are not shipped yet"
)


@needs_hopper
def test_same_name_steps_and_seed_give_the_same_hash_whatever_the_workers():
    a = build.build_dataset("hopper-medium", steps=1000, seed=3, workers=1, store_as="a")
    b = build.build_dataset("hopper-medium", steps=1000, seed=3, workers=2, store_as="b")
    c = build.build_dataset("hopper-medium", steps=1000, seed=4, workers=1, store_as="c")
    assert a.card.content_hash == b.card.content_hash
    assert a.card.content_hash != c.card.content_hash
    assert len(a) == 1000
    import mujoco

    assert a.card.source["simulator"]["mujoco"] == mujoco.__version__  # the hash holds under this simulator


@needs_hopper
def test_a_script_without_a_main_guard_builds_with_two_workers_once(tmp_path, cli_env):
    """The build's workers are fresh interpreters that import offlab alone: a script that builds a dataset at
    import time, with no `if __name__ == "__main__":` guard (multiprocessing's spawn ran it again in every worker,
    which then failed), builds it once, the same as one worker does."""
    script = tmp_path / "build_data.py"
    script.write_text(
        "from offlab.data import build\n"
        "ds = build.build_dataset('hopper-medium', steps=600, seed=2, workers=2, store_as='two-workers')\n"
        "print('built', len(ds), ds.card.content_hash)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one = build.build_dataset("hopper-medium", steps=600, seed=2, workers=1, store_as="one-worker")
    assert done.stdout.splitlines() == [f"built 600 {one.card.content_hash}"]


def test_a_failed_build_worker_is_one_clear_error(monkeypatch):
    """A worker that dies (here an interpreter that exits at once) stops the build with one line naming the way
    out, and the other workers are stopped."""
    import shutil

    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(OfflabError, match=r"a dataset build worker stopped \(exit code 1; .*--workers 1"):
        build.rollout("Hopper-v5", [build.Part(build.PolicySource("uniform"), 600)], seed=0, workers=2)


def test_without_a_python_executable_the_workers_build_in_this_process(monkeypatch):
    """Where sys.executable is unknown (an embedded interpreter) no worker can start: the groups run in this
    process, with the data of a build in two workers."""
    part = [build.Part(build.PolicySource("uniform"), 600)]
    in_workers = build.rollout("Hopper-v5", part, seed=0, workers=2)
    make_env("Hopper-v5").close()  # mujoco's import asks sys.executable about glfw's library: import it first
    monkeypatch.setattr(build, "_run_groups_in_workers", lambda *a: pytest.fail("started workers"))
    monkeypatch.setattr(sys, "executable", "")
    here = build.rollout("Hopper-v5", part, seed=0, workers=2)
    assert in_workers.keys() == here.keys()
    for name, column in in_workers.items():
        np.testing.assert_array_equal(column, here[name], err_msg=name)


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@needs_hopper
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the workers through /proc")
def test_ctrl_c_stops_a_two_worker_build_and_its_workers_and_leaves_nothing(cli_env, isolated_stores, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during `offlab data build` with two workers:
    exit code 130 and "interrupted", the workers gone, no dataset and no temporary folder left."""
    import signal
    import time

    env = cli_env | {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    cli = subprocess.Popen([sys.executable, "-m", "offlab.cli", "data", "build", "hopper-medium", "--steps", "400000",
                            "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_children(cli.pid)) < 2 and time.monotonic() < deadline and cli.poll() is None:
        time.sleep(0.2)
    workers = _children(cli.pid)
    assert len(workers) == 2, "the build's two workers did not start"
    time.sleep(1.0)  # the workers are rolling out
    os.killpg(cli.pid, signal.SIGINT)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-1000:]
    for pid in workers:  # killed and reaped by the CLI
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    assert not (isolated_stores / "datasets" / "hopper-medium").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


_LOGP_PROBE = """
import hashlib
from offlab.data import build
cols = build.rollout("Hopper-v5", [build.Part(build.resolve_policy("hopper/medium"), 3000)], seed=0)
print(*(hashlib.sha256(cols[k].tobytes()).hexdigest() for k in ("obs", "action", "logp")))
"""


@needs_hopper
def test_a_build_does_not_depend_on_the_cpus_vector_instructions():
    # torch's float32 kernels round a few ulps differently under AVX2 and without it (and under AVX-512), which
    # used to change ~11% of the logged behaviour log-probs, and so the content hash, from one machine to another.
    # And MKL's float32 products in the behaviour actor: its AVX-512 kernels on an Intel CPU and its AVX2 ones (an
    # AMD CPU's) gave other actions, so another rollout (session 31); MKL_CBWR=COMPATIBLE is its SSE code path,
    # different from the default on any x86-64 CPU
    variants = {"as is": {}, "ATen scalar": {"ATEN_CPU_CAPABILITY": "default"},
                "ATen AVX2": {"ATEN_CPU_CAPABILITY": "avx2"}, "MKL AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                "MKL SSE": {"MKL_CBWR": "COMPATIBLE"}}
    digests = {}
    for name, extra in variants.items():
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")} | extra
        out = subprocess.run([sys.executable, "-c", _LOGP_PROBE], env=env, capture_output=True, text=True, check=True)
        digests[name] = out.stdout.split()
    assert all(d == digests["as is"] for d in digests.values()), digests


def test_the_logged_log_prob_is_the_tanh_gaussian_density():
    import torch

    from offlab.nets import tanh_gaussian_log_prob

    rng = np.random.default_rng(0)
    mean, log_std = rng.normal(size=(500, 3)), rng.uniform(-5, 2, size=(500, 3))
    u = mean + np.exp(log_std) * rng.normal(size=(500, 3)) * 3
    expected = tanh_gaussian_log_prob(*(torch.from_numpy(x) for x in (u, mean, log_std))).numpy()
    # up to torch's softplus, which returns x itself above x = 20 (an error of exp(-20) = 2e-9)
    np.testing.assert_allclose(build._tanh_gaussian_log_prob64(u, mean, log_std), expected, rtol=1e-12, atol=1e-8)


@needs_hopper
def test_random_dataset_scores_near_zero():
    ds = build.build_dataset("hopper-random", steps=4000, seed=0, workers=1)
    returns = ds.episode_returns()[(ds.terminated | ds.truncated)[np.r_[ds.episode_starts[1:] - 1, len(ds) - 1]]]
    score = normalized_score(returns.mean(), ds.card.ref_min_score, ds.card.ref_max_score)
    assert -5 <= score <= 5
    assert ds.behavior_logp is not None and np.isfinite(ds.behavior_logp).all()


@pytest.mark.parametrize("family, env_id", [("hopper", "Hopper-v5"), ("halfcheetah", "HalfCheetah-v5"),
                                             ("walker2d", "Walker2d-v5")])
def test_shipped_expert_returns_more_than_shipped_medium(family, env_id):
    if not (catalog_dir() / "policies" / family / "expert.safetensors").is_file():
        pytest.skip(f"{family} behaviour policies are not shipped")
    expert = build.evaluate_policy(build.resolve_policy(f"{family}/expert"), env_id, episodes=4)
    medium = build.evaluate_policy(build.resolve_policy(f"{family}/medium"), env_id, episodes=4)
    assert expert["return_mean"] > medium["return_mean"] + 2 * (expert["return_se"] + medium["return_se"])


@needs_hopper
def test_episode_ends_terminated_before_the_time_limit_and_truncated_at_the_limit():
    # the real TimeLimit at a short limit; uniform actions fall early, the medium policy runs out of time
    parts = [build.Part(build.PolicySource("uniform"), 1500), build.Part(build.resolve_policy("hopper/medium"), 1500)]
    cols = build.rollout("Hopper-v5", parts, seed=0, env_kwargs={"max_episode_steps": 60})
    episode, term, trunc = cols["episode"], cols["terminated"], cols["truncated"]
    last = np.r_[np.flatnonzero(np.diff(episode)), len(episode) - 1]
    lengths = np.diff(np.r_[-1, last])
    assert trunc[last].any() and term[last].any()
    assert not (term & trunc).any()
    assert (lengths[trunc[last]] == 60).all()
    assert (lengths[term[last]] <= 60).all()
    # an episode with neither flag is one cut by its stream's step budget: at most one per stream
    assert (~term[last] & ~trunc[last]).sum() <= build.STREAMS * len(parts)
    inner = np.ones(len(episode), bool)
    inner[last] = False
    assert not term[inner].any() and not trunc[inner].any()


@needs_hopper
def test_behavior_logp_is_the_log_density_of_the_logged_action():
    import torch

    from offlab.nets import TanhGaussianActor

    ds = build.build_dataset("hopper-medium", steps=500, seed=1, workers=1)
    src = build.resolve_policy("hopper/medium")
    actor = TanhGaussianActor(11, 3)
    actor.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in src.tensors.items()})
    with torch.no_grad():
        logp = actor.log_prob(torch.from_numpy(ds.obs), torch.from_numpy(ds.action)).numpy()
    ok = np.abs(ds.action).max(axis=1) < 0.999  # atanh is ill-conditioned at the box's edge
    np.testing.assert_allclose(logp[ok], ds.behavior_logp[ok], rtol=1e-3, atol=1e-3)


@needs_hopper
def test_medium_replay_mixes_warmup_and_snapshots_and_medium_expert_is_half_and_half():
    replay = build.build_dataset("hopper-medium-replay", steps=2000, seed=0, workers=1)
    kinds = replay.card.behavior_policy
    assert kinds["kind"] == "replay" and len(kinds["snapshots"]) >= 1
    # whole episodes, as in a replay buffer: every episode ends terminated or truncated, none is cut
    last = np.r_[replay.episode_starts[1:] - 1, len(replay) - 1]
    assert (replay.terminated | replay.truncated)[last].all()
    assert len(replay) >= 2000
    me = build.build_dataset("hopper-medium-expert", steps=2000, seed=0, workers=1)
    assert len(me) == 2000
    assert [p["dataset"] for p in me.card.behavior_policy["parts"]] == ["hopper-medium", "hopper-expert"]


def small_hopper_random_catalog(folder, steps: int) -> str:
    """A copy of the catalog whose hopper-random recipe is `steps` long, with the real shipped policies."""
    import yaml

    cat = yaml.safe_load((catalog_dir() / "catalog.yaml").read_text())
    cat["datasets"]["hopper-random"]["recipe"]["steps"] = steps
    folder.mkdir()
    (folder / "catalog.yaml").write_text(yaml.safe_dump(cat))
    (folder / "policies").symlink_to(catalog_dir() / "policies")
    return str(folder)


@needs_hopper
def test_get_builds_when_nothing_else_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLAB_CATALOG_DIR", small_hopper_random_catalog(tmp_path / "cat", 800))
    assert registry.resolve_source("hopper-random") == "build"
    ds = registry.get("hopper-random", download=False)
    assert store.exists("hopper-random") and ds.card.source["kind"] == "built" and len(ds) == 800
    assert registry.resolve_source("hopper-random") == "cache"


def test_collect_bad_inputs_are_one_line_and_write_nothing(tmp_path):
    with pytest.raises(OfflabError, match="--steps must be a positive"):
        build.collect("Hopper-v5", "hopper/expert", 0, "x")
    with pytest.raises(EnvError, match="not installed"):
        build.collect("Hoper-v5", "hopper/expert", 10, "x")
    with pytest.raises(PolicyError, match="does not exist"):
        build.collect("Hopper-v5", str(tmp_path / "nope.safetensors"), 10, "x")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PolicyError, match="not a readable safetensors"):
        build.collect("Hopper-v5", str(bad), 10, "x")
    assert not store.exists("x")


@needs_hopper
def test_collect_rejects_a_policy_of_another_env_and_existing_names():
    with pytest.raises(PolicyError, match="width 11 to actions of width 3, but the env has 17 and 6"):
        build.collect("HalfCheetah-v5", "hopper/expert", 10, "x")
    build.collect("Hopper-v5", "hopper/expert", 50, "x")
    with pytest.raises(DatasetExists):
        build.collect("Hopper-v5", "hopper/expert", 50, "x")


@needs_hopper
def test_collect_cli_from_a_shipped_policy_with_noise(cli_env):
    r = run_cli("data", "collect", "--env", "Hopper-v5", "--policy", "hopper/medium", "--steps", "300",
                "--name", "noisy", "--noise", "0.1", env=cli_env)
    assert r.returncode == 0, r.stderr
    ds = store.load_dataset("noisy")
    assert len(ds) == 300 and ds.behavior_logp is not None
    assert ds.card.behavior_policy["noise"] == 0.1


def test_build_cli_bad_inputs_exit_2(cli_env):
    for args, msg in [
        (("data", "build", "hopper-medum"), "did you mean 'hopper-medium'"),
        (("data", "build", "hopper-medium", "--steps", "0"), "--steps must be a positive"),
        (("data", "collect", "--env", "Nope-v0", "--policy", "hopper/expert", "--steps", "5", "--name", "z"),
         "not installed"),
    ]:
        r = run_cli(*args, env=cli_env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert store.list_local() == []


@needs_hopper
def test_export_of_a_built_dataset_loads_in_minari_with_reference_scores():
    import minari

    from offlab.data.minari_io import export_minari

    build.build_dataset("hopper-medium", steps=1500, seed=0, workers=1)
    export_minari("hopper-medium", "offlab/hopper/medium-v0")
    md = minari.load_dataset("offlab/hopper/medium-v0")
    assert md.total_steps == 1500
    assert md.storage.metadata["ref_min_score"] == pytest.approx(-20.272305)
    assert md.storage.metadata["ref_max_score"] == pytest.approx(3234.3)


def test_collect_reads_an_sb3_sac_file_without_sb3(tmp_path):
    sb3 = pytest.importorskip("stable_baselines3")
    import gymnasium as gym
    import torch

    from offlab.nets import TanhGaussianActor

    model = sb3.SAC("MlpPolicy", gym.make("Hopper-v5"), seed=0, device="cpu")
    model.save(tmp_path / "sac.zip")
    src = build.resolve_policy(str(tmp_path / "sac.zip"))
    actor = TanhGaussianActor(11, 3)
    actor.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in src.tensors.items()})
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    ours = actor(torch.from_numpy(obs), deterministic=True)[0].detach().numpy()
    theirs = model.predict(obs, deterministic=True)[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    ds = build.collect("Hopper-v5", str(tmp_path / "sac.zip"), 200, "from-sb3")
    assert len(ds) == 200 and ds.card.behavior_policy["algorithm"] == "SB3 SAC"


def _get_at_barrier(env: dict, name: str, barrier) -> str:
    import os

    os.environ.update(env)
    barrier.wait()  # every process finds the dataset missing at the same moment
    return registry.get(name, download=False).card.content_hash


@needs_hopper
def test_parallel_gets_of_a_missing_dataset_build_it_once(tmp_path, monkeypatch):
    """`offlab fit --seed 0 & offlab fit --seed 1 &` on a machine without the data: one process builds it, the
    others wait for it and load it, instead of building it again and failing on the name at the end."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    env = {"OFFLAB_CATALOG_DIR": small_hopper_random_catalog(tmp_path / "cat", 600),
           "OFFLAB_HOME": os.environ["OFFLAB_HOME"]}
    n = 3
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(n, mp_context=ctx) as pool:
        barrier = manager.Barrier(n)
        hashes = list(pool.map(_get_at_barrier, [env] * n, ["hopper-random"] * n, [barrier] * n))
    assert len(set(hashes)) == 1
    monkeypatch.setenv("OFFLAB_CATALOG_DIR", env["OFFLAB_CATALOG_DIR"])
    assert store.load_dataset("hopper-random").card.content_hash == hashes[0]


def test_gymnasiums_own_model_warning_is_dropped_and_the_simulators_warnings_still_shown(tmp_path, monkeypatch,
                                                                                          capfd):
    """HalfCheetah-v5's XML sets the deprecated 'settotalmass': MuJoCo's default handler printed that at every env
    creation (each evaluation of a fit) and wrote MUJOCO_LOG.TXT into the working directory."""
    import mujoco

    monkeypatch.chdir(tmp_path)
    make_env("HalfCheetah-v5").close()
    env = make_env("Hopper-v5")
    captured = capfd.readouterr()
    assert "settotalmass" not in captured.out + captured.err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    model, data = env.unwrapped.model, env.unwrapped.data
    data.qvel[:] = 1e12  # an unstable simulation: MuJoCo's own warning must still reach the user
    mujoco.mj_step(model, data)
    env.close()
    assert "WARNING (MuJoCo): Nan, Inf or huge value in QVEL" in capfd.readouterr().err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
