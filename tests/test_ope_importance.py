"""Importance-sampling estimators: on-policy identities, self-normalised bounds, unbiasedness, weight handling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offlab.data.schema import DatasetCard, coerce_columns, finalize
from offlab.evaluation.ope import estimate
from offlab.evaluation.ope.episodes import complete_episodes
from offlab.evaluation.ope.importance import ImportanceWeights, importance_estimates
from offlab.evaluation.ope.policy import deterministic_policy, tanh_gaussian_policy
from tests.test_ope_support import collect_tanh_gaussian, tanh_gaussian_tensors

GAMMA = 0.995
IS_NAMES = ["is", "wis", "pdis", "wpdis", "wpdis_alive"]


@pytest.fixture(scope="module")
def hopper_sampled():
    """3,000 Hopper-v5 transitions sampled from a random tanh-Gaussian actor, behavior_logp logged."""
    tensors = tanh_gaussian_tensors(11, 3, seed=0)
    return tensors, collect_tanh_gaussian("Hopper-v5", tensors, 3000, seed=0, name="hopper-sampled")


def test_on_policy_weights_are_one_and_estimates_equal_mean_discounted_return(hopper_sampled):
    tensors, ds = hopper_sampled
    policy = tanh_gaussian_policy(tensors, "behaviour", ds.card.action_low, ds.card.action_high)
    result = estimate(policy, ds, IS_NAMES, gamma=GAMMA, references="none", bootstrap=200)
    episodes = complete_episodes(ds)
    mean_return = episodes.returns(GAMMA).mean()
    # the log-ratios themselves: pi's exact log-prob against the logged one
    log_pi = policy.log_prob(ds.obs, ds.action).double().numpy()
    np.testing.assert_allclose(np.exp(log_pi - ds.behavior_logp), 1.0, atol=1e-3)
    for name in IS_NAMES:
        r = result["estimates"][name]
        assert r["value"] == pytest.approx(mean_return, rel=1e-4), name
        assert r["ess"] == pytest.approx(episodes.n, rel=1e-4)
        assert r["clipped_fraction"] == 0.0 and not r["unreliable"]
        assert r["ci"][0] < r["value"] < r["ci"][1]
    assert episodes.n_incomplete >= 1 and result["dataset"]["incomplete_left_out"] == episodes.n_incomplete


def test_off_policy_estimates_move_and_self_normalised_ones_stay_in_range(hopper_sampled):
    _, ds = hopper_sampled
    other = tanh_gaussian_policy(tanh_gaussian_tensors(11, 3, seed=5), "other", ds.card.action_low,
                                 ds.card.action_high)
    result = estimate(other, ds, IS_NAMES, gamma=GAMMA, references="none", bootstrap=200)["estimates"]
    episodes = complete_episodes(ds)
    g = episodes.returns(GAMMA)
    assert abs(result["is"]["value"] - g.mean()) > 1e-3  # the target differs, so the weights do work
    assert result["wis"]["ess"] < episodes.n
    assert g.min() - 1e-9 <= result["wis"]["value"] <= g.max() + 1e-9
    # WPDIS is a weighted average of each step's rewards (ended episodes contribute their absorbing 0):
    # it lies within the per-step envelope sum_t gamma^t [min_i r_it, max_i r_it]
    disc = episodes.discounts(GAMMA)
    low, high = disc @ episodes.reward.min(0), disc @ episodes.reward.max(0)
    assert low - 1e-9 <= result["wpdis"]["value"] <= high + 1e-9


def test_self_normalised_bounds_hold_under_extreme_weights():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, h = 30, 12
        lengths = rng.integers(1, h + 1, n)
        episodes = _synthetic_episodes(lengths, rng.normal(size=(n, h)), terminated=rng.random(n) < 0.5)
        log_ratio = rng.normal(scale=3.0, size=(n, episodes.horizon))
        w = ImportanceWeights(episodes, log_ratio, 0.9, clip=None)
        point = w.point()
        g = episodes.returns(0.9)
        assert g.min() - 1e-9 <= point["wis"] <= g.max() + 1e-9, trial
        reps = w.bootstrap(50, rng)
        assert np.all(reps["wis"][np.isfinite(reps["wis"])] >= g.min() - 1e-9)
        assert np.all(reps["wis"][np.isfinite(reps["wis"])] <= g.max() + 1e-9)


def test_is_is_unbiased_on_a_one_step_problem_with_a_closed_form_value():
    """Bandit: mu uniform on [-1, 1], pi = N(m, s^2) (smoothed constant policy), r = -(a - 0.5)^2;
    V(pi) = -((m - 0.5)^2 + s^2) (pi's mass outside the box is ~1e-15). Unclipped weights: the default
    log-ratio clip [-6, 2] trades this unbiasedness for variance."""
    m, s = 0.2, 0.1
    v_true = -((m - 0.5) ** 2 + s**2)
    policy = deterministic_policy(lambda o: np.full((len(o), 1), m, np.float32), "const", [-1.0], [1.0],
                                  mode="smoothed", sigma=s)
    estimates = []
    terms = []
    for seed in range(40):
        ds = _bandit_dataset(2000, seed)
        w = estimate(policy, ds, ["is", "wis"], gamma=1.0, references="none", bootstrap=0, sweep=False,
                     log_ratio_clip=None)
        estimates.append(w["estimates"]["is"]["value"])
        log_ratio = policy.log_prob(ds.obs, ds.action).double().numpy() - ds.behavior_logp
        terms.append(np.exp(log_ratio) * ds.reward)
    terms = np.concatenate(terms)
    se = terms.std(ddof=1) / math.sqrt(len(terms))
    assert abs(np.mean(estimates) - v_true) < 4 * se
    # and the per-dataset estimates scatter around the truth with the spread the terms predict
    assert abs(np.mean(estimates) - terms.mean()) < 1e-9
    assert np.std(estimates) == pytest.approx(terms.std() / math.sqrt(2000), rel=0.35)


def test_terminated_episode_weight_freezes_and_padding_adds_nothing():
    episodes = _synthetic_episodes(np.array([2, 4]), np.ones((2, 4)), terminated=np.array([True, False]))
    log_ratio = np.log(np.array([[2.0, 2.0, 50.0, 50.0], [1.0, 1.0, 1.0, 1.0]]))  # padding values must be ignored
    w = ImportanceWeights(episodes, log_ratio, 1.0, clip=None)
    np.testing.assert_allclose(w.weights(), [4.0, 1.0])
    np.testing.assert_allclose(w.weights(3), [4.0, 1.0])
    point = w.point()
    # is: mean(4 * 2, 1 * 4) = 6; pdis: (2*1 + 4*1 + 1+1+1+1) / 2 = 5
    assert point["is"] == pytest.approx(6.0)
    assert point["pdis"] == pytest.approx(5.0)
    # wpdis keeps the ended episode in the denominator: t=0: (2+1)/3, t=1: (4+1)/5, t=2,3: (0+1)/5
    assert point["wpdis"] == pytest.approx(1.0 + 1.0 + 0.2 + 0.2)
    # wpdis_alive divides by the mean weight of episodes still alive (policy_eval)
    # t=0: (2+1)/1.5, t=1: (4+1)/2.5, t=2, t=3: 1/1 each; averaged over the 2 episodes
    assert point["wpdis_alive"] == pytest.approx((2.0 + 2.0 + 1.0 + 1.0) / 2)


def test_log_ratio_clipping_and_low_ess_flag():
    episodes = _synthetic_episodes(np.full(200, 5), np.ones((200, 5)), terminated=np.zeros(200, bool))
    log_ratio = np.zeros((200, 5))
    log_ratio[0] = 10.0  # clipped to 2 per step: one episode carries weight e^10, the rest 1
    w = ImportanceWeights(episodes, log_ratio, 0.99)
    assert w.clipped_fraction == pytest.approx(5 / 1000)
    assert w.weights()[0] == pytest.approx(math.exp(10.0))
    out = importance_estimates(w, ["is", "wis"], resamples=100)
    assert out["wis"]["ess"] == pytest.approx((math.exp(10) + 199) ** 2 / (math.exp(20) + 199))
    assert out["wis"]["unreliable"] and out["wis"]["ess"] < 0.01 * 200


def _synthetic_episodes(lengths: np.ndarray, reward: np.ndarray, terminated: np.ndarray):
    """A Dataset of episodes with given lengths/rewards (obs are step counters) -> its padded view."""
    ep = np.repeat(np.arange(len(lengths)), lengths)
    step = np.concatenate([np.arange(n) for n in lengths])
    n = len(ep)
    obs = np.stack([step, ep], 1).astype(np.float32)
    last = np.r_[np.flatnonzero(np.diff(ep)), n - 1]
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    term[last] = terminated
    trunc[last] = ~terminated
    card = DatasetCard(name="synthetic", env_id="none", obs_dim=2, action_dim=1)
    ds = finalize(coerce_columns(card, episode=ep, step=step, obs=obs, next_obs=obs + np.array([1, 0], np.float32),
                                 action=np.zeros((n, 1)), reward=reward[ep, step], terminated=term, truncated=trunc))
    return complete_episodes(ds)


def _bandit_dataset(n: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)
    card = DatasetCard(name="bandit", env_id="none", obs_dim=1, action_dim=1, action_low=[-1.0], action_high=[1.0])
    return finalize(coerce_columns(
        card, episode=np.arange(n), step=np.zeros(n), obs=np.zeros((n, 1)), next_obs=np.zeros((n, 1)), action=a,
        reward=-((a[:, 0] - 0.5) ** 2), terminated=np.ones(n, bool), truncated=np.zeros(n, bool),
        behavior_logp=np.full(n, -math.log(2.0)),
    ))


def test_deterministic_target_is_smoothed_by_default_with_a_sigma_sweep():
    ds = _bandit_dataset(500, seed=0)
    policy = deterministic_policy(lambda o: np.full((len(o), 1), 0.2, np.float32), "const", [-1.0], [1.0])
    result = estimate(policy, ds, ["is", "wpdis"], gamma=1.0, references="none", bootstrap=0)
    assert result["policy"]["mode"] == "smoothed" and result["policy"]["sigma_or_h"] == 0.1
    sweep = result["estimates"]["is"]["sigma_sweep"]
    assert list(sweep) == ["0.05", "0.1", "0.2", "0.4"]
    assert sweep["0.1"] == pytest.approx(result["estimates"]["is"]["value"])
    assert "different (noisier) target" in result["sigma_sweep_note"]
    kernel = estimate(policy, ds, ["is"], gamma=1.0, references="none", bootstrap=0, mode="kernel", sigma=0.1)
    assert kernel["policy"]["mode"] == "kernel"
    assert kernel["estimates"]["is"]["value"] == pytest.approx(result["estimates"]["is"]["value"])  # same weights
