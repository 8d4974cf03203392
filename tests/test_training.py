"""The training loop: same seed same numbers, bit-exact resume after SIGKILL and Ctrl-C, the online phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from offlab import training
from offlab.algos import LearnerSpec, get_algo
from offlab.algos.base import ALGOS, register
from offlab.algos.bc import BC, BCConfig
from offlab.config import RunConfig, resolve_run
from offlab.data.store import Transitions
from offlab.evaluation.online import Evaluator
from offlab.training import OnlineInteraction, ReplayBuffer, mixed_batch
from tests.helpers import make_sim_dataset

TINY = "hopper-tiny"


pytestmark = pytest.mark.usefixtures("tiny_store")


def tiny_run(**changes) -> RunConfig:
    flags = {"dataset": TINY, "algo": "td3bc", "steps": 120, "eval_every": 60, "eval_episodes": 2,
             "online_steps": 80, "seed": 0}
    sets = ["hidden=64,64", "checkpoint_every=40", "log_every=20", "dataset_quality=false"]
    for k, v in changes.items():
        if k in flags:
            flags[k] = v
        else:
            sets.append(f"{k}={v}")
    return resolve_run(None, flags, sets)[0]


def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run (perf/* excluded: wall-clock) as sorted (step, value) lists."""
    client = MlflowClient()
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics if not key.startswith("perf/")
    }


def final_state(run_id: str) -> dict:
    return torch.load(training.run_dir(run_id) / "checkpoint.pt", weights_only=True)


def assert_same_tensors(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_the_same_numbers_offline_and_online():
    first = training.fit(tiny_run(), progress=False)
    second = training.fit(tiny_run(), progress=False)
    other_seed = training.fit(tiny_run(seed=1), progress=False)
    h1, h2, h3 = history(first.run_id), history(second.run_id), history(other_seed.run_id)
    assert {"train/critic_loss", "train/actor_loss", "eval/return", "eval/normalized_score",
            "online/episode_return"} <= set(h1)
    assert [s for s, _ in h1["eval/return"]] == [60, 120, 180, 200]
    assert [s for s, _ in h1["train/critic_loss"]] == list(range(20, 201, 20))
    assert h1 == h2
    assert h1["train/critic_loss"] != h3["train/critic_loss"]
    s1, s2 = final_state(first.run_id), final_state(second.run_id)
    assert_same_tensors(s1["learner"], s2["learner"])
    assert_same_tensors(s1["online"], s2["online"])
    assert MlflowClient().get_run(first.run_id).data.params == MlflowClient().get_run(second.run_id).data.params
    assert s1["step"] == 200 and s1["online"]["replay"]["size"] == 80


@pytest.mark.parametrize("algo", ["td3bc", "prdc"])
def test_two_threads_give_the_same_numbers_twice(algo):
    """fit's default is one thread per core: with 256-wide layers and batch 256 the ops do split across two
    threads (and PRDC's critic step drops to one beside its search), and the same seed still repeats exactly."""
    runs = [training.fit(tiny_run(algo=algo, steps=60, online_steps=0, eval_every=60, hidden="256,256",
                                  threads=2), progress=False) for _ in range(2)]
    assert history(runs[0].run_id) == history(runs[1].run_id)
    assert_same_tensors(final_state(runs[0].run_id)["learner"], final_state(runs[1].run_id)["learner"])
    got = MlflowClient().get_run(runs[0].run_id).data
    assert got.tags["torch_threads"] == "2" and got.params["algo.hidden"] == "[256, 256]"


def test_a_learner_with_a_core_of_its_own_gets_torch_on_one_core_fewer(monkeypatch):
    """PRDC's search process keeps a core busy (`side_cores`): a run that leaves the thread count to the machine
    gives torch the other cores (and PRDC lends torch the search's core when it is idle); one that names its count
    gets it, and PRDC never changes it."""
    import offlab.algos.prdc as prdc_module
    from offlab.data import registry

    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 3)
    monkeypatch.setattr(training, "usable_cores", lambda: 3)
    before = torch.get_num_threads()
    try:
        for threads, algo, expected, named in ((0, "prdc", 2, None), (3, "prdc", 3, None), (2, "prdc", 2, False),
                                               (0, "td3bc", before, None)):
            # named False: a resumed run's count, restored from its tag, which the learner may still lend beside
            trainer = training.Trainer(tiny_run(algo=algo, steps=4, online_steps=0, eval_episodes=0,
                                                threads=threads), registry.get(TINY), torch.device("cpu"),
                                       progress=False, threads_named=named)
            assert getattr(trainer.learner, "side_cores", 0) == (algo == "prdc")
            assert torch.get_num_threads() == expected
            if algo == "prdc":
                assert (trainer.learner.layout is None) == (named is None and bool(threads))
            trainer.close()
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_adams_moment_of_a_dead_weight_sticks_subnormal_unless_flushed_as_training_does():
    """Adam's first moment of a weight whose gradient turns zero decays by beta1 = 0.9 a step; in float32 it enters
    the subnormal range after about 750 steps and stays there (0.9 times a few units of the last place rounds
    back), where every Adam step pays x86's slow path. Flushed, as `offlab fit` trains, it becomes exactly 0."""
    from offlab.nets import adam, take_step
    from offlab.threads import denormals_flushed

    tiny = torch.finfo(torch.float32).tiny

    def first_moment_after_a_dead_stretch() -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(8))
        opt = adam([w], 3e-4)
        take_step(opt, (w * 1e-3).sum())  # one live gradient, then none
        for _ in range(1000):
            take_step(opt, (w * 0.0).sum())
        return opt.state[w]["exp_avg"]

    stuck = first_moment_after_a_dead_stretch()
    assert bool(((stuck != 0) & (stuck.abs() < tiny)).all())  # subnormal, not zero
    with denormals_flushed():
        assert torch.count_nonzero(first_moment_after_a_dead_stretch().view(torch.int32)) == 0


