"""`estimate`: every requested OPE estimator for one policy on one dataset, with CIs and D4RL scores.

The one entry point the CLI (`offlab ope`), the training loop (`offlab fit --ope fqe,mb`) and the
validation loop call. It resolves the policy and the dataset, gets the behaviour log-probabilities
(logged, or a fitted density), runs the estimators, and normalises every estimate.

What is estimated (METRICS.md B.0), stated in every result under "target":
V_gamma(pi) = E[sum_{t<H} gamma^t r_t], gamma = 0.995 by default, H the env's time limit, for the
policy in its evaluation mode (a deterministic policy is smoothed with sigma = 0.1 by default).
Scores: a discounted estimate is normalised with discounted references,
100 * (V - V_gamma(random)) / (V_gamma(expert) - V_gamma(random)); only model-based rollouts
(and the simulator truth) also give the undiscounted return and its score on the card's
ref_min/ref_max_score.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offlab.data.schema import Dataset
from offlab.dynamics import fit_dynamics, termination_for
from offlab.errors import ConfigError, DataValidationError, OfflabError, PolicyError, did_you_mean
from offlab.evaluation.ope.behavior import BehaviorConfig, fit_behavior
from offlab.evaluation.ope.doubly_robust import DR_ESTIMATORS, DoublyRobust, dr_estimates
from offlab.evaluation.ope.episodes import complete_episodes
from offlab.evaluation.ope.fqe import FQE, FQEConfig, fqe_summary
from offlab.evaluation.ope.importance import (
    IS_ESTIMATORS,
    LOG_RATIO_CLIP,
    ImportanceWeights,
    importance_estimates,
)
from offlab.evaluation.ope.model_based import ModelBasedConfig, model_based_estimate, rollout_horizon
from offlab.evaluation.ope.policy import DEFAULT_SIGMA, ActionDistribution, TargetPolicy, as_target_policy
from offlab.evaluation.ope.truth import discounted_references, normalize

ESTIMATORS = ("fqe", "is", "wis", "pdis", "wpdis", "wpdis_alive", "dr", "wdr", "mb")
ALIASES = {"dm": "fqe", "tis": "is", "sntis": "wis", "snpdis": "wpdis", "sndr": "wdr", "mb-ff": "mb"}
DEFAULT_ESTIMATORS = ("fqe", "is", "wis", "pdis", "wpdis", "dr", "wdr", "mb")
NEEDS_BEHAVIOR = IS_ESTIMATORS + DR_ESTIMATORS
NEEDS_FQE = ("fqe",) + DR_ESTIMATORS
DEFAULT_GAMMA = 0.995
SWEEP_SIGMAS = (0.05, 0.1, 0.2, 0.4)
BEHAVIOR_SOURCES = ("auto", "logged", "fit")


def parse_estimators(spec: str | Sequence[str] | None) -> list[str]:
    """'fqe,pdis' or a list -> canonical names in order; ConfigError naming an unknown one."""
    if spec is None:
        return list(DEFAULT_ESTIMATORS)
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ConfigError(f"no estimator given; choose from {', '.join(ESTIMATORS)}")
    out = []
    for item in items:
        name = ALIASES.get(item, item)
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator '{item}'{did_you_mean(item, [*ESTIMATORS, *ALIASES])}; "
                              f"known estimators: {', '.join(ESTIMATORS)} (aliases {', '.join(ALIASES)})")
        if name not in out:
            out.append(name)
    return out


def resolve_dataset(dataset: Any) -> Dataset:
    """A Dataset, a Transitions view, or a dataset name (resolved through the catalog)."""
    if isinstance(dataset, Dataset):
        ds = dataset
    elif hasattr(dataset, "dataset") and isinstance(dataset.dataset, Dataset):
        ds = dataset.dataset
    elif isinstance(dataset, str):
        from offlab.data import registry

        ds = registry.get(dataset, progress=True)
    else:
        raise OfflabError(f"cannot evaluate on {type(dataset).__name__}; give a dataset name or a Dataset")
    if ds.action.ndim != 2:
        raise DataValidationError(f"dataset '{ds.card.name}' has discrete actions; offlab's OPE covers continuous "
                                  f"actions only")
    return ds


def _box(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    a = ds.action.shape[1]
    low = np.asarray(ds.card.action_low if ds.card.action_low is not None else -np.ones(a), np.float32)
    high = np.asarray(ds.card.action_high if ds.card.action_high is not None else np.ones(a), np.float32)
    return low, high


def behavior_log_probs(ds: Dataset, source: str, needed_by: list[str], config: BehaviorConfig | None = None
                       ) -> tuple[np.ndarray, dict]:
    """log mu(a_t|s_t) of every row: logged `behavior_logp` (wins under 'auto'), or a fitted BC density."""
    if source not in BEHAVIOR_SOURCES:
        raise ConfigError(f"unknown behaviour source '{source}'; use one of {', '.join(BEHAVIOR_SOURCES)}")
    if ds.behavior_logp is not None and source in ("auto", "logged"):
        return ds.behavior_logp.astype(np.float64), {"source": "logged behavior_logp"}
    needs = ", ".join(needed_by)
    if source == "logged":
        raise DataValidationError(
            f"dataset '{ds.card.name}' has no behavior_logp column and fitting a behaviour model was turned off "
            f"(--behavior logged); {needs} need behaviour log-probabilities: use --behavior auto or drop them"
        )
    try:
        model = fit_behavior(ds, config)
    except DataValidationError as e:
        raise DataValidationError(f"{e}; estimators that need it: {needs}") from None
    return model.log_prob(ds.obs, ds.action), {"source": "fitted behaviour-cloned density", **model.info}


@dataclass
class SharedFits:
    """Policy-independent fits for one dataset, reused across the policies of a validation suite."""

    behavior: tuple[np.ndarray, dict] | None = None
    """(log mu(a_t|s_t) of every row, how it was obtained)."""
    dynamics: tuple[Any, dict] | None = None
    """(the fitted DynamicsEnsemble, its training info)."""
    termination: tuple[Any, str] | None = None
    """(the rollouts' termination rule, how it was chosen)."""
    references: dict | None = None
    """The discounted references of the dataset's env."""


def estimator_configs(seed: int, fqe_updates: int | None = None, mb_updates: int | None = None,
                      behavior_steps: int | None = None) -> tuple[FQEConfig, ModelBasedConfig, BehaviorConfig]:
    """FQE, model-based and behaviour-density settings seeded by `seed`, with their update budgets where given."""
    fqe = FQEConfig(seed=seed) if fqe_updates is None else FQEConfig(updates=fqe_updates, seed=seed)
    mb = ModelBasedConfig(seed=seed)
    if mb_updates is not None:
        mb = dataclasses.replace(mb, dynamics=dataclasses.replace(mb.dynamics, max_updates=mb_updates, seed=seed))
    behavior = BehaviorConfig(seed=seed) if behavior_steps is None else BehaviorConfig(steps=behavior_steps, seed=seed)
    return fqe, mb, behavior


def estimate(policy: Any, dataset: Any, estimators: str | Sequence[str] | None = None, *,
             gamma: float = DEFAULT_GAMMA, mode: str = "auto", sigma: float = DEFAULT_SIGMA, behavior: str = "auto",
             fqe: FQEConfig | None = None, mb: ModelBasedConfig | None = None,
             behavior_config: BehaviorConfig | None = None, bootstrap: int = 2000, seed: int = 0,
             references: str | dict | None = "auto", sweep: bool = True, progress: bool = False,
             device: str = "cpu", shared: SharedFits | None = None,
             log_ratio_clip: tuple[float, float] | None = LOG_RATIO_CLIP) -> dict[str, Any]:
    """Estimate V_gamma(policy) on `dataset` with each estimator; a JSON-ready dict (see module docstring).

    policy: a learner object, TargetPolicy, shipped name, .safetensors actor, MLflow model URI or numpy
    callable. dataset: a Dataset, Transitions or dataset name. estimators: 'fqe,pdis,...' or a list
    (default: fqe, is, wis, pdis, wpdis, dr, wdr, mb). mode/sigma: how the policy is evaluated
    (policy.py). behavior: 'auto' (logged, else fitted), 'logged' or 'fit'. references: 'auto'
    (simulator Monte-Carlo, cached), 'none', or a dict from `discounted_references`. shared: a
    SharedFits to reuse (and fill) the behaviour density and dynamics model across policies.
    log_ratio_clip: the per-step log-ratio clip of the IS family (None: unclipped, unbiased).
    """
    names = parse_estimators(estimators)
    if not 0 < gamma <= 1:
        raise ConfigError(f"gamma must be in (0, 1], got {gamma}")
    ds = resolve_dataset(dataset)
    low, high = _box(ds)
    target = as_target_policy(policy, low, high, mode=mode, sigma=sigma)
    target.check_fits(ds.obs.shape[1], ds.action.shape[1], f"dataset '{ds.card.name}'")
    fqe_cfg = fqe or FQEConfig(seed=seed)
    mb_cfg = mb or ModelBasedConfig(seed=seed)
    horizon = rollout_horizon(ds, mb_cfg.horizon)
    weighted = [n for n in names if n in NEEDS_BEHAVIOR]
    if weighted and not target.has_density:
        raise PolicyError(f"{', '.join(weighted)} need the target policy's density, and mode 'deterministic' has "
                          f"none; use --mode smoothed or kernel (sigma > 0), or only fqe and mb")
    result: dict[str, Any] = {
        "policy": target.describe(),
        "dataset": {"name": ds.card.name, "env_id": ds.card.env_id, "content_hash": ds.card.content_hash,
                    "transitions": len(ds), "episodes": ds.n_episodes},
        "gamma": gamma, "horizon": horizon,
        "target": (f"V_gamma(pi) = E[sum_(t<{horizon}) {gamma}^t r_t] (discounted, gamma={gamma}) of the policy in "
                   f"mode '{target.mode}'" + (f" (sigma={target.sigma})" if target.sigma else "")),
        "estimates": {}, "behavior": None,
        "settings": {"fqe": dataclasses.asdict(fqe_cfg), "mb": dataclasses.asdict(mb_cfg), "bootstrap": bootstrap,
                     "seed": seed, "estimators": names},
    }
    est = result["estimates"]
    bar = _Bar(progress)
    weights = None
    if weighted:
        t0 = time.perf_counter()
        if shared is not None and shared.behavior is not None:
            log_mu, result["behavior"] = shared.behavior
        else:
            log_mu, result["behavior"] = behavior_log_probs(ds, behavior, weighted, behavior_config)
            if shared is not None:
                shared.behavior = (log_mu, result["behavior"])
        episodes = complete_episodes(ds)
        rows = episodes.valid_rows
        dist = target.distribution(ds.obs[rows])
        u = target.to_unit(torch.from_numpy(np.ascontiguousarray(ds.action[rows], np.float32)))
        log_pi = (dist.log_prob(u) - target.log_scale).double().numpy()
        log_ratio = np.zeros(episodes.rows.shape)
        log_ratio[episodes.mask] = log_pi - log_mu[rows]
        weights = ImportanceWeights(episodes, log_ratio, gamma, log_ratio_clip)
        result["dataset"].update(complete_episodes=episodes.n, incomplete_left_out=episodes.n_incomplete)
        is_names = [n for n in names if n in IS_ESTIMATORS]
        if is_names:
            est.update(importance_estimates(weights, is_names, bootstrap, seed))
            if sweep and target.mode in ("smoothed", "kernel"):
                sw = _sigma_sweep(target, dist, u, log_mu[rows], episodes, gamma, is_names, log_ratio_clip)
                for n in is_names:
                    est[n]["sigma_sweep"] = sw[n]
                result["sigma_sweep_note"] = (
                    f"IS point estimates with {'sigma' if target.mode == 'smoothed' else 'h'} in "
                    f"{list(SWEEP_SIGMAS)}" + ("; under smoothing each sigma is a different (noisier) target policy"
                                               if target.mode == "smoothed" else ""))
            seconds = time.perf_counter() - t0
            for n in is_names:
                est[n]["seconds"] = seconds
    critic = None
    if any(n in NEEDS_FQE for n in names):
        t0 = time.perf_counter()
        critic = FQE(target, ds, gamma, fqe_cfg, device)
        with bar("FQE", fqe_cfg.updates) as advance:
            critic.fit(advance)
        fit_seconds = time.perf_counter() - t0
        if "fqe" in names:
            est["fqe"] = {**fqe_summary(critic, bootstrap, seed), "seconds": time.perf_counter() - t0}
        dr_names = [n for n in names if n in DR_ESTIMATORS]
        if dr_names:
            t1 = time.perf_counter()
            rows = weights.episodes.valid_rows
            q = np.zeros(weights.mask.shape)
            v = np.zeros(weights.mask.shape)
            q[weights.mask] = critic.q_values(ds.obs[rows], ds.action[rows]).mean(0).double().numpy()
            v[weights.mask] = critic.state_values(ds.obs[rows]).mean(0).double().numpy()
            dr = DoublyRobust(weights, q, v)
            for n, r in dr_estimates(dr, dr_names, bootstrap, seed).items():
                est[n] = {**r, "seconds": fit_seconds + time.perf_counter() - t1}
    if "mb" in names:
        t0 = time.perf_counter()
        if shared is not None and shared.dynamics is None:
            with bar("dynamics model", mb_cfg.dynamics.max_updates) as advance:
                shared.dynamics = fit_dynamics(ds, mb_cfg.dynamics, advance)
            shared.termination = termination_for(ds)
        if shared is not None:
            model, info = shared.dynamics
            est["mb"] = model_based_estimate(target, ds, gamma, mb_cfg, model=model, resamples=bootstrap,
                                             termination=shared.termination)
            est["mb"]["model"] = {k: v for k, v in info.items() if k != "history"}
        else:
            with bar("dynamics model", mb_cfg.dynamics.max_updates) as advance:
                est["mb"] = model_based_estimate(target, ds, gamma, mb_cfg, resamples=bootstrap, progress=advance)
        est["mb"]["seconds"] = time.perf_counter() - t0
    result["estimates"] = {n: est[n] for n in names if n in est}
    if shared is not None and shared.references is None and references == "auto":
        shared.references = discounted_references(ds.card, gamma, horizon) or {}
    if shared is not None and references == "auto":
        references = shared.references or "none"
    _normalise(result, ds, gamma, horizon, references)
    return result


def _sigma_sweep(target: TargetPolicy, dist: ActionDistribution, u: torch.Tensor, log_mu: np.ndarray, episodes,
                 gamma: float, names: list[str], clip) -> dict[str, dict[str, float]]:
    """IS point estimates with the smoothing sigma (or kernel h) at 0.05, 0.1, 0.2, 0.4 (METRICS B.2)."""
    action = dist.mode_action()
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for s in SWEEP_SIGMAS:
        log_pi = (ActionDistribution("gaussian", action, s).log_prob(u) - target.log_scale).double().numpy()
        lr = np.zeros(episodes.rows.shape)
        lr[episodes.mask] = log_pi - log_mu
        point = ImportanceWeights(episodes, lr, gamma, clip).point()
        for n in names:
            out[n][str(s)] = point[n]
    return out


def _normalise(result: dict, ds: Dataset, gamma: float, horizon: int, references) -> None:
    if isinstance(references, dict):
        ref = references
    elif references in (None, "none"):
        ref = None
    else:
        ref = discounted_references(ds.card, gamma, horizon)
    if ref is None:
        result["normalization"] = {"note": "no reference scores (the card has no ref_min/ref_max_score, or "
                                           "references were turned off); normalised values are omitted"}
    else:
        result["normalization"] = {
            "formula": "100 * (V - V_gamma(random)) / (V_gamma(expert) - V_gamma(random)) on discounted values; "
                       "the undiscounted model-based return uses the card's ref_min/ref_max_score",
            **ref}
    for r in result["estimates"].values():
        r["normalized"] = normalize(r["value"], ref)
        r["normalized_ci"] = [normalize(c, ref) for c in r["ci"]]
        if "undiscounted" in r:
            r["undiscounted_normalized"] = normalize(r["undiscounted"], ref, discounted=False)
            r["undiscounted_normalized_ci"] = [normalize(c, ref, discounted=False) for c in r["undiscounted_ci"]]


class _Bar:
    """A rich progress bar per long phase when asked for; otherwise a no-op advance callback."""

    def __init__(self, show: bool):
        self.show = show

    def __call__(self, label: str, total: int):
        import contextlib

        if not self.show:
            return contextlib.nullcontext(None)
        from offlab.progress import progress_bar

        return progress_bar(label, total)


# ------------------------------------------------------------------------------------ MLflow


def metric_values(result: dict, prefix: str = "ope") -> dict[str, float]:
    """`ope/<estimator>` plus _ci_lo/_ci_hi, _normalized (+ CI), _ess and MB's undiscounted numbers."""
    out: dict[str, float] = {}
    for name, r in result["estimates"].items():
        key = f"{prefix}/{name}"
        out[key] = r["value"]
        out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = r["ci"]
        if r.get("normalized") is not None:
            out[f"{key}_normalized"] = r["normalized"]
            out[f"{key}_normalized_ci_lo"], out[f"{key}_normalized_ci_hi"] = r["normalized_ci"]
        if "ess" in r:
            out[f"{key}_ess"] = r["ess"]
        if "undiscounted" in r:
            out[f"{key}_undiscounted"] = r["undiscounted"]
            if r.get("undiscounted_normalized") is not None:
                out[f"{key}_undiscounted_normalized"] = r["undiscounted_normalized"]
        if "member_std" in r:
            out[f"{key}_member_std"] = r["member_std"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def log_estimates(run_id: str, result: dict, step: int = 0, tracking_uri: str | None = None) -> dict[str, float]:
    """Log `result` to MLflow run `run_id`: metrics `ope/<estimator>` (+ CI and normalised variants), tags
    `ope.gamma`, `ope.policy_mode`, `ope.behavior`, and the whole result as artifact `ope/estimates.json`."""
    import tempfile
    from pathlib import Path

    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    from offlab.errors import TrackingError
    from offlab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    tracker.get_run(run_id)
    metrics = metric_values(result)
    now = int(time.time() * 1000)
    pol = result["policy"]
    tags = {"ope.gamma": str(result["gamma"]), "ope.policy_mode": str(pol.get("mode")),
            "ope.sigma_or_h": str(pol.get("sigma_or_h")), "ope.estimators": ",".join(result["estimates"]),
            "ope.behavior": str((result.get("behavior") or {}).get("source", "not needed"))}
    try:
        tracker.client.log_batch(run_id, metrics=[Metric(k, v, now, int(step)) for k, v in metrics.items()],
                                 tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "estimates.json"
            path.write_text(json.dumps(result, indent=2, default=_json_default))
            tracker.client.log_artifact(run_id, str(path), "ope")
    except MlflowException as e:
        raise TrackingError(f"cannot log OPE estimates to run {run_id}: {str(e).splitlines()[0]}") from None
    return metrics


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
