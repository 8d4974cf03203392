"""TD3+BC: TD3 with a behaviour-cloning term on the actor.

Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021,
arXiv:2106.06860. Section 5: the actor maximises lambda * Q(s, pi(s)) - (pi(s) - a)^2 with
lambda = alpha / mean|Q| (the objective and lambda's definition; equation numbers differ between
arXiv versions), states normalised by the dataset's mean and std. The critic is TD3's (Fujimoto et
al. 2018): clipped double Q, target policy smoothing, delayed actor and target updates.

Differs from the reference code:
- The paper averages lambda's denominator over dataset pairs Q(s_i, a_i); the authors' code, and
  offlab, use Q1(s, pi(s)) on the batch.
- The twin critics are one 2-member vectorised ensemble (same maths, one batched matmul).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from offlab.algos.base import LearnerSpec, check_settings, register
from offlab.algos.losses import q_normalised_bc_actor_loss, td3_critic_loss
from offlab.nets import (
    NOISE,
    DeterministicActor,
    EnsembleCritic,
    Normalizer,
    act_on_numpy,
    adam,
    freeze,
    grads_off,
    learner_state,
    load_learner_state,
    polyak,
    stream_generator,
    take_step,
)


@dataclass
class TD3BCConfig:
    """TD3+BC settings; defaults are the paper's (all D4RL locomotion datasets use the same values)."""

    seed: int = 0
    """Seed for network initialisation and the target-smoothing noise."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target networks."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of actor and critics."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise, as a fraction of max_action."""
    noise_clip: float = 0.5
    """Clip of the smoothing noise, as a fraction of max_action."""
    policy_freq: int = 2
    """Actor and target networks update once every this many critic updates."""
    alpha: float = 2.5
    """BC trade-off: lambda = alpha / mean|Q|; alpha = 0 is pure behaviour cloning."""
    normalize_states: bool = True
    """Normalise states by the dataset's mean and std (+1e-3)."""

    LIMITS: ClassVar[dict[str, str]] = {
        "gamma": "[0, 1]", "tau": "(0, 1]", "actor_lr": "(0, inf)", "critic_lr": "(0, inf)",
        "policy_noise": "[0, inf)", "noise_clip": "[0, inf)", "policy_freq": "[1, inf)", "alpha": "[0, inf)"
    }
    """Valid interval of each numeric setting, checked when the config is built."""

    def __post_init__(self):
        check_settings(self)


PAPER_OVERRIDES: dict[str, dict[str, Any]] = {
    # the paper uses alpha = 2.5 and the defaults above on every D4RL locomotion dataset
    "halfcheetah": {},
    "hopper": {},
    "walker2d": {},
}


@register
class TD3BC:
    name: ClassVar[str] = "td3bc"
    Config: ClassVar[type] = TD3BCConfig

    def __init__(self, config: TD3BCConfig, spec: LearnerSpec, device: torch.device | str = "cpu"):
        self.cfg = config
        self.spec = spec
        self.device = torch.device(device)
        self.max_action = spec.max_action
        with torch.random.fork_rng(devices=[]):  # initialise from the config's seed, leave the global RNG alone
            torch.manual_seed(config.seed)
            self.actor = DeterministicActor(spec.obs_dim, spec.action_dim, config.hidden, self.max_action)
            self.critic = EnsembleCritic(spec.obs_dim, spec.action_dim, 2, config.hidden)
        self.actor_target = freeze(copy.deepcopy(self.actor))
        self.critic_target = freeze(copy.deepcopy(self.critic))
        if config.normalize_states:
            self.normalizer = Normalizer(spec.obs_mean, np.asarray(spec.obs_std) + 1e-3)
        else:
            self.normalizer = Normalizer.identity(spec.obs_dim)
        for net in (self.actor, self.critic, self.actor_target, self.critic_target, self.normalizer):
            net.to(self.device)
        self.actor_opt = adam(self.actor.parameters(), config.actor_lr)
        self.critic_opt = adam(self.critic.parameters(), config.critic_lr)
        self.generator = stream_generator(config.seed, NOISE, self.device)  # apart from the init's numbers
        self.updates = 0

    @classmethod
    def defaults_for(cls, dataset_name: str) -> dict[str, Any]:
        """The paper's config overrides for a dataset's env family (empty when none apply)."""
        name = dataset_name.lower()
        return next((dict(v) for family, v in PAPER_OVERRIDES.items() if family in name), {})

    def update(self, batch) -> dict[str, float]:
        cfg = self.cfg
        s, s2 = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        a = batch.action
        critic_loss = td3_critic_loss(
            self.critic, self.critic_target, self.actor_target, s, a, batch.reward, s2, batch.terminated,
            gamma=cfg.gamma, policy_noise=cfg.policy_noise * self.max_action,
            noise_clip=cfg.noise_clip * self.max_action, max_action=self.max_action, generator=self.generator,
        )
        take_step(self.critic_opt, critic_loss)
        self.updates += 1
        metrics = {"train/critic_loss": critic_loss.item()}

        if self.updates % cfg.policy_freq == 0:  # delayed actor and target update
            with grads_off(self.critic):  # the actor loss trains the actor only
                pi = self.actor(s)
                q = self.critic.member(s, pi, 0)  # Q1(s, pi(s))
                # -lambda * mean Q + mean ||pi(s) - a||^2, lambda = alpha / mean|Q| detached
                actor_loss, bc = q_normalised_bc_actor_loss(q, pi, a, cfg.alpha)
                take_step(self.actor_opt, actor_loss)
            polyak(self.actor_target, self.actor, cfg.tau)
            polyak(self.critic_target, self.critic, cfg.tau)
            metrics |= {"train/actor_loss": actor_loss.item(), "train/bc_loss": bc.item(),
                        "train/q_mean": q.mean().item()}
        return metrics

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """The deterministic policy's action (TD3+BC evaluates without exploration noise)."""
        return act_on_numpy(lambda o: self.actor(self.normalizer(o)), obs, self.device,
                            self.spec.action_low, self.spec.action_high)

    STATE_PARTS = ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt", "normalizer")

    def state_dict(self) -> dict[str, Any]:
        return learner_state(self, self.STATE_PARTS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_learner_state(self, state, self.STATE_PARTS)
