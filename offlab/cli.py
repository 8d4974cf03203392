"""The `offlab` command line: parse arguments, call a library function, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from offlab.errors import OfflabError

app = typer.Typer(
    help="offlab: offline-RL datasets, quality reports, learners, off-policy evaluation, MLflow tracking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: list, get, build, import, export, inspect, delete.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

MINARI_SUFFIX = (".hdf5", ".h5", ".parquet", ".pq", ".csv")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


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
        table.add_row(k, str(v))
    console.print(table)


@data_app.command("get")
def data_get(
    name: str,
    no_download: bool = typer.Option(False, "--no-download", help="Do not try the Minari hub."),
    no_build: bool = typer.Option(False, "--no-build", help="Do not build from the shipped policies."),
):
    """Make a dataset available: local cache -> local Minari store -> Minari download -> build."""
    from offlab.data import registry

    ds = registry.get(name, download=not no_download, build=not no_build, progress=True)
    console.print(f"[green]{name}[/green]: {len(ds):,} transitions, {ds.n_episodes:,} episodes "
                  f"({ds.card.source.get('kind', '?')}), hash {ds.card.content_hash}")


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="A catalog name, e.g. hopper-medium."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Transitions (default: the recipe's, D4RL sizes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rollouts; same name, steps and seed -> same hash."),
    workers: int = typer.Option(2, "--workers", help="Worker processes (the result does not depend on it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild over an existing dataset."),
    as_name: Optional[str] = typer.Option(None, "--name", help="Store under another name (default: NAME)."),
):
    """Build a catalog dataset in the simulator from the shipped behaviour policies (rollouts only)."""
    import time

    from offlab.data import build

    t0 = time.perf_counter()
    ds = build.build_dataset(name, steps=steps, seed=seed, workers=workers, overwrite=overwrite, progress=True,
                             store_as=as_name)
    _print_built(ds, time.perf_counter() - t0)


@data_app.command("collect")
def data_collect(
    env: str = typer.Option(..., "--env", help="Gymnasium env id, e.g. Hopper-v5."),
    policy: str = typer.Option(..., "--policy", help="Shipped policy (hopper/expert), .safetensors, SB3 .zip, "
                               "or an MLflow model URI (runs:/<run_id>/policy)."),
    steps: int = typer.Option(..., "--steps", help="Transitions to collect."),
    name: str = typer.Option(..., "--name", help="Name to store the dataset under."),
    noise: float = typer.Option(0.0, "--noise", help="Gaussian exploration noise (std, in units of the action "
                                "half-range) added to the policy's mean action; 0 samples a stochastic policy."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Collect a dataset from any policy you have."""
    import time

    from offlab.data import build

    t0 = time.perf_counter()
    ds = build.collect(env, policy, steps, name, noise=noise, seed=seed, workers=workers, overwrite=overwrite,
                       progress=True)
    _print_built(ds, time.perf_counter() - t0)


def _print_built(ds, seconds: float) -> None:
    from offlab.envs.make import normalized_score

    returns = ds.episode_returns()
    line = (f"[green]{ds.card.name}[/green]: {len(ds):,} transitions, {ds.n_episodes:,} episodes, "
            f"mean return {returns.mean():.1f}")
    if ds.card.ref_min_score is not None:
        line += f" (normalised {float(normalized_score(returns.mean(), ds.card.ref_min_score, ds.card.ref_max_score)):.1f})"
    console.print(line + f", hash {ds.card.content_hash}, {seconds:.1f} s")


@data_app.command("import")
def data_import(
    source: str = typer.Argument(..., help="A Minari dataset id, or a .hdf5/.h5, .parquet or .csv file."),
    name: str = typer.Option(..., "--name", help="Name to store the dataset under."),
    env: Optional[str] = typer.Option(None, "--env", help="Gymnasium env id the data was logged in (files)."),
    column: list[str] = typer.Option(
        [], "--column", help="Map a field to your column: --column obs=state (fields: obs, next_obs, action, "
        "reward, terminated, truncated, episode, step, cost, behavior_logp). Flattened columns state_0..k work too."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
):
    """Import a Minari dataset or a log file into the store."""
    from offlab.data import file_io, minari_io

    path = Path(source)
    if path.suffix.lower() in MINARI_SUFFIX or path.exists():
        if env is None:
            raise OfflabError(f"importing '{source}' needs the env the data was logged in: add --env, e.g. --env Hopper-v5")
        mapping = {}
        for item in column:
            if "=" not in item:
                raise OfflabError(f"--column '{item}' must look like field=column, e.g. --column obs=state")
            k, v = item.split("=", 1)
            mapping[k.strip()] = v.strip()
        ds = file_io.import_file(path, name, env, columns=mapping, overwrite=overwrite)
    elif "/" in source or source.rsplit("-v", 1)[-1].isdigit():
        ds = minari_io.import_minari(source, name, download=True, overwrite=overwrite)
    else:
        raise OfflabError(
            f"'{source}' is neither an existing file nor a Minari dataset id (namespace/env/name-vN); check the path"
        )
    console.print(f"[green]{name}[/green]: imported {len(ds):,} transitions, {ds.n_episodes:,} episodes "
                  f"from {source}, hash {ds.card.content_hash}")
    if ds.card.notes:
        console.print(f"note: {ds.card.notes}")


@data_app.command("export")
def data_export(
    name: str,
    minari_id: str = typer.Option(..., "--minari", help="Minari dataset id to write, e.g. offlab/hopper/mine-v0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a Minari dataset with that id."),
):
    """Export a stored dataset to the local Minari store (minari.load_dataset reads it)."""
    from offlab.data import minari_io

    md = minari_io.export_minari(name, minari_id, overwrite=overwrite)
    console.print(f"[green]{minari_id}[/green]: {md.total_episodes:,} episodes, {md.total_steps:,} steps "
                  f"written to the local Minari store")


@data_app.command("delete")
def data_delete(
    name: str,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete a dataset from the local cache."""
    from offlab.data import store

    store.load_card(name)  # a clear error for unknown names before asking anything
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Delete dataset '{name}'?"):
        raise typer.Exit(1)
    store.delete_dataset(name)
    console.print(f"deleted {name}")


def main() -> None:
    try:
        app()
    except OfflabError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
