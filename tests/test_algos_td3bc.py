"""TD3+BC's mechanisms (Fujimoto & Gu 2021): the detached Q-normalisation, the reduction to BC,
the delayed actor/target updates, and bootstrapping through time-limit truncations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.bc import BC, BCConfig
from offlab.algos.losses import bootstrap_target, q_normalised_bc_actor_loss, q_scale
from offlab.algos.td3bc import TD3BC, TD3BCConfig
from offlab.data.store import Transitions
from tests.helpers import make_sim_dataset

SMALL = (64, 64)


@pytest.fixture(scope="module")
def hopper_data(hopper_random):
    return Transitions(hopper_random)


def make(data, **overrides) -> TD3BC:
    return TD3BC(TD3BCConfig(hidden=SMALL, **overrides), LearnerSpec.from_transitions(data))


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_q_scale_is_alpha_over_mean_abs_q():
    q = torch.tensor([1.0, -3.0, 2.0, 6.0])
    assert q_scale(q, 2.5).item() == pytest.approx(2.5 / 3.0)


def test_q_scale_is_detached():
    """d loss / d Q_b = -lambda / B exactly: no gradient flows through lambda's |Q| denominator."""
    q = torch.tensor([1.0, -3.0, 2.0, 6.0], requires_grad=True)
    pi = torch.zeros(4, 2)
    loss, _ = q_normalised_bc_actor_loss(q, pi, torch.ones(4, 2), alpha=2.5)
    loss.backward()
    torch.testing.assert_close(q.grad, torch.full((4,), -(2.5 / 3.0) / 4), rtol=0, atol=1e-7)


def test_q_scale_cancels_the_critic_scale(hopper_data):
    """Scaling Q by 10 leaves the actor gradient unchanged (lambda divides the scale out)."""
    learner = make(hopper_data)
    batch = hopper_data.sample(128, torch.Generator().manual_seed(1))
    s = learner.normalizer(batch.obs)

    def actor_grads(critic) -> list[torch.Tensor]:
        actor = copy.deepcopy(learner.actor)
        pi = actor(s)
        loss, _ = q_normalised_bc_actor_loss(critic(s, pi)[0], pi, batch.action, alpha=2.5)
        loss.backward()
        return [p.grad for p in actor.parameters()]

    scaled = copy.deepcopy(learner.critic)
    last = scaled.net.net[-1]
    with torch.no_grad():
        last.weight.mul_(10.0)
        last.bias.mul_(10.0)
    for g, g10 in zip(actor_grads(learner.critic), actor_grads(scaled), strict=True):
        torch.testing.assert_close(g, g10, rtol=1e-4, atol=1e-7)


def test_actor_step_uses_lambda_from_q_of_policy_actions(hopper_data):
    """The actor gradient of the delayed step equals grad(-alpha/mean|Q1(s,pi)| * mean Q1(s,pi) + mse(pi, a))."""
    learner = make(hopper_data)
    batch = hopper_data.sample(64, torch.Generator().manual_seed(2))
    learner.update(batch)  # critic only
    actor, critic = copy.deepcopy(learner.actor), copy.deepcopy(learner.critic)
    learner.update(batch)  # the critic moves first, then the actor uses the moved critic
    s = learner.normalizer(batch.obs)
    critic.load_state_dict(learner.critic.state_dict())
    pi = actor(s)
    q1 = critic(s, pi)[0]
    lam = 2.5 / q1.abs().mean().detach()
    (-lam * q1.mean() + ((pi - batch.action) ** 2).mean()).backward()
    for p_expected, p_learner in zip(actor.parameters(), learner.actor.parameters(), strict=True):
        torch.testing.assert_close(p_learner.grad, p_expected.grad, rtol=1e-5, atol=1e-8)


def test_alpha_zero_reduces_to_bc(hopper_data):
    """alpha = 0: the actor gradient is exactly the BC gradient, and the first actor step moves the
    parameters exactly as BC's first step from the same initialisation and batch."""
    learner = make(hopper_data, alpha=0.0)
    bc = BC(BCConfig(hidden=SMALL, lr=learner.cfg.actor_lr), LearnerSpec.from_transitions(hopper_data))
    assert same(params(learner.actor), params(bc.actor))  # same seed, same init
    batch = hopper_data.sample(64, torch.Generator().manual_seed(3))
    reference = copy.deepcopy(learner.actor)
    ((reference(learner.normalizer(batch.obs)) - batch.action) ** 2).mean().backward()
    learner.update(batch)
    learner.update(batch)  # delayed actor step
    bc.update(batch)
    for p, p_ref in zip(learner.actor.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-9)
    for p, p_bc in zip(learner.actor.parameters(), bc.actor.parameters(), strict=True):
        torch.testing.assert_close(p, p_bc, rtol=0, atol=1e-7)


