"""The one training loop: offline phase, optional online phase, evaluation, checkpoints, logging.

    offlab fit --dataset hopper-medium --algo td3bc --steps 200000 --online-steps 100000

The loop owns the clock and everything around a learner's update; the learner owns its networks:

    for step in 1 .. steps:                      offline phase
        batch = data.sample(batch_size, sampler)         (rows in learner.training_rows when it sets them)
        learner.lookahead(the next step's batch)         (drawn now, for learners that define it)
        metrics = learner.update(batch)
    for step in steps+1 .. steps+online_steps:   online phase (one env step, one update)
        a = learner.act(obs, deterministic=False) (+ Gaussian exploration noise for deterministic policies)
        env.step(a) -> online replay buffer
        batch = online_ratio of the batch from the replay, the rest from the offline data
        metrics = learner.update(batch)
      or, for learners that define it:  metrics = learner.online_step(env, context)
    every eval_every steps: Evaluator (real simulator, seeded episodes) -> eval/*
    every log_every steps: train/* averaged; every checkpoint_every steps (and at the end, on Ctrl-C): checkpoint

What learners may declare (all optional):
- `stochastic_policy` (bool): `act(deterministic=False)` already explores, so the loop adds no noise.
- `training_rows` (LongTensor of dataset rows): the offline rows to sample from (%BC's top episodes).
- `lookahead(batch)`: told the next offline update's batch before the current update, to start work on it
  early (PRDC's neighbour search); the numbers must not depend on it (`AnnouncedBatches`).
- `online_step(env, context) -> dict | None`: the learner drives the online phase itself; `context`
  is an `OnlineContext` (offline data, replay buffer, mixed-batch sampler, step, second env).
- `needs_second_env = True`: the context carries a second simulator (`RunConfig.second_env`).

Reproducibility: one seed drives everything (networks, batches, exploration, episode resets). The
initial weights come from torch.manual_seed(seed); every other stream (batches, exploration, a learner's
noise) from its own generator seeded by `nets.stream_generator(seed, stream)`, so none replays another. A
checkpoint holds the learner's state_dict (networks, optimisers, its generator), the sampler's and
the exploration noise's generator states, the global torch/numpy/python RNG states, the train-metric
accumulators, the step counter, and in the online phase the replay buffer plus the current
episode's reset index and actions (the env is restored by replaying them: MuJoCo is deterministic).
`offlab fit --resume RUN_ID` after a SIGKILL at any step therefore ends with exactly the numbers of
an uninterrupted run on the same machine. Checkpoints hold tensors and plain data only
(`torch.load(weights_only=True)`), written to a temporary file and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offlab import paths
from offlab.algos.base import LearnerSpec, get_algo
from offlab.config import RunConfig, config_dict, learner_config, run_from_dict
from offlab.data.store import Batch, Transitions
from offlab.errors import ConfigError, DataValidationError, OfflabError
from offlab.evaluation.online import EvalResult, Evaluator, episode_seed
from offlab.nets import BATCHES, EXPLORATION, mixed_precision, stream_generator
from offlab.threads import CoreWait, denormals_flushed, torch_threads_beside, usable_cores

CHECKPOINT_FORMAT = 1
POLICY_FORMAT = 1


def run_dir(run_id: str) -> Path:
    """Where a run's checkpoint, config and policy file live: $OFFLAB_HOME/runs/<run_id>/."""
    return paths.home() / "runs" / run_id


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it (atomic)."""
    with paths.atomic_write(path, fsync=True) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which and what to do
        raise OfflabError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to restart the run") from None


def global_rng_state() -> dict[str, Any]:
    """torch, numpy and python global RNG states as tensors and plain numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ policy files


def save_policy(learner, algo: str, spec: LearnerSpec, path: Path) -> Path:
    """The learner's config, its spec's plain parts and its state_dict in one tensors-only file."""
    state = {
        "format": POLICY_FORMAT,
        "algo": algo,
        "config": config_dict(learner.cfg),
        "spec": spec_dict(spec),
        "state": learner.state_dict(),
    }
    save_checkpoint(state, path)
    return path


