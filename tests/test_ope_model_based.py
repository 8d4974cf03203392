"""Model-based OPE and the dynamics ensemble: on-policy value within tolerance of simulator truth, known terminations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offlab.dynamics import DynamicsConfig, DynamicsEnsemble, fit_dynamics, known_termination, termination_for
from offlab.envs.make import make_env
from offlab.evaluation.ope.model_based import ModelBasedConfig, model_based_estimate
from offlab.evaluation.ope.policy import deterministic_policy
from tests.test_ope_support import collect_pendulum, linear_pendulum_policy, set_pendulum_state

GAMMA = 0.9
HORIZON = 60  # gamma^60 = 0.002: the discounted value is settled


def test_model_based_on_policy_value_lands_near_the_simulator_truth():
    """Data from pi_sigma (the linear controller with Gaussian noise sigma = 0.3), MB evaluates the same pi_sigma
    from the dataset's start states, truth from those same start states in the real simulator."""
    policy = linear_pendulum_policy(3.0, 1.0)
    ds = collect_pendulum(10_000, seed=0, policy=policy, noise=0.3)
    target = deterministic_policy(policy, "linear", [-2.0], [2.0], obs_dim=3, mode="smoothed", sigma=0.3)
    env = make_env("Pendulum-v1")
    env.reset(seed=0)
    act = target.numpy_sampler(123)
    values = []
    for start in ds.obs[ds.episode_starts]:
        for _ in range(5):
            set_pendulum_state(env, start)
            o, g = start, 0.0
            for t in range(HORIZON):
                o, r, *_ = env.unwrapped.step(act(o[None])[0])
                g += GAMMA**t * r
            values.append(g)
    env.close()
    truth = float(np.mean(values))
    cfg = ModelBasedConfig(dynamics=DynamicsConfig(hidden=(64, 64, 64), max_updates=3000, eval_every=500),
                           horizon=HORIZON)
    result = model_based_estimate(target, ds, GAMMA, cfg, resamples=200)
    assert result["value"] == pytest.approx(truth, rel=0.06)
    assert result["ci"][0] < result["value"] < result["ci"][1]
    assert result["termination"].startswith("none") and result["rollout_length_mean"] == HORIZON
    assert len(result["member_values"]) == 5 and result["member_std"] < 0.1 * abs(truth)
    assert result["model"]["heldout_state_mse"] < 1e-2


def test_hopper_termination_rule_matches_the_simulator(hopper_random):
    rule = known_termination("Hopper-v5")
    terminal = rule(torch.from_numpy(hopper_random.next_obs)).numpy()
    assert hopper_random.terminated.any()
    np.testing.assert_array_equal(terminal, hopper_random.terminated)
    assert known_termination("Pendulum-v1") is False and known_termination("HalfCheetah-v5") is False
    rule_fn, source = termination_for(hopper_random)
    assert "healthy" in source and rule_fn is not None


def test_model_steps_stay_inside_the_data_range_and_choose_members_uniformly(hopper_random):
    model, info = fit_dynamics(hopper_random, DynamicsConfig(members=4, hidden=(32, 32), max_updates=200,
                                                             eval_every=100))
    assert isinstance(model, DynamicsEnsemble) and info["updates"] <= 200
    obs = torch.from_numpy(hopper_random.obs[:64]) * 50  # far outside the data
    nxt, r = model.step(obs, torch.zeros(64, 3), torch.Generator().manual_seed(0))
    assert torch.all(nxt <= model.obs_high) and torch.all(nxt >= model.obs_low)
    # without noise, a uniformly chosen member per row equals that member's own prediction for that row
    x = torch.from_numpy(hopper_random.obs[:40])
    a = torch.from_numpy(hopper_random.action[:40])
    mixed, _ = model.step(x, a, torch.Generator().manual_seed(1), sample=False)
    each = torch.stack([model.step(x, a, member=m, sample=False)[0] for m in range(4)])  # [E, B, d]
    match = torch.isclose(each, mixed.unsqueeze(0), atol=1e-5).all(-1)  # [E, B]
    assert torch.all(match.sum(0) >= 1)  # every row came from some member
    assert set(match.float().argmax(0).tolist()) == {0, 1, 2, 3}  # and all members were used


def test_rollouts_take_member_means_unless_model_noise_is_asked_for(hopper_random):
    """MuJoCo is deterministic: by default a rollout step is the chosen member's mean, so one member's rollout
    of a deterministic policy is the same twice; with model_noise it samples the member's Gaussian."""
    from offlab.evaluation.ope.model_based import ModelBasedConfig, rollout_returns
    from offlab.evaluation.ope.policy import as_target_policy

    model, _ = fit_dynamics(hopper_random, DynamicsConfig(members=3, hidden=(32, 32), max_updates=200,
                                                          eval_every=100))
    policy = as_target_policy(lambda o: np.zeros((len(o), 3), np.float32), -np.ones(3), np.ones(3),
                              mode="deterministic")
    starts = hopper_random.obs[hopper_random.episode_starts[:8]]

    def run(seed, noise):
        return rollout_returns(model, policy, starts, 50, 0.99, None, torch.Generator().manual_seed(seed),
                               member=1, model_noise=noise)[0]

    np.testing.assert_array_equal(run(0, False), run(1, False))
    assert not np.allclose(run(0, True), run(1, True))
    assert ModelBasedConfig().model_noise is False
