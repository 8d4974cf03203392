"""The gymnasium env factory, env space lookup and the D4RL normalised score."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from offlab.errors import EnvError, did_you_mean


@dataclass(frozen=True)
class EnvSpaces:
    obs_shape: tuple[int, ...]
    action_dim: int
    discrete: bool
    action_low: tuple[float, ...] | None
    action_high: tuple[float, ...] | None
    max_episode_steps: int | None


GYMNASIUM_MODEL_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)
"""Starts of the MuJoCo warnings that gymnasium's own model files raise on every env creation (HalfCheetah-v5 and
Walker2d-v5 set the total mass in their XML): nothing a user of offlab can act on."""


@functools.cache
def quiet_gymnasium_model_warnings() -> None:
    """Drop MuJoCo's warnings about gymnasium's own XML (`GYMNASIUM_MODEL_WARNINGS`); print any other on stderr.

    MuJoCo's default handler prints each warning and appends it to MUJOCO_LOG.TXT in the working directory, so
    every `offlab fit` on halfcheetah or walker2d printed the same deprecation notice at each evaluation and left
    that file behind. A handler the user set first is left in place. Once per process.
    """
    try:
        import mujoco
    except ImportError:  # no MuJoCo envs here
        return
    if mujoco.get_mju_user_warning() is not None:
        return

    def forward(message: str) -> None:
        if not message.startswith(GYMNASIUM_MODEL_WARNINGS):
            print(f"WARNING (MuJoCo): {message}", file=sys.stderr, flush=True)

    mujoco.set_mju_user_warning(forward)


def make_env(env_id: str, seed: int | None = None, **kwargs) -> gym.Env:
    """gym.make with a one-line error for ids that are not installed (and without gymnasium's model warnings)."""
    quiet_gymnasium_model_warnings()
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        known = [k for k in gym.registry if "-v" in k]
        raise EnvError(
            f"env '{env_id}' is not installed ({str(e).splitlines()[0]}){did_you_mean(env_id, known)}"
        ) from None
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


@functools.lru_cache(maxsize=64)
def _spaces(env_id: str, kwargs_items: tuple) -> EnvSpaces:
    env = make_env(env_id, **dict(kwargs_items))
    try:
        a = env.action_space
        discrete = isinstance(a, gym.spaces.Discrete)
        return EnvSpaces(
            obs_shape=tuple(env.observation_space.shape),
            action_dim=int(a.n) if discrete else int(np.prod(a.shape)),
            discrete=discrete,
            action_low=None if discrete else tuple(float(x) for x in a.low.reshape(-1)),
            action_high=None if discrete else tuple(float(x) for x in a.high.reshape(-1)),
            max_episode_steps=env.spec.max_episode_steps if env.spec else None,
        )
    finally:
        env.close()


def env_spaces(env_id: str, **kwargs) -> EnvSpaces:
    """Shapes and bounds of an env's spaces (the env is made once per id and cached)."""
    return _spaces(env_id, tuple(sorted(kwargs.items())))


def normalized_score(ret: float | np.ndarray, ref_min: float, ref_max: float) -> float | np.ndarray:
    """D4RL normalised score: 100 * (R - R_min) / (R_max - R_min)."""
    return 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)