def spec_dict(spec: LearnerSpec) -> dict[str, Any]:
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    return {"obs_dim": spec.obs_dim, "action_dim": spec.action_dim, "action_low": t(spec.action_low),
            "action_high": t(spec.action_high), "obs_mean": t(spec.obs_mean), "obs_std": t(spec.obs_std),
            "env_id": spec.env_id, "dataset_name": spec.dataset_name,
            "episode_returns": torch.as_tensor(np.asarray(spec.episode_returns, dtype=np.float64))}


def load_policy(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a learner from `save_policy`'s file (no dataset needed unless the learner's constructor needs one)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    algo_cls = get_algo(raw["algo"])
    s = raw["spec"]
    spec = LearnerSpec(
        obs_dim=int(s["obs_dim"]), action_dim=int(s["action_dim"]), action_low=s["action_low"].numpy(),
        action_high=s["action_high"].numpy(), obs_mean=s["obs_mean"].numpy(), obs_std=s["obs_std"].numpy(),
        env_id=s["env_id"], dataset_name=s["dataset_name"], data=None, episode_returns=s["episode_returns"].numpy(),
    )
    cfg = learner_config(algo_cls, "", raw["config"])
    learner = algo_cls(cfg, spec, device)
    learner.load_state_dict(raw["state"])
    return learner


# ------------------------------------------------------------------------------------ online phase


