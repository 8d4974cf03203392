"""Model-based OPE: roll the target policy out in a learned dynamics-and-reward ensemble.

DOPE's "MB-FF" (Fu et al., "Benchmarks for Deep Off-Policy Evaluation", ICLR 2021,
arXiv:2103.16596; Zhang et al., "Autoregressive Dynamics Models for Offline Policy Evaluation and
Optimization", ICLR 2021, arXiv:2104.13877, the feed-forward baseline), METRICS.md B.2:
- an ensemble of E = 5 probabilistic MLPs (4 x 200, Gaussian NLL) predicts (s' - s, r)
  (offlab.dynamics, shared with the model-based learners);
- termination by the env's known rule (MuJoCo v5 healthy ranges) or a learned classifier;
- R = 5 rollouts of pi from every dataset initial state s_0^i (at most `max_starts`, subsampled),
  a uniformly chosen member at each step, horizon H = the env's time limit;
- predicted states clipped to the data range +- 10% (policy_eval passes the state bounds);
- V = mean over rollouts of sum_t gamma^t r_t. The same rollouts give the undiscounted return
  (gamma = 1), the one OPE number with a D4RL score on the card's undiscounted references.
- The uncertainty signal: one rollout per start with each member alone; the std of those per-member
  values across members.

Differs from the reference code: each step takes the chosen member's mean next state, not a sample from
its Gaussian (`model_noise`; MuJoCo is deterministic, see the config); rollouts run the full horizon H even
when gamma^t < 1e-3, because the undiscounted return needs it; the CI is the initial-state bootstrap
(resampling start states, labelled: it ignores model-fit uncertainty) unless B refits are asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from offlab.data.schema import Dataset
from offlab.dynamics import DynamicsConfig, DynamicsEnsemble, Termination, fit_dynamics, termination_for
from offlab.evaluation.ope.episodes import percentile_interval
from offlab.evaluation.ope.policy import TargetPolicy
from offlab.nets import NOISE, stream_generator


@dataclass
class ModelBasedConfig:
    """Model-based OPE settings (METRICS B.2 MB-FF)."""

    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    """The ensemble and its training."""
    rollouts_per_start: int = 5
    """Rollouts R from each start state."""
    max_starts: int = 200
    """Start states used at most (a seeded subsample of the dataset's initial states)."""
    member_starts: int = 50
    """Start states of the per-member rollouts (the ensemble-disagreement signal)."""
    horizon: int = 0
    """Rollout length; 0: the env's time limit (from the card's env kwargs or the env spec)."""
    model_noise: bool = False
    """Sample each next state from the chosen member's Gaussian (PETS' trajectory sampling). Off by default:
    the MuJoCo simulators are deterministic, so that variance is model error, not the environment's, and
    sampling it makes rollouts drift out of the healthy range early (benchmarks/ope.md: on hopper-medium the
    behaviour policy's model rollouts last 247 steps with noise, 661 without; its real episodes ~370-1000).
    Each step still draws its member uniformly, which keeps the ensemble's disagreement in the rollouts."""
    seed: int = 0
    """Seed of the start subsample, member choice, model noise and policy sampling."""


@torch.no_grad()
def rollout_returns(model: DynamicsEnsemble, policy: TargetPolicy, starts: np.ndarray, horizon: int, gamma: float,
                    terminal: Termination | None, generator: torch.Generator, member: int | None = None,
                    model_noise: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(discounted return, undiscounted return, length) of one model rollout from each start state."""
    obs = torch.tensor(np.asarray(starts, np.float32))  # a copy: rollouts write into it
    n = len(obs)
    disc = torch.zeros(n, dtype=torch.float64)
    undisc = torch.zeros(n, dtype=torch.float64)
    length = torch.zeros(n, dtype=torch.int64)
    alive = torch.arange(n)
    for t in range(horizon):
        if not len(alive):
            break
        o = obs[alive]
        a = policy.sample(o, generator, 1)[0]
        nxt, r = model.step(o, a, generator, member=member, sample=model_noise)
        disc[alive] += (gamma**t) * r.double()
        undisc[alive] += r.double()
        length[alive] += 1
        obs[alive] = nxt
        if terminal is not None:
            alive = alive[~terminal(nxt)]
    return disc.numpy(), undisc.numpy(), length.numpy()


def rollout_horizon(ds: Dataset, config_horizon: int = 0) -> int:
    """The evaluation horizon H: the config's, else the card's max_episode_steps, else the env's time limit."""
    if config_horizon:
        return int(config_horizon)
    kw = ds.card.env_kwargs or {}
    if kw.get("max_episode_steps"):
        return int(kw["max_episode_steps"])
    from offlab.envs.make import env_spaces
    from offlab.errors import EnvError

    try:
        h = env_spaces(ds.card.env_id).max_episode_steps
    except EnvError:  # data from an env that is not installed here: its longest episode
        h = None
    return int(h or ds.episode_lengths.max())


def model_based_estimate(policy: TargetPolicy, ds: Dataset, gamma: float, config: ModelBasedConfig | None = None,
                         model: DynamicsEnsemble | None = None, resamples: int = 2000, level: float = 0.95,
                         progress: Callable[[int], None] | None = None,
                         termination: tuple[Termination | None, str] | None = None) -> dict:
    """The MB estimate of V_gamma(pi) (and of the undiscounted return), with its CI and model diagnostics.

    `model` and `termination` (from `offlab.dynamics.termination_for`) are fitted here when not given.
    """
    cfg = config or ModelBasedConfig()
    info: dict = {}
    if model is None:
        model, info = fit_dynamics(ds, cfg.dynamics, progress)
    terminal, term_source = termination or termination_for(ds)
    horizon = rollout_horizon(ds, cfg.horizon)
    rng = np.random.default_rng(cfg.seed)
    start_rows = ds.episode_starts
    if len(start_rows) > cfg.max_starts:
        start_rows = np.sort(rng.choice(start_rows, cfg.max_starts, replace=False))
    starts = ds.obs[start_rows]
    gen = stream_generator(cfg.seed, NOISE)
    r = cfg.rollouts_per_start
    disc, undisc, length = rollout_returns(model, policy, np.repeat(starts, r, axis=0), horizon, gamma, terminal, gen,
                                           model_noise=cfg.model_noise)
    per_start = disc.reshape(-1, r).mean(1)
    per_start_undisc = undisc.reshape(-1, r).mean(1)
    idx = rng.integers(0, len(per_start), size=(resamples, len(per_start)))
    lo, hi = percentile_interval(per_start[idx].mean(1), level)
    ulo, uhi = percentile_interval(per_start_undisc[idx].mean(1), level)
    member_values = []
    few = starts[: cfg.member_starts]
    for m in range(model.members):
        d, _, _ = rollout_returns(model, policy, few, horizon, gamma, terminal, gen, member=m,
                                  model_noise=cfg.model_noise)
        member_values.append(float(d.mean()))
    return {
        "value": float(disc.mean()), "ci": [lo, hi],
        "ci_method": (f"initial-state bootstrap over {len(per_start)} starts x {r} rollouts, {resamples} resamples, "
                      f"percentile {int(level * 100)}% (ignores model-fit uncertainty)"),
        "undiscounted": float(undisc.mean()), "undiscounted_ci": [ulo, uhi],
        "member_values": member_values, "member_std": float(np.std(member_values, ddof=1)),
        "rollout_length_mean": float(length.mean()), "horizon": horizon, "termination": term_source,
        "starts": int(len(per_start)), "rollouts": int(len(disc)),
        "model": {k: v for k, v in info.items() if k != "history"},
        "unreliable": bool(not np.isfinite(disc.mean())),
    }
