"""DOPE metrics, suite files, and the validation loop against simulator truth (a tiny real-simulator suite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from offlab.data import store
from offlab.errors import ConfigError
from offlab.evaluation.ope.validate import (
    bootstrap_metrics,
    dope_metrics,
    load_suite,
    normalise_to_truth,
    regret_at_k,
    validate_suite,
)
from tests.test_ope_support import collect_tanh_gaussian, linear_actor_file, linear_actor_tensors


def test_dope_metrics_of_perfect_shifted_and_reversed_estimators():
    v = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    perfect = dope_metrics(v, v)
    assert perfect["abs_err"] == 0 and perfect["spearman"] == pytest.approx(1.0) and perfect["regret@1"] == 0
    shifted = dope_metrics(v, v + 5.0)  # same ranking, 5 / 50 off in normalised units
    assert shifted["abs_err"] == pytest.approx(0.1) and shifted["spearman"] == pytest.approx(1.0)
    assert shifted["regret@1"] == 0 and shifted["mse"] == pytest.approx(0.01)
    reversed_ = dope_metrics(v, v[::-1].copy())
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["kendall"] == pytest.approx(-1.0)
    assert reversed_["regret@1"] == pytest.approx(1.0)  # picks the worst policy: normalised value 0
    assert reversed_["regret@5"] == pytest.approx(0.2)  # best of the bottom five has normalised value 0.8


def test_normalisation_clips_estimates_above_at_two_and_regret_uses_the_raw_ranking():
    t, e = normalise_to_truth(np.array([0.0, 10.0]), np.array([-5.0, 1e6]))
    np.testing.assert_allclose(t, [0.0, 1.0])
    np.testing.assert_allclose(e, [-0.5, 2.0])
    # two estimates above the clip tie at 2 after normalising; the raw estimate still ranks them
    v_true = np.array([0.0, 0.5, 1.0])
    assert regret_at_k(v_true, np.array([0.0, 1e9, 1e8]), 1) == pytest.approx(0.5)
    assert regret_at_k(v_true, np.array([0.0, 1e8, 1e9]), 1) == 0.0


def test_policy_bootstrap_gives_mean_and_spread_of_each_metric():
    rng = np.random.default_rng(0)
    v = np.linspace(0, 100, 11)
    noisy = v + rng.normal(scale=20, size=11)
    out = bootstrap_metrics(v, noisy, resamples=300)
    mean, std = out["spearman"]
    assert 0.5 < mean <= 1.0 and 0.0 < std < 0.3
    assert out["abs_err"][0] > 0


@pytest.mark.parametrize("text, match", [
    ("dataset: x\npolicies: [uniform\n", "does not parse as YAML at line"),
    ("dataset: x\npolicies: [uniform]\nestimator: [fqe]\n", "unknown key 'estimator'.*did you mean 'estimators'"),
    ("dataset: x\n", "lacks 'policies'"),
    ("dataset: x\npolicies: [uniform]\nestimators: [fqe, pdiss]\n", "unknown estimator 'pdiss'"),
    ("dataset: x\npolicies: [uniform]\ngamma: 1.5\n", "gamma"),
    ("dataset: x\npolicies: [{name: a}]\n", "without a 'policy'"),
    ("dataset: x\npolicies: [uniform, uniform]\n", "more than once"),
    ("dataset: x\npolicies: [uniform]\nsettings: {fqe: {updatez: 3}}\n", "unknown key 'updatez'"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_suite_files_that_do_not_parse_or_fit_give_one_line_errors(tmp_path, text, match):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_suite(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_shipped_hopper_suite_parses():
    suite = load_suite("evaluators/hopper-medium.yaml")
    assert suite.dataset == "hopper-medium" and suite.gamma == 0.995
    assert {"fqe", "pdis", "wpdis", "dr", "wdr", "mb"} <= set(suite.estimators)
    names = [p.name for p in suite.policies]
    assert names[:4] == ["uniform", "random", "medium", "expert"]
    assert any(n.startswith("replay/step_") for n in names)  # the shipped replay snapshots, expanded from a glob


def test_validate_a_small_suite_against_simulator_truth(tmp_path):
    """InvertedPendulum-v5, linear controllers of clearly different quality, data from a noisy middle one."""
    behaviour = linear_actor_tensors((0.3, 2.5, 0.4, 0.4), -2.0)
    ds = collect_tanh_gaussian("InvertedPendulum-v5", behaviour, 3000, seed=0, name="ip-small")
    store.write_dataset(ds)
    files = {name: linear_actor_file(tmp_path / f"{name}.safetensors", gains, log_std)
             for name, (gains, log_std) in {"zero": ((0, 0, 0, 0), -2.0), "weak": ((0, 1, 0, 0.2), -3.0),
                                            "good": ((0.5, 3, 0.5, 0.5), -3.0),
                                            "expert": ((1, 5, 1, 1), -3.0)}.items()}
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"""
name: small
dataset: ip-small
estimators: [is, wis, pdis, wpdis, fqe]
truth: {{episodes: 24, seed: 5, max_episodes: 48}}
policies:
  - {{name: uniform, policy: uniform}}
{''.join(f'  - {{name: {k}, policy: {v}}}' + chr(10) for k, v in files.items())}  - {{name: expert-again, policy: {files['expert']}}}
settings:
  bootstrap: 200
  metric_resamples: 100
  fqe: {{updates: 300, hidden: [64, 64], tau: 0.05}}
  mb: {{horizon: 100}}
""")
    report = validate_suite(suite_file, out_html=tmp_path / "ope.html", log=True)
    names = [p["policy"] for p in report["policies"]]
    assert names == ["uniform", "zero", "weak", "good", "expert"]  # the duplicate was evaluated once
    truths = {p["policy"]: p["truth"] for p in report["policies"]}
    assert truths["expert"]["v_gamma"] > truths["good"]["v_gamma"] > truths["zero"]["v_gamma"]
    assert all(t["horizon"] == 100 and t["episodes"] >= 24 for t in truths.values())
    for est in ("is", "wis", "pdis", "wpdis", "fqe"):
        m = report["estimators"][est]
        assert m["abs_err"] >= 0 and -1 <= m["spearman"] <= 1 and 0 <= m["regret@1"] <= 1
        assert 0 <= m["ci_coverage"] <= 1 and set(m["bootstrap"]) >= {"abs_err", "spearman", "regret@1"}
    html = (tmp_path / "ope.html").read_text()
    assert "Spearman" in html and "expert" in html
    client = MlflowClient()
    parent = client.get_run(report["mlflow_run_id"])
    assert "dope/wpdis/spearman" in parent.data.metrics
    assert parent.data.metrics["dope/fqe/abs_err"] == pytest.approx(report["estimators"]["fqe"]["abs_err"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 5 * 5
    child = next(c for c in children if c.info.run_name == "wis:expert")
    assert child.data.metrics["v_true"] == pytest.approx(truths["expert"]["v_gamma"])
    assert child.data.params["estimator"] == "wis" and "ess" in child.data.metrics
    saved = json.loads(open(client.download_artifacts(parent.info.run_id, "report.json", str(tmp_path))).read())
    assert saved["suite"] == "small"
