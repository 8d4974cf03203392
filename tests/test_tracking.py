"""MLflow tracking read back with MlflowClient: params, metrics, tags, the input dataset, artifacts, the pyfunc policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import offlab
from offlab import tracking, training
from offlab.config import flatten, from_flat, resolve_run, run_from_dict
from offlab.errors import TrackingError

TINY = "hopper-tiny"


pytestmark = pytest.mark.usefixtures("tiny_store")


def test_a_run_reads_back_with_mlflow_client(hopper_random):
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "td3bc", "steps": 60, "eval_every": 30, "eval_episodes": 2,
                                "seed": 3}, ["hidden=32,32", "log_every=20", "actor_lr=1e-4",
                                             "dataset_quality=false", "threads=2"])
    threads_before = torch.get_num_threads()
    result = training.fit(run, progress=False)
    assert torch.get_num_threads() == threads_before  # the run's thread count does not outlive it
    client = MlflowClient()
    got = client.get_run(result.run_id)

    assert got.info.run_name == "td3bc-s3" and got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).name == TINY
    tags = got.data.tags
    assert tags["algo"] == "td3bc" and tags["dataset"] == TINY and tags["seed"] == "3"
    assert tags["dataset_hash"] == hopper_random.card.content_hash
    assert tags["offlab_version"] == offlab.__version__ and tags["env_id"] == "Hopper-v5"
    assert len(tags.get("git_commit", "0" * 40)) == 40
    assert tags["torch_threads"] == "2"  # the count the updates ran with (numbers depend on it)
    assert tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and tags["cpu"]  # wall times' context
    # every tag offlab documents is there (git_commit only where offlab runs from a git checkout)
    assert set(tracking.OFFLAB_TAGS) - {"git_commit"} <= set(tags)

    params = got.data.params
    assert params == flatten(run)
    assert params["algo.actor_lr"] == "0.0001" and params["algo.alpha"] == "2.5" and params["steps"] == "60"
    assert from_flat(params) == run

    evals = client.get_metric_history(result.run_id, "eval/return")
    assert [m.step for m in evals] == [30, 60]
    assert [m.step for m in client.get_metric_history(result.run_id, "train/critic_loss")] == [20, 40, 60]
    assert {"eval/normalized_score", "eval/return_se", "train/actor_loss", "train/bc_loss", "train/q_mean"} <= set(
        got.data.metrics)
    score = client.get_metric_history(result.run_id, "eval/normalized_score")[-1].value
    assert score == pytest.approx(100 * (evals[-1].value + 20.272305) / (3234.3 + 20.272305))

    [dataset_input] = got.inputs.dataset_inputs
    assert dataset_input.dataset.name == TINY
    assert dataset_input.dataset.digest == hopper_random.card.content_hash
    assert str(offlab.data.store.dataset_path(TINY)) in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    config_file = client.download_artifacts(result.run_id, "config.yaml")
    assert run_from_dict(yaml.safe_load(open(config_file))) == run
    ckpt = torch.load(client.download_artifacts(result.run_id, "checkpoint/checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 60

    model = tracking.load_run_policy(result.run_id)
    obs = hopper_random.obs[:7]
    actions = model.predict(obs)
    assert actions.shape == (7, 3) and actions.dtype == np.float32
    assert (actions >= -1).all() and (actions <= 1).all()
    assert np.array_equal(model.predict(pd.DataFrame(obs)), actions)
    learner = training.load_policy(training.run_dir(result.run_id) / "policy.pt")
    np.testing.assert_array_equal(learner.act(obs), actions)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 11)


def test_an_unreachable_tracking_server_fails_before_training():
    with pytest.raises(TrackingError, match="not reachable"):
        tracking.check_reachable("http://127.0.0.1:9", timeout=2)
    with pytest.raises(TrackingError, match="not reachable"):
        tracking.check_reachable("postgresql://u:p@127.0.0.1:9/db", timeout=2)
    assert tracking.check_reachable() == tracking.tracking_uri()


def test_default_store_is_under_mlflow_in_the_working_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert tracking.artifact_root(tracking.tracking_uri()) == tmp_path / "mlflow" / "artifacts"
    cmd = tracking.ui_command(port=5123)
    assert cmd[1:4] == ["-m", "mlflow", "ui"] and "5123" in cmd
    assert f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}" in cmd


def test_compare_lines_up_runs_of_one_dataset():
    for algo, seed in (("bc", 0), ("bc", 1), ("td3bc", 0)):
        run, _ = resolve_run(None, {"dataset": TINY, "algo": algo, "steps": 20, "eval_every": 10, "eval_episodes": 1,
                                    "seed": seed}, ["hidden=16", "dataset_quality=false"])
        training.fit(run, progress=False)
    rows = tracking.compare_runs(TINY)
    assert sorted((r["algo"], r["seed"]) for r in rows) == [("bc", "0"), ("bc", "1"), ("td3bc", "0")]
    client = MlflowClient()
    for r in rows:
        values = [m.value for m in client.get_metric_history(r["run_id"], "eval/normalized_score")]
        assert r["final"] == values[-1] and r["best"] == max(values) and r["steps"] == 20
        assert r["status"] == "FINISHED" and r["trained_steps"] == 20
    loss_rows = tracking.compare_runs(TINY, "train/bc_loss")
    assert all(r["best"] <= r["final"] for r in loss_rows if r["final"] is not None)
    # a run that never logged the metric still shows how far it trained
    critic_rows = tracking.compare_runs(TINY, "train/critic_loss")
    [td3bc] = [r for r in critic_rows if r["algo"] == "td3bc"]
    [bc] = [r for r in critic_rows if r["algo"] == "bc" and r["seed"] == "0"]
    assert td3bc["final"] is not None and td3bc["trained_steps"] == 20
    assert bc["final"] is None and bc["steps"] is None and bc["trained_steps"] == 20
    with pytest.raises(TrackingError, match="no runs for dataset 'other'"):
        tracking.compare_runs("other")


def test_dataset_quality_is_logged_when_the_metrics_module_provides_it(hopper_random):
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 5, "eval_episodes": 0}, ["hidden=8"])
    assert run.dataset_quality
    result = training.fit(run, progress=False)
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    try:
        from offlab.data.metrics import quality_metrics
    except ImportError:
        quality_metrics = None
    if quality_metrics is None:
        assert not any(k.startswith("quality/") for k in metrics)
        assert tracking.log_dataset_quality(result.run_id, hopper_random) == {}
        return
    expected = {k if k.startswith("quality/") else f"quality/{k}": v for k, v in quality_metrics(hopper_random).items()}
    assert expected
    for key, value in expected.items():
        if np.isfinite(value):
            assert metrics[key] == pytest.approx(value), key
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    tracking.log_dataset_quality(result.run_id, hopper_random)
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])


def test_a_run_killed_while_logging_dataset_quality_resumes_and_logs_it(monkeypatch):
    """The quality metrics can take a minute on 1M rows: the run's config is stored before them, so a run
    killed there resumes from step 0 and logs them then."""
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 5, "eval_episodes": 0}, ["hidden=8"])
    real = tracking.log_dataset_quality
    started: list[str] = []

    def killed(tracker, dataset):
        started.append(tracker.run_id)
        raise KeyboardInterrupt  # what a SIGKILL leaves behind: a RUNNING run with params, config, no quality

    monkeypatch.setattr(tracking, "log_dataset_quality", killed)
    with pytest.raises(KeyboardInterrupt):
        training.fit(run, progress=False)
    run_id = started[0]
    assert not any(k.startswith("quality/") for k in MlflowClient().get_run(run_id).data.metrics)
    monkeypatch.setattr(tracking, "log_dataset_quality", real)
    result = training.resume(run_id, progress=False)
    got = MlflowClient().get_run(run_id)
    assert result.step == 5 and got.info.status == "FINISHED"
    assert any(k.startswith("quality/") for k in got.data.metrics)


def test_a_prdc_run_logs_a_pyfunc_policy_and_collect_rolls_it_out(hopper_random):
    """PRDC's neighbour index needs the dataset to train but not to act: its run logs a servable policy,
    and `offlab data collect` builds a dataset from that MLflow model URI in the real simulator."""
    from offlab.data import build, store

    run, _ = resolve_run(None, {"dataset": TINY, "algo": "prdc", "steps": 40, "eval_episodes": 0, "seed": 1},
                         ["hidden=32,32", "dataset_quality=false"])
    result = training.fit(run, progress=False)
    assert result.model_uri, MlflowClient().get_run(result.run_id).data.tags.get("policy_model")
    learner = training.load_policy(training.run_dir(result.run_id) / "policy.pt")
    obs = hopper_random.obs[:5]
    np.testing.assert_array_equal(tracking.load_run_policy(result.run_id).predict(obs), learner.act(obs))
    with pytest.raises(offlab.ConfigError, match="needs the dataset"):
        learner.update(None)

    uri = f"runs:/{result.run_id}/policy"
    build.collect("Hopper-v5", uri, 120, "from-mlflow", seed=2)
    ds = store.load_dataset("from-mlflow")
    assert len(ds) == 120 and ds.behavior_logp is None  # a deterministic policy: no behaviour density
    assert ds.card.behavior_policy["policy"] == uri and ds.card.behavior_policy["kind"] == "mlflow"
    # the logged actions are the policy's own actions on the logged states
    np.testing.assert_allclose(ds.action, learner.act(ds.obs), atol=1e-6)


def test_the_logged_policy_answers_through_mlflows_scoring_server(hopper_random):
    """`mlflow models serve -m runs:/ID/policy` runs MLflow's scoring app on the logged model: observations
    posted to /invocations come back as the policy's actions."""
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 30, "eval_episodes": 0, "seed": 2},
                         ["hidden=32,32", "dataset_quality=false"])
    result = training.fit(run, progress=False)
    app = TestClient(scoring_server.init(tracking.load_run_policy(result.run_id)))
    assert app.get("/ping").status_code == 200

    obs = hopper_random.obs[:4]
    reply = app.post("/invocations", json={"inputs": obs.tolist()})
    assert reply.status_code == 200, reply.text
    served = np.asarray(reply.json()["predictions"], dtype=np.float32)
    learner = training.load_policy(training.run_dir(result.run_id) / "policy.pt")
    np.testing.assert_allclose(served, learner.act(obs), atol=1e-6)
    # the logged signature rejects observations of the wrong width instead of acting on them
    assert app.post("/invocations", json={"inputs": obs[:, :5].tolist()}).status_code == 400


