"""Ground truth in the real simulator: Monte-Carlo values of a target policy, and the discounted references.

METRICS.md B.6 (2): N_mc = 256 episodes per policy by default (policy_eval's default), reset seeds
disjoint from any dataset collection (their own SeedSequence tag), the policy acting exactly as OPE
evaluates it (sampled, sigma-smoothed or deterministic). Records V_gamma (same gamma as OPE), the
undiscounted return J, the D4RL score of J on the card's references, and the standard errors
sd / sqrt(N_mc). Results are cached under $OFFLAB_HOME/ope/truth/, keyed by a hash of the policy
weights, its evaluation mode, env id and kwargs, gamma, horizon, episodes and seed.

B.0: a discounted OPE estimate is normalised with discounted references, the Monte-Carlo values
V_gamma of the uniform random policy and of the env's shipped expert policy. When no expert policy
is shipped, the expert reference falls back to the card's undiscounted ref_max_score spread evenly
over the horizon, ref_max / H * (1 - gamma^H) / (1 - gamma), and is labelled approximate.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from offlab import paths
from offlab.evaluation.ope.policy import TargetPolicy, tanh_gaussian_policy, uniform_policy

TRUTH_TAG = 4  # reset-seed tag, distinct from evaluation (1), online (2), second env (3) in online.py


def _seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, TRUTH_TAG, int(index)]).generate_state(1)[0])


def _cache_path(key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return paths.home() / "ope" / "truth" / f"{digest}.json"


def monte_carlo(policy: TargetPolicy, env_id: str, gamma: float, episodes: int = 256, seed: int = 0,
                env_kwargs: dict | None = None, horizon: int | None = None,
                ref_scores: tuple[float, float] | None = None, cache: bool = True) -> dict[str, Any]:
    """V_gamma, J and their standard errors for `policy` from `episodes` simulator episodes (lockstep)."""
    from offlab.envs.make import make_env

    env_kwargs = dict(env_kwargs or {})
    key = {"policy": policy.fingerprint, "mode": policy.mode, "sigma": policy.sigma, "env": env_id,
           "kwargs": env_kwargs, "gamma": gamma, "episodes": episodes, "seed": seed, "horizon": horizon}
    path = _cache_path(key) if cache and policy.fingerprint else None
    if path is not None and path.is_file():
        out = json.loads(path.read_text())
        return _with_scores(out, ref_scores)
    envs = [make_env(env_id, **env_kwargs) for _ in range(episodes)]
    limit = horizon or envs[0].spec.max_episode_steps or 1000
    raw = [e.unwrapped for e in envs]  # the time limit is applied here, without the wrappers' per-step cost
    obs = np.stack([r.reset(seed=_seed(seed, i))[0] for i, r in enumerate(raw)]).astype(np.float32)
    act = policy.numpy_sampler(_seed(seed, 10**9))  # the action noise, apart from every reset seed
    disc = np.zeros(episodes)
    undisc = np.zeros(episodes)
    length = np.zeros(episodes, np.int64)
    running = np.ones(episodes, bool)
    for t in range(limit):
        idx = np.flatnonzero(running)
        if not len(idx):
            break
        actions = act(obs[idx])
        for j, i in enumerate(idx):
            o, r, terminated, _, _ = raw[i].step(actions[j])
            obs[i] = o
            disc[i] += gamma**t * float(r)
            undisc[i] += float(r)
            length[i] += 1
            if terminated:
                running[i] = False
    for e in envs:
        e.close()
    sq = math.sqrt(episodes)
    out = {"v_gamma": float(disc.mean()), "v_gamma_sem": float(disc.std(ddof=1) / sq) if episodes > 1 else 0.0,
           "return": float(undisc.mean()), "return_sem": float(undisc.std(ddof=1) / sq) if episodes > 1 else 0.0,
           "length": float(length.mean()), "episodes": episodes, "gamma": gamma, "horizon": int(limit),
           "mode": policy.mode, "sigma": policy.sigma, "seed": seed}
    if path is not None:
        with paths.atomic_write(path, "w") as f:
            f.write(json.dumps(out))
    return _with_scores(out, ref_scores)


def _with_scores(out: dict, ref_scores: tuple[float, float] | None) -> dict:
    out = dict(out)
    if ref_scores is not None and None not in ref_scores:
        lo, hi = ref_scores
        out["normalized"] = 100.0 * (out["return"] - lo) / (hi - lo)
        out["normalized_sem"] = 100.0 * out["return_sem"] / (hi - lo)
    return out


def shipped_expert(env_id: str) -> Path | None:
    """The shipped expert behaviour policy of `env_id`, when the catalog names one and its file exists."""
    from offlab.data.registry import catalog

    for e in catalog().values():
        r = e.recipe or {}
        if e.env == env_id and r.get("kind") == "policy" and str(r.get("policy", "")).endswith("/expert"):
            path = paths.catalog_dir() / "policies" / f"{r['policy']}.safetensors"
            if path.is_file():
                return path
    return None


def discounted_references(card, gamma: float, horizon: int, episodes: int = 100, seed: int = 0
                          ) -> dict[str, Any] | None:
    """V_gamma of the random and expert references for `card`'s env (None without card ref scores)."""
    if card.ref_min_score is None or card.ref_max_score is None:
        return None
    low = card.action_low if card.action_low is not None else [-1.0] * card.action_dim
    high = card.action_high if card.action_high is not None else [1.0] * card.action_dim
    rand = monte_carlo(uniform_policy(low, high), card.env_id, gamma, episodes, seed, card.env_kwargs, horizon)
    ref = {"random": rand["v_gamma"], "random_source": f"uniform random policy, {episodes} simulator episodes"}
    expert_path = shipped_expert(card.env_id)
    if expert_path is not None:
        from safetensors.numpy import load_file

        expert = tanh_gaussian_policy(load_file(str(expert_path)), expert_path.stem, low, high)
        ex = monte_carlo(expert, card.env_id, gamma, episodes, seed, card.env_kwargs, horizon)
        ref["expert"] = ex["v_gamma"]
        ref["expert_source"] = f"shipped expert policy {expert_path.name}, {episodes} simulator episodes"
    else:
        per_step = card.ref_max_score / horizon
        ref["expert"] = per_step * (1 - gamma**horizon) / (1 - gamma) if gamma < 1 else card.ref_max_score
        ref["expert_source"] = (f"approximate: card ref_max_score {card.ref_max_score} spread evenly over "
                                f"{horizon} steps (no shipped expert policy for {card.env_id})")
    ref["undiscounted"] = {"random": card.ref_min_score, "expert": card.ref_max_score, "source": "dataset card"}
    return ref


def normalize(value: float, ref: dict | None, discounted: bool = True) -> float | None:
    """100 * (V - V_rand) / (V_exp - V_rand) with the discounted (or the card's undiscounted) references."""
    if ref is None or value is None or not np.isfinite(value):
        return None
    lo, hi = (ref["random"], ref["expert"]) if discounted else (ref["undiscounted"]["random"],
                                                                 ref["undiscounted"]["expert"])
    return 100.0 * (value - lo) / (hi - lo)
