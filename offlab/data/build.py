"""Build D4RL-style datasets in the simulator from shipped behaviour policies, and collect from any policy.

D4RL's protocol on the Gymnasium v5 envs (details and departures in datasets/catalog.yaml):
- random: a randomly initialised SAC actor, sampled;
- medium / expert: a SAC actor stopped at about a third of expert return / fully trained, sampled
  (the stochastic policy, as D4RL's logged `action_log_probs` show), `behavior_logp` stored;
- medium-replay: the learner's experience up to the medium snapshot, rebuilt from the training run's
  actor snapshots (each sampled for the steps it was in charge of) after the run's uniform-random
  warm-up steps, instead of D4RL's shipped replay buffer;
- medium-expert: the medium and expert datasets concatenated, half and half.

Rollouts are split into a fixed number of *streams* (an env and a noise generator each, seeded from
the build seed); workers take whole groups of streams, and groups always run the actor on the same
batch shape, so the same name, steps and seed give the same content hash whatever `--workers` is.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offlab import paths
from offlab.data import store
from offlab.data.schema import Dataset, DatasetCard, coerce_columns
from offlab.errors import OfflabError, PolicyError
from offlab.threads import fresh_interpreter, fresh_interpreter_available

STREAMS = 16
GROUP = 8  # the actor always sees batches of GROUP observations


# ------------------------------------------------------------------------------------ policies


@dataclass
class PolicySource:
    """A behaviour policy as plain data (so it can be sent to worker processes)."""

    kind: str  # "tanh_gaussian" (shipped / SB3 SAC), "uniform", "deterministic" (MLP tanh actor), "mlflow"
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    uri: str = ""

    @property
    def stochastic(self) -> bool:
        return self.kind in ("tanh_gaussian", "uniform")


def load_policy_file(path: str | Path) -> PolicySource:
    """An offlab behaviour policy (.safetensors, with an optional .json card beside it)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file '{path}' does not exist; give a .safetensors file, an SB3 .zip or an MLflow model URI")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PolicyError(f"'{path}' is not a readable safetensors policy ({str(e).splitlines()[0]})") from None
    if not {"mean.weight", "log_std.weight", "hidden.0.weight"} <= set(tensors):
        raise PolicyError(
            f"'{path}' does not hold an offlab tanh-Gaussian actor (hidden.*, mean.*, log_std.* tensors)"
        )
    card_path = path.with_suffix(".json")
    meta = json.loads(card_path.read_text()) if card_path.is_file() else {}
    return PolicySource("tanh_gaussian", tensors, meta)


def load_sb3_zip(path: str | Path) -> PolicySource:
    """A Stable-Baselines3 SAC model file, read without SB3 (policy.pth holds a plain state dict)."""
    import io
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            state = torch.load(io.BytesIO(z.read("policy.pth")), map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, KeyError, RuntimeError, OSError) as e:
        raise PolicyError(f"'{path}' is not a Stable-Baselines3 model file ({str(e).splitlines()[0]})") from None
    if "actor.mu.weight" not in state:
        raise PolicyError(f"'{path}' is not an SB3 SAC model (no actor.mu); offlab reads SAC policies from SB3 files")
    hidden = sorted({int(k.split(".")[2]) for k in state if k.startswith("actor.latent_pi.") and k.endswith("weight")})
    tensors = {}
    for i, layer in enumerate(hidden):
        tensors[f"hidden.{i}.weight"] = state[f"actor.latent_pi.{layer}.weight"].numpy()
        tensors[f"hidden.{i}.bias"] = state[f"actor.latent_pi.{layer}.bias"].numpy()
    for ours, theirs in (("mean", "mu"), ("log_std", "log_std")):
        tensors[f"{ours}.weight"] = state[f"actor.{theirs}.weight"].numpy()
        tensors[f"{ours}.bias"] = state[f"actor.{theirs}.bias"].numpy()
    return PolicySource("tanh_gaussian", tensors, {"algorithm": "SB3 SAC", "file": str(path)})


