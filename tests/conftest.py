"""Shared fixtures: every test runs in its own OFFLAB_HOME, Minari store and MLflow store."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import make_sim_dataset

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """A temporary OFFLAB_HOME, Minari store and MLflow tracking store for each test."""
    home = tmp_path / "offlab_home"
    monkeypatch.setenv("OFFLAB_HOME", str(home))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    yield home


@pytest.fixture(autouse=True)
def subnormals_as_before():
    """A test that leaves a Trainer open leaves its flush of subnormal floats on; the next starts without it."""
    yield
    from offlab.threads import flushes_denormals, set_flush_denormals

    if flushes_denormals():
        set_flush_denormals(False)


@pytest.fixture(scope="session")
def hopper_random():
    """2,000 random-action Hopper-v5 transitions from the real simulator (built once per session)."""
    return make_sim_dataset("Hopper-v5", steps=2000, seed=0, name="hopper-tiny")


@pytest.fixture
def cli_env():
    """Environment for CLI subprocesses: the current (test-isolated) stores."""
    return dict(os.environ)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An MLflow sqlite store with its tables created once (creating them takes seconds)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tiny_store(mlflow_template, tmp_path, hopper_random):
    """The test's MLflow store, copied from the template, and `hopper_random` stored as 'hopper-tiny'."""
    from offlab.data.store import write_dataset

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    write_dataset(hopper_random, "hopper-tiny")
