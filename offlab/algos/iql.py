"""IQL: implicit Q-learning; V is an upper expectile of Q over dataset actions, the policy is AWR.

Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022,
arXiv:2110.06169. Value loss: the expectile regression L_V = E[L2^tau(Q'(s, a) - V(s))] (Eq. 5);
Q loss: E[(r + gamma V(s') - Q(s, a))^2] (Eq. 6); policy extraction by advantage-weighted
regression, L_pi = -E[exp(beta (Q'(s, a) - V(s))) log pi(a|s)] (Eq. 7), with the exponentiated
advantage capped at 100 as in the authors' code. Update order as in the reference code: V, actor
(using the new V), Q (bootstrapping from the new V), then the Polyak target of Q.

Differs from the reference code:
- The twin critics are one 2-member vectorised ensemble.
- The reward scale 1000 / (max return - min return) is computed from every episode in the dataset,
  the last one included even if it was cut by the end of the data (the reference code does the same).
- The actor's state-independent log-std is clamped to [-20, 2] (nets.GaussianActor, as CORL); the
  authors' code clamps its minimum at -5 (recalled, verify).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from offlab.algos.base import LearnerSpec, check_settings, register
from offlab.algos.losses import (
    advantage_weights,
    bootstrap_target,
    ensemble_mse,
    expectile_loss,
    return_range_reward_scale,
)
from offlab.nets import (
    NOISE,
    EnsembleCritic,
    GaussianActor,
    Normalizer,
    ValueNet,
    act_on_numpy,
    adam,
    freeze,
    learner_state,
    load_learner_state,
    polyak,
    stream_generator,
    take_step,
)


@dataclass
class IQLConfig:
    """IQL settings; defaults are the paper's for D4RL locomotion (see PAPER_OVERRIDES for the rest)."""

    seed: int = 0
    """Seed for network initialisation and the stochastic policy's sampling."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor (decayed by a cosine schedule over max_steps)."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    value_lr: float = 3e-4
    """Adam learning rate of the value network."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of actor, critics and value network."""
    expectile: float = 0.7
    """Expectile tau of the value loss; 0.5 is the mean, towards 1 the max over dataset actions."""
    beta: float = 3.0
    """Inverse temperature of the advantage weights exp(beta * A); 0 is plain behaviour cloning."""
    max_weight: float = 100.0
    """Cap on the advantage weights."""
    max_steps: int = 1_000_000
    """Length of the actor's cosine learning-rate decay (the run's number of updates)."""
    scale_rewards: bool = True
    """Multiply rewards by 1000 / (max episode return - min episode return) (locomotion)."""
    reward_shift: float = 0.0
    """Added to every (scaled) reward; AntMaze uses -1."""
    normalize_states: bool = False
    """Normalise states by the dataset's mean and std (+1e-3); the paper does not."""

    LIMITS: ClassVar[dict[str, str]] = {
        "gamma": "[0, 1]", "tau": "(0, 1]", "actor_lr": "(0, inf)", "critic_lr": "(0, inf)", "value_lr": "(0, inf)",
        "expectile": "(0, 1)", "beta": "[0, inf)", "max_weight": "(0, inf)", "max_steps": "[0, inf)"
    }
    """Valid interval of each numeric setting, checked when the config is built."""

    def __post_init__(self):
        check_settings(self)


PAPER_OVERRIDES: dict[str, dict[str, Any]] = {
    # locomotion uses the defaults above; AntMaze values from the paper's appendix / reference configs
    "halfcheetah": {},
    "hopper": {},
    "walker2d": {},
    "antmaze": {"expectile": 0.9, "beta": 10.0, "scale_rewards": False, "reward_shift": -1.0},
}


