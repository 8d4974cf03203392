"""Validation of OPE against simulator truth: DOPE's metrics over a policy set (an `evaluators/` suite).

Fu et al., "Benchmarks for Deep Off-Policy Evaluation", ICLR 2021 (arXiv:2103.16596); metrics as
the authors' plotting notebook computes them (METRICS.md B.4): per task, ground-truth values v_i
of the policy set are min-max normalised, v~_i = (v_i - min v) / (max v - min v), estimates with the
same affine map and clipped above at 2, then

    AbsErr   = mean_i |v^~_i - v~_i|
    RankCorr = Spearman rho(v~, v^~)          (offlab adds Kendall tau and MSE)
    Regret@k = (max_i v~_i - max_{i in top-k by v^} v~_i) / max_i v~_i

plus (B.6) CI coverage, the share of policies whose true V_gamma lies inside the estimator's 95%
interval, and the share of estimates flagged unreliable. Metric uncertainty: 1000 bootstrap
resamples of the policy set, mean +- std (the notebook's procedure).

A suite file (YAML, evaluators/*.yaml) names the dataset, the policies (shipped names, actor files
or globs of them, MLflow model URIs, `uniform`), the estimators, gamma and the truth budget; see
evaluators/hopper-medium.yaml. `validate_suite` computes the truth per policy (truth.py, cached),
runs `estimate` per policy (behaviour density, dynamics model and references fitted once and
shared), scores each estimator, writes an HTML report (table + estimate-vs-truth plots) and logs a
parent MLflow run with the DOPE metrics and one child run per (estimator, policy).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from offlab import paths
from offlab.errors import ConfigError, did_you_mean
from offlab.evaluation.ope.fqe import FQEConfig
from offlab.evaluation.ope.model_based import ModelBasedConfig, rollout_horizon
from offlab.evaluation.ope.policy import DEFAULT_SIGMA, MODES, TargetPolicy, as_target_policy
from offlab.evaluation.ope.runner import (
    DEFAULT_GAMMA,
    SharedFits,
    estimate,
    parse_estimators,
    resolve_dataset,
)
from offlab.evaluation.ope.truth import monte_carlo

# ------------------------------------------------------------------------------------ DOPE metrics


def normalise_to_truth(v_true: np.ndarray, v_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DOPE's per-task normalisation: truth to [0, 1], estimates with the same map, clipped above at 2."""
    v_true, v_hat = np.asarray(v_true, np.float64), np.asarray(v_hat, np.float64)
    lo, span = v_true.min(), v_true.max() - v_true.min()
    if span <= 0:
        return np.full_like(v_true, np.nan), np.full_like(v_hat, np.nan)
    return (v_true - lo) / span, np.minimum((v_hat - lo) / span, 2.0)


def regret_at_k(v_true_n: np.ndarray, v_hat: np.ndarray, k: int) -> float:
    """(max v~ - max of v~ over the k policies ranked highest by the estimate) / max v~."""
    order = np.argsort(-np.nan_to_num(np.asarray(v_hat, np.float64), nan=-np.inf), kind="stable")
    best = v_true_n.max()
    return float((best - v_true_n[order[:k]].max()) / best) if best > 0 else float("nan")


def dope_metrics(v_true: np.ndarray, v_hat: np.ndarray) -> dict[str, float]:
    """AbsErr, Spearman, Kendall tau, Regret@1, Regret@5 and MSE of one estimator over a policy set."""
    from scipy import stats

    t, e = normalise_to_truth(v_true, v_hat)
    if np.isnan(t).all():
        return {k: float("nan") for k in ("abs_err", "spearman", "kendall", "regret@1", "regret@5", "mse")}
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # ties everywhere: the correlation is NaN
        spearman = float(stats.spearmanr(t, e).statistic)
        kendall = float(stats.kendalltau(t, e).statistic)
    return {"abs_err": float(np.mean(np.abs(e - t))), "spearman": spearman, "kendall": kendall,
            "regret@1": regret_at_k(t, v_hat, 1), "regret@5": regret_at_k(t, v_hat, 5),
            "mse": float(np.mean((e - t) ** 2))}


