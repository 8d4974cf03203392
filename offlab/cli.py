"""The `offlab` command line: parse arguments, call a library function, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from offlab.errors import OfflabError
from offlab.threads import openmp_defaults, openmp_for_training

# Idle OpenMP threads (faiss's, scikit-learn's, torch's) spin a while by default and take the core of a helper
# thread (a report's BC models); not spinning at all slows every multi-threaded training step. A short spin does
# both jobs; `offlab fit` spins longer, faster for training (`openmp_for_training`). It must be
# set before any OpenMP runtime loads (none has, up to here).
openmp_defaults()

app = typer.Typer(
    help="offlab: offline-RL datasets, quality reports, learners, off-policy evaluation, MLflow tracking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: list, get, build, import, export, inspect, delete.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console(stderr: bool = False) -> Console:
    """A console for offlab's output; in logs and pipes, lines and tables at 160 columns, not rich's 80.

    Soft wrap keeps a long line (a run id, a path) on one line; off a terminal, rich would otherwise cut
    tables to 80 columns and clip dataset names. `COLUMNS` still sets the width where given.
    """
    out = Console(stderr=stderr, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 160
    return out


console = _console()
err_console = _console(stderr=True)

MINARI_SUFFIX = (".hdf5", ".h5", ".parquet", ".pq", ".csv")

# click's exception classes, found through typer's public BadParameter (recent typer vendors its own click)
_CLICK = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
ClickException, UsageError = _CLICK["ClickException"], _CLICK["UsageError"]


def whole_number(value) -> int:
    """A count given as 200000, 200_000 or 2e5 (the forms --set and run files take for integer settings)."""
    if isinstance(value, int):
        return value
    from offlab.config import coerce
    from offlab.errors import ConfigError

    try:
        return coerce(value, int, "value")
    except ConfigError:
        raise typer.BadParameter(f"'{value}' is not a whole number (e.g. 200000, 200_000 or 2e5)") from None


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _show_progress(as_json: bool) -> bool:
    """Progress bars go to stderr, so `--json` keeps them where a person watches (a terminal), not in a log file."""
    return not as_json or err_console.is_terminal


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------- data


@data_app.command("list")
def data_list(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Catalog names and local datasets: where each comes from and whether it is on disk."""
    from offlab.data import registry as info

    rows = info.list_datasets()
    if as_json:
        print_json(rows)
        return
    table = Table(title="offlab datasets")
    for col in ("name", "env", "source", "on disk", "steps"):
        table.add_column(col, justify="right" if col == "steps" else "left")
    for r in rows:
        table.add_row(r["name"], r["env"] or "", r["source"], "yes" if r["on_disk"] else "no",
                      f"{r['n_steps']:,}" if r["n_steps"] else "")
    console.print(table)


