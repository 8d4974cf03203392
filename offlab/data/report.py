"""The dataset quality report: TQ, SACo and coverage beside the diagnostics, as HTML, JSON and an MLflow run.

`build_report` resolves the dataset and its reference (METRICS.md A.1 "Which reference": the env's
replay buffer when logged, else its medium-replay dataset, else the pooled reference of every local
dataset of the env), runs `offlab.data.metrics.quality`, and keeps every number and plot array.
`render_html` draws the plots METRICS.md A.2 lists into one self-contained page (plotly.js inline, so
it opens from disk without a server or a network). `log_report` records one MLflow run in the
experiment `datasets`: metrics `quality/*`, the page and the JSON summary as artifacts, the dataset
through `mlflow.log_input`. `compare` and `render_plane_html` draw the paper's TQ-SACo plane.
"""

from __future__ import annotations

import dataclasses
import html
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offlab.data import metrics
from offlab.data.metrics import QualityConfig, QualityResult, Reference
from offlab.data.schema import Dataset
from offlab.errors import DatasetNotFound, OfflabError, SourceUnavailable, TrackingError
from offlab.paths import atomic_write

EXPERIMENT = "datasets"
SATURATED_NOTE = "saturated: nearly every row has its own cell, so the count measures N, not coverage"


# ----------------------------------------------------------------------------------- references


def _load(name: str) -> Dataset:
    from offlab.data import registry

    return registry.get(name, progress=True)


def default_reference(ds: Dataset, *, exclude_build: bool = False) -> Reference:
    """The env's replay buffer (`<family>-full-replay`), else its medium-replay, else the pooled reference."""
    from offlab.data import registry, store

    family = metrics.env_family(ds.card.env_id)
    for candidate, kind in ((f"{family}-full-replay", "replay"), (f"{family}-medium-replay", "medium_replay")):
        if candidate == ds.card.name:
            return metrics.reference_from_dataset(ds, kind)
        e = registry.entry(candidate)
        on_disk = store.exists(candidate)
        if not on_disk and (e is None or e.env != ds.card.env_id):
            continue
        if not on_disk and exclude_build:
            continue
        try:
            ref_ds = store.load_dataset(candidate) if on_disk else registry.get(candidate, progress=True)
        except (SourceUnavailable, DatasetNotFound):
            continue
        if ref_ds.card.env_id == ds.card.env_id and ref_ds.obs.shape[1] == ds.obs.shape[1]:
            return metrics.reference_from_dataset(ref_ds, kind)
    return pooled_local_reference(ds)


def pooled_local_reference(ds: Dataset) -> Reference:
    """Every local dataset of the same env and spaces (and `ds` itself), equal rows from each."""
    from offlab.data import store

    members = {ds.card.name: ds}
    for name in store.list_local():
        if name in members:
            continue
        card = store.load_card(name)
        if card.env_id == ds.card.env_id and card.obs_dim == ds.obs.shape[1] and card.action_dim == ds.card.action_dim:
            other = store.load_dataset(name)
            if len(other):
                members[name] = other
    return metrics.pooled_reference(list(members.values()))


def resolve_reference(ds: Dataset, name: str | None = None) -> Reference:
    """`--reference NAME` (a dataset name, or 'pooled'), or the default; always checked against `ds`."""
    if name is None:
        ref = default_reference(ds)
    elif name == "pooled":
        ref = pooled_local_reference(ds)
    elif name == ds.card.name:
        ref = metrics.reference_from_dataset(ds)
    else:
        ref = metrics.reference_from_dataset(_load(name))
    metrics.check_reference(ds, ref)
    return ref


# --------------------------------------------------------------------------------------- the report


@dataclass(repr=False)
class Report:
    """A dataset's quality numbers, plot arrays, reference and settings."""

    dataset: Dataset
    reference: Reference
    result: QualityResult
    cfg: QualityConfig
    seconds: float

    def __repr__(self) -> str:
        return f"Report('{self.dataset.card.name}', reference='{self.reference.name}', ok={self.result.ok})"

    def summary(self) -> dict[str, Any]:
        """Every number, with stable keys (what `--json` prints)."""
        c = self.dataset.card
        out: dict[str, Any] = {
            "dataset": {"name": c.name, "env_id": c.env_id, "content_hash": c.content_hash,
                        "n_transitions": len(self.dataset), "n_episodes": self.dataset.n_episodes,
                        "obs_dim": int(self.dataset.obs.shape[1]), "action_dim": c.action_dim},
            "settings": settings(self.cfg),
        }
        out.update(self.result.numbers)
        out["timing"] = {**self.result.numbers.get("timing", {}), "total": self.seconds}
        return _plain(out)


