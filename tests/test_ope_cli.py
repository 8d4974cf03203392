"""`offlab ope`: a policy on a dataset, a run's policy logged back to the run, every bad input as one line + exit 2."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from mlflow import MlflowClient

from offlab.data import store
from offlab.errors import ConfigError, PolicyError
from offlab.evaluation.ope import estimate, metric_values
from tests.helpers import run_cli
from tests.test_ope_support import (
    collect_pendulum,
    linear_actor_file,
    linear_pendulum_policy,
    tanh_gaussian_file,
)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `offlab ARGS` in this process through `offlab.cli.main` (exit code, stdout, stderr)."""
    from offlab.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["offlab", *args])
        monkeypatch.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


@pytest.fixture
def pendulum_stored():
    """2,000 noisy-controller Pendulum-v1 transitions (behavior_logp logged) in the test's store as 'pend'."""
    ds = collect_pendulum(2000, seed=0, policy=linear_pendulum_policy(3.0, 1.0), noise=0.3, name="pend")
    return store.write_dataset(ds)


def test_cli_estimates_a_policy_file_on_a_dataset(pendulum_stored, tmp_path, cli):
    policy = linear_actor_file(tmp_path / "pi.safetensors", (0.0, -3.0, -1.0), -1.5)
    code, stdout, stderr = cli("ope", "--policy", policy, "--dataset", "pend", "--estimators", "pdis,wpdis,fqe",
                               "--fqe-updates", "200", "--bootstrap", "200", "--gamma", "0.95", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result["estimates"]) == {"pdis", "wpdis", "fqe"}
    assert result["gamma"] == 0.95 and "discounted, gamma=0.95" in result["target"]
    assert result["policy"]["mode"] == "stochastic" and result["behavior"]["source"] == "logged behavior_logp"
    for r in result["estimates"].values():
        assert np.isfinite(r["value"]) and r["ci"][0] <= r["value"] <= r["ci"][1] and r["normalized"] is None
    assert "no reference scores" in result["normalization"]["note"]
    code, stdout, _ = cli("ope", "--policy", policy, "--dataset", "pend", "--estimators", "wis", "--bootstrap", "100")
    assert code == 0 and "wis" in stdout and "V_gamma(pi)" in stdout and "behaviour log-probs: logged" in stdout


def test_cli_evaluates_a_runs_policy_and_logs_ope_metrics_to_the_run(pendulum_stored, cli):
    """`offlab ope RUN_ID` loads the run's pyfunc policy, evaluates it on the run's dataset, logs to the run."""
    from offlab.algos import get_algo
    from offlab.algos.base import LearnerSpec
    from offlab.data.store import Transitions
    from offlab.tracking import Tracker
    from offlab.training import save_policy

    data = Transitions(pendulum_stored)
    spec = LearnerSpec.from_transitions(data)
    bc = get_algo("bc")(get_algo("bc").Config(hidden=(32, 32)), spec)
    for _ in range(50):
        bc.update(data.sample(64))
    tracker = Tracker()
    exp = tracker.experiment_id("pend")
    tracker.run_id = tracker.client.create_run(exp, run_name="bc-s0", tags={"dataset": "pend", "algo": "bc"}).info.run_id
    path = save_policy(bc, "bc", spec, store.dataset_path("pend").parent / "bc-policy.pt")
    tracker.log_policy(path, pendulum_stored.obs[:5], spec.action_dim)
    run_id = tracker.run_id
    code, stdout, stderr = cli("ope", run_id, "--estimators", "wpdis,fqe", "--fqe-updates", "100", "--bootstrap", "100",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["logged_to_run"] == run_id and result["dataset"]["name"] == "pend"
    assert result["policy"]["mode"] == "smoothed" and result["policy"]["sigma_or_h"] == 0.1  # deterministic BC
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["ope/wpdis"] == pytest.approx(result["estimates"]["wpdis"]["value"])
    assert run.data.metrics["ope/fqe_ci_lo"] == pytest.approx(result["estimates"]["fqe"]["ci"][0])
    assert run.data.tags["ope.policy_mode"] == "smoothed"
    assert "ope/estimates.json" in [a.path for a in MlflowClient().list_artifacts(run_id, "ope")]


BAD = {
    "unknown estimator": (["--policy", "uniform", "--dataset", "pend", "--estimators", "fqe,pdiss"],
                          "unknown estimator 'pdiss'; did you mean 'pdis'?"),
    "action width": (["--policy", "{hopper_policy}", "--dataset", "pend", "--estimators", "pdis"],
                     "actions of width 3"),
    "no behaviour log-probs": (["--policy", "uniform", "--dataset", "pend-nologp", "--estimators", "pdis,wdr,fqe",
                                "--behavior", "logged"], "pdis, wdr need behaviour log-probabilities"),
    "suite does not parse": (["validate", "{bad_suite}"], "does not parse as YAML"),
    "policy without dataset": (["--policy", "uniform"], "--policy needs --dataset"),
    "unknown run": (["0123456789abcdef"], "no run '0123456789abcdef'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_and_exit_2(case, pendulum_stored, tmp_path, cli):
    store.write_dataset(dataclasses.replace(pendulum_stored, behavior_logp=None), "pend-nologp")
    hopper_policy = tanh_gaussian_file(tmp_path / "hopper.safetensors", 11, 3, seed=0)
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("dataset: pend\npolicies: [uniform\n")
    args, message = BAD[case]
    args = [a.format(hopper_policy=hopper_policy, bad_suite=bad_suite) for a in args]
    code, stdout, stderr = cli("ope", *args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()  # MLflow's INFO lines on a fresh store are silenced too
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_cli_process_exits_2_with_one_line(cli_env):
    out = run_cli("ope", "--policy", "uniform", "--dataset", "nope", "--estimators", "fqe,mbb", env=cli_env)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "unknown estimator 'mbb'" in out.stderr


def test_normalised_scores_use_the_discounted_references(pendulum_stored):
    refs = {"random": -100.0, "expert": -20.0, "random_source": "test", "expert_source": "test",
            "undiscounted": {"random": -1500.0, "expert": -150.0, "source": "test"}}
    result = estimate("uniform", pendulum_stored, ["wis"], gamma=0.95, references=refs, bootstrap=100)
    r = result["estimates"]["wis"]
    assert r["normalized"] == pytest.approx(100 * (r["value"] + 100.0) / 80.0)
    assert r["normalized_ci"][0] == pytest.approx(100 * (r["ci"][0] + 100.0) / 80.0)
    assert "discounted" in result["normalization"]["formula"]
    metrics = metric_values(result)
    assert set(metrics) == {"ope/wis", "ope/wis_ci_lo", "ope/wis_ci_hi", "ope/wis_normalized",
                            "ope/wis_normalized_ci_lo", "ope/wis_normalized_ci_hi", "ope/wis_ess"}


def test_library_errors_for_deterministic_targets_and_bad_names(pendulum_stored):
    policy = linear_pendulum_policy(3.0, 1.0)
    with pytest.raises(PolicyError, match="pdis need the target policy's density"):
        estimate(policy, pendulum_stored, ["pdis", "fqe"], mode="deterministic", references="none")
    with pytest.raises(ConfigError, match="unknown estimator 'dsr'"):
        estimate(policy, pendulum_stored, "fqe,dsr")
    with pytest.raises(ConfigError, match="sigma must be > 0"):
        estimate(policy, pendulum_stored, ["fqe"], sigma=0.0)
