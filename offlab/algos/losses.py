"""Loss and target functions shared by several learners: pure functions of tensors (and networks).

Each function is one named piece of math from a paper, used by two or more learners (or named in a
paper on its own): the TD3 critic target with policy smoothing (TD3+BC, PRDC), the Q-normalised
actor objective (TD3+BC, PRDC), the expectile loss and the advantage weights (IQL, FamO2O), and the
IQL-style reward scale. Nothing here holds state; learners own networks, optimisers and generators.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def bootstrap_target(reward: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor,
                     gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s').

    Only a true terminal stops the bootstrap; a time-limit truncation never does (the batch has no
    truncation column at all).
    """
    return reward + gamma * (1.0 - terminated) * next_value


def ensemble_mse(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_i mean_b (Q_i(s_b, a_b) - y_b)^2 for an ensemble of Q-values [N, B] and targets [B]."""
    return ((q - target) ** 2).mean(dim=1).sum()


def smoothed_target_action(actor_target: nn.Module, next_obs: torch.Tensor, noise_std: float, noise_clip: float,
                           max_action: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """TD3 target policy smoothing: clip(pi'(s') + clip(eps, -c, c), -a_max, a_max), eps ~ N(0, sigma^2)."""
    action = actor_target(next_obs)
    noise = torch.randn(action.shape, generator=generator, device=action.device, dtype=action.dtype)
    noise = (noise * noise_std).clamp(-noise_clip, noise_clip)
    return (action + noise).clamp(-max_action, max_action)


def td3_critic_loss(critic: nn.Module, critic_target: nn.Module, actor_target: nn.Module, obs: torch.Tensor,
                    action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor, terminated: torch.Tensor, *,
                    gamma: float, policy_noise: float, noise_clip: float, max_action: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """TD3's clipped double-Q loss (Fujimoto et al. 2018).

    y = r + gamma (1 - terminated) min_i Q_i'(s', a~'), a~' the smoothed target action; the loss is
    the sum over critics of the mean squared error to y.
    """
    with torch.no_grad():
        next_action = smoothed_target_action(actor_target, next_obs, policy_noise, noise_clip, max_action, generator)
        next_q = critic_target(next_obs, next_action).min(dim=0).values
        target = bootstrap_target(reward, terminated, next_q, gamma)
    return ensemble_mse(critic(obs, action), target)


def q_scale(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """TD3+BC's lambda = alpha / mean|Q(s, pi(s))|, detached: it rescales the Q term, it is not optimised."""
    return alpha / q.abs().mean().detach()


def q_normalised_bc_actor_loss(q: torch.Tensor, policy_action: torch.Tensor, bc_target: torch.Tensor,
                               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TD3+BC's actor objective: -lambda * mean Q(s, pi(s)) + mean ||pi(s) - a_bc||^2.

    `bc_target` is the logged action in TD3+BC and the nearest dataset action in PRDC. Returns
    (actor loss, BC term); the squared error is averaged over batch and action dimensions, as in both
    authors' code (F.mse_loss).
    """
    bc = ((policy_action - bc_target) ** 2).mean()
    return -q_scale(q, alpha) * q.mean() + bc, bc


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric L2, mean |tau - 1[u < 0]| u^2 with u = Q - V: V tends to the tau-expectile of Q."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff**2).mean()


def advantage_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Advantage-weighted regression weights min(exp(beta * A), max_weight), detached."""
    return torch.exp(beta * advantage.detach()).clamp(max=max_weight)


def return_range_reward_scale(episode_returns: np.ndarray, target_range: float = 1000.0) -> float:
    """IQL's locomotion reward scale: target_range / (max episode return - min episode return).

    Returns 1.0 when there are fewer than two episodes or all returns are equal (nothing to scale by).
    """
    returns = np.asarray(episode_returns, dtype=np.float64)
    if returns.size < 2:
        return 1.0
    spread = float(returns.max() - returns.min())
    return target_range / spread if spread > 0 else 1.0