def settings(cfg: QualityConfig) -> dict[str, Any]:
    """The config plus the subsampling rules in words (stated in every report)."""
    rules = [
        f"saco_paper: the first min(N, {cfg.paper_rows:,}) rows of the dataset and of the reference; per-dimension "
        f"limits from the reference's min/max over all its rows; {cfg.paper_edges} np.linspace edges; exact set count",
        f"saco_grid: N_sub = min(N, N_ref, {cfg.grid_rows:,}) rows of each, uniform without replacement (seeded "
        f"row-hash sample, seeds {list(cfg.seeds)}); z standardised by the reference, PCA to >= "
        f"{cfg.pca_variance} variance (p <= {cfg.pca_max_dims}), clipped to +-{cfg.grid_clip:g}, {cfg.grid_bins} bins",
        f"saco_h: N_sub = min(N, N_ref, {cfg.entropy_rows:,}) rows of each, exact duplicates removed, "
        f"k = {cfg.entropy_k} Kozachenko-Leonenko entropy",
        f"coverage: N_sub = min(N, N_ref, {cfg.coverage_rows:,}) rows of each, M = min({cfg.coverage_queries:,}, "
        f"N_sub) reference query points (and as many dataset points for out-of-support), k = {cfg.coverage_k}",
        f"behaviour models: <= {cfg.bc_rows:,} training rows from 90% of the episodes, <= {cfg.bc_heldout_rows:,} "
        f"held-out rows from the other 10%",
        "diagnostics (returns, lengths, actions, states, rewards, duplicates, NaN/inf, discontinuities): all rows",
        f"plots: histograms over all rows; projections and violins from <= {cfg.plot_rows:,} sampled rows each",
    ]
    return {**dataclasses.asdict(cfg), "subsampling": rules}


def build_report(name_or_ds: str | Dataset, reference: str | Reference | Dataset | None = None,
                 cfg: QualityConfig = QualityConfig()) -> Report:
    """Load the dataset and its reference, and compute every quality number."""
    t0 = time.perf_counter()
    ds = _load(name_or_ds) if isinstance(name_or_ds, str) else name_or_ds
    if len(ds) == 0:
        metrics.quality(ds, None, cfg)  # raises the one-line empty-dataset error
    if isinstance(reference, Reference):
        ref = reference
        metrics.check_reference(ds, ref)
    elif isinstance(reference, Dataset):
        ref = metrics.reference_from_dataset(reference)
        metrics.check_reference(ds, ref)
    else:
        ref = resolve_reference(ds, reference)
    result = metrics.quality(ds, ref, cfg)
    return Report(ds, ref, result, cfg, time.perf_counter() - t0)


def _plain(obj):
    """numpy scalars and arrays -> JSON-ready Python values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


# --------------------------------------------------------------------------------------- output files


def check_writable(path: str | Path) -> Path:
    """Fail early, with one line, when `path` cannot be written (creating missing parent folders)."""
    path = Path(path)
    if path.is_dir():
        raise OfflabError(f"cannot write the report to '{path}': it is a folder; pass a file name, e.g. --out {path}/report.html")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".offlab-probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OfflabError(
            f"cannot write the report to '{path}' ({e.strerror or type(e).__name__}); choose a writable --out path"
        ) from None
    return path


def write_text_atomic(path: Path, text: str) -> None:
    try:
        with atomic_write(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OfflabError(f"cannot write '{path}' ({e.strerror or type(e).__name__}); choose a writable --out path") from None


# ------------------------------------------------------------------------------------------- HTML


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x, 3) for x in v) + "]"
    return str(v)


def _pm(mean: float, std: float) -> str:
    return f"{_fmt(mean)} ± {_fmt(std, 2)}"


def headline_rows(numbers: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(measure, value, note, greyed) rows of the TQ / SACo panel (shared by the HTML and the CLI)."""
    rows = []
    tq = numbers["tq"]
    rows.append(("TQ", _fmt(tq["tq"]), f"g(D) = {_fmt(tq['g'])} over {tq['episodes_used']:,} episodes; random "
                 f"{_fmt(tq['random_return'])}, expert {_fmt(tq['expert_return'])} ({tq['scores_from']})", False))
    if "saco_paper" in numbers:
        sp, sg, sh, cov = numbers["saco_paper"], numbers["saco_grid"], numbers["saco_h"], numbers["coverage"]
        rows.append(("SACo (paper protocol)", _fmt(sp["saco"]),
                     f"{sp['unique']:,} / {sp['unique_ref']:,} unique cells of {sp['rows']:,} / {sp['rows_ref']:,} rows; "
                     f"occupancy {_fmt(sp['occupancy'], 3)} / {_fmt(sp['occupancy_ref'], 3)}"
                     + (f"; {SATURATED_NOTE}" if sp["saturated"] else ""), sp["saturated"]))
        rows.append(("SACo-grid", _pm(sg["saco"], sg["saco_std"]),
                     f"{_fmt(sg['unique'])} / {_fmt(sg['unique_ref'])} cells of {sg['rows']:,} rows, "
                     f"10^{sg['log10_cells_available']:.1f} cells available"
                     + (f"; {SATURATED_NOTE}" if sg["saturated"] else ""), sg["saturated"]))
        rows.append(("SACo-H (per dimension)", _pm(sh["saco_h_pd"], sh["saco_h_pd_std"]),
                     f"exp(ΔH / p), ΔH = {_pm(sh['delta_h'], sh['delta_h_std'])} nats, exp(ΔH) = {_fmt(sh['saco_h'])}, "
                     f"p = {numbers['space']['p']}", False))
        rows.append((f"Coverage@{cov['k']}", _pm(cov["coverage_at_k"], cov["coverage_at_k_std"]),
                     f"share of {cov['queries']:,} reference points with a dataset point within their {cov['k']}-NN radius",
                     False))
        rows.append(("Coverage(r)", ", ".join(f"{m}: {_fmt(cov[f'cov_r{m}'], 3)}" for m in
                                              ("0.5", "1", "2", "4")),
                     f"at r = r0 × {{0.5, 1, 2, 4}}, r0 = {_fmt(cov['r0'])}; area {_fmt(cov['cov_auc'], 3)}", False))
        rows.append(("Out-of-support", _pm(cov["out_of_support"], cov["out_of_support_std"]),
                     "share of dataset points farther from the reference than that point's k-NN radius", False))
    return rows