def bootstrap_metrics(v_true: np.ndarray, v_hat: np.ndarray, resamples: int = 1000, seed: int = 0
                      ) -> dict[str, tuple[float, float]]:
    """Mean and std of each DOPE metric over bootstrap resamples of the policy set."""
    rng = np.random.default_rng(seed)
    n = len(v_true)
    reps: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        for k, v in dope_metrics(v_true[idx], v_hat[idx]).items():
            reps.setdefault(k, []).append(v)
    return {k: (float(np.nanmean(v)), float(np.nanstd(v))) if np.isfinite(v).any() else (float("nan"), float("nan"))
            for k, v in reps.items()}


# ------------------------------------------------------------------------------------ suites


SUITE_KEYS = {"name", "description", "dataset", "gamma", "estimators", "policies", "truth", "settings", "seed",
              "env", "env_kwargs"}
POLICY_KEYS = {"name", "policy", "mode", "sigma", "optional"}
SETTINGS_KEYS = {"fqe", "mb", "dynamics", "bootstrap", "behavior", "metric_resamples"}
TRUTH_KEYS = {"episodes", "seed", "max_episodes", "sem_fraction"}


@dataclass
class PolicyEntry:
    """One policy of a suite: a display name, what `as_target_policy` takes, and its evaluation mode."""

    name: str
    policy: str
    mode: str = "auto"
    sigma: float = DEFAULT_SIGMA


@dataclass
class Suite:
    """A parsed evaluators/*.yaml file."""

    name: str
    dataset: str
    policies: list[PolicyEntry]
    estimators: list[str]
    gamma: float = DEFAULT_GAMMA
    truth_episodes: int = 256
    truth_seed: int = 1_000
    truth_max_episodes: int = 1024
    truth_sem_fraction: float = 0.01
    fqe: FQEConfig = field(default_factory=FQEConfig)
    mb: ModelBasedConfig = field(default_factory=ModelBasedConfig)
    bootstrap: int = 2000
    behavior: str = "auto"
    metric_resamples: int = 1000
    seed: int = 0
    description: str = ""
    path: str = ""


def _fail(path: Path, what: str) -> ConfigError:
    return ConfigError(f"evaluators file '{path}' {what}")


def _check_keys(path: Path, where: str, raw: dict, known: set[str]) -> None:
    for k in raw:
        if k not in known:
            raise _fail(path, f"has an unknown key '{k}' in {where}{did_you_mean(str(k), known)}; "
                              f"keys are {', '.join(sorted(known))}")