@register
class IQL:
    name: ClassVar[str] = "iql"
    Config: ClassVar[type] = IQLConfig

    def __init__(self, config: IQLConfig, spec: LearnerSpec, device: torch.device | str = "cpu"):
        self.cfg = config
        self.spec = spec
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # initialise from the config's seed, leave the global RNG alone
            torch.manual_seed(config.seed)
            self.actor = GaussianActor(spec.obs_dim, spec.action_dim, config.hidden, spec.max_action)
            self.critic = EnsembleCritic(spec.obs_dim, spec.action_dim, 2, config.hidden)
            self.value = ValueNet(spec.obs_dim, config.hidden)
        self.critic_target = freeze(copy.deepcopy(self.critic))
        if config.normalize_states:
            self.normalizer = Normalizer(spec.obs_mean, np.asarray(spec.obs_std) + 1e-3)
        else:
            self.normalizer = Normalizer.identity(spec.obs_dim)
        for net in (self.actor, self.critic, self.critic_target, self.value, self.normalizer):
            net.to(self.device)
        self.actor_opt = adam(self.actor.parameters(), config.actor_lr)
        self.critic_opt = adam(self.critic.parameters(), config.critic_lr)
        self.value_opt = adam(self.value.parameters(), config.value_lr)
        self.reward_scale = return_range_reward_scale(spec.episode_returns) if config.scale_rewards else 1.0
        self.generator = stream_generator(config.seed, NOISE, self.device)  # apart from the init's numbers
        self.updates = 0
        # act(deterministic=False) samples the Gaussian policy: an online phase explores with it, not added noise
        self.stochastic_policy = True

    @classmethod
    def defaults_for(cls, dataset_name: str) -> dict[str, Any]:
        """The paper's config overrides for a dataset's env family (empty when none apply)."""
        name = dataset_name.lower()
        return next((dict(v) for family, v in PAPER_OVERRIDES.items() if family in name), {})

    def actor_lr_now(self) -> float:
        """Cosine decay from actor_lr to 0 over max_steps updates (then held at 0)."""
        progress = min(self.updates, self.cfg.max_steps) / self.cfg.max_steps
        return self.cfg.actor_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def update(self, batch) -> dict[str, float]:
        cfg = self.cfg
        s, a, s2 = self.normalizer(batch.obs), batch.action, self.normalizer(batch.next_obs)
        r = batch.reward * self.reward_scale + cfg.reward_shift
        with torch.no_grad():
            q_target = self.critic_target(s, a).min(dim=0).values

        # value: expectile regression of V(s) towards min_i Q_i'(s, a), Eq. (5)
        v = self.value(s)
        value_loss = expectile_loss(q_target - v, cfg.expectile)
        take_step(self.value_opt, value_loss)

        # actor: advantage-weighted regression with the updated V, Eq. (7)
        with torch.no_grad():
            weights = advantage_weights(q_target - self.value(s), cfg.beta, cfg.max_weight)
        log_prob = self.actor.log_prob(s, a)
        actor_loss = -(weights * log_prob).mean()
        for group in self.actor_opt.param_groups:
            group["lr"] = self.actor_lr_now()
        take_step(self.actor_opt, actor_loss)

        # critics: y = r + gamma (1 - terminated) V(s') with the updated V, Eq. (6)
        with torch.no_grad():
            target = bootstrap_target(r, batch.terminated, self.value(s2), cfg.gamma)
        q = self.critic(s, a)
        critic_loss = ensemble_mse(q, target)
        take_step(self.critic_opt, critic_loss)
        polyak(self.critic_target, self.critic, cfg.tau)
        self.updates += 1
        return {
            "train/value_loss": value_loss.item(), "train/actor_loss": actor_loss.item(),
            "train/critic_loss": critic_loss.item(), "train/q_mean": q.mean().item(),
            "train/bc_loss": -log_prob.mean().item(), "train/adv_weight_mean": weights.mean().item(),
        }

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """The Gaussian policy's mean (deterministic) or a sample from it, clipped to the action box."""
        return act_on_numpy(
            lambda o: self.actor(self.normalizer(o), deterministic=deterministic, generator=self.generator),
            obs, self.device, self.spec.action_low, self.spec.action_high,
        )

    STATE_PARTS = ("actor", "critic", "critic_target", "value", "actor_opt", "critic_opt", "value_opt", "normalizer")

    def state_dict(self) -> dict[str, Any]:
        return learner_state(self, self.STATE_PARTS) | {"reward_scale": self.reward_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_learner_state(self, state, self.STATE_PARTS)
        self.reward_scale = float(state["reward_scale"])