def test_training_flushes_subnormals_on_every_torch_thread_and_stops_at_close():
    """The Trainer sets flush-to-zero for the run on its own thread and on torch's OpenMP threads, including ones
    started before it (they are restarted), and puts the mode back when it closes; one the caller set stays."""
    from offlab.data import registry
    from offlab.threads import flushes_denormals, set_flush_denormals

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not flushes_denormals(2)
        torch.ones(1 << 18).mul_(2.0)  # torch's second thread is running, started without the mode
        trainer = training.Trainer(tiny_run(steps=4, online_steps=0, eval_episodes=0, threads=2),
                                   registry.get(TINY), torch.device("cpu"), progress=False)
        assert flushes_denormals() and flushes_denormals(2)
        trainer.close()
        assert not flushes_denormals() and not flushes_denormals(2)
        assert set_flush_denormals(True)  # the caller's own choice
        training.Trainer(tiny_run(steps=4, online_steps=0, eval_episodes=0, threads=2), registry.get(TINY),
                         torch.device("cpu"), progress=False).close()
        assert flushes_denormals(2)
    finally:
        set_flush_denormals(False)
        torch.set_num_threads(before)


def test_core_wait_sees_a_busy_machine_and_the_loop_says_so_once():
    """`CoreWait` reads how long this process's threads waited for a core: little alone, most of the time for a busy
    thread among busy processes, four per core. A run whose torch threads keep waiting says once
    that the machine is crowded and suggests threads=1; a run that waits little, or has one thread, says nothing."""
    from offlab.data import registry
    from offlab.threads import runqueue_seconds, usable_cores

    if runqueue_seconds() is None:
        pytest.skip("this kernel does not report per-thread run-queue waits")

    # in a fresh interpreter (this one's own threads, torch's pool and helpers, may be waiting for cores too): a
    # busy thread alone for a second, then for 1.5 s beside busy processes, four per core (it waits ~80% of the time;
    # alone it waits only as much as the rest of the machine makes it)
    probe = ("import sys, time; from offlab.threads import CoreWait\n"
             "def spin(s):\n    end = time.perf_counter() + s\n    while time.perf_counter() < end: pass\n"
             "w = CoreWait(); spin(1.0); print(w.sample(), flush=True)\n"
             "sys.stdin.readline(); time.sleep(0.3); w.sample(); spin(1.5); print(w.sample(), flush=True)")
    run = subprocess.Popen([sys.executable, "-c", probe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    alone = float(run.stdout.readline())
    hogs = [subprocess.Popen([sys.executable, "-c", "import time; t = time.time() + 2.5\nwhile time.time() < t: pass"])
            for _ in range(4 * usable_cores())]
    try:
        run.stdin.write("go\n")
        run.stdin.flush()
        crowded = float(run.stdout.readline())
    finally:
        run.wait(timeout=60)
        for hog in hogs:
            hog.wait()
    assert alone < 0.9 and crowded > 0.5, (alone, crowded)

    before = torch.get_num_threads()
    try:
        trainer = training.Trainer(tiny_run(steps=4, online_steps=0, eval_episodes=0, threads=2), registry.get(TINY),
                                   torch.device("cpu"), progress=False)
        trainer._check_crowding(0.2, elapsed=5.0)  # 10% of two threads: a lone run's noise
        trainer._check_crowding(1.5, elapsed=1.0)  # too short an interval to tell
        assert trainer.own_notices == []
        trainer._check_crowding(1.5, elapsed=5.0)
        trainer._check_crowding(1.8, elapsed=5.0)
        assert len(trainer.own_notices) == 1 and "--set threads=1" in trainer.own_notices[0]
        trainer.close()
        one = training.Trainer(tiny_run(steps=4, online_steps=0, eval_episodes=0, threads=1), registry.get(TINY),
                               torch.device("cpu"), progress=False)
        one._check_crowding(0.9, elapsed=5.0)  # one thread: threads=1 is no help
        assert one.own_notices == []
        one.close()
        prdc = training.Trainer(tiny_run(algo="prdc", steps=4, online_steps=0, eval_episodes=0, threads=1),
                                registry.get(TINY), torch.device("cpu"), progress=False)
        if prdc.learner.side_cores:  # its search process keeps a second core busy: the advice takes it inline
            prdc._check_crowding(0.9, elapsed=5.0)
            assert len(prdc.own_notices) == 1 and "search_process=false" in prdc.own_notices[0]
        prdc.close()
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_taken_while_the_next_batch_is_announced_resumes_exactly():
    """The loop draws each offline batch one step early for a learner that takes announcements (PRDC starts
    that batch's neighbour search during the update before). A checkpoint stores the sampler as it was before
    that draw, so the resumed run draws the same batch again and ends with the numbers of an unbroken run."""
    from offlab.data import registry

    run = tiny_run(algo="prdc", steps=9, online_steps=0, eval_episodes=0)
    dataset = registry.get(TINY)

    def trainer_after(steps: int, state=None) -> training.Trainer:
        trainer = training.Trainer(run, dataset, torch.device("cpu"), progress=False)
        if state is not None:
            trainer.load_state_dict(torch.load(state, weights_only=True))
        for _ in range(steps):
            trainer.train_step()
            trainer.step += 1
        return trainer

    whole = trainer_after(9)
    first = trainer_after(5)  # the 6th update is an actor step: its batch is drawn, its search under way
    assert first.offline_batches.upcoming is not None and first.learner._early is not None
    path = Path(os.environ["OFFLAB_HOME"]) / "mid.pt"
    training.save_checkpoint(first.state_dict(), path)
    resumed = trainer_after(4, path)
    assert resumed.step == 9
    assert_same_tensors(whole.learner.state_dict(), resumed.learner.state_dict())
    assert_same_tensors(whole.sampler.get_state(), resumed.sampler.get_state())
    for t in (whole, first, resumed):
        t.close()


def test_checkpoint_holds_tensors_and_plain_data_only():
    result = training.fit(tiny_run(steps=40, online_steps=20, eval_episodes=0), progress=False)
    state = torch.load(result.checkpoint, weights_only=True)  # no pickled objects
    assert state["step"] == 60
    assert {"learner", "sampler", "rng", "train_acc", "online", "run_config", "dataset_hash"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["run_config"]["algo_settings"]["hidden"] == [64, 64]
    assert not list(Path(result.checkpoint).parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------ resume


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "offlab.cli", *args]


def wait_for_checkpoint(proc: subprocess.Popen, runs: Path, known: set[str], min_step: int, timeout: float = 300):
    """Poll until a new run's checkpoint has reached `min_step`; returns (run_id, step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"fit ended before step {min_step}: {proc.communicate()}"
        for folder in runs.glob("*") if runs.exists() else []:
            ckpt = folder / "checkpoint.pt"
            if folder.name in known or not ckpt.exists():
                continue
            try:
                step = torch.load(ckpt, weights_only=True)["step"]
            except Exception:  # renamed into place between exists() and load(): try again
                continue
            if step >= min_step:
                return folder.name, step
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def whole_and_killed(args: list[str], env: dict, min_step: int) -> tuple[str, str, int]:
    """`offlab <args>` run to the end, then again SIGKILLed once a checkpoint of `min_step` or later is on disk:
    (the whole run's id, the killed run's id, the killed run's checkpoint step)."""
    whole = subprocess.run(cli(*args), capture_output=True, text=True, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr
    reference = json.loads(whole.stdout)["run_id"]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    run_id, killed_at = wait_for_checkpoint(proc, Path(os.environ["OFFLAB_HOME"]) / "runs", {reference}, min_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return reference, run_id, killed_at


def test_resume_after_sigkill_and_ctrl_c_ends_with_the_numbers_of_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["fit", "--dataset", TINY, "--algo", "td3bc", "--steps", "200", "--online-steps", "200",
            "--eval-every", "100", "--eval-episodes", "2", "--set", "hidden=64,64", "--set", "checkpoint_every=10",
            "--set", "log_every=50", "--set", "dataset_quality=false", "--json"]
    runs = Path(os.environ["OFFLAB_HOME"]) / "runs"
    # an uninterrupted run, then the same run SIGKILLed in the offline phase
    reference, run_id, killed_at = whole_and_killed(args, env, min_step=50)
    assert killed_at < 200
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # killed: nobody closed it

    # resume, then Ctrl-C in the online phase (mid-episode, with a replay buffer)
    proc = subprocess.Popen(cli("fit", "--resume", run_id, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    _, step = wait_for_checkpoint(proc, runs, {reference} | ({p.name for p in runs.glob("*")} - {run_id}),
                                  min_step=270)
    # a second --resume while this one trains (paused, so it cannot finish meanwhile): refused at once
    proc.send_signal(signal.SIGSTOP)
    try:
        twice = subprocess.run(cli("fit", "--resume", run_id), capture_output=True, text=True, env=env, timeout=120)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert twice.returncode == 2 and len(twice.stderr.strip().splitlines()) == 1, twice.stderr
    assert f"run '{run_id}' is being trained by another process" in twice.stderr
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted" not in err, err  # the stop is in the JSON, told once
    stopped = json.loads(out)
    assert stopped["interrupted"] and 270 <= stopped["step"] < 400
    assert final_state(run_id)["step"] == stopped["step"]
    assert MlflowClient().get_run(run_id).info.status == "KILLED"

    # resume to the end
    done = subprocess.run(cli("fit", "--resume", run_id, "--json"), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 400

    a, b = final_state(reference), final_state(run_id)
    assert_same_tensors(a["learner"], b["learner"])
    assert_same_tensors(a["online"], b["online"])
    assert_same_tensors(a["rng"], b["rng"])
    ha, hb = history(reference), history(run_id)
    assert ha == hb  # every metric at every step, each logged once
    assert len(ha["eval/return"]) == 4 and ha["online/episode_return"]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_prdc_run_killed_with_its_search_process_resumes_to_the_numbers_of_an_uninterrupted_run():
    """On two or more cores PRDC searches in a process of its own: a SIGKILL of the trainer leaves that process
    nothing to serve (it exits), and the resumed run, with a new search process, ends with the numbers of a run
    that was never stopped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["fit", "--dataset", TINY, "--algo", "prdc", "--steps", "600", "--eval-every", "0", "--set",
            "hidden=64,64", "--set", "checkpoint_every=10", "--set", "dataset_quality=false", "--json"]
    reference, run_id, killed_at = whole_and_killed(args, env, min_step=30)
    assert killed_at < 600
    done = subprocess.run(cli("fit", "--resume", run_id, "--json"), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 600
    assert_same_tensors(final_state(reference)["learner"], final_state(run_id)["learner"])
    assert MlflowClient().get_run(run_id).data.tags["torch_threads"] == \
        MlflowClient().get_run(reference).data.tags["torch_threads"]


def test_a_run_on_the_default_thread_count_resumes_on_the_count_it_started_with(monkeypatch):
    """threads 0 means the machine's default, one per core. A run resumed on a machine with more cores keeps the
    count it started with (tagged torch_threads), since its numbers depend on it; with fewer cores than that, it
    takes this machine's and says so."""
    from offlab import tracking

    run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 5, "eval_episodes": 0},
                         ["hidden=8", "threads=0"])
    started: list[str] = []

    def killed(tracker, dataset):  # a SIGKILL after the run's tags and config were stored
        started.append(tracker.run_id)
        raise KeyboardInterrupt

    real = tracking.log_dataset_quality
    monkeypatch.setattr(tracking, "log_dataset_quality", killed)
    with pytest.raises(KeyboardInterrupt):
        training.fit(run, progress=False)  # conftest runs tests on one torch thread
    monkeypatch.setattr(tracking, "log_dataset_quality", real)
    assert MlflowClient().get_run(started[0]).data.tags["torch_threads"] == "1"
    seen: list[int] = []
    torch.set_num_threads(2)  # this machine's default is now two
    try:
        training.resume(started[0], progress=False, on_start=lambda _: seen.append(torch.get_num_threads()))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert seen == [1] and after == 2  # trained on the run's count; the caller's count restored
    assert training.resumed_threads(0, "1", "r", cores=2) == 1
    assert training.resumed_threads(3, "1", "r", cores=2) == 3  # an explicit count is the run's config
    assert training.resumed_threads(0, None, "r", cores=2) == 0  # runs from before the tag existed
    assert training.resumed_threads(0, "16", "r", cores=2) == 0  # too few cores: this machine's default


def test_online_state_restores_the_env_mid_episode_exactly():
    ds = make_sim_dataset("Hopper-v5", steps=400, seed=3, name="x")
    spec = LearnerSpec.from_transitions(Transitions(ds))
    learner = BC(BCConfig(), spec, "cpu")
    online = OnlineInteraction("Hopper-v5", {}, 7, spec, capacity=50, exploration_noise=0.3)
    for _ in range(37):
        online.step(learner, add_noise=True)
    state = online.state_dict()
    assert len(state["episode_actions"]) > 0, "the checkpoint should fall mid-episode"
    later = [(online.step(learner, True), online.obs.copy()) for _ in range(40)]
    restored = OnlineInteraction("Hopper-v5", {}, 7, spec, capacity=50, exploration_noise=0.3)
    restored.load_state_dict(state)
    again = [(restored.step(learner, True), restored.obs.copy()) for _ in range(40)]
    for (m1, o1), (m2, o2) in zip(later, again, strict=True):
        assert m1 == m2
        np.testing.assert_array_equal(o1, o2)
    assert_same_tensors(online.replay.state_dict(), restored.replay.state_dict())
    assert online.replay.size == 50 and online.replay.pos == 77 % 50  # a full ring buffer wraps


def test_online_batches_mix_replay_and_offline_data_at_the_ratio():
    ds = make_sim_dataset("Hopper-v5", steps=300, seed=0, name="x")
    data = Transitions(ds)
    replay = ReplayBuffer(10, ds.obs.shape[1], 3)
    generator = torch.Generator().manual_seed(0)
    offline = lambda n: data.sample(n, generator)  # noqa: E731
    assert len(mixed_batch(offline, replay, 256, 0.25, generator, torch.device("cpu")).obs) == 256  # empty replay
    for _ in range(5):
        replay.add(np.full(11, 1e6), np.zeros(3), 0.0, np.zeros(11), False)
    for ratio, expected in ((0.25, 64), (0.5, 128), (0.0, 0), (1.0, 256)):
        batch = mixed_batch(offline, replay, 256, ratio, generator, torch.device("cpu"))
        assert batch.obs.shape == (256, 11)
        assert int((batch.obs[:, 0] == 1e6).sum()) == expected
        # the offline part knows its dataset rows, the replay part is marked -1 (PRDC's state neighbours)
        from_replay = batch.obs[:, 0] == 1e6
        if expected == 256:
            assert batch.rows is None  # all from the replay: no dataset rows
            continue
        assert torch.all(batch.rows[from_replay] == -1) and torch.all(batch.rows[~from_replay] >= 0)
        np.testing.assert_array_equal(batch.obs[~from_replay].numpy(), data.obs[batch.rows[~from_replay]].numpy())


def test_evaluation_is_seeded_and_normalised():
    ev = Evaluator("Hopper-v5", episodes=3, seed=5, ref_min_score=-20.272305, ref_max_score=3234.3)
    rng = np.random.default_rng(0)
    fixed = rng.uniform(-1, 1, (200, 3)).astype(np.float32)
    t = {"i": 0}

    def open_loop(obs):
        t["i"] += 1
        return np.repeat(fixed[t["i"] % 200][None], len(obs), 0)

    first = ev(open_loop)
    t["i"] = 0
    second = ev(open_loop)
    np.testing.assert_array_equal(first.returns, second.returns)
    assert first.episodes == 3
    assert first.normalized_score == pytest.approx(100 * (first.mean_return + 20.272305) / (3234.3 + 20.272305))
    assert first.return_se == pytest.approx(first.returns.std(ddof=1) / np.sqrt(3))
    other = Evaluator("Hopper-v5", episodes=3, seed=6)
    t["i"] = 0
    assert not np.array_equal(other(open_loop).returns, first.returns)


class _CollectingBC(BC):
    """BC that runs the online phase itself: collects a short episode per call, then one mixed update."""

    name = "test-collecting-bc"
    needs_second_env = True
    seen: dict = {}

    def online_step(self, env, context):
        obs, _ = env.reset(seed=context.step)
        next_obs, reward, terminated, _, _ = env.step(self.act(obs))
        context.replay.add(obs, self.act(obs), reward, next_obs, terminated)
        _CollectingBC.seen = {"second_env": context.second_env, "step": context.step, "replay": len(context.replay)}
        return self.update(context.sample())


def test_learners_with_online_step_drive_interaction_and_get_a_second_env():
    register(_CollectingBC)
    try:
        run = tiny_run(algo="test-collecting-bc", steps=10, online_steps=5, eval_episodes=0)
        result = training.fit(run, progress=False)
    finally:
        ALGOS.pop("test-collecting-bc")
    assert result.step == 15 and not result.interrupted
    seen = _CollectingBC.seen
    assert seen["step"] == 14 and seen["replay"] == 5
    assert seen["second_env"] is not None and seen["second_env"].spec.id == "Hopper-v5"


class _AdvisingBC(BC):
    """BC that leaves a notice on its third update."""

    name = "test-advising-bc"
    last = None

    def update(self, batch):
        _AdvisingBC.last = self
        if getattr(self, "calls", 0) == 2:
            self.notices.append("three updates done; try --set lr=1")
        self.calls = getattr(self, "calls", 0) + 1
        return super().update(batch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notices = []


@pytest.mark.parametrize("progress", [False, True])
def test_a_learners_notice_is_printed_once_and_cleared(capsys, progress):
    register(_AdvisingBC)
    try:
        result = training.fit(tiny_run(algo="test-advising-bc", steps=10, online_steps=0, eval_episodes=0),
                              progress=progress)
    finally:
        ALGOS.pop("test-advising-bc")
    err = capsys.readouterr().err
    assert err.count("three updates done; try --set lr=1") == 1
    assert "notice:" in err
    assert _AdvisingBC.last.notices == []
    assert MlflowClient().get_run(result.run_id).data.tags["notice"] == "three updates done; try --set lr=1"


def test_resuming_a_finished_run_is_refused():
    result = training.fit(tiny_run(steps=20, online_steps=0, eval_episodes=0), progress=False)
    with pytest.raises(Exception, match="already finished"):
        training.resume(result.run_id, progress=False)
    assert get_algo("td3bc")