def diagnostic_rows(numbers: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of the diagnostics table (shared by the HTML and the CLI)."""
    e, r, a, s, rw = (numbers[k] for k in ("episodes", "returns", "actions", "states", "rewards"))
    d, nf, dc = numbers["duplicates"], numbers["nonfinite"], numbers["discontinuities"]
    rows = [
        ("episodes / transitions", f"{e['n_episodes']:,} / {e['n_transitions']:,}"),
        ("episode length min / mean / median / max",
         f"{e['length_min']} / {_fmt(e['length_mean'])} / {_fmt(e['length_median'])} / {e['length_max']}"),
        ("share at max_episode_steps", f"{_fmt(e['frac_max_length'])} (max {e['max_episode_steps']})"),
        ("ends: terminated / truncated / incomplete",
         f"{_fmt(e['frac_terminated'], 3)} / {_fmt(e['frac_truncated'], 3)} / {_fmt(e['frac_incomplete'], 3)}"),
        ("return mean ± std", f"{_fmt(r['mean'])} ± {_fmt(r['std'])}"),
        ("return min / p5 / p25 / p50 / p75 / p95 / max",
         " / ".join(_fmt(r[k]) for k in ("min", "p5", "p25", "p50", "p75", "p95", "max"))),
        ("normalised return mean", _fmt(r["normalized_mean"])),
        ("return CV / bimodality coefficient", f"{_fmt(r['cv'])} / {_fmt(r['bimodality'])}"),
        ("action saturation (|a| ≥ 0.99) per dim", _fmt(a["saturation"])),
        ("action saturation, any dim", _fmt(a["saturation_any"])),
        ("actions outside the box", f"{a['out_of_bounds']:,}"),
        ("constant state dims", _fmt(s["constant_dims"]) if s["constant_dims"] else "none"),
        ("state outlier rate (|z| > 10)", _fmt(s["outlier_rate"])),
        ("reward mean ± std / min / max", f"{_fmt(rw['mean'])} ± {_fmt(rw['std'])} / {_fmt(rw['min'])} / {_fmt(rw['max'])}"),
        ("reward exact-zero share", _fmt(rw["frac_zero"])),
        ("duplicate transitions / episodes", f"{_fmt(d['frac_duplicate_transitions'])} / {d['duplicate_episodes']:,}"),
        ("NaN/inf obs / action / reward / next_obs", " / ".join(str(nf[k]) for k in ("obs", "action", "reward", "next_obs"))),
        ("discontinuous episodes", f"{dc['count']:,}" + (f" ({_fmt(dc['episodes'][:10])})" if dc["count"] else "")),
        ("source policies (card)", _fmt(numbers["policies"]["source_policies"])),
    ]
    b = numbers.get("behaviour")
    if b and b.get("fitted"):
        rows += [
            ("BC entropy proxy (nats)", _fmt(b["entropy_proxy"])),
            ("BC residual action std", _fmt(b["residual_action_std"])),
            ("held-out NLL Gaussian / mixture", f"{_fmt(b['nll_gauss'])} / {_fmt(b['nll_mixture'])}"),
            ("ΔNLL (Gaussian − mixture)", _fmt(b["delta_nll"])),
            ("mixture effective components", f"{_fmt(b['effective_components'])} of {b['mixture_components']}"),
        ]
    elif b:
        rows.append(("behaviour models", f"not fitted: {b['reason']}"))
    return rows


def _figures(report: Report, plane_points: list[dict[str, Any]] | None = None) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ds, num, arr = report.dataset, report.result.numbers, report.result.arrays
    name, ref_name = ds.card.name, report.reference.name
    figs: list[tuple[str, Any]] = []
    layout = {"template": "plotly_white", "height": 380, "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}

    returns = ds.episode_returns()
    f = go.Figure(go.Histogram(x=returns, nbinsx=50, name="episode return", marker_color="#4c78a8"))
    tq = num["tq"]
    for label, x, color in (("random", tq["random_return"], "#d62728"), ("expert", tq["expert_return"], "#2ca02c")):
        if x is not None:
            f.add_vline(x=x, line_color=color, line_dash="dash", annotation_text=label)
    f.update_layout(title="Episode returns (dashed: random and expert reference returns)",
                    xaxis_title="return", yaxis_title="episodes", **layout)
    figs.append(("returns", f))

    f = go.Figure(go.Histogram(x=ds.episode_lengths, nbinsx=50, marker_color="#72b7b2"))
    f.update_layout(title="Episode lengths", xaxis_title="steps", yaxis_title="episodes", **layout)
    figs.append(("lengths", f))

    idx = np.arange(len(returns))
    shown = idx if len(idx) <= 5000 else np.unique(np.linspace(0, len(idx) - 1, 5000).astype(int))
    f = go.Figure(go.Scatter(x=shown, y=returns[shown], mode="markers", marker={"size": 3, "opacity": 0.5},
                             name="episodes" if len(shown) == len(idx) else f"{len(shown):,} of {len(idx):,} episodes"))
    window = max(1, len(returns) // 100)
    if window > 1:
        means = np.convolve(returns, np.ones(window) / window, mode="valid")
        f.add_trace(go.Scatter(x=idx[window - 1 :: max(1, len(means) // 1000)], y=means[:: max(1, len(means) // 1000)],
                               mode="lines", name=f"running mean of {window} episodes"))
    f.update_layout(title="Return against episode index (a learning curve on replay data)",
                    xaxis_title="episode", yaxis_title="return", **layout)
    figs.append(("return_by_episode", f))

    act = metrics.state_actions(ds)[:, ds.obs.shape[1]:]
    n_a = act.shape[1]
    cols = min(n_a, 3)
    rows_ = int(np.ceil(n_a / cols))
    f = make_subplots(rows=rows_, cols=cols, subplot_titles=[f"a[{j}]" for j in range(n_a)])
    edges = np.linspace(-1.0, 1.0, 51)
    centers = 0.5 * (edges[1:] + edges[:-1])
    for j in range(n_a):
        counts, _ = np.histogram(np.clip(act[:, j], -1, 1), bins=edges)
        r, c = j // cols + 1, j % cols + 1
        f.add_trace(go.Bar(x=centers, y=counts, marker_color="#f58518", showlegend=False), row=r, col=c)
        for lo, hi in ((-1.0, -0.99), (0.99, 1.0)):
            f.add_vrect(x0=lo - 0.02, x1=hi + 0.02, fillcolor="#d62728", opacity=0.15, line_width=0, row=r, col=c)
    f.update_layout(title="Actions per dimension (shaded: saturation bands |a| ≥ 0.99)", bargap=0,
                    **{**layout, "height": 260 * rows_ + 80})
    figs.append(("actions", f))

    rng = np.random.default_rng(0)
    pick = rng.choice(len(ds), size=min(report.cfg.plot_rows, len(ds)), replace=False)
    st = num["states"]
    z = (ds.obs[pick] - np.asarray(st["mean"])) / np.where(np.asarray(st["std"]) < 1e-8, 1.0, np.asarray(st["std"]))
    f = go.Figure()
    for j in range(z.shape[1]):
        f.add_trace(go.Violin(y=z[:, j], name=f"s[{j}]", box_visible=False, points=False, showlegend=False))
    f.update_layout(title="Standardised state dimensions", yaxis_title="z", **layout)
    figs.append(("states", f))

    if "proj_data" in arr:
        f = go.Figure()
        pr, pdat = arr["proj_ref"], arr["proj_data"]
        f.add_trace(go.Histogram2dContour(x=pr[:, 0], y=pr[:, 1], name=f"reference {ref_name}",
                                          colorscale="Greys", showscale=False, ncontours=12))
        f.add_trace(go.Scatter(x=pdat[:, 0], y=pdat[:, 1], mode="markers", name=name,
                                 marker={"size": 3, "color": "#e45756", "opacity": 0.6}))
        f.update_layout(title=f"(s, a) on the reference's first two principal axes: {name} over {ref_name}",
                        xaxis_title="PC 1", yaxis_title="PC 2", **{**layout, "height": 480})
        figs.append(("projection", f))

        cov = num["coverage"]
        f = go.Figure(go.Scatter(x=arr["cov_curve_r"], y=arr["cov_curve"], mode="lines", name="cov(r)"))
        f.add_hline(y=cov["coverage_at_k"], line_dash="dot", annotation_text=f"coverage@{cov['k']}")
        f.update_layout(title="Coverage curve: share of reference points within r of the dataset",
                        xaxis_title="r / r0", yaxis_title="cov(r)", yaxis_range=[0, 1.02], **layout)
        figs.append(("coverage_curve", f))

        f = go.Figure()
        f.add_trace(go.Histogram(x=arr["data_to_ref_distance"], nbinsx=60, name="dataset → reference", opacity=0.7))
        f.add_trace(go.Histogram(x=arr["ref_to_data_distance"], nbinsx=60, name="reference → dataset", opacity=0.7))
        f.update_layout(title="Nearest-neighbour distances between dataset and reference (units of r0; "
                              "reference → dataset distances beyond 4 r0 drawn at 4)",
                        barmode="overlay", xaxis_title="distance / r0", yaxis_title="points", **layout)
        figs.append(("distances", f))

    if plane_points is not None and "saco_paper" in num:
        figs.append(("plane", plane_figure(plane_points, highlight=name)))

    if "bc_entropy" in arr:
        f = go.Figure(go.Histogram(x=arr["bc_entropy"], nbinsx=50, marker_color="#b279a2"))
        f.update_layout(title="BC policy entropy per held-out state (tanh-Gaussian, nats)",
                        xaxis_title="entropy", yaxis_title="states", **layout)
        figs.append(("bc_entropy", f))

    counts, edges = np.histogram(np.asarray(ds.reward, dtype=np.float64), bins=60)
    f = go.Figure(go.Bar(x=0.5 * (edges[1:] + edges[:-1]), y=counts, marker_color="#54a24b"))
    f.update_layout(title="Per-step rewards", xaxis_title="reward", yaxis_title="steps", bargap=0, **layout)
    figs.append(("rewards", f))
    return figs


VARIANTS = (
    ("saco_paper", "SACo (paper)", "circle"),
    ("saco_grid", "SACo-grid", "square"),
    ("saco_h_pd", "SACo-H per dim", "diamond"),
    ("coverage", "Coverage@k", "triangle-up"),
)


def plane_figure(points: list[dict[str, Any]], highlight: str | None = None, title: str | None = None):
    """The TQ-SACo plane: one marker per dataset and SACo variant; saturated paper counts hollow and grey."""
    import plotly.graph_objects as go

    f = go.Figure()
    for key, label, symbol in VARIANTS:
        pts = [p for p in points if p.get(key) is not None and p.get("tq") is not None]
        if not pts:
            continue
        sat = [key in ("saco_paper", "saco_grid") and bool(p.get(f"{key}_saturated")) for p in pts]
        f.add_trace(go.Scatter(
            x=[p[key] for p in pts], y=[p["tq"] for p in pts], mode="markers+text", name=label,
            text=[p["name"] for p in pts], textposition="top center", textfont={"size": 10},
            marker={"symbol": [f"{symbol}-open" if s else symbol for s in sat], "size": [16 if p["name"] == highlight
                    else 11 for p in pts], "color": ["#aaaaaa" if s else None for s in sat] if any(sat) else None},
            hovertemplate="%{text}<br>" + label + " %{x:.3f}<br>TQ %{y:.3f}<extra></extra>",
        ))
    refs = sorted({p.get("reference", "") for p in points})
    f.update_layout(
        title=title or f"TQ-SACo plane (reference: {', '.join(refs)}; hollow grey = saturated count)",
        xaxis_title="SACo (relative to the reference)", yaxis_title="TQ", template="plotly_white", height=520,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
    )
    return f


def plane_point(name: str, numbers: dict[str, Any]) -> dict[str, Any]:
    """One dataset's row of the TQ-SACo plane (also a row of `compare`)."""
    return {
        "name": name,
        "reference": numbers["reference"]["id"],
        "reference_kind": numbers["reference"]["kind"],
        "tq": numbers["tq"]["tq"],
        "saco_paper": numbers["saco_paper"]["saco"],
        "saco_paper_saturated": numbers["saco_paper"]["saturated"],
        "saco_grid": numbers["saco_grid"]["saco"],
        "saco_grid_std": numbers["saco_grid"]["saco_std"],
        "saco_grid_saturated": numbers["saco_grid"]["saturated"],
        "saco_h_pd": numbers["saco_h"]["saco_h_pd"],
        "saco_h_pd_std": numbers["saco_h"]["saco_h_pd_std"],
        "delta_h": numbers["saco_h"]["delta_h"],
        "coverage": numbers["coverage"]["coverage_at_k"],
        "coverage_std": numbers["coverage"]["coverage_at_k_std"],
        "out_of_support": numbers["coverage"]["out_of_support"],
    }


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1300px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.v{font-family:ui-monospace,monospace;white-space:nowrap}
tr.greyed td{color:#999;background:#fafafa} .headline td{font-weight:600} .problems{color:#b00;font-weight:600}
.meta{color:#555} ul.rules li{margin:2px 0;color:#444} .fig{margin:12px 0}
"""


def _table(rows: list[tuple], header: tuple[str, ...], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="v">{html.escape(str(c))}</td>' if j == 1 else f"<td>{html.escape(str(c))}</td>"
                        for j, c in enumerate(r))
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _page(title: str, body: list[str], figures: list[tuple[str, Any]]) -> str:
    import plotly.io as pio

    divs = []
    for i, (key, fig) in enumerate(figures):
        divs.append(f'<div class="fig" id="fig-{key}">' + pio.to_html(
            fig, include_plotlyjs=(i == 0), full_html=False, div_id=f"plot-{key}",
            config={"displaylogo": False, "responsive": True},
        ) + "</div>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n<h2>Plots</h2>\n" + "\n".join(divs)
            + "\n</body></html>\n")


def render_html(report: Report, plane_points: list[dict[str, Any]] | None = None) -> str:
    """One self-contained HTML page: the TQ/SACo panel, diagnostics, settings and the plots."""
    from offlab import __version__

    s = report.summary()
    ds, ref = report.dataset, report.reference
    body = [f"<h1>Dataset quality: {html.escape(ds.card.name)}</h1>",
            f"<p class=\"meta\">env {html.escape(ds.card.env_id)} · {len(ds):,} transitions · {ds.n_episodes:,} "
            f"episodes · hash {html.escape(ds.card.content_hash)} · offlab {__version__} · computed in "
            f"{report.seconds:.1f} s</p>",
            f"<p><b>Reference:</b> {html.escape(ref.name)} ({html.escape(ref.kind)}; "
            f"{len(ref):,} rows from {html.escape(', '.join(ref.constituents))}). Compare SACo only across "
            f"datasets that share a reference.</p>"]
    if report.result.problems:
        body.append("<p class=\"problems\">Checks failed: " + html.escape("; ".join(report.result.problems)) + "</p>")
    body.append("<h2>TQ and SACo</h2>")
    rows = headline_rows(s)
    headline = s.get("headline")
    classes = []
    for r in rows:
        if r[3]:
            classes.append("greyed")
        elif (headline == "saco_h" and r[0].startswith(("SACo-H", "Coverage@"))) or (
                headline == "saco_grid" and r[0] == "SACo-grid") or r[0] == "TQ":
            classes.append("headline")
        else:
            classes.append("")
    body.append(_table([r[:3] for r in rows], ("measure", "value", "how"), classes))
    if "space" in s:
        sp = s["space"]
        body.append(f"<p class=\"meta\">(s, a) space: d = {sp['d']}, {sp['dims_dropped']} constant dims dropped, "
                    f"p = {sp['p']} principal axes ({_fmt(sp['pca_explained'], 3)} of the reference's variance), "
                    f"neighbours by {html.escape(sp['neighbours'])}; mean ± std over seeds {sp['seeds']}; "
                    f"reference entropies and radii: {html.escape(str(sp.get('reference_cache', 'computed')))}. "
                    f"Headline coverage measure: {html.escape(str(headline))}.</p>")
    body.append("<h2>Diagnostics</h2>")
    body.append(_table(diagnostic_rows(s), ("diagnostic", "value")))
    body.append("<h2>Subsampling and settings</h2><ul class=\"rules\">"
                + "".join(f"<li>{html.escape(r)}</li>" for r in s["settings"]["subsampling"]) + "</ul>")
    t = s["timing"]
    body.append("<p class=\"meta\">time (s): " + html.escape(", ".join(f"{k} {v:.1f}" for k, v in t.items())) + "</p>")
    return _page(f"offlab quality: {ds.card.name}", body, _figures(report, plane_points))


# ------------------------------------------------------------------------------------------ MLflow


def tracking_uri() -> str:
    """offlab.tracking's URI (MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db), its sqlite folder created."""
    from offlab import tracking

    uri = tracking.tracking_uri()
    db = tracking.sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def _experiment_id(client, uri: str) -> str:
    from offlab import tracking

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    root = tracking.artifact_root(uri)
    return client.create_experiment(EXPERIMENT, artifact_location=root.resolve().as_uri() if root else None)


def _dataset_input(ds: Dataset):
    import mlflow.data

    from offlab.data import store

    source = str(store.dataset_path(ds.card.name)) if store.exists(ds.card.name) else f"offlab:{ds.card.name}"
    with warnings.catch_warnings():  # MLflow warns that a local path could be two (equivalent) source types
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_numpy(
            features={"obs": ds.obs, "action": ds.action}, targets=ds.reward, source=source,
            name=ds.card.name, digest=(ds.card.content_hash or ds.content_hash())[:36],
        )


def log_report(report: Report, html_path: Path | None) -> str:
    """One run in experiment `datasets`: quality/* metrics, params, the HTML and JSON, the dataset input."""
    summary = report.summary()
    c = report.dataset.card
    tags = {"offlab.kind": "quality-report", "dataset": c.name, "dataset_hash": c.content_hash, "env": c.env_id,
            "reference": report.reference.name, "reference_kind": report.reference.kind}
    params = {"reference_id": report.reference.name, "reference_kind": report.reference.kind,
              "reference_constituents": ",".join(report.reference.constituents)[:500],
              "seeds": ",".join(map(str, report.cfg.seeds)), "entropy_k": report.cfg.entropy_k,
              "coverage_k": report.cfg.coverage_k, "pca_variance": report.cfg.pca_variance,
              "grid_bins": report.cfg.grid_bins, "p": summary.get("space", {}).get("p")}
    artifacts = {"quality.json": summary}
    return _log_run(f"quality-{c.name}", tags, params, metrics.flatten_metrics(report.result.numbers),
                    [html_path] if html_path else [], artifacts, [report.dataset])


def _log_run(run_name: str, tags: dict, params: dict, metric_values: dict[str, float], files: list[Path],
             dicts: dict[str, Any], inputs: list[Dataset]) -> str:
    try:
        import mlflow

        from offlab.tracking import quiet_client

        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        client = quiet_client(uri)
        exp_id = _experiment_id(client, uri)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
            mlflow.set_tags(tags)
            mlflow.log_params({k: v for k, v in params.items() if v is not None})
            mlflow.log_metrics(metric_values)
            for f in files:
                mlflow.log_artifact(str(f))
            for name, obj in dicts.items():
                mlflow.log_dict(obj, name)
            for ds in inputs:
                mlflow.log_input(_dataset_input(ds), context="quality")
            return run.info.run_id
    except OfflabError:
        raise
    except Exception as e:  # an unreachable or broken store: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"cannot log to MLflow at '{os.environ.get('MLFLOW_TRACKING_URI', 'mlflow/mlflow.db')}' ({msg}); "
            f"fix MLFLOW_TRACKING_URI or pass --no-mlflow"
        ) from None


def logged_plane_points(env_id: str, reference_id: str) -> list[dict[str, Any]]:
    """The latest logged report of every dataset of `env_id` measured against `reference_id` (for the plane)."""
    try:
        from offlab.tracking import quiet_client

        client = quiet_client(tracking_uri())
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return []
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.env = '{env_id}' and tags.reference = '{reference_id}' "
                          f"and tags.`offlab.kind` = 'quality-report'",
            order_by=["attributes.start_time DESC"], max_results=500,
        )
    except Exception:  # the plane is a convenience: no store, no extra points
        return []
    points, seen = [], set()
    for r in runs:
        name = r.data.tags.get("dataset")
        m = r.data.metrics
        if name in seen or "quality/tq" not in m:
            continue
        seen.add(name)
        points.append({"name": name, "reference": reference_id, "tq": m.get("quality/tq"),
                       "saco_paper": m.get("quality/saco"), "saco_grid": m.get("quality/saco_grid"),
                       "saco_paper_saturated": bool(m.get("quality/saco_paper/saturated", 0.0)),
                       "saco_grid_saturated": bool(m.get("quality/saco_grid/saturated", 0.0)),
                       "saco_h_pd": m.get("quality/saco_h_pd"), "coverage": m.get("quality/coverage")})
    return points


# ---------------------------------------------------------------------------------------- compare


@dataclass(repr=False)
class Comparison:
    """Rows of the TQ-SACo plane, the reference of each env, and the datasets compared."""

    rows: list[dict[str, Any]]
    references: dict[str, Reference]
    datasets: list[Dataset]

    def __repr__(self) -> str:
        return f"Comparison({[r['name'] for r in self.rows]}, references={list(self.references)})"


def compare(names: list[str], reference: str | None = None, cfg: QualityConfig | None = None) -> Comparison:
    """TQ and every SACo variant of each dataset; one reference per env, shared by that env's datasets."""
    cfg = cfg or dataclasses.replace(QualityConfig(), bc=False)
    if len(names) < 1:
        raise OfflabError("compare needs at least one dataset name, e.g. offlab data compare hopper-medium hopper-expert")
    datasets = [_load(n) for n in names]
    refs: dict[str, Reference] = {}
    rows = []
    for ds in datasets:
        metrics.require_rows(ds)
        env = ds.card.env_id
        if env not in refs:
            refs[env] = resolve_reference(ds, reference)
        ref = refs[env]
        metrics.check_reference(ds, ref)
        t = time.perf_counter()
        tq, _ = metrics.return_stats(ds, metrics.reference_scores(ds.card))
        cov, _ = metrics.coverage_measures(metrics.state_actions(ds), ref, cfg)
        cov.pop("_timing")
        numbers = {"tq": tq, **cov, "reference": ref.describe()}
        row = {"env": env, **plane_point(ds.card.name, numbers), "n_transitions": len(ds),
               "p": cov["space"]["p"], "seconds": time.perf_counter() - t}
        rows.append(_plain(row))
    return Comparison(rows, refs, datasets)


COMPARE_COLUMNS = ("name", "env", "reference", "tq", "saco_paper", "saco_grid", "saco_h_pd", "coverage",
                   "out_of_support", "n_transitions", "seconds")


def render_plane_html(comparison: Comparison) -> str:
    """The TQ-SACo plane per env, with the table of numbers."""
    rows, refs = comparison.rows, comparison.references
    body = ["<h1>TQ-SACo plane</h1>",
            "<p class=\"meta\">Schweighofer et al. (CoLLAs 2022): TQ = normalised mean return, SACo = unique "
            "state-action pairs relative to the reference. Paper-protocol counts that saturate (≥ 95% of rows in "
            "their own cell) are drawn hollow and grey; SACo-H (per dimension) and Coverage@k do not saturate.</p>"]
    for env, ref in refs.items():
        body.append(f"<p><b>{html.escape(env)}</b>: reference {html.escape(ref.name)} ({html.escape(ref.kind)}; "
                    f"from {html.escape(', '.join(ref.constituents))})</p>")
    table = []
    for r in rows:
        sat = " (saturated)" if r["saco_paper_saturated"] else ""
        table.append((r["name"], _fmt(r["tq"]), r["env"], r["reference"], _fmt(r["saco_paper"]) + sat,
                      _pm(r["saco_grid"], r["saco_grid_std"]), _pm(r["saco_h_pd"], r["saco_h_pd_std"]),
                      _pm(r["coverage"], r["coverage_std"]), _fmt(r["out_of_support"]), f"{r['seconds']:.1f}"))
    body.append(_table(table, ("dataset", "TQ", "env", "reference", "SACo (paper)", "SACo-grid", "SACo-H per dim",
                               "Coverage@k", "out-of-support", "seconds")))
    figs = [(f"plane-{i}", plane_figure([r for r in rows if r["env"] == env], title=f"{env}: TQ-SACo plane "
                                        f"(reference {ref.name}; hollow grey = saturated count)"))
            for i, (env, ref) in enumerate(refs.items())]
    return _page("offlab TQ-SACo plane", body, figs)


def log_compare(comparison: Comparison, html_path: Path | None) -> str:
    """One run in experiment `datasets` for a comparison: quality/<dataset>/* metrics and the plane."""
    rows, refs, datasets = comparison.rows, comparison.references, comparison.datasets
    values = {}
    for r in rows:
        for k in ("tq", "saco_paper", "saco_grid", "saco_h_pd", "coverage", "out_of_support"):
            if r.get(k) is not None:
                values[f"quality/{r['name']}/{k}"] = float(r[k])
    tags = {"offlab.kind": "quality-compare", "datasets": ",".join(r["name"] for r in rows)[:5000],
            "references": ",".join(ref.name for ref in refs.values())}
    return _log_run("quality-compare", tags, {"n_datasets": len(rows)}, values,
                    [html_path] if html_path else [], {"compare.json": {"rows": rows}}, datasets)
