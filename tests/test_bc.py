"""BC (ALGORITHMS.md §1): it recovers a deterministic policy, and its clone beats a random policy in the simulator."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from offlab.algos import LearnerSpec, get_algo
from offlab.algos.bc import BC, BCConfig, top_episode_rows
from offlab.data.store import Transitions
from offlab.evaluation.online import evaluate_policy
from tests.helpers import make_sim_dataset

PD_GAINS = np.array([1.0, 10.0, 1.0, 2.0], dtype=np.float32)


def balance(obs: np.ndarray) -> np.ndarray:
    """A linear state-feedback controller that balances InvertedPendulum-v5 for all 1000 steps."""
    return np.clip(PD_GAINS @ obs, -3.0, 3.0).reshape(1)


def train_bc(data: Transitions, steps: int, **settings) -> BC:
    spec = LearnerSpec.from_transitions(data)
    learner = BC(BCConfig(**settings), spec, "cpu")
    generator = torch.Generator().manual_seed(0)
    rows = learner.training_rows
    for _ in range(steps):
        if rows is None:
            batch = data.sample(256, generator)
        else:
            batch = data.batch(rows[torch.randint(len(rows), (256,), generator=generator)])
        learner.update(batch)
    return learner


def test_bc_recovers_a_deterministic_linear_policy():
    rng = np.random.default_rng(0)
    weights = rng.normal(0.0, 0.3, (3, 11)).astype(np.float32)

    def policy(obs):
        return np.tanh(weights @ obs)

    train = make_sim_dataset("Hopper-v5", steps=2000, seed=0, name="linear", policy=policy)
    held_out = make_sim_dataset("Hopper-v5", steps=400, seed=1, name="linear-test", policy=policy)
    learner = train_bc(Transitions(train), steps=1500, lr=1e-3)
    predicted = learner.act(held_out.obs)
    mse = float(((predicted - held_out.action) ** 2).mean())
    baseline = float(((held_out.action - train.action.mean(0)) ** 2).mean())  # predicting the mean action
    assert mse < 1e-3, mse
    assert mse < baseline / 100


def test_bc_clone_beats_a_random_policy_in_the_simulator():
    # the controller with N(0, 0.5) action noise: logged states cover more than the upright point,
    # and BC's least-squares fit recovers the controller (the noise's mean is zero)
    rng = np.random.default_rng(1)
    expert = make_sim_dataset("InvertedPendulum-v5", steps=2000, seed=0, name="balance",
                              policy=lambda o: np.clip(balance(o) + rng.normal(0.0, 0.5), -3.0, 3.0))
    assert expert.episode_returns().min() == 1000
    learner = train_bc(Transitions(expert), steps=1500, lr=1e-3)
    clone = evaluate_policy(lambda o: learner.act(o), "InvertedPendulum-v5", episodes=5, seed=3)
    rng = np.random.default_rng(0)
    random = evaluate_policy(lambda o: rng.uniform(-3, 3, (len(o), 1)).astype(np.float32), "InvertedPendulum-v5",
                             episodes=5, seed=3)
    assert random.mean_return < 50
    assert clone.mean_return > 10 * random.mean_return
    assert clone.mean_return >= 900  # the controller it copies balances all 1000 steps


def test_act_normalises_states_like_training_and_survives_save_load():
    ds = make_sim_dataset("Hopper-v5", steps=600, seed=2, name="norm")
    data = Transitions(ds)
    learner = train_bc(data, steps=50)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = BC(BCConfig(seed=123), LearnerSpec.from_transitions(data), "cpu")
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.act(ds.obs[:32]), learner.act(ds.obs[:32]))
    # the policy sees (s - mean) / (std + 1e-3): the saved normaliser is the dataset's
    np.testing.assert_allclose(state["normalizer"]["mean"].numpy(), ds.obs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["normalizer"]["std"].numpy(), ds.obs.std(0) + 1e-3, rtol=1e-4, atol=1e-5)
    single = learner.act(ds.obs[0])
    assert single.shape == (3,)
    np.testing.assert_array_equal(single, learner.act(ds.obs[:1])[0])


def test_top_fraction_trains_only_on_the_best_episodes():
    ds = make_sim_dataset("Hopper-v5", steps=1500, seed=4, name="mixed")
    returns = ds.episode_returns()
    learner = BC(BCConfig(top_fraction=0.2), LearnerSpec.from_transitions(Transitions(ds)), "cpu")
    rows = learner.training_rows.numpy()
    kept = np.unique(ds.episode[rows])
    assert len(kept) == int(np.ceil(0.2 * ds.n_episodes))
    assert returns[kept].min() >= np.sort(returns)[::-1][len(kept) - 1]
    assert set(rows) == set(np.flatnonzero(np.isin(ds.episode, kept)))
    np.testing.assert_array_equal(top_episode_rows(returns, ds.episode_starts, ds.episode_lengths, 1.0),
                                  np.arange(len(ds)))
    with pytest.raises(Exception, match="top_fraction"):
        BC(BCConfig(top_fraction=0.0), LearnerSpec.from_transitions(Transitions(ds)), "cpu")


def test_stochastic_variant_maximises_the_likelihood_of_logged_actions():
    rng = np.random.default_rng(5)
    weights = rng.normal(0.0, 0.3, (3, 11)).astype(np.float32)
    ds = make_sim_dataset("Hopper-v5", steps=800, seed=5, name="stoch",
                          policy=lambda o: np.clip(np.tanh(weights @ o) + rng.normal(0, 0.1, 3), -1, 1))
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data)
    learner = BC(BCConfig(stochastic=True), spec, "cpu")
    generator = torch.Generator().manual_seed(0)
    fixed = data.sample(512, torch.Generator().manual_seed(9))
    before = learner.update(fixed)["train/bc_loss"]
    for _ in range(300):
        learner.update(data.sample(256, generator))
    after = -learner.actor.log_prob(learner.normalizer(fixed.obs), fixed.action).mean().item()
    assert after < before - 1.0
    mean_action = learner.act(ds.obs[:8], deterministic=True)
    np.testing.assert_array_equal(mean_action, learner.act(ds.obs[:8], deterministic=True))
    sampled = learner.act(ds.obs[:8], deterministic=False)
    assert not np.allclose(sampled, mean_action)
    assert learner.stochastic_policy and not BC(BCConfig(), spec, "cpu").stochastic_policy


def test_bc_is_registered_with_its_config():
    assert get_algo("bc") is BC
    assert BC.defaults_for("hopper-medium") == {}