def test_iql_decays_its_actor_lr_over_the_runs_steps_unless_set():
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "iql", "steps": 1234})
    assert run.algo_settings["max_steps"] == 1234
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "iql", "steps": 1234}, ["max_steps=99"])
    assert run.algo_settings["max_steps"] == 99


def test_fit_with_ope_logs_the_estimates_on_the_training_run(hopper_random):
    """`offlab fit ... --ope fqe,wpdis`: the final policy's estimates land on the run as ope/<estimator> at the
    last step, the same numbers `offlab ope` computes for that learner with the same budget and seed."""
    from offlab.data.store import write_dataset
    from offlab.evaluation.ope import runner as ope
    from offlab.evaluation.ope.fqe import FQEConfig

    # without reference scores no normalisation runs, which would roll out 200 simulator episodes for references
    data = hopper_random.with_card(name="hopper-noref", ref_min_score=None, ref_max_score=None)
    write_dataset(data, "hopper-noref")
    run, _ = resolve_run(None, {"dataset": "hopper-noref", "algo": "bc", "steps": 30, "eval_episodes": 0,
                                "seed": 2, "ope": "fqe,wpdis"},
                         ["hidden=16", "dataset_quality=false", "ope_updates=40"])
    result = training.fit(run, progress=False)
    assert set(result.ope) == {"fqe", "wpdis"}
    got = MlflowClient().get_run(result.run_id)
    [fqe_metric] = MlflowClient().get_metric_history(result.run_id, "ope/fqe")
    assert fqe_metric.step == 30 and fqe_metric.value == pytest.approx(result.ope["fqe"]["value"])
    lo, hi = result.ope["wpdis"]["ci"]
    assert got.data.metrics["ope/wpdis_ci_lo"] == pytest.approx(lo) and got.data.metrics["ope/wpdis_ci_hi"] == pytest.approx(hi)
    assert result.ope["fqe"]["normalized"] is None
    assert got.data.tags["ope.estimators"] == "fqe,wpdis" and got.info.status == "FINISHED"
    learner = training.load_policy(training.run_dir(result.run_id) / "policy.pt")
    again = ope.estimate(learner, data, "fqe", fqe=FQEConfig(updates=40, seed=2), seed=2)
    assert got.data.tags["ope.behavior"].startswith("fit")  # no logged behaviour density: one was fitted
    assert again["estimates"]["fqe"]["value"] == pytest.approx(result.ope["fqe"]["value"], rel=1e-5)