def _dataclass_from(path: Path, cls: type, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise _fail(path, f"has '{where}' as {type(raw).__name__}; it must be a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(path, where, raw, set(fields))
    values = {}
    for k, v in raw.items():
        default = getattr(cls(), k)
        if dataclasses.is_dataclass(default):
            v = _dataclass_from(path, type(default), v, f"{where}.{k}")
        elif isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        elif isinstance(default, bool) and not isinstance(v, bool):
            raise _fail(path, f"sets {where}.{k} to {v!r}; it must be true or false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _fail(path, f"sets {where}.{k} to {v!r}; it must be a number")
            v = type(default)(v)
        values[k] = v
    return cls(**values)


def _resolve_path(ref: str, suite_dir: Path) -> list[str]:
    """A policy reference, with globs expanded and relative paths tried from cwd, the suite, the repo."""
    if "://" in ref or ref.startswith(("runs:/", "models:/")) or ref in ("uniform", "random-uniform"):
        return [ref]
    for base in (Path.cwd(), suite_dir, paths.REPO_ROOT):
        candidate = base / ref
        if any(c in ref for c in "*?["):
            hits = sorted(glob.glob(str(candidate)))
            if hits:
                return hits
        elif candidate.exists():
            return [str(candidate)]
    return [ref]  # a shipped name (hopper/expert) or a missing file: as_target_policy says which


def _resolvable(ref: str) -> bool:
    if "://" in ref or ref.startswith(("runs:/", "models:/")) or ref in ("uniform", "random-uniform"):
        return True
    return Path(ref).is_file() or (paths.catalog_dir() / "policies" / f"{ref}.safetensors").is_file()


def load_suite(path: str | Path) -> Suite:
    """Parse and check a suite file; ConfigError (one line) for anything that does not parse or fit."""
    path = Path(path)
    if not path.is_file():
        alt = paths.evaluators_dir() / path.name
        if alt.is_file():
            path = alt
        else:
            known = sorted(p.name for p in paths.evaluators_dir().glob("*.yaml"))
            raise ConfigError(f"evaluators file '{path}' does not exist{did_you_mean(path.name, known)}"
                              + (f"; shipped suites: {', '.join(known)}" if known else ""))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _fail(path, f"does not parse as YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "must be a YAML mapping with at least 'dataset' and 'policies'")
    _check_keys(path, "the suite", raw, SUITE_KEYS)
    for required in ("dataset", "policies"):
        if required not in raw:
            raise _fail(path, f"lacks '{required}'; a suite needs 'dataset' and 'policies'")
    if not isinstance(raw["dataset"], str):
        raise _fail(path, "must name its dataset as a string (e.g. dataset: hopper-medium)")
    pols = raw["policies"]
    if not isinstance(pols, list) or not pols:
        raise _fail(path, "must list its policies under 'policies' (a non-empty list)")
    entries: list[PolicyEntry] = []
    for i, p in enumerate(pols):
        if isinstance(p, str):
            p = {"policy": p}
        if not isinstance(p, dict) or "policy" not in p:
            raise _fail(path, f"has policy #{i + 1} without a 'policy' (a shipped name, file, glob or model URI)")
        _check_keys(path, f"policy #{i + 1}", p, POLICY_KEYS)
        mode = str(p.get("mode", "auto"))
        if mode not in MODES:
            raise _fail(path, f"gives policy #{i + 1} mode '{mode}'; modes are {', '.join(MODES)}")
        refs = _resolve_path(str(p["policy"]), path.parent)
        if p.get("optional") and not _resolvable(refs[0]):
            continue  # e.g. a training run's snapshots, present only where the recipe ran
        for ref in refs:
            if len(refs) == 1:
                name = p.get("name") or (Path(ref).stem if ref != p["policy"] else ref)
            else:  # a glob: one entry per file, named by the file (prefixed by the entry's name)
                name = f"{p['name']}/{Path(ref).stem}" if p.get("name") else Path(ref).stem
            entries.append(PolicyEntry(str(name), ref, mode, float(p.get("sigma", DEFAULT_SIGMA))))
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _fail(path, f"names policies {dup} more than once; give each a distinct 'name'")
    truth = raw.get("truth") or {}
    if not isinstance(truth, dict):
        raise _fail(path, "has 'truth' that is not a mapping (episodes, seed, max_episodes, sem_fraction)")
    _check_keys(path, "truth", truth, TRUTH_KEYS)
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise _fail(path, "has 'settings' that is not a mapping")
    _check_keys(path, "settings", settings, SETTINGS_KEYS)
    mb = _dataclass_from(path, ModelBasedConfig, {k: v for k, v in (settings.get("mb") or {}).items()}, "settings.mb")
    if settings.get("dynamics") is not None:
        from offlab.dynamics import DynamicsConfig

        mb = dataclasses.replace(mb, dynamics=_dataclass_from(path, DynamicsConfig, settings["dynamics"],
                                                              "settings.dynamics"))
    try:
        estimators = parse_estimators(raw.get("estimators"))
    except ConfigError as e:
        raise _fail(path, f"lists an estimator that does not exist ({e})") from None
    gamma = raw.get("gamma", DEFAULT_GAMMA)
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise _fail(path, f"sets gamma to {gamma!r}; it must be a number in (0, 1]")
    return Suite(
        name=str(raw.get("name", path.stem)), dataset=raw["dataset"], policies=entries, estimators=estimators,
        gamma=float(gamma), truth_episodes=int(truth.get("episodes", 256)), truth_seed=int(truth.get("seed", 1000)),
        truth_max_episodes=int(truth.get("max_episodes", 1024)),
        truth_sem_fraction=float(truth.get("sem_fraction", 0.01)),
        fqe=_dataclass_from(path, FQEConfig, settings.get("fqe"), "settings.fqe"), mb=mb,
        bootstrap=int(settings.get("bootstrap", 2000)), behavior=str(settings.get("behavior", "auto")),
        metric_resamples=int(settings.get("metric_resamples", 1000)), seed=int(raw.get("seed", 0)),
        description=str(raw.get("description", "")), path=str(path),
    )


# ------------------------------------------------------------------------------------ the loop


def _targets(suite: Suite, low, high, say) -> list[TargetPolicy]:
    """Every suite policy as a TargetPolicy; a policy with the same weights and mode as an earlier one is dropped."""
    out, seen = [], {}
    for e in suite.policies:
        t = as_target_policy(e.policy, low, high, mode=e.mode, sigma=e.sigma)
        t.name = e.name
        key = (t.fingerprint, t.mode, t.sigma)
        if t.fingerprint is not None and key in seen:
            say(f"skipping {e.name}: the same policy as {seen[key]}")
            continue
        seen[key] = e.name
        out.append(t)
    return out


def validate_suite(suite: Suite | str | Path, *, out_html: str | Path | None = None, log: bool = True,
                   progress: bool = False, echo=None) -> dict[str, Any]:
    """Truth, estimates and DOPE metrics for every policy of a suite; returns the report dict."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    say = echo or (lambda msg: None)
    ds = resolve_dataset(suite.dataset)
    low = np.asarray(ds.card.action_low if ds.card.action_low is not None else -np.ones(ds.action.shape[1]))
    high = np.asarray(ds.card.action_high if ds.card.action_high is not None else np.ones(ds.action.shape[1]))
    targets = _targets(suite, low, high, say)  # every policy resolves (and fits) before anything long starts
    for t in targets:
        t.check_fits(ds.obs.shape[1], ds.action.shape[1], f"dataset '{ds.card.name}'")
    horizon = rollout_horizon(ds, suite.mb.horizon)
    refs = (ds.card.ref_min_score, ds.card.ref_max_score)
    truths = {}
    for t in targets:
        t0 = time.perf_counter()
        truths[t.name] = monte_carlo(t, ds.card.env_id, suite.gamma, suite.truth_episodes, suite.truth_seed,
                                     ds.card.env_kwargs, horizon, refs)
        say(f"truth {t.name}: V_gamma {truths[t.name]['v_gamma']:.2f} +- {truths[t.name]['v_gamma_sem']:.2f}, "
            f"return {truths[t.name]['return']:.1f} ({time.perf_counter() - t0:.0f} s)")
    _tighten_truth(suite, targets, truths, ds, horizon, refs, say)
    shared = SharedFits()
    results = {}
    for t in targets:
        t0 = time.perf_counter()
        results[t.name] = estimate(t, ds, suite.estimators, gamma=suite.gamma, behavior=suite.behavior,
                                   fqe=suite.fqe, mb=suite.mb, bootstrap=suite.bootstrap, seed=suite.seed,
                                   progress=progress, shared=shared, sweep=False)
        say(f"estimates {t.name}: " + ", ".join(f"{k} {v['value']:.2f}" for k, v in
                                                results[t.name]["estimates"].items())
            + f" ({time.perf_counter() - t0:.0f} s)")
    report = score(suite, truths, results)
    report["dataset"] = {"name": ds.card.name, "env_id": ds.card.env_id, "content_hash": ds.card.content_hash,
                         "transitions": len(ds), "episodes": ds.n_episodes}
    report["references"] = shared.references
    if out_html:
        write_html(report, out_html)
        report["html"] = str(out_html)
    if log:
        report["mlflow_run_id"] = log_validation(report)
    return report


def _tighten_truth(suite: Suite, targets, truths, ds, horizon, refs, say) -> None:
    """B.6: double N_mc for policies whose SEM exceeds `sem_fraction` of the set's value range."""
    values = [v["v_gamma"] for v in truths.values()]
    span = max(values) - min(values)
    if span <= 0:
        return
    for t in targets:
        tr = truths[t.name]
        while tr["v_gamma_sem"] > suite.truth_sem_fraction * span and tr["episodes"] * 2 <= suite.truth_max_episodes:
            tr = monte_carlo(t, ds.card.env_id, suite.gamma, tr["episodes"] * 2, suite.truth_seed,
                             ds.card.env_kwargs, horizon, refs)
            say(f"truth {t.name}: SEM above {suite.truth_sem_fraction:.0%} of the value range, "
                f"{tr['episodes']} episodes -> +- {tr['v_gamma_sem']:.2f}")
        truths[t.name] = tr


def score(suite: Suite, truths: dict[str, dict], results: dict[str, dict]) -> dict[str, Any]:
    """DOPE metrics per estimator (with policy-bootstrap mean +- std), CI coverage, reliability and time."""
    names = list(truths)
    v_true = np.array([truths[n]["v_gamma"] for n in names])
    per_estimator = {}
    for est in suite.estimators:
        rows = [results[n]["estimates"].get(est) for n in names]
        if any(r is None for r in rows):
            continue
        v_hat = np.array([r["value"] for r in rows], np.float64)
        lo = np.array([r["ci"][0] for r in rows], np.float64)
        hi = np.array([r["ci"][1] for r in rows], np.float64)
        with np.errstate(invalid="ignore"):
            covered = (lo <= v_true) & (v_true <= hi)
        per_estimator[est] = {
            **dope_metrics(v_true, v_hat),
            "bootstrap": bootstrap_metrics(v_true, v_hat, suite.metric_resamples, suite.seed),
            "ci_coverage": float(covered.mean()),
            "unreliable_share": float(np.mean([bool(r.get("unreliable")) for r in rows])),
            "seconds_mean": float(np.mean([r.get("seconds", np.nan) for r in rows])),
        }
    policies = []
    for n in names:
        row = {"policy": n, "truth": truths[n],
               "estimates": {k: {kk: v[kk] for kk in ("value", "ci", "normalized", "unreliable", "seconds", "ess") if kk in v}
                             for k, v in results[n]["estimates"].items()},
               "mode": results[n]["policy"].get("mode"), "sigma_or_h": results[n]["policy"].get("sigma_or_h")}
        policies.append(row)
    first = results[names[0]]
    return {"suite": suite.name, "suite_path": suite.path, "gamma": suite.gamma, "target": first["target"],
            "behavior": first.get("behavior"), "estimators": per_estimator, "policies": policies,
            "settings": first["settings"], "truth_episodes": suite.truth_episodes}


# ------------------------------------------------------------------------------------ output


def metrics_table_rows(report: dict) -> list[dict[str, Any]]:
    rows = []
    for est, m in report["estimators"].items():
        b = m["bootstrap"]
        rows.append({"estimator": est, "abs_err": m["abs_err"], "abs_err_std": b["abs_err"][1],
                     "spearman": m["spearman"], "spearman_std": b["spearman"][1], "kendall": m["kendall"],
                     "regret@1": m["regret@1"], "regret@5": m["regret@5"], "mse": m["mse"],
                     "ci_coverage": m["ci_coverage"], "unreliable": m["unreliable_share"],
                     "seconds": m["seconds_mean"]})
    return rows


def write_html(report: dict, path: str | Path) -> Path:
    """The report as one HTML page: the metric table, then estimate-vs-truth scatter plots per estimator."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    path = Path(path)
    ests = list(report["estimators"])
    cols = min(4, max(1, len(ests)))
    nrows = (len(ests) + cols - 1) // cols
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[
        f"{e}: Spearman {report['estimators'][e]['spearman']:.2f}" for e in ests])
    truth = np.array([p["truth"]["v_gamma"] for p in report["policies"]])
    lo, hi = float(truth.min()), float(truth.max())
    for i, e in enumerate(ests):
        r, c = i // cols + 1, i % cols + 1
        vals = np.array([p["estimates"][e]["value"] for p in report["policies"]])
        ci = np.array([p["estimates"][e]["ci"] for p in report["policies"]], np.float64)
        fig.add_trace(go.Scatter(
            x=truth, y=vals, mode="markers", name=e, text=[p["policy"] for p in report["policies"]],
            error_y={"type": "data", "symmetric": False, "array": ci[:, 1] - vals, "arrayminus": vals - ci[:, 0]},
            error_x={"type": "data", "array": [p["truth"]["v_gamma_sem"] for p in report["policies"]]},
            showlegend=False), row=r, col=c)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash", "color": "grey"},
                                 showlegend=False), row=r, col=c)
        fig.update_xaxes(title_text=f"true V (gamma={report['gamma']})", row=r, col=c)
        fig.update_yaxes(title_text="estimate", row=r, col=c)
    fig.update_layout(height=320 * nrows, width=320 * cols + 80,
                      title=f"OPE vs simulator truth: {report['suite']} on {report['dataset']['name']}")
    table = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>" for row in metrics_table_rows(report))
    head = "".join(f"<th>{k}</th>" for k in (metrics_table_rows(report) or [{}])[0])
    pol = "".join(
        f"<tr><td>{p['policy']}</td><td>{_fmt(p['truth']['v_gamma'])} &plusmn; {_fmt(p['truth']['v_gamma_sem'])}"
        f"</td><td>{_fmt(p['truth']['return'])}</td>"
        + "".join(f"<td>{_fmt(p['estimates'][e]['value'])}</td>" for e in ests) + "</tr>"
        for p in report["policies"])
    html = f"""<html><head><meta charset="utf-8"><title>offlab OPE validation {report['suite']}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:2px 8px;text-align:right}}</style></head><body>
<h2>OPE validation: {report['suite']} ({report['dataset']['name']}, {len(report['policies'])} policies)</h2>
<p>{report['target']}. DOPE metrics on truth-normalised values (estimates clipped above at 2); &plusmn; = std over
{report['settings'].get('bootstrap', '')} / policy-bootstrap resamples in the JSON report.</p>
<table border=1 cellspacing=0><tr>{head}</tr>{table}</table>
<h3>Per policy (discounted truth &plusmn; SEM, undiscounted return, estimates)</h3>
<table border=1 cellspacing=0><tr><th>policy</th><th>V_gamma</th><th>return</th>
{''.join(f'<th>{e}</th>' for e in ests)}</tr>{pol}</table>
{fig.to_html(full_html=False, include_plotlyjs='cdn')}
</body></html>"""
    with paths.atomic_write(path, "w") as f:  # a report killed mid-write leaves the previous one whole
        f.write(html)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if np.isfinite(v) else str(v)
    return str(v)


def log_validation(report: dict, tracking_uri: str | None = None) -> str:
    """A parent MLflow run (experiment `ope-<dataset>`) with the DOPE metrics and the report, and one child
    run per (estimator, policy) with v_hat, ci_lo, ci_hi, ess, v_true, v_true_sem (METRICS B.6)."""
    import tempfile

    from mlflow.entities import Metric, Param, RunTag

    from offlab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id(f"ope-{report['dataset']['name']}")
    client = tracker.client
    now = int(time.time() * 1000)
    parent = client.create_run(exp, run_name=f"validate-{report['suite']}",
                               tags={"offlab.kind": "ope-validation", "dataset": report["dataset"]["name"],
                                     "dataset_hash": report["dataset"]["content_hash"]}).info.run_id
    metrics = []
    for est, m in report["estimators"].items():
        for k in ("abs_err", "spearman", "kendall", "regret@1", "regret@5", "mse", "ci_coverage",
                  "unreliable_share", "seconds_mean"):
            if np.isfinite(m[k]):
                metrics.append(Metric(f"dope/{est}/{k}".replace("@", "_at_"), float(m[k]), now, 0))
    client.log_batch(parent, metrics=metrics, params=[Param("gamma", str(report["gamma"])),
                                                      Param("policies", str(len(report["policies"]))),
                                                      Param("suite", report["suite"])])
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "report.json"
        p.write_text(json.dumps(report, indent=2, default=str))
        client.log_artifact(parent, str(p))
        if report.get("html"):
            client.log_artifact(parent, report["html"])
    behaviour = (report.get("behavior") or {}).get("behavior_model") or (report.get("behavior") or {}).get("source")
    for p in report["policies"]:
        for est, r in p["estimates"].items():
            child = client.create_run(exp, run_name=f"{est}:{p['policy']}",
                                      tags={"mlflow.parentRunId": parent, "offlab.kind": "ope-estimate"}).info.run_id
            vals = {"v_hat": r["value"], "ci_lo": r["ci"][0], "ci_hi": r["ci"][1], "v_true": p["truth"]["v_gamma"],
                    "v_true_sem": p["truth"]["v_gamma_sem"], "return_true": p["truth"]["return"],
                    "ess": r.get("ess"), "normalized": r.get("normalized")}
            client.log_batch(child, metrics=[Metric(k, float(v), now, 0) for k, v in vals.items()
                                             if v is not None and np.isfinite(v)],
                             params=[Param("gamma", str(report["gamma"])), Param("estimator", est),
                                     Param("policy", p["policy"]), Param("sigma_or_h", str(p["sigma_or_h"])),
                                     Param("behaviour_model", str(behaviour)),
                                     Param("reference_id", report["dataset"]["content_hash"])],
                             tags=[RunTag("mlflow.parentRunId", parent)])
            client.set_terminated(child)
    client.set_terminated(parent)
    return parent
