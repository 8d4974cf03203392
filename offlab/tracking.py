"""Everything MLflow: the store, experiments, runs, params, metrics, dataset lineage, artifacts, the pyfunc policy.

Conventions (DESIGN.md "Tracking"):
- Tracking URI: MLFLOW_TRACKING_URI if set, else the local store `sqlite:///<cwd>/mlflow/mlflow.db`
  with artifacts in `<cwd>/mlflow/artifacts` (both git-ignored). A sqlite store keeps its artifacts
  beside the database file (`<db folder>/artifacts/<experiment>`).
- One experiment per dataset (named after it); one run per `offlab fit`, named `<algo>-s<seed>`.
- Tags: algo, dataset, dataset_hash, seed, offlab_version, git_commit (when offlab runs from a git
  checkout), env_id, device, torch_threads (the updates' CPU threads), cpu and cpu_capability (the processor
  and the instruction set torch's kernels use: speed and float rounding depend on both). Params: the run config flattened
  (`offlab.config.flatten`).
- Metrics: `train/*` (averaged over log_every steps), `eval/return`, `eval/return_se`,
  `eval/normalized_score`, `online/*`, `quality/*` (dataset quality, when offlab.data.metrics has it).
- Inputs: the dataset via `log_inputs` (name, digest = content hash, source = its folder).
- Artifacts: `config.yaml`, `checkpoint/checkpoint.pt`, and the policy as a pyfunc model `policy`
  (`mlflow.pyfunc.load_model(f"runs:/{run_id}/policy")`; `mlflow models serve`). The model holds no
  pickled objects: it is code (this module's `OfflabPolicy`) plus a tensors-only policy file.

The store is checked for reachability before any training starts (`check_reachable`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from offlab import paths
from offlab.errors import ConfigError, TrackingError, did_you_mean

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars on downloads

REACH_TIMEOUT_S = 3.0
OFFLAB_TAGS = ("algo", "dataset", "dataset_hash", "seed", "offlab_version", "git_commit", "env_id", "device",
               "torch_threads", "cpu", "cpu_capability")


# ------------------------------------------------------------------------------------ the store


def local_store_dir() -> Path:
    """The default store folder: ./mlflow in the working folder."""
    return Path.cwd() / "mlflow"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the local sqlite store under ./mlflow."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser()


def artifact_root(uri: str) -> Path | None:
    """Where a local store keeps artifacts: beside its sqlite file (or the file store's folder); else None."""
    db = sqlite_path(uri)
    if db is not None:
        return db.parent / "artifacts"
    return None


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold an exclusive lock on a local sqlite store (`<db>.lock` beside it) while its tables or an experiment
    are created, so `offlab fit` processes started side by side on a fresh store do not race each other.
    A no-op for servers and databases, which serialise this themselves."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with paths.file_lock(db.with_name(db.name + ".lock")):
        yield


def check_reachable(uri: str | None = None, timeout: float = REACH_TIMEOUT_S) -> str:
    """Raise TrackingError (one line, within ~timeout seconds) when the store cannot be used; return the URI."""
    uri = uri or tracking_uri()
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    hint = "start the server or unset MLFLOW_TRACKING_URI to use the local store under ./mlflow"
    if scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            return uri  # sqlite:// in-memory or unusual forms: let MLflow judge
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow store folder {db.parent}: {e.strerror}; {hint}") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"the MLflow store {db} is not writable; fix its permissions or set MLFLOW_TRACKING_URI")
        return uri
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
        except urllib.error.HTTPError:
            return uri  # something answers; MLflow will say more if it is not a tracking server
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {uri} is not reachable ({reason}); {hint}") from None
        return uri
    if scheme in ("postgresql", "mysql", "mssql") or scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        host, port = parsed.hostname, parsed.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[
            scheme.split("+")[0]]
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise TrackingError(f"MLflow database {host}:{port} is not reachable ({e.strerror or e}); {hint}") from None
        return uri
    if scheme in ("", "file"):
        folder = Path(parsed.path if scheme == "file" else uri)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow store folder {folder}: {e.strerror}; {hint}") from None
    return uri


def git_commit() -> str | None:
    """The commit of the offlab checkout this code runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_tags() -> dict[str, str]:
    """The processor a run trains on and the instruction set of torch's CPU kernels (AVX2, AVX512, ...): wall
    times compare only on the same processor, and the kernels' float rounding can differ between sets."""
    import platform

    import torch

    name, fields = platform.processor() or platform.machine(), {}
    with contextlib.suppress(OSError):  # Linux: the model name, family and model (a VM may say only "AMD EPYC")
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if fields.get("model name"):
        name = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return {"cpu": name or "unknown", "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}


# ------------------------------------------------------------------------------------ runs


class Tracker:
    """One MLflow run of `offlab fit`: create or reopen it, log to it, close it."""

    def __init__(self, uri: str | None = None, timeout: float = REACH_TIMEOUT_S):
        self.uri = check_reachable(uri, timeout)
        try:
            with store_lock(self.uri):  # the first client of a fresh sqlite file creates its tables
                self.client = quiet_client(self.uri)
                with _quiet("mlflow"):
                    self.client.search_experiments(max_results=1)
        except Exception as e:  # MLflow's errors, and sqlalchemy's from MlflowClient() itself
            if "database is locked" in str(e):
                raise TrackingError(
                    f"MLflow store {self.uri} is locked by another process (sqlite: database is locked); retry when "
                    f"it is free, or point MLFLOW_TRACKING_URI at a tracking server for many runs at once"
                ) from None
            if isinstance(e, MlflowException):
                raise TrackingError(f"MLflow store {self.uri} cannot be used: {_one_line(e)}") from None
            raise
        self.run_id: str | None = None
        self.logged_until: dict[str, int] = {}
        """Per metric, the last step already in the store (a resumed run does not log those steps twice)."""

    # experiments ------------------------------------------------------------------------------

    def experiment_id(self, dataset: str, create: bool = True) -> str | None:
        try:
            exp = self.client.get_experiment_by_name(dataset)
        except MlflowException as e:
            raise TrackingError(f"MLflow store {self.uri} failed: {_one_line(e)}") from None
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        root = artifact_root(self.uri)
        location = (root / dataset).as_uri() if root is not None else None
        with store_lock(self.uri):
            exp = self.client.get_experiment_by_name(dataset)  # another process may have created it meanwhile
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(dataset, artifact_location=location)
            except MlflowException as e:
                exp = self.client.get_experiment_by_name(dataset)  # created by a process on another machine
                if exp is None:
                    raise TrackingError(f"MLflow store {self.uri} failed: {_one_line(e)}") from None
                return exp.experiment_id

    # runs ---------------------------------------------------------------------------------------

    def start_run(self, run, dataset, device: str) -> str:
        """Create the run: tags, params (the flattened config) and the dataset as input. Its quality metrics
        come after, from `log_quality`: they can take a minute, and the run's config should be stored first."""
        import torch

        from offlab import __version__
        from offlab.config import flatten

        exp = self.experiment_id(run.dataset)
        tags = {
            "algo": run.algo, "dataset": run.dataset, "dataset_hash": dataset.card.content_hash,
            "seed": str(run.seed), "offlab_version": __version__, "env_id": dataset.card.env_id, "device": device,
            "torch_threads": str(torch.get_num_threads()), **cpu_tags(),
        }
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        created = self.client.create_run(exp, run_name=run.run_name, tags=tags)
        self.run_id = created.info.run_id
        params = [Param(k, v) for k, v in flatten(run).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.log_dataset(dataset)
        return self.run_id

    def log_quality(self, run, dataset) -> None:
        """The dataset's quality metrics on this run (when `run.dataset_quality`)."""
        if run.dataset_quality:
            log_dataset_quality(self, dataset)

    def get_run(self, run_id: str):
        """The MLflow run `run_id`, or ConfigError when the store has none."""
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"no run '{run_id}' in the tracking store {self.uri}; list runs with `offlab compare --dataset NAME`"
            ) from None

    def open_run(self, run_id: str) -> None:
        """Reopen an existing run for logging (status RUNNING); remember which steps it already has."""
        run = self.get_run(run_id)
        self.run_id = run_id
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            if history:
                self.logged_until[key] = max(m.step for m in history)
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log finite metrics at `step`, skipping steps a resumed run already logged."""
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and np.isfinite(v) and step > self.logged_until.get(k, -1)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def download_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """Download one artifact of a run into folder `dst`; None when the run has no such artifact."""
        try:
            dst.mkdir(parents=True, exist_ok=True)
            got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                      tracking_uri=self.uri)
        except (MlflowException, OSError):
            return None
        return Path(got) if Path(got).exists() else None

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

    # dataset lineage -------------------------------------------------------------------------------

    def log_dataset(self, dataset) -> None:
        """The dataset as the run's training input (name, digest = content hash, source = its folder)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.types import Schema, TensorSpec

        from offlab.data import store

        card = dataset.card
        source = _dataset_source(store.dataset_path(card.name))
        act_dtype = np.dtype(np.int64) if card.discrete_actions else np.dtype(np.float32)
        schema = Schema([
            TensorSpec(np.dtype(np.float32), (-1, card.obs_dim), "obs"),
            TensorSpec(act_dtype, (-1, card.action_dim), "action"),
            TensorSpec(np.dtype(np.float32), (-1,), "reward"),
            TensorSpec(np.dtype(np.float32), (-1, card.obs_dim), "next_obs"),
            TensorSpec(np.dtype(np.bool_), (-1,), "terminated"),
            TensorSpec(np.dtype(np.bool_), (-1,), "truncated"),
        ])
        meta = MetaDataset(source, name=card.name, digest=card.content_hash[:36], schema=schema)
        tags = [InputTag("mlflow.data.context", "training"), InputTag("env_id", card.env_id),
                InputTag("n_steps", str(card.n_steps)), InputTag("n_episodes", str(card.n_episodes)),
                InputTag("source_kind", str(card.source.get("kind", "")))]
        if card.source.get("minari_id"):
            tags.append(InputTag("minari_id", str(card.source["minari_id"])))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(meta._to_mlflow_entity(), tags)])

    # the policy ---------------------------------------------------------------------------------------

    def log_policy(self, policy_file: Path, example_obs: np.ndarray, action_dim: int) -> str:
        """Log the policy as a pyfunc model `policy` (code + a tensors-only file); returns its model URI.

        `example_obs` ([n, obs_dim] float32) is stored as the model's input example.
        """
        example_obs = np.asarray(example_obs, dtype=np.float32)
        obs_dim = example_obs.shape[1]
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, obs_dim))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, action_dim))]),
        )
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "offlab_policy_model.py"
            code.write_text(MODEL_CODE)
            with using_tracking_uri(self.uri), _quiet("mlflow"), mlflow.start_run(run_id=self.run_id):
                info = mlflow.pyfunc.log_model(
                    name="policy", python_model=str(code), artifacts={"policy": str(policy_file)},
                    signature=signature, input_example=example_obs, pip_requirements=_requirements(),
                )
        return info.model_uri