def test_actor_and_targets_move_only_on_delayed_steps(hopper_data):
    learner = make(hopper_data, policy_freq=3)
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 7):
        before = {k: params(getattr(learner, k)) for k in ("actor", "critic", "actor_target", "critic_target")}
        metrics = learner.update(hopper_data.sample(32, gen))
        delayed = step % 3 == 0
        assert not same(before["critic"], params(learner.critic))
        for k in ("actor", "actor_target", "critic_target"):
            assert same(before[k], params(getattr(learner, k))) != delayed, (step, k)
        assert ("train/actor_loss" in metrics) == delayed
        assert ("train/bc_loss" in metrics) == delayed


def test_bootstrap_target_stops_only_at_terminals():
    r, v = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    y = bootstrap_target(r, torch.tensor([0.0, 1.0]), v, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([10.0, 1.0]))


def test_bootstrap_ignores_truncation():
    """Time-limit truncated rows (terminated False) bootstrap: with a constant target critic C the
    critic loss is computed against y = r + gamma * C on them, not y = r."""
    ds = make_sim_dataset("Hopper-v5", steps=300, seed=5, name="hop-trunc", max_episode_steps=10)
    truncated_rows = np.flatnonzero(ds.truncated & ~ds.terminated)
    assert len(truncated_rows) >= 5
    data = Transitions(ds)
    learner = make(data)
    with torch.no_grad():  # target critic outputs exactly C everywhere
        last = learner.critic_target.net.net[-1]
        last.weight.zero_()
        last.bias.fill_(7.0)
    batch = data.batch(torch.from_numpy(truncated_rows))
    assert not batch.terminated.any()
    s = learner.normalizer(batch.obs)
    with torch.no_grad():
        q = learner.critic(s, batch.action)
    y = batch.reward + learner.cfg.gamma * 7.0
    expected = ((q - y) ** 2).mean(dim=1).sum()
    metrics = learner.update(batch)
    assert metrics["train/critic_loss"] == pytest.approx(expected.item(), rel=1e-5)
    truncation_as_terminal = ((q - batch.reward) ** 2).mean(dim=1).sum()
    assert metrics["train/critic_loss"] != pytest.approx(truncation_as_terminal.item(), rel=1e-2)


def test_states_are_normalised_with_dataset_statistics_plus_eps(hopper_data):
    learner = make(hopper_data)
    torch.testing.assert_close(learner.normalizer.mean, torch.from_numpy(hopper_data.obs_mean))
    torch.testing.assert_close(learner.normalizer.std, torch.from_numpy(hopper_data.obs_std + 1e-3))
    raw = make(hopper_data, normalize_states=False)
    obs = hopper_data.obs[:3].numpy()
    # act() normalises: feeding pre-normalised states to the raw learner with the same weights agrees
    raw.actor.load_state_dict(learner.actor.state_dict())
    pre = (obs - hopper_data.obs_mean) / (hopper_data.obs_std + 1e-3)
    np.testing.assert_allclose(learner.act(obs), raw.act(pre), atol=1e-6)


def test_paper_defaults():
    cfg = TD3BCConfig()
    assert (cfg.alpha, cfg.policy_freq, cfg.policy_noise, cfg.noise_clip, cfg.tau, cfg.gamma) == (
        2.5, 2, 0.2, 0.5, 0.005, 0.99)
    assert (cfg.actor_lr, cfg.critic_lr, cfg.hidden) == (3e-4, 3e-4, (256, 256))
    assert TD3BC.defaults_for("hopper-medium") == {}


def test_actor_step_uses_q1_alone_and_leaves_the_critic_untouched(hopper_data):
    """The actor loss goes through Q1 only (TD3), computed on member 0's weights alone, and records no critic
    gradient: after an actor step the critic's gradients are those of its own step, bit for bit."""
    from offlab.nets import VectorizedLinear

    learner = make(hopper_data, policy_freq=1)
    batch = hopper_data.sample(32, torch.Generator().manual_seed(0))
    s = learner.normalizer(batch.obs)
    with torch.no_grad():
        both = learner.critic(s, batch.action)
        for i in range(2):
            torch.testing.assert_close(learner.critic.member(s, batch.action, i), both[i], rtol=1e-5, atol=1e-5)
    head = next(m for m in learner.critic.modules() if isinstance(m, VectorizedLinear) and m.weight.shape[-1] == 1)
    x = torch.randn(2, 5, head.weight.shape[1])
    torch.testing.assert_close(head(x), torch.baddbmm(head.bias, x, head.weight), rtol=1e-5, atol=1e-5)

    no_actor = copy.deepcopy(learner)
    no_actor.cfg = copy.copy(learner.cfg)
    no_actor.cfg.policy_freq = 10**9
    learner.update(batch)  # critic step, then (policy_freq 1) the actor step
    no_actor.update(batch)  # the same critic step alone
    assert not same(params(learner.actor), params(no_actor.actor))  # the actor did step
    # the critic's gradients are its own step's: the actor's backward added nothing to them
    assert same([p.grad for p in learner.critic.parameters()], [p.grad for p in no_actor.critic.parameters()])
    assert all(p.requires_grad for p in learner.critic.parameters())
