"""BC: behaviour cloning, supervised regression from state to logged action.

Pomerleau, "ALVINN", NeurIPS 1988 is the idea; the offline-RL baseline follows the IQL paper's and
CORL's BC (Kostrikov et al., ICLR 2022, arXiv:2110.06169, Table 1 "BC" column): states normalised
by the dataset's mean and std, an MLP policy, Adam.
- Deterministic variant (default): L = mean ||pi(s) - a||^2 with pi(s) = max_action * tanh(f(s)).
- Stochastic variant (`stochastic=True`): L = -mean log pi(a|s) for a tanh-Gaussian pi, actions
  clipped to [-1 + 1e-6, 1 - 1e-6] * max_action before the atanh; `act` returns the mean's tanh.
- "%BC" (Chen et al., Decision Transformer, NeurIPS 2021): `top_fraction` < 1 trains only on the
  top fraction of episodes by return.

Differs from the reference code:
- The squared error is averaged over batch and action dimensions (F.mse_loss, as CORL), not
  summed over action dimensions.
- %BC selects whole episodes by undiscounted return; an episode cut by the dataset's end counts
  with the return it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from offlab.algos.base import LearnerSpec, check_settings, register
from offlab.nets import (
    NOISE,
    DeterministicActor,
    Normalizer,
    TanhGaussianActor,
    act_on_numpy,
    adam,
    learner_state,
    load_learner_state,
    stream_generator,
    take_step,
)


@dataclass
class BCConfig:
    """BC settings; defaults follow the IQL paper's / CORL's BC baseline."""

    seed: int = 0
    """Seed for network initialisation and for sampling the stochastic policy."""
    lr: float = 3e-4
    """Adam learning rate."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the policy."""
    stochastic: bool = False
    """Fit a tanh-Gaussian policy by maximum likelihood instead of the deterministic MSE policy."""
    top_fraction: float = 1.0
    """Train only on this fraction of episodes with the highest return (0.1 is '10% BC'; 1.0 uses all)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    normalize_states: bool = True
    """Normalise states by the dataset's mean and std (+1e-3)."""

    LIMITS: ClassVar[dict[str, str]] = {
        "lr": "(0, inf)", "top_fraction": "(0, 1]", "weight_decay": "[0, inf)"
    }
    """Valid interval of each numeric setting, checked when the config is built."""

    def __post_init__(self):
        check_settings(self)


def bc_loss(actor: torch.nn.Module, obs: torch.Tensor, action: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """mean ||pi(s) - a||^2 (deterministic) or -mean log pi(a|s) (stochastic)."""
    if stochastic:
        return -actor.log_prob(obs, action).mean()
    return ((actor(obs) - action) ** 2).mean()


def top_episode_rows(episode_returns: np.ndarray, episode_starts: np.ndarray, episode_lengths: np.ndarray,
                     fraction: float) -> np.ndarray:
    """Row indices of the ceil(fraction * n) episodes with the highest return, in row order."""
    n = len(episode_returns)
    keep = max(1, math.ceil(fraction * n))
    best = np.sort(np.argsort(-episode_returns, kind="stable")[:keep])
    return np.concatenate([np.arange(episode_starts[i], episode_starts[i] + episode_lengths[i]) for i in best])


@register
class BC:
    name: ClassVar[str] = "bc"
    Config: ClassVar[type] = BCConfig

    def __init__(self, config: BCConfig, spec: LearnerSpec, device: torch.device | str = "cpu"):
        self.cfg = config
        self.spec = spec
        self.device = torch.device(device)
        self.max_action = spec.max_action
        self.stochastic_policy = config.stochastic
        with torch.random.fork_rng(devices=[]):  # initialise from the config's seed, leave the global RNG alone
            torch.manual_seed(config.seed)
            if config.stochastic:
                self.actor = TanhGaussianActor(spec.obs_dim, spec.action_dim, config.hidden, self.max_action)
            else:
                self.actor = DeterministicActor(spec.obs_dim, spec.action_dim, config.hidden, self.max_action)
        if config.normalize_states:
            self.normalizer = Normalizer(spec.obs_mean, np.asarray(spec.obs_std) + 1e-3)
        else:
            self.normalizer = Normalizer.identity(spec.obs_dim)
        self.actor.to(self.device)
        self.normalizer.to(self.device)
        self.optimizer = adam(self.actor.parameters(), config.lr, weight_decay=config.weight_decay)
        self.generator = stream_generator(config.seed, NOISE, self.device)  # apart from the init's numbers
        self.updates = 0
        self.training_rows: torch.Tensor | None = None
        """Dataset rows the loop samples from (None: all); set by %BC."""
        if config.top_fraction < 1.0 and spec.data is not None:
            d = spec.data
            rows = top_episode_rows(d.dataset.episode_returns(), d.episode_starts, d.episode_lengths,
                                    config.top_fraction)
            self.training_rows = torch.from_numpy(rows)

    @classmethod
    def defaults_for(cls, dataset_name: str) -> dict[str, Any]:
        """BC uses the same settings on every dataset."""
        return {}

    def update(self, batch) -> dict[str, float]:
        loss = bc_loss(self.actor, self.normalizer(batch.obs), batch.action, self.cfg.stochastic)
        take_step(self.optimizer, loss)
        self.updates += 1
        value = loss.item()
        return {"train/bc_loss": value, "train/actor_loss": value}

    def _policy(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        s = self.normalizer(obs)
        if self.cfg.stochastic:
            return self.actor(s, deterministic=deterministic, generator=self.generator)[0]
        return self.actor(s)

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """The policy's action: the mean's tanh, or a sample of the stochastic policy when not deterministic."""
        return act_on_numpy(lambda o: self._policy(o, deterministic), obs, self.device,
                            self.spec.action_low, self.spec.action_high)

    STATE_PARTS = ("actor", "normalizer", "optimizer")

    def state_dict(self) -> dict[str, Any]:
        return learner_state(self, self.STATE_PARTS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_learner_state(self, state, self.STATE_PARTS)