MODEL_CODE = '''"""offlab policy as an MLflow pyfunc model: observations -> actions (the code of `offlab.tracking.OfflabPolicy`)."""
import mlflow

from offlab.tracking import OfflabPolicy

mlflow.models.set_model(OfflabPolicy())
'''


class OfflabPolicy(mlflow.pyfunc.PythonModel):
    """Pyfunc policy: rebuilds the learner from the `policy` artifact (a tensors-only file) and acts.

    `predict` takes observations as a float32 numpy array [B, obs_dim], a pandas DataFrame with obs_dim
    columns, or nested lists, and returns float32 actions [B, action_dim] (the deterministic policy).
    """

    _skip_type_hint_validation = True  # the model signature types the input (MLflow's switch for that)

    def load_context(self, context) -> None:
        from offlab.training import load_policy

        self.learner = load_policy(context.artifacts["policy"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        obs = observations_array(model_input)
        return np.asarray(self.learner.act(obs, deterministic=True), dtype=np.float32).reshape(len(obs), -1)


def observations_array(model_input: Any) -> np.ndarray:
    """Observations as float32 [B, obs_dim] from numpy, pandas or lists."""
    if hasattr(model_input, "to_numpy"):
        model_input = model_input.to_numpy()
    obs = np.array(model_input, dtype=np.float32, order="C")  # a writable copy, row-major as the learner's own
    return obs.reshape(1, -1) if obs.ndim == 1 else obs.reshape(len(obs), -1)


def load_run_policy(run_id: str, uri: str | None = None):
    """The pyfunc policy of a run (`predict(observations) -> actions`) from the store at `uri` (default: ours)."""
    with using_tracking_uri(uri or tracking_uri()):
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/policy")


def quiet_client(uri: str) -> MlflowClient:
    """MlflowClient(uri) without MLflow's INFO lines ("Creating initial MLflow database tables...") when it
    creates a fresh sqlite store: those are MLflow's bookkeeping, not offlab's output."""
    with _quiet("mlflow"):
        return MlflowClient(uri)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only warnings and errors from a logger (MLflow logs INFO lines while saving a model)."""
    import logging

    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's fluent API against `uri`, leaving MLflow's global tracking URI and the environment as they were.

    (`mlflow.set_tracking_uri` is global and also writes MLFLOW_TRACKING_URI into os.environ.)
    """
    from mlflow.tracking._tracking_service import utils

    saved_global = getattr(utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if hasattr(utils, "_tracking_uri"):
            utils._tracking_uri = saved_global
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "pyyaml", "scipy", "scikit-learn", "gymnasium", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def _dataset_source(path: Path):
    """The dataset's folder as an MLflow local dataset source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(path))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------ dataset quality hook


def log_dataset_quality(run, dataset) -> dict[str, float]:
    """Log `quality/*` metrics of `dataset` on `run` (a Tracker or a run id) when offlab.data.metrics
    provides `quality_metrics(dataset) -> dict[str, float]`; returns what was logged ({} when absent).

    The global RNG states are left as they were, so a run's numbers do not depend on this hook.
    """
    try:
        from offlab.data import metrics as quality
    except ImportError:
        return {}
    fn = getattr(quality, "quality_metrics", None)
    if fn is None:
        return {}
    import random

    import torch

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            raw = fn(dataset)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    values = {k if k.startswith("quality/") else f"quality/{k}": float(v) for k, v in raw.items()}
    values = {k: v for k, v in values.items() if np.isfinite(v)}
    if isinstance(run, Tracker):
        run.log_metrics(values, step=0)
    else:
        client = quiet_client(tracking_uri())
        batch = [Metric(k, v, 0, 0) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(str(run), metrics=batch[i:i + 1000])
    return values


# ------------------------------------------------------------------------------------ reading runs back


def compare_runs(dataset: str, metric: str = "eval/normalized_score", uri: str | None = None) -> list[dict[str, Any]]:
    """The runs of one dataset side by side: run, algo, seed, status, final and best `metric`, the step of the
    final value (`steps`), how far the run trained (`trained_steps`, the furthest step it logged anything at),
    and the content hash of the data each trained on (a dataset rebuilt under another simulator version is
    other data)."""
    tracker = Tracker(uri)
    exp = tracker.experiment_id(dataset, create=False)
    if exp is None:
        raise TrackingError(
            f"no runs for dataset '{dataset}' in {tracker.uri}; train one with "
            f"`offlab fit --dataset {dataset} --algo bc` (or set MLFLOW_TRACKING_URI)"
        )
    rows = []
    lower_is_better = "loss" in metric
    runs = tracker.client.search_runs([exp], order_by=["attributes.start_time ASC"], max_results=10_000)
    logged = sorted({name for run in runs for name in run.data.metrics})
    if runs and metric not in logged:
        curves = [m for m in logged if not m.startswith("quality/")]  # the dataset's quality values are not curves
        more = f" and {len(logged) - len(curves)} quality/* values" if len(curves) < len(logged) else ""
        raise ConfigError(f"no run of '{dataset}' logged '{metric}'{did_you_mean(metric, logged)} "
                          f"(logged: {', '.join(curves)}{more})")
    for run in runs:
        history = tracker.client.get_metric_history(run.info.run_id, metric) if metric in run.data.metrics else []
        history = sorted(history, key=lambda m: (m.step, m.timestamp))
        values = [m.value for m in history]
        tags, params = run.data.tags, run.data.params
        last_step = history[-1].step if history else None
        # how far the run trained: the furthest step of anything it logged (train/* every log_every steps)
        trained = max((m.step for m in run.data.to_proto().metrics), default=None)
        rows.append({
            "run": run.info.run_name,
            "run_id": run.info.run_id,
            "algo": tags.get("algo", params.get("algo", "")),
            "seed": tags.get("seed", params.get("seed", "")),
            "steps": last_step,
            "trained_steps": trained,
            "status": run.info.status,
            "final": values[-1] if values else None,
            "best": (min(values) if lower_is_better else max(values)) if values else None,
            "dataset_hash": tags.get("dataset_hash"),
        })
    return rows


def ui_command(port: int = 5000, host: str = "127.0.0.1", uri: str | None = None) -> list[str]:
    """The `mlflow ui` command line that opens the local store."""
    uri = uri or tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    root = artifact_root(uri)
    if root is not None:
        cmd += ["--default-artifact-root", root.as_uri()]
    return cmd