def resolve_policy(ref: str) -> PolicySource:
    """A policy from a shipped name (hopper/expert), a .safetensors file, an SB3 .zip or an MLflow model URI."""
    if "://" in ref or ref.startswith(("runs:/", "models:/")):
        return PolicySource("mlflow", uri=ref)
    p = Path(ref)
    if p.suffix == ".zip":
        if not p.is_file():
            raise PolicyError(f"policy file '{ref}' does not exist")
        return load_sb3_zip(p)
    if p.suffix == ".safetensors" or p.exists():
        return load_policy_file(p)
    shipped = paths.catalog_dir() / "policies" / f"{ref}.safetensors"
    if shipped.is_file():
        return load_policy_file(shipped)
    raise PolicyError(
        f"policy '{ref}' is neither a file, an MLflow model URI (runs:/<id>/policy) nor a shipped policy "
        f"(e.g. hopper/expert)"
    )


class _Actor:
    """Batched numpy-in/numpy-out action sampling for one PolicySource (lives in a worker)."""

    def __init__(self, source: PolicySource, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray):
        from offlab.nets import TanhGaussianActor

        self.source = source
        self.low, self.high = action_low.astype(np.float32), action_high.astype(np.float32)
        self.action_dim = len(action_low)
        if source.kind == "tanh_gaussian":
            t = source.tensors
            n_hidden = len([k for k in t if k.startswith("hidden.") and k.endswith(".weight")])
            sizes = [t[f"hidden.{i}.weight"].shape[0] for i in range(n_hidden)]
            in_dim = t["hidden.0.weight"].shape[1]
            out_dim = t["mean.weight"].shape[0]
            if in_dim != obs_dim or out_dim != self.action_dim:
                raise PolicyError(
                    f"policy maps observations of width {in_dim} to actions of width {out_dim}, but the env has "
                    f"{obs_dim} and {self.action_dim}; use a policy trained on this env"
                )
            self.net = TanhGaussianActor(in_dim, out_dim, sizes, max_action=1.0)
            self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in t.items()})
            # float64: BLAS's float32 products round differently with its code path (MKL's AVX-512 kernels on an
            # Intel CPU against its AVX2 ones on AMD changed the actions, so the whole rollout, session 31); in
            # float64 such differences almost never survive the actions' rounding to float32
            self.net.double().eval()
        elif source.kind == "mlflow":
            self.net = _load_pyfunc(source.uri)
        self.scale = (self.high - self.low) / 2
        self.center = (self.high + self.low) / 2

    def __call__(self, obs: np.ndarray, rng: list[np.random.Generator], noise: float
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Actions in the env's box for a batch of observations, and their log-probs when known."""
        n = len(obs)
        if self.source.kind == "uniform":
            u = np.stack([g.uniform(-1, 1, self.action_dim) for g in rng]).astype(np.float32)
            logp = np.full(n, -self.action_dim * math.log(2.0) - np.log(self.scale).sum(), np.float32)
            return self.center + self.scale * u, logp
        if self.source.kind == "tanh_gaussian":
            with torch.no_grad():
                mean, log_std = self.net.distribution_params(torch.from_numpy(np.asarray(obs, np.float64)))
            mean, log_std = mean.numpy(), log_std.numpy()
            eps = np.stack([g.standard_normal(self.action_dim) for g in rng])
            if noise > 0:  # deterministic mean + Gaussian noise, clipped to the box
                return self._gaussian_noise(np.tanh(mean), eps, noise)
            u = mean + np.exp(log_std) * eps  # float64 throughout, rounded to float32 once at the end
            logp = _tanh_gaussian_log_prob64(u, mean, log_std) - np.log(self.scale.astype(np.float64)).sum()
            action = self.center.astype(np.float64) + self.scale.astype(np.float64) * np.tanh(u)
            return action.astype(np.float32), logp.astype(np.float32)
        # a deterministic policy (MLflow model), optionally with Gaussian exploration noise
        a = np.asarray(self.net.predict(obs), dtype=np.float32).reshape(n, -1)
        if a.shape[1] != self.action_dim:
            raise PolicyError(f"policy returns actions of width {a.shape[1]} but the env expects {self.action_dim}")
        if noise > 0:
            eps = np.stack([g.standard_normal(self.action_dim) for g in rng]).astype(np.float32)
            return self._gaussian_noise((a - self.center) / self.scale, eps, noise)
        return np.clip(a, self.low, self.high), None

    def _gaussian_noise(self, unit_action: np.ndarray, eps: np.ndarray, noise: float):
        a = unit_action + noise * eps
        # density of the Gaussian before clipping (exact wherever the action stays inside the box)
        logp = (-0.5 * eps**2 - math.log(noise) - 0.5 * math.log(2 * math.pi)).sum(-1) - np.log(self.scale).sum()
        return (self.center + self.scale * np.clip(a, -1, 1)).astype(np.float32), logp.astype(np.float32)


def _tanh_gaussian_log_prob64(u: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """`nets.tanh_gaussian_log_prob` for the logged behaviour log-probs, in float64 with the action dims summed in a
    fixed order.

    In float32, torch's vectorised kernels round differently with the CPU's instruction set (AVX2 against AVX-512),
    so the same build gave log-probs a few ulps apart, and another content hash, on different machines. In float64
    such gaps almost never survive the rounding to float32.
    """
    u, mean, log_std = (np.asarray(x, np.float64) for x in (u, mean, log_std))
    normal = -0.5 * ((u - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))  # log |d tanh(u)/du|, stably
    per_dim = normal - log_det
    total = per_dim[:, 0].copy()
    for i in range(1, per_dim.shape[1]):  # left to right, never a vectorised reduction
        total += per_dim[:, i]
    return total


def _load_pyfunc(uri: str):
    try:
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(uri)
    except Exception as e:
        raise PolicyError(f"cannot load MLflow model '{uri}' ({str(e).splitlines()[0][:160]})") from None


# ------------------------------------------------------------------------------------ rollouts


@dataclass
class Part:
    """`steps` transitions from one policy, split over STREAMS streams.

    With `whole_episodes`, a part is a number of complete episodes instead: it uses one stream per
    `max_episode_steps` of budget (at most STREAMS) and each stream finishes the episode it is in when
    its budget runs out, so no episode is cut (D4RL's medium-replay holds whole training episodes).
    """

    policy: PolicySource
    steps: int
    noise: float = 0.0
    label: str = ""
    whole_episodes: bool = False


def _part_budgets(part: Part, max_episode_steps: int) -> list[int]:
    if not part.whole_episodes:
        return _stream_budgets(part.steps)
    used = min(STREAMS, max(1, -(-part.steps // max_episode_steps)))
    return _stream_budgets(part.steps, used) + [0] * (STREAMS - used)


def _stream_budgets(steps: int, streams: int = STREAMS) -> list[int]:
    base, extra = divmod(steps, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


def _run_group(env_id: str, env_kwargs: dict, part: Part, seed: int, part_index: int, group: list[int],
               budgets: list[int], episode_quota: int | None = None) -> list[dict[str, np.ndarray]]:
    """Roll out one group of streams in lockstep; returns one column dict per stream.

    A stream stops when its step budget is spent or, with `episode_quota`, once it has completed
    that many episodes.
    """
    import gymnasium as gym

    from offlab.envs.make import quiet_gymnasium_model_warnings

    torch.set_num_threads(1)
    quiet_gymnasium_model_warnings()
    envs = [gym.make(env_id, **env_kwargs) for _ in group]
    max_steps = envs[0].spec.max_episode_steps or 1000
    raw = [e.unwrapped for e in envs]
    space = envs[0].action_space
    actor = _Actor(part.policy, int(np.prod(envs[0].observation_space.shape)), space.low, space.high)
    seeds = [seed * 1_000_003 + part_index * 1_009 + s for s in group]
    rngs = [np.random.default_rng(s) for s in seeds]
    obs = np.stack([r.reset(seed=s)[0] for r, s in zip(raw, seeds, strict=True)]).astype(np.float32)
    t = np.zeros(len(group), np.int64)
    ep = np.zeros(len(group), np.int64)
    cols: list[dict[str, list]] = [{k: [] for k in ("episode", "step", "obs", "next_obs", "action", "reward",
                                                    "terminated", "truncated", "logp")} for _ in group]
    remaining = np.array([budgets[s] for s in group])
    active = remaining > 0
    while active.any():
        actions, logp = actor(obs, rngs, part.noise)
        for i, env in enumerate(raw):
            if not active[i]:
                continue
            nxt, r, term, _, _ = env.step(actions[i])
            nxt = np.asarray(nxt, np.float32)
            t[i] += 1
            trunc = (not term) and t[i] >= max_steps
            row = (ep[i], t[i] - 1, obs[i].copy(), nxt, actions[i], r, term, trunc, 0.0 if logp is None else logp[i])
            for key, value in zip(cols[i], row, strict=True):
                cols[i][key].append(value)
            remaining[i] -= 1
            if term or trunc:
                nxt = np.asarray(env.reset()[0], np.float32)
                ep[i] += 1
                t[i] = 0
                if episode_quota is not None and ep[i] >= episode_quota:
                    remaining[i] = 0
            # a spent budget ends the stream, mid-episode unless the part is whole episodes
            active[i] = remaining[i] > 0 or (part.whole_episodes and t[i] > 0)
            obs[i] = nxt
    for e in envs:
        e.close()
    logp_known = part.policy.stochastic or part.noise > 0
    out = []
    for c in cols:
        d = {k: np.asarray(v) for k, v in c.items()}
        if not logp_known:
            d.pop("logp")
        out.append(d)
    return out


def _run_groups_in_workers(tasks: list[tuple], workers: int, done: Callable[[tuple], Any]) -> list:
    """`_run_group(*task)` of each task, in up to `workers` worker processes at once, in task order (`done(task)`
    after each, in that order).

    Each worker is a fresh interpreter (`threads.fresh_interpreter`, not multiprocessing's `spawn`, which would
    import the caller's `__main__` again: a script that builds a dataset at import time, with no `if __name__ ==
    "__main__":` guard, would run again in every worker). The task and its streams go through pickle files in a
    private temporary folder. Ctrl-C, or a worker's failure, stops the others."""
    import subprocess
    import tempfile
    from collections import deque

    results, queue, running = [], deque(enumerate(tasks)), deque()
    with tempfile.TemporaryDirectory(prefix="offlab-build-") as folder:
        def start_next() -> None:
            if queue:
                i, task = queue.popleft()
                job = Path(folder) / f"group{i}"
                job.with_suffix(".task").write_bytes(pickle.dumps(task))
                statement = f"from offlab.data.build import _run_group_file; _run_group_file({str(job)!r})"
                running.append((task, job, subprocess.Popen(fresh_interpreter(statement), stdin=subprocess.DEVNULL)))

        try:
            for _ in range(workers):
                start_next()
            while running:
                task, job, worker = running[0]
                if worker.wait() != 0:
                    raise OfflabError(f"a dataset build worker stopped (exit code {worker.returncode}; its error, if "
                                      "it printed one, is above); --workers 1 builds in this process")
                running.popleft()
                results.append(pickle.loads(job.with_suffix(".out").read_bytes()))
                done(task)
                start_next()
        finally:
            for _, _, worker in running:
                worker.kill()
                worker.wait()
    return results


def _run_group_file(job: str) -> None:
    """A build worker's work (`_run_groups_in_workers`): `_run_group` of the task pickled at `<job>.task`, its
    streams pickled to `<job>.out` (written whole, then renamed)."""
    job_path = Path(job)
    streams = _run_group(*pickle.loads(job_path.with_suffix(".task").read_bytes()))
    partial = job_path.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(streams, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(partial, job_path.with_suffix(".out"))


def rollout(env_id: str, parts: list[Part], seed: int, workers: int = 1, env_kwargs: dict | None = None,
            progress: Callable[[int], None] | None = None, episode_quota: int | None = None
            ) -> dict[str, np.ndarray]:
    """All parts' transitions as one column dict, in (part, stream) order with dense episode ids."""
    import gymnasium as gym

    env_kwargs = env_kwargs or {}
    max_episode_steps = env_kwargs.get("max_episode_steps") or gym.spec(env_id).max_episode_steps or 1000
    tasks = []
    for pi, part in enumerate(parts):
        budgets = _part_budgets(part, max_episode_steps)
        for g in range(0, STREAMS, GROUP):
            tasks.append((env_id, env_kwargs, part, seed, pi, list(range(g, g + GROUP)), budgets, episode_quota))

    def report(task: tuple) -> None:  # a group is done: its streams' step budgets
        if progress:
            progress(sum(task[6][s] for s in task[5]))

    # workers are fresh interpreters; where none can start (an embedding without sys.executable) the groups run
    # here, with the same content hash
    if workers > 1 and len(tasks) > 1 and fresh_interpreter_available():
        results = _run_groups_in_workers(tasks, workers, report)
    else:
        results = []
        for task in tasks:
            results.append(_run_group(*task))
            report(task)
    streams = [s for group in results for s in group if len(s["reward"])]
    offset = 0
    for s in streams:
        s["episode"] = s["episode"] + offset
        offset = int(s["episode"][-1]) + 1
    keys = streams[0].keys()
    return {k: np.concatenate([s[k] for s in streams]) for k in keys if all(k in s for s in streams)}


# ------------------------------------------------------------------------------------ datasets


def _check_steps(steps: int) -> None:
    if steps is None or steps <= 0:
        raise OfflabError(f"--steps must be a positive number of transitions, got {steps}")


def _card(name: str, env_id: str, entry, source: dict, policy_card: dict | None, seed: int, notes: str = ""
          ) -> DatasetCard:
    from offlab.envs.make import env_spaces

    sp = env_spaces(env_id)
    return DatasetCard(
        name=name, env_id=env_id, obs_dim=sp.obs_shape[0], action_dim=sp.action_dim,
        action_low=list(sp.action_low), action_high=list(sp.action_high),
        ref_min_score=entry.ref_min_score if entry else None,
        ref_max_score=entry.ref_max_score if entry else None,
        source={**source, "seed": seed, "simulator": simulator_versions()}, behavior_policy=policy_card, notes=notes,
    )


def simulator_versions() -> dict[str, str]:
    """The versions a built dataset's content depends on: the same recipe and seed give the same content
    hash only under the same simulator (a MuJoCo release can change trajectories) and torch (the actor)."""
    import gymnasium
    import mujoco
    import torch

    return {"mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "torch": torch.__version__.split("+")[0]}


def _to_dataset(card: DatasetCard, cols: dict[str, np.ndarray]) -> Dataset:
    return coerce_columns(
        card, episode=cols["episode"], step=cols["step"], obs=cols["obs"], next_obs=cols["next_obs"],
        action=cols["action"], reward=cols["reward"], terminated=cols["terminated"], truncated=cols["truncated"],
        behavior_logp=cols.get("logp"),
    )


def _split_exactly(total: int, weights: list[int]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(int)
    out[np.argsort(-(raw - out))[: total - out.sum()]] += 1
    return out.tolist()


def recipe_parts(name: str, steps: int | None = None) -> tuple[list[Part], dict, dict | None, str]:
    """The rollout parts of a catalog dataset, its source record, policy card and notes."""
    from offlab.data.registry import entry

    e = entry(name)
    if e is None or not e.recipe:
        from offlab.data.registry import not_found

        raise not_found(name) if e is None else OfflabError(f"dataset '{name}' has no build recipe in the catalog")
    r = e.recipe
    kind = r["kind"]
    pol_dir = paths.catalog_dir() / "policies"
    if kind == "policy":
        pol = load_policy_file(pol_dir / f"{r['policy']}.safetensors")
        n = steps or int(r["steps"])
        return [Part(pol, n, label=r["policy"])], {"kind": "built", "recipe": r}, pol.meta, r.get("notes", "")
    if kind == "replay":
        # the warm-up steps of uniform random actions, then each snapshot for the steps it was in charge of
        snaps = sorted(pol_dir.glob(r["snapshots"]))
        sizes = [int(r["random_steps"])] + [int(r["steps_per_snapshot"])] * len(snaps)
        if steps is not None:
            sizes = _split_exactly(steps, sizes)
        # whole episodes, as a replay buffer holds them; the total is therefore approximately `steps`
        parts = [Part(PolicySource("uniform"), sizes[0], label="uniform", whole_episodes=True)]
        for p, n in zip(snaps, sizes[1:], strict=True):
            parts.append(Part(load_policy_file(p), n, label=p.stem, whole_episodes=True))
        parts = [p for p in parts if p.steps > 0]
        card = {"kind": "replay", "snapshots": [str(s.relative_to(pol_dir)) for s in snaps],
                "algorithm": parts[-1].policy.meta.get("algorithm")}
        return parts, {"kind": "built", "recipe": r}, card, r.get("notes", "")
    if kind == "mix":
        parts, cards = [], []
        n_each = [None] * len(r["parts"]) if steps is None else _split_exactly(steps, [1] * len(r["parts"]))
        for sub, n in zip(r["parts"], n_each, strict=True):
            p, _, c, _ = recipe_parts(sub, n)
            parts += p
            cards.append({"dataset": sub, **(c or {})})
        return parts, {"kind": "built", "recipe": r}, {"kind": "mix", "parts": cards}, r.get("notes", "")
    raise OfflabError(f"unknown recipe kind '{kind}' for '{name}' in the catalog")


def build_dataset(name: str, *, steps: int | None = None, seed: int = 0, workers: int | None = None,
                  overwrite: bool = False, progress: bool = False, store_as: str | None = None) -> Dataset:
    """Build catalog dataset `name` in the simulator and store it (as `store_as`, default `name`)."""
    from offlab.data.registry import entry

    if steps is not None:
        _check_steps(steps)
    target = store_as or name
    if store.exists(target) and not overwrite:
        from offlab.errors import DatasetExists

        raise DatasetExists(f"dataset '{target}' already exists; pass --overwrite to rebuild it")
    e = entry(name)
    parts, source, policy_card, notes = recipe_parts(name, steps)
    total = sum(p.steps for p in parts)
    workers = workers or min(2, os.cpu_count() or 1)
    cols = _with_progress(lambda cb: rollout(e.env, parts, seed, workers, progress=cb), total, f"building {name}",
                          progress)
    source = {**source, "steps": total, "workers_independent": True}
    ds = _to_dataset(_card(target, e.env, e, source, policy_card, seed, notes), cols)
    return store.write_dataset(ds, target, overwrite=overwrite)


def collect(env_id: str, policy: str, steps: int, name: str, *, noise: float = 0.0, seed: int = 0,
            workers: int = 1, overwrite: bool = False, progress: bool = False) -> Dataset:
    """Roll out any policy (shipped, .safetensors, SB3 .zip, MLflow model URI) into a stored dataset."""
    from offlab.data.registry import catalog
    from offlab.envs.make import env_spaces

    _check_steps(steps)
    store.check_name(name)
    if noise < 0:
        raise OfflabError(f"--noise must be >= 0, got {noise}")
    if store.exists(name) and not overwrite:
        from offlab.errors import DatasetExists

        raise DatasetExists(f"dataset '{name}' already exists; pass --overwrite to replace it or choose another --name")
    sp = env_spaces(env_id)  # EnvError for ids that are not installed
    source = resolve_policy(policy)
    # check shapes here, in this process, so a mismatch is one clear line and nothing starts
    _Actor(source, sp.obs_shape[0], np.array(sp.action_low), np.array(sp.action_high))
    if source.kind == "mlflow":
        workers = 1  # the loaded model is not sent to workers
    e = next((c for c in catalog().values() if c.env == env_id), None)
    parts = [Part(source, steps, noise=noise, label=policy)]
    cols = _with_progress(lambda cb: rollout(env_id, parts, seed, workers, progress=cb), steps,
                          f"collecting {name}", progress)
    pcard = {**source.meta, "policy": policy, "noise": noise, "kind": source.kind}
    src = {"kind": "collected", "policy": policy, "noise": noise, "steps": steps}
    notes = ""
    if "logp" in cols and source.kind == "mlflow" and noise > 0:
        notes = "behavior_logp is the Gaussian noise density before clipping to the action box"
    ds = _to_dataset(_card(name, env_id, e, src, pcard, seed, notes), cols)
    return store.write_dataset(ds, name, overwrite=overwrite)


def _with_progress(fn, total: int, label: str, show: bool):
    if not show:
        return fn(None)
    from offlab.progress import progress_bar

    with progress_bar(label, total) as advance:
        return fn(advance)



def evaluate_policy(source: PolicySource, env_id: str, episodes: int = 50, seed: int = 12345,
                    noise: float = 0.0, workers: int = 1) -> dict[str, float]:
    """Mean undiscounted return ± standard error over at least `episodes` complete episodes, with the
    policy acting as it does in a build (sampled)."""
    quota = math.ceil(episodes / STREAMS)
    cols = rollout(env_id, [Part(source, STREAMS * 10**9, noise=noise)], seed, workers, episode_quota=quota)
    starts = np.r_[0, np.flatnonzero(np.diff(cols["episode"])) + 1]
    returns = np.add.reduceat(cols["reward"].astype(np.float64), starts)
    return {"episodes": int(len(returns)), "return_mean": float(returns.mean()),
            "return_se": float(returns.std(ddof=1) / np.sqrt(len(returns)))}
