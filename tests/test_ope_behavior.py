"""The behaviour density: a BC fit recovers a known policy's log-probs; logged log-probs win; impossible fits fail clearly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from offlab.errors import DataValidationError
from offlab.evaluation.ope import estimate
from offlab.evaluation.ope.behavior import BehaviorConfig, episode_split, fit_behavior
from offlab.evaluation.ope.episodes import complete_episodes
from offlab.evaluation.ope.policy import tanh_gaussian_policy
from tests.test_ope_support import collect_tanh_gaussian, tanh_gaussian_tensors

FAST = BehaviorConfig(hidden=(64, 64), steps=1500, eval_every=250)


@pytest.fixture(scope="module")
def sampled():
    tensors = tanh_gaussian_tensors(11, 3, seed=2)
    return tensors, collect_tanh_gaussian("Hopper-v5", tensors, 4000, seed=1, name="hopper-sampled")


def test_fitted_density_recovers_the_behaviour_policy(sampled):
    _, ds = sampled
    model = fit_behavior(ds, FAST)
    _, held = episode_split(ds.n_episodes, FAST.holdout, FAST.seed)
    rows = np.isin(ds.episode, held)
    true_nll = -ds.behavior_logp[rows].mean()
    fitted = model.log_prob(ds.obs, ds.action)
    info = model.info
    assert info["behavior_model"] in ("gaussian", "mdn5")
    best = info[f"heldout_nll_{info['behavior_model']}"]
    assert best == pytest.approx(-fitted[rows].mean(), abs=1e-4)  # the reported NLL is the kept model's
    assert true_nll - 0.1 < best < true_nll + 0.5  # close to the truth's held-out NLL, not (much) below it
    assert np.corrcoef(fitted, ds.behavior_logp)[0, 1] > 0.8


def test_estimate_fits_a_density_when_none_is_logged_and_prefers_the_logged_one(sampled):
    tensors, ds = sampled
    policy = tanh_gaussian_policy(tensors, "behaviour", ds.card.action_low, ds.card.action_high)
    unlogged = dataclasses.replace(ds, behavior_logp=None)
    result = estimate(policy, unlogged, ["wis", "wpdis"], references="none", bootstrap=100, behavior_config=FAST)
    assert result["behavior"]["source"].startswith("fitted") and "heldout_nll_gaussian" in result["behavior"]
    wis = result["estimates"]["wis"]
    # on-policy with a fitted mu: per-step log-ratios centre on 0, but their spread (~0.3 nats here) compounds
    # over whole episodes, so trajectory weights are far from 1 (ESS collapses: DOPE's finding for IS)
    assert abs(wis["mean_log_ratio"]) < 0.1
    assert wis["ess"] < complete_episodes(ds).n
    g = complete_episodes(ds).returns(0.995)
    assert g.min() <= wis["value"] <= g.max()
    logged = estimate(policy, ds, ["wis"], references="none", bootstrap=100)
    assert logged["behavior"]["source"] == "logged behavior_logp"


def test_missing_behaviour_log_probs_that_cannot_be_fitted_name_the_estimators(sampled):
    tensors, ds = sampled
    policy = tanh_gaussian_policy(tensors, "behaviour", ds.card.action_low, ds.card.action_high)
    unlogged = dataclasses.replace(ds, behavior_logp=None)
    with pytest.raises(DataValidationError, match=r"no behavior_logp.*is, pdis need behaviour log-probabilities"):
        estimate(policy, unlogged, ["is", "pdis"], behavior="logged", references="none")
    one = unlogged.select_rows(np.flatnonzero(unlogged.episode == 0))
    with pytest.raises(DataValidationError, match=r"only 1 episode.*estimators that need it: wdr"):
        estimate(policy, one, ["wdr"], references="none")