class ReplayBuffer:
    """The online phase's transitions (a ring buffer of tensors on the CPU)."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.capacity = capacity
        self.obs = torch.zeros(capacity, obs_dim)
        self.action = torch.zeros(capacity, action_dim)
        self.reward = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.terminated = torch.zeros(capacity)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ReplayBuffer(size={self.size}, capacity={self.capacity}, obs={list(self.obs.shape[1:])})"

    def add(self, obs, action, reward: float, next_obs, terminated: bool) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        self.action[i] = torch.as_tensor(np.asarray(action, dtype=np.float32))
        self.reward[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(np.asarray(next_obs, dtype=np.float32))
        self.terminated[i] = float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Batch:
        idx = torch.randint(self.size, (n,), generator=generator)
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx])

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"obs": self.obs[:n].clone(), "action": self.action[:n].clone(), "reward": self.reward[:n].clone(),
                "next_obs": self.next_obs[:n].clone(), "terminated": self.terminated[:n].clone(),
                "pos": self.pos, "size": self.size, "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        for key in ("obs", "action", "reward", "next_obs", "terminated"):
            getattr(self, key)[:n] = state[key]
        self.pos, self.size = int(state["pos"]), n


def concat_batches(a: Batch, b: Batch) -> Batch:
    """a's transitions, then b's; dataset rows where either knows them (-1 for the other's)."""
    rows = None
    if a.rows is not None or b.rows is not None:
        rows = torch.cat([x.rows if x.rows is not None else torch.full((len(x.obs),), -1, device=x.obs.device)
                          for x in (a, b)])
    return Batch(*(torch.cat([x, y]) for x, y in zip(
        (a.obs, a.action, a.reward, a.next_obs, a.terminated),
        (b.obs, b.action, b.reward, b.next_obs, b.terminated), strict=True)), rows=rows)


@dataclass
class OnlineContext:
    """What a learner with `online_step` gets besides the env."""

    offline: Transitions
    replay: ReplayBuffer
    generator: torch.Generator
    batch_size: int
    online_ratio: float
    device: torch.device
    step: int = 0
    second_env: Any = None
    sample_offline: Any = None

    def sample(self) -> Batch:
        """A batch with `online_ratio` of it from the replay buffer and the rest from the offline data."""
        return mixed_batch(self.sample_offline, self.replay, self.batch_size, self.online_ratio, self.generator,
                           self.device)


def mixed_batch(sample_offline, replay: ReplayBuffer, batch_size: int, ratio: float, generator: torch.Generator,
                device: torch.device) -> Batch:
    """round(ratio * batch_size) rows from the replay buffer (none while it is empty), the rest offline."""
    n_online = int(round(ratio * batch_size)) if len(replay) else 0
    n_offline = batch_size - n_online
    parts = []
    if n_offline:
        parts.append(sample_offline(n_offline))
    if n_online:
        parts.append(replay.sample(n_online, generator).to(device))
    return parts[0] if len(parts) == 1 else concat_batches(*parts)


class OnlineInteraction:
    """The online phase's env loop: seeded episodes, exploration noise, the replay buffer; resumable mid-episode."""

    def __init__(self, env_id: str, env_kwargs: dict, seed: int, spec: LearnerSpec, capacity: int,
                 exploration_noise: float):
        from offlab.envs.make import make_env

        self.env = make_env(env_id, **env_kwargs)
        self.seed = seed
        self.low, self.high = np.asarray(spec.action_low), np.asarray(spec.action_high)
        self.noise_std = exploration_noise * spec.max_action
        self.replay = ReplayBuffer(capacity, spec.obs_dim, spec.action_dim)
        self.generator = stream_generator(seed, EXPLORATION)
        self.episode = 0
        self.episode_actions: list[np.ndarray] = []
        self.episode_return = 0.0
        self.obs = self._reset()

    def _reset(self) -> np.ndarray:
        self.episode_actions = []
        self.episode_return = 0.0
        return self.env.reset(seed=episode_seed(self.seed, "online", self.episode))[0]

    def step(self, learner, add_noise: bool) -> dict[str, float]:
        """One env step with the learner's exploring action; returns online/* metrics when an episode ends."""
        action = np.asarray(learner.act(self.obs, deterministic=False), dtype=np.float32)
        if add_noise and self.noise_std > 0:
            noise = torch.randn(action.shape, generator=self.generator).numpy() * self.noise_std
            action = np.clip(action + noise, self.low, self.high).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        self.replay.add(self.obs, action, reward, next_obs, terminated)
        self.episode_actions.append(action)
        self.episode_return += float(reward)
        if terminated or truncated:
            out = {"online/episode_return": self.episode_return, "online/episode_length": len(self.episode_actions)}
            self.episode += 1
            self.obs = self._reset()
            return out
        self.obs = next_obs
        return {}

    def state_dict(self) -> dict[str, Any]:
        actions = np.stack(self.episode_actions) if self.episode_actions else np.zeros((0, len(self.low)), np.float32)
        return {"episode": self.episode, "episode_actions": torch.from_numpy(actions.astype(np.float32)),
                "obs": torch.as_tensor(np.asarray(self.obs, dtype=np.float64)), "replay": self.replay.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the replay and the env mid-episode: reset with the episode's seed and replay its actions."""
        self.replay.load_state_dict(state["replay"])
        self.generator.set_state(state["generator"])
        self.episode = int(state["episode"])
        obs = self._reset()
        for action in state["episode_actions"].numpy():
            obs, reward, _, _, _ = self.env.step(action)
            self.episode_actions.append(action)
            self.episode_return += float(reward)
        if not np.array_equal(np.asarray(obs, dtype=np.float64), state["obs"].numpy()):
            raise OfflabError(
                f"the env {self.env.spec.id if self.env.spec else ''} did not replay to the checkpoint's state "
                f"(non-deterministic simulator); resume cannot be exact"
            )
        self.obs = obs

    def close(self) -> None:
        self.env.close()


# ------------------------------------------------------------------------------------ the loop


@dataclass
class FitResult:
    """What `fit` returns: the run, how far it got, its last evaluation, where things are."""

    run_id: str
    run_name: str
    dataset: str
    algo: str
    step: int
    total_steps: int
    interrupted: bool
    tracking_uri: str
    checkpoint: str
    final_eval: dict[str, Any] | None = None
    model_uri: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    ope: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AnnouncedBatches:
    """A learner's batches, each announced one update before it arrives (`learner.lookahead(batch)`) when the
    learner takes announcements, so it can begin work on the next batch during the current update (PRDC's
    neighbour search). A learner's numbers never depend on whether it was told.

    `draw()` makes the next batch; `generator` (the one draw consumes, if any) is reported by
    `generator_state()` as it was before the announced batch was drawn: what a checkpoint stores, so that a
    resumed run draws that batch again.
    """

    def __init__(self, learner, draw, generator: torch.Generator | None = None):
        self.learner, self.draw, self.generator = learner, draw, generator
        self.announces = callable(getattr(learner, "lookahead", None))
        self.upcoming: Batch | None = None
        self.state_before_upcoming = None

    def take(self, announce_next: bool = True) -> Batch:
        """The batch of this update; the following one is drawn and announced when `announce_next`."""
        batch = self.draw() if self.upcoming is None else self.upcoming
        self.upcoming = None
        if self.announces and announce_next:
            if self.generator is not None:
                self.state_before_upcoming = self.generator.get_state()
            self.upcoming = self.draw()
            self.learner.lookahead(self.upcoming)
        return batch

    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state() if self.upcoming is None else self.state_before_upcoming

    def forget(self) -> None:
        """Drop the announced batch (the generator was set back to before it)."""
        self.upcoming = None


def update_on(learner, batches: list[Batch]) -> list[dict[str, float]]:
    """`learner.update` on each batch in turn, each announced one update ahead as the training loop does."""
    feed = AnnouncedBatches(learner, iter(batches).__next__)
    return [learner.update(feed.take(announce_next=i + 1 < len(batches))) for i in range(len(batches))]


class Trainer:
    """One run's state: data, learner, generators, the online phase, evaluation and metric accumulators."""

    def __init__(self, run: RunConfig, dataset, device: torch.device, tracker=None, progress: bool = True,
                 threads_named: bool | None = None):
        """`threads_named`: whether the user named `run.threads` (default: whenever it is set); a resumed run's
        count restored from its tag is not, so a learner may still move torch between counts with the same bits
        (PRDC's `lend_core`)."""
        from offlab.data import registry

        self.run = run
        self.dataset = dataset
        self.device = device
        self.tracker = tracker
        self.progress = progress
        self.algo_cls = get_algo(run.algo)
        card = dataset.card
        self.env_id = card.env_id
        self.env_kwargs = dict(card.env_kwargs or {})
        self.ref = registry.score_range(run.dataset, card)

        self._threads_before = torch.get_num_threads()  # the caller's count, restored by close()
        # subnormal floats flushed to zero while the run lasts (Adam's moments of dead units; threads.py)
        self._float_mode = contextlib.ExitStack()
        self._float_mode.enter_context(denormals_flushed())
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            _warn("precision bf16: this CPU has no bfloat16 matmul support (AVX512-BF16/AMX), so bf16 will be "
                  "slower than float32; use --precision float32")
        seed_everything(run.seed)
        self.data = Transitions(dataset, device)
        self.spec = LearnerSpec.from_transitions(self.data, self.env_id, run.dataset)
        cfg = learner_config(self.algo_cls, run.dataset, run.algo_settings, seed=run.seed)
        self.learner = self.algo_cls(cfg, self.spec, device)
        if getattr(self.learner, "side_cores", 0) and not run.threads:  # a core kept busy beside torch (PRDC)
            torch.set_num_threads(torch_threads_beside(self.learner, usable_cores()))
        named = bool(run.threads) if threads_named is None else threads_named
        if named and hasattr(self.learner, "hold_threads"):  # the user's count: the learner keeps it
            self.learner.hold_threads()
        self.sampler = stream_generator(run.seed, BATCHES)
        rows = getattr(self.learner, "training_rows", None)
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.offline_batches = AnnouncedBatches(self.learner, lambda: self.sample_offline(run.batch_size), self.sampler)
        self.evaluator = Evaluator(self.env_id, run.eval_episodes, run.seed, self.env_kwargs, *self.ref)
        self.step = 0
        self.acc: dict[str, list[float]] = {}
        self.last_eval: dict[str, float] = {}
        self.notices: list[str] = []  # the learner's notices in this process (the run's `notice` tag)
        self.own_notices: list[str] = []  # the loop's own, shown as the learner's are
        self.core_wait = CoreWait()  # the threads' wait for a core per logging interval (`perf/cores_waited`)
        self._crowding_said = False
        self.online: OnlineInteraction | None = None
        self.second_env = None
        self.stop_requested = False
        self.stop_signal: int | None = None
        self._last_checkpoint_step = -1

    # sampling ---------------------------------------------------------------------------------------

    def sample_offline(self, n: int) -> Batch:
        if self.rows is None:
            return self.data.sample(n, self.sampler)
        pick = torch.randint(len(self.rows), (n,), generator=self.sampler)
        return self.data.batch(self.rows[pick].to(self.data.device))

    # checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "run_config": self.run.to_dict(),
            "dataset_hash": self.dataset.card.content_hash,
            "step": self.step,
            "learner": self.learner.state_dict(),
            "sampler": self.offline_batches.generator_state(),  # before the announced batch, if any
            "rng": global_rng_state(),
            "train_acc": {k: [float(v[0]), int(v[1])] for k, v in self.acc.items()},
            "last_eval": dict(self.last_eval),
            "online": None if self.online is None else self.online.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.learner.load_state_dict(state["learner"])
        self.sampler.set_state(state["sampler"])
        self.offline_batches.forget()
        set_global_rng_state(state["rng"])
        self.acc = {k: [float(v[0]), int(v[1])] for k, v in state["train_acc"].items()}
        self.last_eval = dict(state["last_eval"])
        if state["online"] is not None:
            self.start_online()
            self.online.load_state_dict(state["online"])
        self._last_checkpoint_step = self.step

    def checkpoint_path(self) -> Path:
        return run_dir(self.tracker.run_id) / "checkpoint.pt"

    def save(self) -> Path:
        path = self.checkpoint_path()
        save_checkpoint(self.state_dict(), path)
        self._last_checkpoint_step = self.step
        return path

    # the phases ---------------------------------------------------------------------------------------

    def start_online(self) -> None:
        r = self.run
        capacity = max(1, min(r.online_buffer_size, r.online_steps))
        self.online = OnlineInteraction(self.env_id, self.env_kwargs, r.seed, self.spec, capacity,
                                        r.exploration_noise)
        if getattr(self.learner, "needs_second_env", False):
            from offlab.envs.make import make_env

            self.second_env = make_env(r.second_env or self.env_id, **({} if r.second_env else self.env_kwargs))
            self.second_env.reset(seed=episode_seed(r.seed, "second", 0))

    def train_step(self) -> dict[str, float]:
        """One step of the offline or online phase; returns the learner's train/* metrics (online/* are logged here)."""
        r = self.run
        if self.step < r.steps:
            return self.learner.update(self.offline_batches.take(announce_next=self.step + 1 < r.steps))
        if self.online is None:
            self.start_online()
        if hasattr(self.learner, "online_step"):
            ctx = OnlineContext(self.data, self.online.replay, self.sampler, r.batch_size, r.online_ratio,
                                self.device, self.step, self.second_env, self.sample_offline)
            return dict(self.learner.online_step(self.online.env, ctx) or {})
        add_noise = not getattr(self.learner, "stochastic_policy", False)
        episode_metrics = self.online.step(self.learner, add_noise)
        batch = mixed_batch(self.sample_offline, self.online.replay, r.batch_size, r.online_ratio, self.sampler,
                            self.device)
        metrics = self.learner.update(batch)
        if episode_metrics:
            lo, hi = self.ref
            if lo is not None and hi is not None:
                ret = episode_metrics["online/episode_return"]
                episode_metrics["online/normalized_score"] = 100.0 * (ret - lo) / (hi - lo)
            self.log(episode_metrics)
        return metrics

    def evaluate(self) -> EvalResult:
        result = self.evaluator(lambda obs: self.learner.act(obs, deterministic=True))
        self.last_eval = result.metrics()
        self.log(self.last_eval)
        return result

    def log(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.step)

    def flush_train_metrics(self, elapsed: float, steps: int) -> None:
        means = {k: s / n for k, (s, n) in self.acc.items() if n}
        if elapsed > 0 and steps > 0:
            means["perf/steps_per_second"] = steps / elapsed
        waiting = self.core_wait.sample()
        if waiting is not None:
            means["perf/cores_waited"] = waiting
            self._check_crowding(waiting, elapsed)
        self.log(means)
        self.acc = {}

    CROWDED = 0.35
    """The share of the cores the run keeps busy (torch's threads, and PRDC's search process) that, waiting for a
    core on average over a logging interval, makes the run say the machine is crowded (a lone TD3+BC run waits ~2%
    of one core, PRDC 12-25%)."""

    def _check_crowding(self, waiting: float, elapsed: float) -> None:
        """Say once when the run's threads keep waiting for cores: another job is running beside this one. Two
        trainings of two threads each on two cores took 55 ms per TD3+BC update each against 3.5-4 ms alone
        (benchmarks/d3rlpy_speed.md, session 33), because torch's threads wait for each other at every op; one
        thread each loses nothing of that."""
        threads = torch.get_num_threads()
        side = getattr(self.learner, "side_cores", 0)  # PRDC's search process: a core busy beside torch's
        busy = threads + side
        if self._crowding_said or busy < 2 or elapsed < 2.0 or waiting < self.CROWDED * busy:
            return
        self._crowding_said = True
        advice = "--set threads=1 --set search_process=false" if side else "--set threads=1"
        self.own_notices.append(
            f"this run's threads waited for a core {waiting:.1f} cores' worth of the time (it keeps {busy} busy on "
            f"{usable_cores()} cores): something else is running beside it; runs side by side train much faster "
            f"with {advice} each")

    def loop(self) -> bool:
        """Train until the last step or a stop request; returns True when it ran to the end."""
        r = self.run
        total = r.total_steps
        bar = _Progress(self, total) if self.progress else contextlib.nullcontext()
        t_log, s_log = time.perf_counter(), self.step
        with bar:
            while self.step < total and not self.stop_requested:
                with mixed_precision(self.device, r.precision):
                    metrics = self.train_step()
                self.step += 1
                if notices := getattr(self.learner, "notices", None):  # the learner's advice, shown once
                    self.show_notices(notices, bar)
                for k, v in metrics.items():
                    a = self.acc.setdefault(k, [0.0, 0])
                    a[0] += float(v)
                    a[1] += 1
                if self.step % r.log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    self.flush_train_metrics(now - t_log, self.step - s_log)
                    t_log, s_log = now, self.step
                    if self.own_notices:
                        self.show_notices(self.own_notices, bar)
                if r.eval_episodes and (
                    (r.eval_every and self.step % r.eval_every == 0) or self.step == total
                ):
                    self.evaluate()
                if self.step % r.checkpoint_every == 0 or self.step == total:
                    self.save()
                if self.progress:
                    bar.advance(self.step)
            if self._last_checkpoint_step != self.step:
                self.save()
        return self.step >= total

    def show_notices(self, notices: list[str], bar) -> None:
        """Print a learner's notices (above the progress bar when there is one), keep them on the run as the
        `notice` tag (the MLflow UI shows it beside the run), and clear them."""
        for message in notices:
            if isinstance(bar, _Progress):
                bar.bar.console.print(f"[yellow]notice:[/yellow] {message}", highlight=False, soft_wrap=True)
            else:
                _warn(message, "notice")
        self.notices.extend(notices)
        if self.tracker is not None:
            self.tracker.set_tags({"notice": "\n".join(self.notices)})
        notices.clear()

    def close(self) -> None:
        torch.set_num_threads(self._threads_before)
        self._float_mode.close()
        self.evaluator.close()
        if self.online is not None:
            self.online.close()
        if self.second_env is not None:
            self.second_env.close()


class _Progress:
    """A rich progress bar on stderr: steps, steps/s, ETA and the last evaluation."""

    def __init__(self, trainer: Trainer, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.trainer = trainer
        console = Console(stderr=True)
        self.bar = Progress(  # redrawn 4 times a second on a terminal (the drawing thread costs CPU), else once at the end
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), TextColumn("{task.fields[score]}"),
            console=console, transient=False, auto_refresh=console.is_terminal, refresh_per_second=4,
        )
        r = trainer.run
        self.task = self.bar.add_task(f"{r.algo} {r.dataset}", total=total, completed=trainer.step,
                                      speed="", score="")
        self.t0, self.s0 = time.perf_counter(), trainer.step
        self.shown = trainer.step

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.advance(self.trainer.step, force=True)
        return self.bar.__exit__(*exc)

    def advance(self, step: int, force: bool = False) -> None:
        if not force and step - self.shown < 50:
            return
        self.shown = step
        dt = time.perf_counter() - self.t0
        speed = f"{(step - self.s0) / dt:,.0f} steps/s" if dt > 0 and step > self.s0 else ""
        ev = self.trainer.last_eval
        if "eval/normalized_score" in ev:
            score = f"eval {ev['eval/normalized_score']:.1f}"
        elif "eval/return" in ev:
            score = f"eval return {ev['eval/return']:.1f}"
        else:
            score = ""
        self.bar.update(self.task, completed=step, speed=speed, score=score)


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """Ctrl-C and SIGTERM ask the loop to stop after the current step and write a checkpoint; a second
    Ctrl-C aborts at once. After Ctrl-C `fit` returns an interrupted result; after SIGTERM the signal is
    delivered again once the checkpoint is written (so the process ends as it was asked to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        trainer.stop_signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------ entry points


def fit(run: RunConfig, *, progress: bool = True, on_start=None) -> FitResult:
    """Train `run` from scratch, tracked in MLflow; see the module docstring."""
    from offlab import tracking
    from offlab.data import registry

    run.check()
    get_algo(run.algo)
    tracker = tracking.Tracker()  # an unreachable store fails here, before any data or training
    device = resolve_device(run.device)
    dataset = registry.get(run.dataset, progress=progress)
    trainer = Trainer(run, dataset, device, tracker, progress)
    tracker.start_run(run, dataset, str(device))
    with _training_lock(tracker.run_id):
        config_file = run_dir(tracker.run_id) / "config.yaml"
        with paths.atomic_write(config_file, "w") as f:
            f.write(run.to_yaml())
        tracker.log_artifact(config_file)  # before the slow quality metrics: a run killed from here on can resume
        tracker.log_quality(run, dataset)
        if on_start is not None:
            on_start(tracker.run_id)
        return _train(trainer)


@contextlib.contextmanager
def _training_lock(run_id: str):
    """Held while a process trains run `run_id` (a lock file in its run folder), so that `--resume` of a run
    that is still training elsewhere on this machine fails at once instead of writing beside it. A process
    that was killed holds nothing: its run resumes."""
    folder = run_dir(run_id)
    with paths.file_lock(folder / ".training.lock", wait=False) as mine:
        if not mine:
            raise ConfigError(f"run '{run_id}' is being trained by another process right now; wait for it to end "
                              f"or stop it (Ctrl-C keeps a checkpoint), then resume")
        yield


def resume(run_id: str, *, dataset: str | None = None, device: str | None = None, progress: bool = True,
           on_start=None) -> FitResult:
    """Continue run `run_id` from its last checkpoint (or from the start when it never wrote one)."""
    from offlab import tracking

    if (run_dir(run_id) / ".training.lock").exists():
        # refuse at once while another process trains it, before the store is opened: that process may be
        # writing to a local sqlite store (or be paused mid-write), and a second client would wait on it
        with _training_lock(run_id):
            pass
    tracker = tracking.Tracker()
    mlrun = tracker.get_run(run_id)
    tags = mlrun.data.tags
    if "dataset" not in tags or "algo" not in tags:
        raise ConfigError(f"run '{run_id}' was not made by `offlab fit` (it has no dataset/algo tags); nothing to resume")
    if dataset and tags["dataset"] != dataset:
        raise ConfigError(
            f"run '{run_id}' belongs to dataset '{tags['dataset']}', not '{dataset}'; drop --dataset or pass "
            f"--dataset {tags['dataset']}"
        )
    with _training_lock(run_id):  # before its checkpoint is read: nobody else may be writing it
        return _resume(tracker, mlrun, device, progress, on_start)


def _resume(tracker, mlrun, device: str | None, progress: bool, on_start) -> FitResult:
    from offlab.data import registry

    run_id, tags = mlrun.info.run_id, mlrun.data.tags
    folder = run_dir(run_id)
    ckpt_file = folder / "checkpoint.pt"
    if not ckpt_file.exists():
        tracker.download_artifact(run_id, "checkpoint/checkpoint.pt", folder)
    state = load_checkpoint(ckpt_file) if ckpt_file.exists() else None
    if state is not None:
        run = run_from_dict(state["run_config"])
    else:
        config_file = folder / "config.yaml"
        if not config_file.exists() and tracker.download_artifact(run_id, "config.yaml", folder) is None:
            raise ConfigError(f"run '{run_id}' has neither a checkpoint nor a config.yaml to resume from")
        from offlab.config import read_run_file

        run = run_from_dict(read_run_file(config_file))
    if state is not None and state["step"] >= run.total_steps and mlrun.info.status == "FINISHED":
        raise ConfigError(f"run '{run_id}' already finished all {run.total_steps} steps; start a new run instead")
    if device:
        run.device = device
    named = bool(run.threads)  # the user's count, not one restored from the run's tag
    run.threads = resumed_threads(run.threads, tags.get("torch_threads"), run_id)
    ds = registry.get(run.dataset, progress=progress)
    if ds.card.content_hash != tags.get("dataset_hash", ds.card.content_hash):
        raise DataValidationError(
            f"dataset '{run.dataset}' changed since run '{run_id}' started (hash {ds.card.content_hash} != "
            f"{tags['dataset_hash']}); a resumed run would not match; start a new run"
        )
    trainer = Trainer(run, ds, resolve_device(run.device), tracker, progress, threads_named=named)
    if state is not None:
        trainer.load_state_dict(state)
    tracker.open_run(run_id)
    if not any(key.startswith("quality/") for key in tracker.logged_until):  # killed while fit logged them
        tracker.log_quality(run, ds)
    if on_start is not None:
        on_start(run_id)
    return _train(trainer)


def resumed_threads(threads: int, tagged: str | None, run_id: str, cores: int | None = None) -> int:
    """The torch thread count a resumed run trains with. A run that left the count to the machine (threads 0)
    keeps the count it started with (its `torch_threads` tag): float sums, hence its numbers, depend on it, and
    another machine's cores would change it. Where this machine has fewer cores than that, it takes this
    machine's default and says that the numbers will differ."""
    if threads or not (tagged or "").isdigit():
        return threads
    cores = cores or usable_cores()
    used = int(tagged)
    if used <= cores:
        return used
    _warn(f"run '{run_id}' trained on {used} torch threads and this machine has {cores} cores: it resumes on "
          f"{torch.get_num_threads()}, so its numbers will differ from an uninterrupted run's")
    return 0


def _train(trainer: Trainer) -> FitResult:
    tracker, run = trainer.tracker, trainer.run
    try:
        with _stop_on_signals(trainer):
            finished = trainer.loop()
        ckpt = trainer.checkpoint_path()
        result = FitResult(
            run_id=tracker.run_id, run_name=run.run_name, dataset=run.dataset, algo=run.algo, step=trainer.step,
            total_steps=run.total_steps, interrupted=not finished, tracking_uri=tracker.uri, checkpoint=str(ckpt),
            metrics=dict(trainer.last_eval),
        )
        if not finished:
            tracker.end("KILLED")
            if trainer.stop_signal == signal.SIGTERM:  # checkpoint saved: now terminate as asked
                signal.raise_signal(signal.SIGTERM)
            return result
        tracker.log_artifact(ckpt, "checkpoint")
        policy_file = save_policy(trainer.learner, run.algo, trainer.spec, ckpt.parent / "policy.pt")
        try:
            load_policy(policy_file)  # the pyfunc model rebuilds the learner from this file alone
        except OfflabError as e:
            tracker.set_tags({"policy_model": f"not logged: {e}"})
            _warn(f"the policy model was not logged: {run.algo} cannot be rebuilt from its saved state alone ({e}); "
                  f"the checkpoint holds the trained learner")
        else:
            example = trainer.dataset.obs[:2]
            result.model_uri = tracker.log_policy(policy_file, example, trainer.spec.action_dim)
        if run.ope:
            result.ope = _end_of_training_ope(trainer)
        tracker.end("FINISHED")
        result.final_eval = _final_eval(trainer)
        return result
    except KeyboardInterrupt:  # a second Ctrl-C: the last periodic checkpoint stays resumable
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        trainer.close()


def _warn(message: str, label: str = "warning") -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]{label}:[/yellow] {message}", highlight=False, soft_wrap=True)


def _end_of_training_ope(trainer: Trainer) -> dict[str, Any]:
    """`--ope`: estimate the final policy's value on the training data and log ope/<estimator> on the run."""
    from offlab.evaluation.ope import runner as ope

    run = trainer.run
    budget = run.ope_updates or None  # one budget for FQE, the dynamics ensemble and the behaviour density
    fqe, mb, behavior = ope.estimator_configs(run.seed, budget, budget, budget)
    result = ope.estimate(trainer.learner, trainer.dataset, run.ope, fqe=fqe, mb=mb, behavior_config=behavior,
                          seed=run.seed, device=str(trainer.device), progress=trainer.progress)
    ope.log_estimates(trainer.tracker.run_id, result, step=trainer.step, tracking_uri=trainer.tracker.uri)
    return {name: {k: r.get(k) for k in ("value", "ci", "normalized", "normalized_ci")}
            for name, r in result["estimates"].items()}


def _final_eval(trainer: Trainer) -> dict[str, Any] | None:
    ev = trainer.last_eval
    if not ev:
        return None
    return {"return": ev.get("eval/return"), "return_se": ev.get("eval/return_se"),
            "normalized_score": ev.get("eval/normalized_score")}