@data_app.command("info")
def data_info(name: str, as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """A dataset's card and summary statistics (or its catalog entry when not on disk)."""
    from rich.markup import escape

    from offlab.data import registry as info

    summary = info.describe(name)
    if as_json:
        print_json(summary)
        return
    table = Table(show_header=False, title=f"dataset {name}")
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        table.add_row(k, escape(str(v)))
    console.print(table)


@data_app.command("get")
def data_get(
    name: str,
    no_download: bool = typer.Option(False, "--no-download", help="Do not try the Minari hub."),
    no_build: bool = typer.Option(False, "--no-build", help="Do not build from the shipped policies."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Make a dataset available: local cache -> local Minari store -> Minari download -> build."""
    from offlab.data import registry

    ds = registry.get(name, download=not no_download, build=not no_build, progress=True)
    if as_json:
        print_json(_dataset_result(ds))
        return
    console.print(f"[green]{name}[/green]: {len(ds):,} transitions, {ds.n_episodes:,} episodes "
                  f"({ds.card.source.get('kind', '?')}), hash {ds.card.content_hash}")


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="A catalog name, e.g. hopper-medium."),
    steps: int | None = typer.Option(None, "--steps", parser=whole_number, help="Transitions (default: the recipe's, D4RL sizes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rollouts; same name, steps and seed -> same hash."),
    workers: int = typer.Option(2, "--workers", help="Worker processes (the result does not depend on it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild over an existing dataset."),
    as_name: str | None = typer.Option(None, "--name", help="Store under another name (default: NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Build a catalog dataset in the simulator from the shipped behaviour policies (rollouts only)."""
    import time

    from offlab.data import build

    t0 = time.perf_counter()
    ds = build.build_dataset(name, steps=steps, seed=seed, workers=workers, overwrite=overwrite,
                             progress=True, store_as=as_name)
    _print_built(ds, time.perf_counter() - t0, as_json)


@data_app.command("collect")
def data_collect(
    env: str = typer.Option(..., "--env", help="Gymnasium env id, e.g. Hopper-v5."),
    policy: str = typer.Option(..., "--policy", help="Shipped policy (hopper/expert), .safetensors, SB3 .zip, "
                               "or an MLflow model URI (runs:/<run_id>/policy)."),
    steps: int = typer.Option(..., "--steps", parser=whole_number, help="Transitions to collect."),
    name: str = typer.Option(..., "--name", help="Name to store the dataset under."),
    noise: float = typer.Option(0.0, "--noise", help="Gaussian exploration noise (std, in units of the action "
                                "half-range) added to the policy's mean action; 0 samples a stochastic policy."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Collect a dataset from any policy you have."""
    import time

    from offlab.data import build

    t0 = time.perf_counter()
    ds = build.collect(env, policy, steps, name, noise=noise, seed=seed, workers=workers, overwrite=overwrite,
                       progress=True)
    _print_built(ds, time.perf_counter() - t0, as_json)


def _dataset_result(ds, **extra) -> dict:
    """What the data commands print about the dataset they made available, for `--json` (stable keys)."""
    from offlab.data import store
    from offlab.envs.make import normalized_score

    returns = ds.episode_returns()
    mean = float(returns.mean()) if len(returns) else None
    score = None
    if mean is not None and ds.card.ref_min_score is not None and ds.card.ref_max_score is not None:
        score = float(normalized_score(mean, ds.card.ref_min_score, ds.card.ref_max_score))
    return {"name": ds.card.name, "env": ds.card.env_id, "n_steps": len(ds), "n_episodes": ds.n_episodes,
            "return_mean": mean, "normalized_score": score, "content_hash": ds.card.content_hash,
            "source": ds.card.source.get("kind"), "path": str(store.dataset_path(ds.card.name)), **extra}


def _print_built(ds, seconds: float, as_json: bool = False) -> None:
    r = _dataset_result(ds, seconds=round(seconds, 3))
    if as_json:
        print_json(r)
        return
    line = (f"[green]{r['name']}[/green]: {r['n_steps']:,} transitions, {r['n_episodes']:,} episodes, "
            f"mean return {r['return_mean']:.1f}")
    if r["normalized_score"] is not None:
        line += f" (normalised {r['normalized_score']:.1f})"
    console.print(line + f", hash {r['content_hash']}, {seconds:.1f} s")


@data_app.command("import")
def data_import(
    source: str = typer.Argument(..., help="A Minari dataset id, or a .hdf5/.h5, .parquet or .csv file."),
    name: str = typer.Option(..., "--name", help="Name to store the dataset under."),
    env: str | None = typer.Option(None, "--env", help="Gymnasium env id the data was logged in (files)."),
    column: list[str] = typer.Option(
        [], "--column", help="Map a field to your column: --column obs=state (fields: obs, next_obs, action, "
        "reward, terminated, truncated, episode, step, cost, behavior_logp). Flattened columns state_0..k work too."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Import a Minari dataset or a log file into the store."""
    from offlab.data import file_io, minari_io
    from offlab.errors import SourceUnavailable

    path = Path(source)
    if path.suffix.lower() in MINARI_SUFFIX or path.exists():
        if not path.exists():
            raise SourceUnavailable(f"file '{source}' does not exist; check the path")
        if env is None:
            raise OfflabError(f"importing '{source}' needs the env the data was logged in: add --env, e.g. --env Hopper-v5")
        mapping = {}
        for item in column:
            if "=" not in item:
                raise OfflabError(f"--column '{item}' must look like field=column, e.g. --column obs=state")
            k, v = item.split("=", 1)
            mapping[k.strip()] = v.strip()
        ds = file_io.import_file(path, name, env, columns=mapping, overwrite=overwrite)
    elif minari_io.looks_like_minari_id(source):
        ds = minari_io.import_minari(source, name, download=True, overwrite=overwrite)
    else:
        raise OfflabError(
            f"'{source}' is neither an existing file nor a Minari dataset id (namespace/env/name-vN); check the path"
        )
    if as_json:
        print_json(_dataset_result(ds, imported_from=source, notes=ds.card.notes))
        return
    console.print(f"[green]{name}[/green]: imported {len(ds):,} transitions, {ds.n_episodes:,} episodes "
                  f"from {source}, hash {ds.card.content_hash}")
    if ds.card.notes:
        console.print(f"note: {ds.card.notes}", markup=False, highlight=False)


@data_app.command("export")
def data_export(
    name: str,
    minari_id: str = typer.Option(..., "--minari", help="Minari dataset id to write, e.g. offlab/hopper/mine-v0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a Minari dataset with that id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Export a stored dataset to the local Minari store (minari.load_dataset reads it)."""
    from offlab.data import minari_io

    md = minari_io.export_minari(name, minari_id, overwrite=overwrite)
    if as_json:
        print_json({"name": name, "minari_id": minari_id, "n_episodes": int(md.total_episodes),
                    "n_steps": int(md.total_steps)})
        return
    console.print(f"[green]{minari_id}[/green]: {md.total_episodes:,} episodes, {md.total_steps:,} steps "
                  f"written to the local Minari store")


@data_app.command("delete")
def data_delete(
    name: str,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Delete a dataset from the local cache."""
    from offlab.data import store

    store.load_card(name)  # a clear error for unknown names before asking anything
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Delete dataset '{name}'?"):
        raise typer.Exit(1)
    store.delete_dataset(name)
    if as_json:
        print_json({"deleted": name})
        return
    console.print(f"deleted {name}")


# ----------------------------------------------------------------------------------------- training


@app.command("fit")
def fit_cmd(
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name, e.g. hopper-medium."),
    algo: str | None = typer.Option(None, "--algo", help="Learner name (see `offlab algos`)."),
    steps: int | None = typer.Option(None, "--steps", parser=whole_number, help="Offline gradient steps (default 1,000,000)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of everything random (default 0)."),
    sets: list[str] = typer.Option([], "--set", help="Override a setting: --set actor_lr=1e-4 (repeatable)."),
    eval_every: int | None = typer.Option(None, "--eval-every", parser=whole_number, help="Evaluate every N steps (default 10,000)."),
    eval_episodes: int | None = typer.Option(None, "--eval-episodes", parser=whole_number, help="Episodes per evaluation (default 10)."),
    online_steps: int | None = typer.Option(None, "--online-steps", parser=whole_number, help="Online fine-tuning env steps after the offline phase."),
    config: Path | None = typer.Option(None, "--config", help="A run file (YAML); --set and flags override it."),
    resume: str | None = typer.Option(None, "--resume", help="Continue the run with this MLflow run id."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    precision: str | None = typer.Option(None, "--precision", help="float32 (default) or bf16 mixed precision "
                                         "(faster on CPUs with AVX512-BF16/AMX and recent GPUs; numbers differ)."),
    ope: str | None = typer.Option(None, "--ope", help="Estimate the final policy's value off-policy, e.g. "
                                   "--ope fqe,mb (logged as ope/<estimator>; see `offlab ope`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (the progress bar stays on a "
                                 "terminal's stderr)."),
):
    """Train a learner on a dataset, tracked in MLflow (see `offlab algos` for learners and settings)."""
    openmp_for_training()  # before torch loads: a longer spin, faster for training than the short one
    from offlab import training
    from offlab.config import resolve_run

    def announce(run_id: str) -> None:
        if not as_json:
            err_console.print(f"run [bold]{run_id}[/bold]; resume with `offlab fit --resume {run_id}`", highlight=False)

    if resume:
        given = {"--algo": algo, "--steps": steps, "--seed": seed, "--eval-every": eval_every,
                 "--eval-episodes": eval_episodes, "--online-steps": online_steps, "--config": config, "--ope": ope,
                 "--precision": precision}
        extra = [k for k, v in given.items() if v is not None] + (["--set"] if sets else [])
        if extra:
            raise OfflabError(f"--resume keeps the run's own config; drop {', '.join(extra)} (only --dataset and "
                              f"--device may accompany it)")
        result = training.resume(resume, dataset=dataset, device=device, progress=_show_progress(as_json),
                                 on_start=announce)
    else:
        flags = {"dataset": dataset, "algo": algo, "steps": steps, "seed": seed, "eval_every": eval_every,
                 "eval_episodes": eval_episodes, "online_steps": online_steps, "device": device, "ope": ope, "precision": precision}
        run, _ = resolve_run(config, flags, sets)
        result = training.fit(run, progress=_show_progress(as_json), on_start=announce)
    if as_json:
        print_json(result.to_dict())
    else:
        ev = result.final_eval or {}
        score = ev.get("normalized_score")
        shown = (f"normalised score {score:.1f}" if score is not None else
                 f"return {ev['return']:.1f}" if ev.get("return") is not None else "no evaluation")
        if result.interrupted:
            console.print(f"stopped at step {result.step:,}/{result.total_steps:,}; checkpoint {result.checkpoint}; "
                          f"resume with `offlab fit --resume {result.run_id}`")
        else:
            console.print(f"[green]{result.run_name}[/green] on {result.dataset}: {result.step:,} steps, {shown}; "
                          f"run {result.run_id} in {result.tracking_uri} (`offlab ui` to browse)")
            for name, est in (result.ope or {}).items():
                norm = est.get("normalized")
                lo, hi = est["ci"]
                console.print(f"  ope/{name}: {est['value']:.2f} [{lo:.2f}, {hi:.2f}]"
                              + (f", normalised {norm:.1f}" if norm is not None else ""))
    if result.interrupted:  # the stop was reported above: no "interrupted" line from main()
        sys.exit(130)


@app.command("algos")
def algos_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Learners, their settings and defaults, and the paper's per-dataset overrides."""
    from offlab.algos import ALGOS
    from offlab.config import describe_settings, family_overrides
    from offlab.data import registry

    names = sorted(registry.catalog())
    rows = []
    for name in sorted(ALGOS):
        cls = ALGOS[name]
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        rows.append({"name": name, "summary": doc[0] if doc else "", "settings": describe_settings(cls.Config),
                     "overrides": family_overrides(cls, names)})
    if as_json:
        print_json(rows)
        return
    from rich.markup import escape

    for row in rows:
        table = Table(title=f"[bold]{row['name']}[/bold]: {escape(row['summary'])}", title_justify="left")
        for col in ("setting", "type", "default", "range", "description"):
            table.add_column(col, no_wrap=col == "range")
        for s in row["settings"]:
            table.add_row(s["name"], escape(s["type"]), escape(str(s["default"])), escape(s["range"]), escape(s["doc"]))
        console.print(table)
        for pattern, over in row["overrides"].items():
            console.print(f"  paper overrides for {pattern}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
    console.print("Change a setting with `offlab fit ... --set name=value`; run settings: `offlab fit --help`.")


@app.command("compare")
def compare_cmd(
    dataset: str = typer.Option(..., "--dataset", help="Dataset whose runs to compare."),
    metric: str = typer.Option("eval/normalized_score", "--metric", help="Metric to compare."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Runs of one dataset side by side from MLflow: final and best value of a metric."""
    from offlab import tracking

    rows = tracking.compare_runs(dataset, metric)
    if as_json:
        print_json(rows)
        return
    builds = {r["dataset_hash"] for r in rows if r["dataset_hash"]}
    mixed = len(builds) > 1  # the name was rebuilt (e.g. under another simulator version) between runs
    table = Table(title=f"{dataset}: {metric}")
    # the step of the final value, when it is not where every run stopped (a run cut short, a metric logged early)
    at_step = any(r["steps"] != r["trained_steps"] for r in rows)
    numeric = ("trained", "final", "at step", "best")
    for col in ("run", "run id", "algo", "seed", "trained", "status", "final", *(["at step"] if at_step else []),
                "best", *(["data"] if mixed else [])):
        table.add_column(col, justify="right" if col in numeric else "left")
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}"  # noqa: E731
    for r in sorted(rows, key=lambda r: -(r["final"] if r["final"] is not None else float("-inf"))):
        cells = [r["run"], r["run_id"], r["algo"], str(r["seed"]), fmt(r["trained_steps"]), r["status"],
                 fmt(r["final"]), *([fmt(r["steps"])] if at_step else []), fmt(r["best"])]
        if mixed:
            cells.append((r["dataset_hash"] or "?")[:8])
        table.add_row(*cells)
    console.print(table)
    if mixed:
        console.print(f"[yellow]note:[/] these runs trained on {len(builds)} different builds of '{dataset}' "
                      f"(column 'data': content hash); scores of different builds are on different data")


@app.command("ui")
def ui_cmd(
    port: int = typer.Option(5000, "--port", help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
):
    """Open the MLflow UI on the local store (./mlflow, or MLFLOW_TRACKING_URI's sqlite file)."""
    import os
    import subprocess

    from offlab import tracking

    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        console.print(f"runs are on the tracking server {uri}: open it in a browser")
        return
    cmd = tracking.ui_command(port, host, uri)
    if dry_run:
        sys.stdout.write(" ".join(cmd) + "\n")
        return
    tracking.check_reachable(uri)
    console.print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    try:
        subprocess.run(cmd, env=env, check=False)
    except KeyboardInterrupt:
        pass


@data_app.command("report")
def data_report(
    name: str,
    reference: str | None = typer.Option(
        None, "--reference", help="Dataset to measure SACo/coverage against, or 'pooled' (default: the env's "
        "replay buffer, else its medium-replay, else every local dataset of the env pooled)."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default: <name>-quality.html)."),
    as_json: bool = typer.Option(False, "--json", help="Print every number as JSON for scripts."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log the report to MLflow."),
):
    """Dataset quality: TQ, SACo (paper protocol + offlab's coverage measures), diagnostics, HTML plots."""
    from offlab.data import report as qr

    out = qr.check_writable(out or Path(f"{name}-quality.html"))
    if not as_json:
        err_console.print(f"computing the quality of [bold]{name}[/bold] ...", highlight=False)
    report = qr.build_report(name, reference)
    summary = report.summary()
    points = [] if no_mlflow else [p for p in qr.logged_plane_points(report.dataset.card.env_id, report.reference.name)
                                   if p["name"] != name]
    qr.write_text_atomic(out, qr.render_html(report, points + [qr.plane_point(name, summary)]))
    summary["html"] = str(out.resolve())
    summary["mlflow_run_id"] = None if no_mlflow else qr.log_report(report, out)
    if as_json:
        print_json(summary)
    else:
        ref = report.reference
        console.print(f"[bold]{name}[/bold] ({report.dataset.card.env_id}, {len(report.dataset):,} transitions, "
                      f"{report.dataset.n_episodes:,} episodes)")
        console.print(f"reference: [bold]{ref.name}[/bold] ({ref.kind}; from {', '.join(ref.constituents)})",
                      highlight=False)
        table = Table(title="TQ and SACo")
        for col in ("measure", "value", "how"):
            table.add_column(col)
        for measure, value, how, greyed in qr.headline_rows(summary):
            style = "dim" if greyed else None
            table.add_row(measure, value, how, style=style)
        console.print(table)
        diag = Table(title="diagnostics")
        diag.add_column("diagnostic")
        diag.add_column("value")
        for k, v in qr.diagnostic_rows(summary):
            diag.add_row(k, v)
        console.print(diag)
        for rule in summary["settings"]["subsampling"]:
            console.print(f"  · {rule}", highlight=False, style="dim")
        if summary["problems"]:
            console.print("[red]checks failed:[/red] " + "; ".join(summary["problems"]))
        console.print(f"report: {out} ({report.seconds:.1f} s)"
                      + (f"; MLflow run {summary['mlflow_run_id']} in experiment 'datasets'" if not no_mlflow else ""))
    if summary["problems"]:
        raise typer.Exit(1)


@data_app.command("compare")
def data_compare(
    names: list[str] = typer.Argument(..., help="Datasets to place on the TQ-SACo plane."),
    reference: str | None = typer.Option(None, "--reference", help="Reference for every env (default as in report)."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default: quality-plane.html)."),
    as_json: bool = typer.Option(False, "--json", help="Print every number as JSON for scripts."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log the comparison to MLflow."),
):
    """The TQ-SACo plane of several datasets (Schweighofer et al.'s figure): a table and a scatter plot."""
    from offlab.data import report as qr

    out = qr.check_writable(out or Path("quality-plane.html"))
    comparison = qr.compare(list(names), reference)
    qr.write_text_atomic(out, qr.render_plane_html(comparison))
    run_id = None if no_mlflow else qr.log_compare(comparison, out)
    if as_json:
        print_json({"rows": comparison.rows, "references": {e: r.describe() for e, r in comparison.references.items()},
                    "html": str(out.resolve()), "mlflow_run_id": run_id})
        return
    for env, ref in comparison.references.items():
        console.print(f"{env}: reference [bold]{ref.name}[/bold] ({ref.kind}; from {', '.join(ref.constituents)})",
                      highlight=False)
    table = Table(title="TQ-SACo plane", caption="means over seeds; their stds are in --json and the HTML")
    for col in ("dataset", "TQ", "SACo paper", "SACo-grid", "SACo-H/dim", "Cov@k", "out-of-supp."):
        table.add_column(col, justify="left" if col == "dataset" else "right", no_wrap=True)
    for r in comparison.rows:
        paper = f"{r['saco_paper']:.3f}" + (" sat." if r["saco_paper_saturated"] else "")
        tq = "–" if r["tq"] is None else f"{r['tq']:.3f}"
        table.add_row(r["name"], tq, paper, f"{r['saco_grid']:.3f}", f"{r['saco_h_pd']:.3f}",
                      f"{r['coverage']:.3f}", f"{r['out_of_support']:.3f}")
    console.print(table)
    console.print(f"plane: {out}" + (f"; MLflow run {run_id} in experiment 'datasets'" if run_id else ""))


# ----------------------------------------------------------------------------------------- off-policy evaluation


@app.command("ope")
def ope_cmd(
    target: str | None = typer.Argument(None, help="An MLflow run id (its policy on its dataset), or 'validate'."),
    suite: str | None = typer.Argument(None, help="With 'validate': an evaluators/*.yaml suite file."),
    policy: str | None = typer.Option(None, "--policy", help="Instead of a run: an MLflow model URI (runs:/<id>/policy), "
                                      "a shipped policy (hopper/medium), an actor .safetensors file, or 'uniform'."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset to evaluate on (default: the run's)."),
    estimators: str = typer.Option("fqe,is,wis,pdis,wpdis,dr,wdr,mb", "--estimators",
                                   help="Comma-separated: fqe, is, wis, pdis, wpdis, wpdis_alive, dr, wdr, mb."),
    gamma: float = typer.Option(0.995, "--gamma", help="Discount of the estimated value V_gamma."),
    mode: str = typer.Option("auto", "--mode", help="auto, stochastic, smoothed, kernel or deterministic "
                             "(auto: sampled if the policy is stochastic, else smoothed with --sigma)."),
    sigma: float = typer.Option(0.1, "--sigma", help="Gaussian smoothing std (or kernel bandwidth) of a "
                                "deterministic policy, on the [-1, 1] action scale."),
    behavior: str = typer.Option("auto", "--behavior", help="Behaviour log-probs: auto (logged, else a fitted "
                                 "BC density), logged, or fit."),
    fqe_updates: int | None = typer.Option(None, "--fqe-updates", parser=whole_number, help="FQE gradient steps (default 250,000)."),
    mb_updates: int | None = typer.Option(None, "--mb-updates", parser=whole_number, help="Dynamics-model gradient steps (default 20,000)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", parser=whole_number, help="Bootstrap resamples of the confidence intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of every fit and resample."),
    out: Path | None = typer.Option(None, "--out", help="validate: write the HTML report here (e.g. ope.html)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log to MLflow (the run's ope/* metrics; validate: "
                             "a parent run with the DOPE metrics)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (the progress bar stays on a "
                                 "terminal's stderr)."),
):
    """Off-policy evaluation: `offlab ope RUN_ID`, `offlab ope --policy URI --dataset NAME`, or
    `offlab ope validate evaluators/hopper-medium.yaml [--out ope.html]` (every estimator vs simulator truth)."""
    from offlab.evaluation.ope.runner import parse_estimators

    if target == "validate":
        if suite is None:
            raise OfflabError("`offlab ope validate` needs a suite file, e.g. offlab ope validate evaluators/hopper-medium.yaml")
        _ope_validate(suite, out, log, as_json)
        return
    if suite is not None:
        raise OfflabError(f"unexpected argument '{suite}'; give one run id, or `validate FILE`")
    if target is None and policy is None:
        raise OfflabError("give a run id (offlab ope RUN_ID), a policy (--policy URI --dataset NAME) or "
                          "`validate FILE`")
    if target is not None and policy is not None:
        raise OfflabError("give either a run id or --policy, not both")
    names = parse_estimators(estimators)  # a bad name fails before anything loads
    from offlab.evaluation.ope import runner as ope

    run_id = None
    if target is not None:
        from offlab.tracking import Tracker

        run = Tracker().get_run(target)
        run_id = target
        dataset = dataset or run.data.tags.get("dataset")
        if not dataset:
            raise OfflabError(f"run {target} records no dataset; pass --dataset NAME")
        policy = f"runs:/{target}/policy"
    elif dataset is None:
        raise OfflabError("--policy needs --dataset NAME (the data to evaluate it on)")
    fqe_cfg, mb_cfg, _ = ope.estimator_configs(seed, fqe_updates, mb_updates)
    result = ope.estimate(policy, dataset, names, gamma=gamma, mode=mode, sigma=sigma, behavior=behavior,
                          fqe=fqe_cfg, mb=mb_cfg, bootstrap=bootstrap, seed=seed, progress=_show_progress(as_json))
    if run_id is not None and log:
        ope.log_estimates(run_id, result)
        result["logged_to_run"] = run_id
    if as_json:
        print_json(result)
        return
    _print_ope(result)


def _print_ope(result: dict) -> None:
    pol = result["policy"]
    table = Table(title=f"OPE of {pol['name']} on {result['dataset']['name']}")
    for col in ("estimator", "V_gamma", "95% CI", "normalised", "norm. CI", "ESS", "flags", "seconds"):
        table.add_column(col, justify="left" if col in ("estimator", "flags") else "right")
    for name, r in result["estimates"].items():
        norm = r.get("normalized")
        nci = r.get("normalized_ci") or [None, None]
        flags = ["unreliable"] if r.get("unreliable") else []
        if "undiscounted" in r:
            flags.append(f"undiscounted {r['undiscounted']:.1f}" + (
                f" (score {r['undiscounted_normalized']:.1f})" if r.get("undiscounted_normalized") is not None else ""))
        table.add_row(name, f"{r['value']:.3f}", f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                      "" if norm is None else f"{norm:.1f}",
                      "" if nci[0] is None else f"[{nci[0]:.1f}, {nci[1]:.1f}]",
                      f"{r['ess']:.1f}" if "ess" in r else "", "; ".join(flags), f"{r.get('seconds', 0):.1f}")
    console.print(table)
    console.print(f"target: {result['target']}", highlight=False)
    if pol.get("note"):
        console.print(f"note: {pol['note']}", highlight=False)
    norm = result.get("normalization") or {}
    if "formula" in norm:
        console.print(f"normalised: {norm['formula']}; V_gamma(random) = {norm['random']:.3f} ({norm['random_source']}), "
                      f"V_gamma(expert) = {norm['expert']:.3f} ({norm['expert_source']})", highlight=False)
    elif norm.get("note"):
        console.print(f"normalised: {norm['note']}", highlight=False)
    if result.get("behavior"):
        console.print(f"behaviour log-probs: {result['behavior']['source']}", highlight=False)
    if result.get("logged_to_run"):
        console.print(f"logged as ope/<estimator> to run {result['logged_to_run']}")


def _ope_validate(suite: str, out: Path | None, log: bool, as_json: bool) -> None:
    from offlab.evaluation.ope.validate import load_suite, metrics_table_rows, validate_suite

    parsed = load_suite(suite)  # one-line ConfigError for a file that does not parse
    say = None if as_json else (lambda msg: err_console.print(msg, highlight=False))
    report = validate_suite(parsed, out_html=out, log=log, progress=_show_progress(as_json), echo=say)
    if as_json:
        print_json(report)
        return
    table = Table(title=f"OPE vs simulator truth: {report['suite']} ({len(report['policies'])} policies, "
                        f"gamma {report['gamma']})")
    for col in ("estimator", "AbsErr", "Spearman", "Kendall", "Regret@1", "Regret@5", "CI cover", "unreliable", "s/policy"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    for r in metrics_table_rows(report):
        table.add_row(r["estimator"], f"{r['abs_err']:.3f} ± {r['abs_err_std']:.3f}",
                      f"{r['spearman']:.3f} ± {r['spearman_std']:.3f}", f"{r['kendall']:.3f}", f"{r['regret@1']:.3f}",
                      f"{r['regret@5']:.3f}", f"{r['ci_coverage']:.2f}", f"{r['unreliable']:.2f}", f"{r['seconds']:.1f}")
    console.print(table)
    if report.get("html"):
        console.print(f"report: {report['html']}")
    if report.get("mlflow_run_id"):
        console.print(f"logged to MLflow run {report['mlflow_run_id']}")


def main() -> None:
    from rich.markup import escape

    try:
        code = app(standalone_mode=False, prog_name="offlab")  # usage errors come back here, printed below
    except OfflabError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ClickException as e:  # a mistyped flag or value: one line and the way to the help
        message = e.format_message()
        if message:  # (empty when a bare `offlab` or `offlab data` has just printed its help)
            ctx = getattr(e, "ctx", None) if isinstance(e, UsageError) else None
            where = ctx.command_path if ctx is not None else "offlab"
            err_console.print(f"[red]error:[/red] {escape(message.rstrip('.'))}; see `{where} --help`", highlight=False,
                              soft_wrap=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    if code == 130:  # typer returns Ctrl-C in a command (KeyboardInterrupt) as exit code 130
        err_console.print("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
