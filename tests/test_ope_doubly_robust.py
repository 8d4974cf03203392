"""Doubly robust: with the true Q it returns the truth whatever the weights; with Q = 0 it is (W)PDIS."""

from __future__ import annotations

import numpy as np
import pytest

from offlab.envs.make import make_env
from offlab.evaluation.ope.doubly_robust import DoublyRobust, dr_estimates
from offlab.evaluation.ope.episodes import complete_episodes
from offlab.evaluation.ope.importance import ImportanceWeights
from offlab.evaluation.ope.policy import deterministic_policy
from tests.test_ope_support import collect_pendulum, linear_pendulum_policy, set_pendulum_state

GAMMA = 0.95
H = 40


@pytest.fixture(scope="module")
def pendulum_exact():
    """12 episodes of 40 steps from the noisy controller; every transition is an exact function of the stored
    float32 observation (the simulator state is reset from it before each step)."""
    policy = linear_pendulum_policy(3.0, 1.0)
    ds = collect_pendulum(12 * H, seed=3, policy=policy, noise=0.5, horizon=H, exact_states=True)
    target = deterministic_policy(policy, "linear", [-2.0], [2.0], obs_dim=3, mode="kernel", sigma=0.2)
    episodes = complete_episodes(ds)
    log_ratio = np.zeros(episodes.rows.shape)
    rows = episodes.valid_rows
    log_ratio[episodes.mask] = target.log_prob(ds.obs[rows], ds.action[rows]).double().numpy() - ds.behavior_logp[rows]
    return policy, ds, episodes, ImportanceWeights(episodes, log_ratio, GAMMA)


def _true_q(env, policy, obs: np.ndarray, action: np.ndarray, steps: int) -> tuple[float, float]:
    """(Q_t(s, a), r(s, a)) with `steps` = H - t steps left: apply a, then the deterministic policy, in the real
    simulator (state reset from the float32 observation before each step, as the data was collected)."""
    g, o, a, first = 0.0, obs, action, None
    for k in range(steps):
        set_pendulum_state(env, o)
        o, r, *_ = env.unwrapped.step(a)
        o = o.astype(np.float32)
        g += GAMMA**k * r
        first = r if first is None else first
        a = policy(o)[0]
    return g, float(first)


def test_dr_with_the_true_q_reduces_to_the_truth(pendulum_exact):
    policy, ds, episodes, weights = pendulum_exact
    env = make_env("Pendulum-v1")
    env.reset(seed=0)
    q = np.zeros(episodes.rows.shape)
    v = np.zeros(episodes.rows.shape)
    reward = np.zeros(episodes.rows.shape)
    for i in range(episodes.n):
        for t in range(episodes.lengths[i]):
            row = episodes.rows[i, t]
            q[i, t], reward[i, t] = _true_q(env, policy, ds.obs[row], ds.action[row], H - t)
            v[i, t], _ = _true_q(env, policy, ds.obs[row], policy(ds.obs[row])[0], H - t)
    env.close()
    np.testing.assert_allclose(reward, episodes.reward, rtol=1e-6)  # the data's rewards, before float32 storage
    # weights reach e^18 here, so float32 reward rounding (1e-7) would show: use the simulator's float64 rewards
    weights.reward = reward
    truth = v[:, 0].mean()  # V^pi over exactly these initial states
    assert weights.ess() < 0.9 * episodes.n  # the weights are far from uniform
    point = DoublyRobust(weights, q, v).point()
    assert point["dr"] == pytest.approx(truth, rel=1e-7)
    assert point["wdr"] == pytest.approx(truth, rel=1e-7)
    assert abs(weights.point()["pdis"] - truth) > 1e-2 * abs(truth)  # without the critic: off by far more
    # the bootstrap of DR with the true Q resamples start states only: its interval brackets the truth
    out = dr_estimates(DoublyRobust(weights, q, v), ["dr", "wdr"], resamples=300)
    assert out["wdr"]["ci"][0] <= truth <= out["wdr"]["ci"][1]


def test_dr_with_a_zero_critic_is_pdis_and_wdr_is_wpdis(pendulum_exact):
    _, _, episodes, weights = pendulum_exact
    zero = np.zeros(episodes.rows.shape)
    dr = DoublyRobust(weights, zero, zero).point()
    is_ = weights.point()
    assert dr["dr"] == pytest.approx(is_["pdis"], rel=1e-12)
    assert dr["wdr"] == pytest.approx(is_["wpdis"], rel=1e-12)
