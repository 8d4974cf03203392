"""Builders shared by the OPE tests (no tests here): real-simulator datasets with known behaviour densities.

- `linear_pendulum_policy`: a fixed deterministic linear controller for Pendulum-v1 (a = -k1 sin th - k2 thdot).
- `collect_pendulum`: its Gaussian-noised version rolled out in the real Pendulum-v1, with `behavior_logp`
  logged the way `offlab data collect --noise` logs it (Gaussian density on the [-1, 1] scale, before
  clipping), optionally resetting the simulator state from the float32 observation before every step,
  so that transitions are an exact function of the stored observations (needed for the true-Q test).
- `tanh_gaussian_file` / `collect_tanh_gaussian`: a randomly initialised offlab actor saved in the
  shipped format, and its samples in the real Hopper-v5 simulator (exact log-probs), built in memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from offlab.data.schema import Dataset, DatasetCard, coerce_columns, finalize
from offlab.envs.make import make_env

PENDULUM_HIGH = 2.0


def linear_pendulum_policy(k1: float = 3.0, k2: float = 1.0):
    """obs [B, 3] (cos, sin, thdot) -> torque [B, 1] in [-2, 2]."""

    def act(obs: np.ndarray) -> np.ndarray:
        obs = np.atleast_2d(obs)
        return np.clip(-(k1 * obs[:, 1] + k2 * obs[:, 2]), -PENDULUM_HIGH, PENDULUM_HIGH)[:, None].astype(np.float32)

    act.__name__ = f"linear-{k1}-{k2}"
    return act


def set_pendulum_state(env, obs: np.ndarray) -> None:
    env.unwrapped.state = np.array([math.atan2(float(obs[1]), float(obs[0])), float(obs[2])])


def collect_pendulum(steps: int, seed: int, policy, noise: float, horizon: int = 200, name: str = "pendulum",
                     exact_states: bool = False) -> Dataset:
    """`steps` transitions of a = clip(policy(s) + 2 * noise * eps, -2, 2) in Pendulum-v1 (whole episodes
    of `horizon` steps, truncated), with behavior_logp = log N(a/2; policy(s)/2, noise^2) - log 2."""
    env = make_env("Pendulum-v1")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated",
                            "behavior_logp")}
    ep = 0
    obs, _ = env.reset(seed=seed)
    obs = obs.astype(np.float32)
    t = 0
    for _ in range(steps):
        mean = policy(obs)[0] / PENDULUM_HIGH
        eps = rng.standard_normal(1)
        u = np.clip(mean + noise * eps, -1.0, 1.0)
        logp = float(np.sum(-0.5 * eps**2 - math.log(noise) - 0.5 * math.log(2 * math.pi)) - math.log(PENDULUM_HIGH))
        a = (PENDULUM_HIGH * u).astype(np.float32)
        if exact_states:
            set_pendulum_state(env, obs)
        nxt, r, _, _, _ = env.unwrapped.step(a)
        nxt = nxt.astype(np.float32)
        t += 1
        trunc = t >= horizon
        for k, v in zip(cols, (ep, t - 1, obs, nxt, a, r, False, trunc, logp), strict=True):
            cols[k].append(v)
        obs = nxt
        if trunc:
            obs = env.reset()[0].astype(np.float32)
            ep, t = ep + 1, 0
    env.close()
    card = DatasetCard(name=name, env_id="Pendulum-v1", obs_dim=3, action_dim=1, action_low=[-2.0],
                       action_high=[2.0], env_kwargs={"max_episode_steps": horizon},
                       source={"kind": "test", "seed": seed, "noise": noise})
    return finalize(coerce_columns(card, **{k: np.asarray(v) for k, v in cols.items()}))


def tanh_gaussian_tensors(obs_dim: int, action_dim: int, seed: int, hidden=(64, 64), log_std_bias: float = -0.5
                          ) -> dict[str, np.ndarray]:
    """A randomly initialised offlab tanh-Gaussian actor as shipped-format tensors."""
    from offlab.nets import TanhGaussianActor

    torch.manual_seed(seed)
    actor = TanhGaussianActor(obs_dim, action_dim, hidden)
    with torch.no_grad():
        actor.log_std.bias.fill_(log_std_bias)
    return {k: v.detach().numpy().copy() for k, v in actor.state_dict().items()}


def tanh_gaussian_file(path, obs_dim: int, action_dim: int, seed: int, **kw) -> str:
    from safetensors.numpy import save_file

    save_file(tanh_gaussian_tensors(obs_dim, action_dim, seed, **kw), str(path))
    return str(path)


def collect_tanh_gaussian(env_id: str, tensors: dict[str, np.ndarray], steps: int, seed: int, name: str = "sampled"
                          ) -> Dataset:
    """Samples of a tanh-Gaussian actor in the real simulator via offlab's builder (exact behavior_logp), in memory."""
    from offlab.data import build
    from offlab.envs.make import env_spaces

    cols = build.rollout(env_id, [build.Part(build.PolicySource("tanh_gaussian", tensors), steps)], seed)
    sp = env_spaces(env_id)
    card = DatasetCard(name=name, env_id=env_id, obs_dim=sp.obs_shape[0], action_dim=sp.action_dim,
                       action_low=list(sp.action_low), action_high=list(sp.action_high), source={"kind": "test"})
    return finalize(coerce_columns(card, episode=cols["episode"], step=cols["step"], obs=cols["obs"],
                                   next_obs=cols["next_obs"], action=cols["action"], reward=cols["reward"],
                                   terminated=cols["terminated"], truncated=cols["truncated"],
                                   behavior_logp=cols["logp"]))


def linear_actor_tensors(gains, log_std: float, scale: float = 3.0) -> dict[str, np.ndarray]:
    """An offlab tanh-Gaussian actor whose mean is exactly (g / scale) . obs (relu(x) - relu(-x) = x, then identity
    on non-negatives): the env action is scale * tanh(u), a saturating linear controller a ~ g . obs."""
    g = np.asarray(gains, np.float32) / scale
    d = len(g)
    eye = np.eye(d, dtype=np.float32)
    return {"hidden.0.weight": np.concatenate([eye, -eye]), "hidden.0.bias": np.zeros(2 * d, np.float32),
            "hidden.1.weight": np.eye(2 * d, dtype=np.float32), "hidden.1.bias": np.zeros(2 * d, np.float32),
            "mean.weight": np.concatenate([g, -g])[None, :], "mean.bias": np.zeros(1, np.float32),
            "log_std.weight": np.zeros((1, 2 * d), np.float32), "log_std.bias": np.full(1, log_std, np.float32)}


def linear_actor_file(path, gains, log_std: float) -> str:
    from safetensors.numpy import save_file

    save_file(linear_actor_tensors(gains, log_std), str(path))
    return str(path)