def test_a_fresh_sqlite_store_is_created_without_mlflow_info_lines(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    tracking.Tracker(uri).experiment_id("hopper-tiny")
    assert (tmp_path / "fresh" / "mlflow.db").is_file()
    err = capfd.readouterr().err
    assert "Creating initial MLflow database tables" not in err and "INFO" not in err, err


def _open_store_and_experiment(uri: str, barrier) -> str:
    barrier.wait()  # every process reaches the fresh store at the same moment
    return tracking.Tracker(uri).experiment_id("hopper-medium")


def test_parallel_fits_on_a_fresh_store_share_it(tmp_path):
    """Seeds launched side by side (`offlab fit --seed 0 & offlab fit --seed 1 &`) on a store nobody has used
    yet: one process creates the sqlite tables and the dataset's experiment, the others wait and use them."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    n = 4
    with ctx.Manager() as manager, ProcessPoolExecutor(n, mp_context=ctx) as pool:
        barrier = manager.Barrier(n)
        ids = list(pool.map(_open_store_and_experiment, [uri] * n, [barrier] * n))
    assert len(set(ids)) == 1
    assert len(MlflowClient(uri).search_experiments(filter_string="name = 'hopper-medium'")) == 1


def test_a_store_locked_by_another_process_is_one_line(tmp_path):
    """Another process inside a write transaction on the local sqlite store (or paused in one) for longer than
    sqlite's wait: the store is refused in one line that says so, not with sqlalchemy's traceback."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracking.Tracker(uri)  # the tables exist
    holder = sqlite3.connect(tmp_path / "mlflow" / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError, match="locked by another process") as caught:
            tracking.Tracker(uri)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "\n" not in str(caught.value)
    tracking.Tracker(uri)  # free again
