"""IQL's mechanisms (Kostrikov et al. 2022): the expectile value loss, advantage-weighted policy
extraction, reward scaling, the cosine actor schedule and the update order."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.iql import IQL, IQLConfig
from offlab.algos.losses import advantage_weights, expectile_loss, return_range_reward_scale
from offlab.data.store import Transitions

SMALL = (64, 64)


@pytest.fixture(scope="module")
def hopper_data(hopper_random):
    return Transitions(hopper_random)


def make(data, **overrides) -> IQL:
    return IQL(IQLConfig(hidden=SMALL, **overrides), LearnerSpec.from_transitions(data))


def test_expectile_loss_at_half_is_half_the_squared_error():
    u = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(expectile_loss(u, 0.5), 0.5 * (u**2).mean())


def test_expectile_above_half_weights_positive_errors_more():
    """With u = Q - V, tau = 0.7 weighs Q above V (u > 0) by 0.7 and below by 0.3: an upper expectile."""
    u = torch.tensor([2.0])
    assert expectile_loss(u, 0.7).item() == pytest.approx(0.7 * 4.0)
    assert expectile_loss(-u, 0.7).item() == pytest.approx(0.3 * 4.0)


@pytest.mark.parametrize(("tau", "expected"), [(0.5, "mean"), (0.99, "near_max")])
def test_expectile_value_is_the_mean_at_half_and_approaches_the_max(tau, expected):
    """Minimising the value loss over a scalar V for one state's Q samples: tau = 0.5 gives their
    mean, tau -> 1 moves V towards their maximum."""
    q = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        expectile_loss(q - v, tau).backward()
        opt.step()
    if expected == "mean":
        assert v.item() == pytest.approx(q.mean().item(), abs=1e-2)
    else:
        assert q.mean().item() + 3.0 < v.item() <= q.max().item()


def test_advantage_weights_are_exp_beta_a_capped_and_detached():
    adv = torch.tensor([-1.0, 0.0, 1.0, 100.0], requires_grad=True)
    w = advantage_weights(adv, beta=3.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([np.exp(-3.0), 1.0, np.exp(3.0), 100.0], dtype=torch.float32))
    assert not w.requires_grad
    assert torch.equal(advantage_weights(adv, 0.0, 100.0), torch.ones(4))


def test_beta_zero_gives_uniform_weights_and_nll_bc(hopper_data):
    """beta = 0: every weight is 1, so the actor loss and its gradient are those of NLL behaviour cloning."""
    learner = make(hopper_data, beta=0.0)
    batch = hopper_data.sample(64, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(learner.actor)
    nll = -reference.log_prob(learner.normalizer(batch.obs), batch.action).mean()
    nll.backward()
    metrics = learner.update(batch)
    assert metrics["train/adv_weight_mean"] == 1.0
    assert metrics["train/actor_loss"] == pytest.approx(nll.item(), rel=1e-6)
    for p, p_ref in zip(learner.actor.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-9)


def test_actor_weights_use_the_target_critic_and_the_updated_value(hopper_data):
    """Order as in the reference code: V steps first; the actor's advantage is min_i Q'_i(s, a) - V_new(s)."""
    learner = make(hopper_data, beta=3.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        learner.update(hopper_data.sample(64, gen))
    batch = hopper_data.sample(64, gen)
    shadow = copy.deepcopy(learner)
    s = shadow.normalizer(batch.obs)
    q_target = shadow.critic_target(s, batch.action).min(dim=0).values.detach()
    shadow.value_opt.zero_grad()
    expectile_loss(q_target - shadow.value(s), 0.7).backward()
    shadow.value_opt.step()
    weights = torch.exp(3.0 * (q_target - shadow.value(s))).clamp(max=100.0).detach()
    expected = -(weights * shadow.actor.log_prob(s, batch.action)).mean()
    metrics = learner.update(batch)
    assert metrics["train/actor_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_locomotion_reward_scale_is_1000_over_return_range(hopper_data, hopper_random):
    returns = hopper_random.episode_returns()
    learner = make(hopper_data)
    assert learner.reward_scale == pytest.approx(1000.0 / (returns.max() - returns.min()))
    assert make(hopper_data, scale_rewards=False).reward_scale == 1.0
    assert return_range_reward_scale(np.array([5.0])) == 1.0


def test_critic_regresses_on_scaled_reward_plus_discounted_value(hopper_data):
    learner = make(hopper_data)
    batch = hopper_data.sample(64, torch.Generator().manual_seed(3))
    shadow = copy.deepcopy(learner)
    metrics = learner.update(batch)
    s, s2 = batch.obs, batch.next_obs  # no state normalisation by default
    q_before = shadow.critic(s, batch.action).detach()
    y = batch.reward * learner.reward_scale + 0.99 * (1 - batch.terminated) * learner.value(s2).detach()
    assert metrics["train/critic_loss"] == pytest.approx(((q_before - y) ** 2).mean(dim=1).sum().item(), rel=1e-5)


def test_actor_lr_follows_a_cosine_decay_over_max_steps(hopper_data):
    learner = make(hopper_data, max_steps=4)
    gen = torch.Generator().manual_seed(4)
    seen = []
    for _ in range(6):
        learner.update(hopper_data.sample(16, gen))
        seen.append(learner.actor_opt.param_groups[0]["lr"])
    lr = learner.cfg.actor_lr
    expected = [lr, lr * (1 + np.cos(np.pi / 4)) / 2, lr / 2, lr * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0, 0.0]
    np.testing.assert_allclose(seen, expected, rtol=1e-12, atol=1e-15)
    assert learner.critic_opt.param_groups[0]["lr"] == lr


def test_deterministic_act_is_the_gaussian_mean(hopper_data):
    learner = make(hopper_data)
    obs = hopper_data.obs[:8]
    with torch.no_grad():
        mean = learner.actor.mean(obs).numpy()
    np.testing.assert_array_equal(learner.act(obs.numpy()), mean)
    samples = np.stack([learner.act(obs.numpy(), deterministic=False) for _ in range(50)])
    assert samples.std(axis=0).mean() > 0.1  # exp(log_std = 0) = 1 before training, clipped to the box


def test_paper_defaults_and_antmaze_overrides():
    cfg = IQLConfig()
    assert (cfg.expectile, cfg.beta, cfg.max_weight, cfg.tau, cfg.gamma) == (0.7, 3.0, 100.0, 0.005, 0.99)
    assert (cfg.actor_lr, cfg.critic_lr, cfg.value_lr, cfg.max_steps) == (3e-4, 3e-4, 3e-4, 1_000_000)
    assert IQL.defaults_for("hopper-medium") == {}
    assert IQL.defaults_for("antmaze-umaze") == {"expectile": 0.9, "beta": 10.0, "scale_rewards": False,
                                                 "reward_shift": -1.0}
