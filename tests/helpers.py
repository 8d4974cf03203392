"""Test helpers: small datasets from the real MuJoCo simulator (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np

from offlab.data.schema import Dataset, DatasetCard, coerce_columns, finalize
from offlab.envs.make import env_spaces, make_env


def make_sim_dataset(
    env_id: str = "Hopper-v5",
    steps: int = 2000,
    seed: int = 0,
    name: str = "sim",
    policy: Callable[[np.ndarray], np.ndarray] | None = None,
    max_episode_steps: int | None = None,
) -> Dataset:
    """Roll out `policy` (default: uniform random actions) for `steps` transitions; whole episodes
    except possibly the last, which is cut by the step budget (neither terminated nor truncated)."""
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    env = make_env(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated")}
    obs, _ = env.reset(seed=seed)
    ep, t = 0, 0
    for _ in range(steps):
        if policy is None:
            a = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        else:
            a = np.asarray(policy(obs), dtype=np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        for k, v in zip(cols, (ep, t, obs, nxt, a, r, term, trunc), strict=True):
            cols[k].append(v)
        obs, t = nxt, t + 1
        if term or trunc:
            obs, _ = env.reset()
            ep, t = ep + 1, 0
    env.close()
    sp = env_spaces(env_id)
    card = DatasetCard(
        name=name, env_id=env_id, obs_dim=sp.obs_shape[0], action_dim=sp.action_dim,
        action_low=list(sp.action_low), action_high=list(sp.action_high),
        ref_min_score=-20.272305 if env_id.startswith("Hopper") else None,
        ref_max_score=3234.3 if env_id.startswith("Hopper") else None,
        source={"kind": "test", "seed": seed},
    )
    return finalize(coerce_columns(card, **{k: np.asarray(v) for k, v in cols.items()}))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `offlab ...` in a subprocess with the test's (isolated) environment."""
    return subprocess.run(
        [sys.executable, "-m", "offlab.cli", *args],
        capture_output=True, text=True, env=env or dict(os.environ), timeout=timeout,
    )
