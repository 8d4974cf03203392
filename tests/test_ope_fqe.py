"""FQE: lands on the Monte-Carlo value in the real simulator; bootstraps through truncation, never through terminals."""

from __future__ import annotations

import numpy as np
import pytest

from offlab.data.schema import DatasetCard, coerce_columns, finalize
from offlab.envs.make import make_env
from offlab.evaluation.ope.fqe import FQE, FQEConfig, fqe_summary
from offlab.evaluation.ope.policy import deterministic_policy
from tests.test_ope_support import collect_pendulum, linear_pendulum_policy, set_pendulum_state

SMALL = {"hidden": (64, 64), "lr": 1e-3, "tau": 0.02}


def true_value_from_starts(ds, policy, gamma: float, horizon: int) -> float:
    """Mean over the dataset's initial states of the deterministic policy's discounted return, rolled out in
    the real Pendulum-v1 from exactly those states (one rollout each: policy and env are deterministic)."""
    env = make_env("Pendulum-v1")
    env.reset(seed=0)
    values = []
    for obs in ds.obs[ds.episode_starts]:
        set_pendulum_state(env, obs)
        g = 0.0
        for t in range(horizon):
            obs, r, *_ = env.unwrapped.step(policy(obs)[0])
            g += gamma**t * r
        values.append(g)
    env.close()
    return float(np.mean(values))


def test_fqe_matches_the_monte_carlo_value_of_a_deterministic_policy_in_pendulum():
    """Data from the noisy controller (sigma 0.6 on the [-1, 1] scale), FQE of the noiseless one."""
    policy = linear_pendulum_policy(8.0, 2.0)
    ds = collect_pendulum(20_000, seed=0, policy=policy, noise=0.6)
    target = deterministic_policy(policy, "linear", [-2.0], [2.0], obs_dim=3, mode="deterministic")
    gamma = 0.9  # gamma^200 ~ 7e-10: the 200-step truth and FQE's bootstrapped value coincide
    truth = true_value_from_starts(ds, policy, gamma, 200)
    fqe = FQE(target, ds, gamma, FQEConfig(updates=3000, **SMALL)).fit()
    summary = fqe_summary(fqe, resamples=500)
    assert summary["value"] == pytest.approx(truth, rel=0.03)
    assert summary["ci"][0] < summary["value"] < summary["ci"][1]
    assert "initial-state bootstrap" in summary["ci_method"]
    # the noisy behaviour's own value lies outside that tolerance: FQE must evaluate the target, not the data
    behaviour_value = np.mean([(0.9 ** np.arange(200)) @ ds.reward[s:s + 200] for s in ds.episode_starts])
    assert abs(behaviour_value - truth) > 0.03 * abs(truth)


def _constant_reward_dataset(terminated: bool, n: int = 4000):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 2)).astype(np.float32)
    card = DatasetCard(name="constant", env_id="none", obs_dim=2, action_dim=1, action_low=[-1.0], action_high=[1.0])
    # one-step episodes: ended by a terminal (no bootstrap) or by a time limit (bootstrap from next_obs)
    return finalize(coerce_columns(
        card, episode=np.arange(n), step=np.zeros(n), obs=obs, next_obs=obs, action=rng.uniform(-1, 1, (n, 1)),
        reward=np.ones(n), terminated=np.full(n, terminated), truncated=np.full(n, not terminated)))


@pytest.mark.parametrize("terminated, expected", [(True, 1.0), (False, 10.0)])
def test_targets_bootstrap_through_truncation_but_not_through_terminals(terminated, expected):
    ds = _constant_reward_dataset(terminated)
    policy = deterministic_policy(lambda o: np.zeros((len(o), 1), np.float32), "zero", [-1.0], [1.0],
                                  mode="deterministic")
    fqe = FQE(policy, ds, 0.9, FQEConfig(updates=1500, hidden=(32, 32), lr=3e-3, tau=0.05)).fit()
    assert fqe_summary(fqe, resamples=100)["value"] == pytest.approx(expected, rel=0.05)


def test_refit_bootstrap_members_train_on_episode_resamples_and_give_a_t_interval():
    policy = linear_pendulum_policy(3.0, 1.0)
    ds = collect_pendulum(4000, seed=1, policy=policy, noise=0.3)
    target = deterministic_policy(policy, "linear", [-2.0], [2.0], mode="smoothed", sigma=0.1)
    fqe = FQE(target, ds, 0.9, FQEConfig(updates=300, members=3, refit_bootstrap=True, **SMALL))
    pools = [set(p.tolist()) for p in fqe.row_pools]
    assert all(len(p) < len(ds) for p in pools) and pools[0] != pools[1]  # each misses some episodes
    summary = fqe_summary(fqe.fit(), resamples=100)
    assert "refit bootstrap" in summary["ci_method"] and len(summary["members"]) == 3
    assert summary["ci"][0] < summary["value"] < summary["ci"][1]
    assert summary["seed_spread"] > 0


@pytest.mark.slow
def test_fqe_acceptance_gate_on_policy_hopper_medium():
    """METRICS B.6.5: FQE evaluating the behaviour policy itself is near its simulator value on medium data.

    50k transitions sampled from the shipped hopper/medium actor, FQE with its defaults (250k updates: with
    tau = 0.005 and gamma = 0.995, 40k updates leave the value a third short), truth from 128 simulator
    episodes; against a zero-value floor the gate's AbsErr <= 0.1 becomes |V_fqe - V_true| <= 0.1 V_true."""
    from safetensors.numpy import load_file

    from offlab import paths
    from offlab.evaluation.ope.policy import tanh_gaussian_policy
    from offlab.evaluation.ope.truth import monte_carlo
    from tests.test_ope_support import collect_tanh_gaussian

    path = paths.catalog_dir() / "policies" / "hopper" / "medium.safetensors"
    if not path.is_file():
        pytest.skip("no shipped hopper/medium policy")
    tensors = load_file(str(path))
    ds = collect_tanh_gaussian("Hopper-v5", tensors, 50_000, seed=0, name="hopper-medium-50k")
    policy = tanh_gaussian_policy(tensors, "hopper/medium", ds.card.action_low, ds.card.action_high)
    truth = monte_carlo(policy, "Hopper-v5", 0.995, 128, seed=7, cache=False)
    fqe = FQE(policy, ds, 0.995, FQEConfig()).fit()
    value = fqe_summary(fqe, resamples=200)["value"]
    assert abs(value - truth["v_gamma"]) <= 0.1 * truth["v_gamma"], (value, truth)
