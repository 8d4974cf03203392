"""Learning benchmark: offlab's learners on built D4RL-style datasets, curves and final scores (run by hand).

    python benchmarks/bench_learning.py run --dataset hopper-medium --algos td3bc,prdc,bc,iql --seeds 0,1 --steps 200000
    python benchmarks/bench_learning.py run --dataset halfcheetah-medium --algos prdc --seeds 0 --search ivf
    python benchmarks/bench_learning.py run --dataset hopper-medium --algos prdc --seeds 0 --threads 2 --label s22
    python benchmarks/bench_learning.py snapshot          # curves of unfinished runs as *.partial.csv
    python benchmarks/bench_learning.py report            # benchmarks/learning.md table + benchmarks/learning.png

Every (dataset, algo, seed) is one ordinary `offlab fit` run (paper defaults for the dataset, evaluation every
--eval-every steps with --eval-episodes episodes), tracked in the MLflow store of OFFLAB_BENCH_HOME
(default ~/.offlab-bench, outside the repo). A run that finished is skipped; one that was interrupted is resumed
with `offlab fit --resume` semantics, bit-exact, so the script can be killed and restarted at any time.
Each finished run's evaluation curve is copied to benchmarks/learning/<dataset>/<algo>-s<seed>.csv (small,
committed), which is all `report` reads. Runs use one torch thread unless --threads says otherwise (their curves
are saved as <algo>@t<n>); --label marks a rerun (<algo>@<label>) so that it does not replace the earlier curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CURVES = HERE / "learning"

# Published D4RL -v2 normalised scores (1M steps; mean over seeds), from the papers' tables (ALGORITHMS.md):
# BC and IQL from Kostrikov et al. 2022 (Table 1), TD3+BC from Fujimoto & Gu 2021 (Table 1),
# PRDC from Ran et al. 2023 (Table 1).
PUBLISHED = {
    "hopper-medium": {"bc": 52.9, "td3bc": 59.3, "iql": 66.3, "prdc": 100.3},
    "walker2d-medium": {"bc": 75.3, "td3bc": 83.7, "iql": 78.3, "prdc": 85.2},
    "halfcheetah-medium": {"bc": 42.6, "td3bc": 48.3, "iql": 47.4, "prdc": 63.5},
}


def bench_home() -> Path:
    home = Path(os.environ.get("OFFLAB_BENCH_HOME", Path.home() / ".offlab-bench"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def use_bench_stores() -> None:
    home = bench_home()
    os.environ.setdefault("OFFLAB_HOME", str(home))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    os.chdir(home)  # the local MLflow artifact folder lands here too


def find_run(dataset: str, algo: str, seed: int, steps: int, precision: str = "float32", search: str = "auto",
             threads: int = 1):
    from offlab import tracking

    client = tracking.Tracker().client  # opens a fresh store under its lock: seeds may start side by side
    exp = client.get_experiment_by_name(dataset)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.algo = '{algo}' and tags.seed = '{seed}' "
                                                   f"and params.steps = '{steps}'", order_by=["start_time DESC"])
    # runs from before RunConfig.precision existed have no such param: they ran in float32
    runs = [r for r in runs if r.data.params.get("precision", "float32") == precision
            and r.data.params.get("threads", "1") == str(threads)]
    if algo == "prdc":
        runs = [r for r in runs if r.data.params.get("algo.nn_search", "auto") == search]
    return runs[0] if runs else None


def save_curve(run_id: str, dataset: str, algo: str, seed: int, seconds: float | None, partial: bool = False) -> Path:
    from mlflow import MlflowClient

    client = MlflowClient()
    ret = {m.step: m.value for m in client.get_metric_history(run_id, "eval/return")}
    se = {m.step: m.value for m in client.get_metric_history(run_id, "eval/return_se")}
    score = {m.step: m.value for m in client.get_metric_history(run_id, "eval/normalized_score")}
    out = CURVES / dataset / f"{algo}-s{seed}{'.partial' if partial else ''}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "return", "return_se", "normalized_score"])
        for step in sorted(ret):
            w.writerow([step, f"{ret[step]:.2f}", f"{se.get(step, float('nan')):.2f}", f"{score.get(step, float('nan')):.2f}"])
    tmp.replace(out)
    if not partial:
        for stale in out.parent.glob(f"{algo}-s{seed}.partial.*"):
            stale.unlink()
    meta = out.with_suffix(".json")
    info = client.get_run(run_id)
    meta.write_text(json.dumps({"run_id": run_id, "dataset": dataset, "algo": algo, "seed": seed,
                                "dataset_hash": info.data.tags.get("dataset_hash"),
                                "git_commit": info.data.tags.get("git_commit"),
                                "cpu": info.data.tags.get("cpu"), "cpu_capability": info.data.tags.get("cpu_capability"),
                                "wall_seconds": seconds, "status": info.info.status,
                                "params": dict(info.data.params)}, indent=1, sort_keys=True))
    return out


def snapshot(args) -> None:
    """Curves of runs that have not finished yet, as <algo>-s<seed>.partial.csv (report shows them dashed)."""
    use_bench_stores()
    from mlflow import MlflowClient

    client = MlflowClient()
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            if r.info.status != "FINISHED":
                tags = r.data.tags
                print(save_curve(r.info.run_id, exp.name, tags["algo"], int(tags["seed"]), None, partial=True))


def run(args) -> None:
    use_bench_stores()
    from offlab.threads import openmp_defaults, openmp_for_training

    openmp_defaults()  # as `offlab fit` runs, before torch loads OpenMP (matters from two threads on)
    openmp_for_training()
    import torch

    from offlab import training
    from offlab.config import resolve_run
    from offlab.data import registry
    from offlab.errors import ConfigError

    torch.set_num_threads(args.threads)
    registry.get(args.dataset, progress=True)  # build it once, up front
    for seed in [int(s) for s in args.seeds.split(",")]:
        for algo in args.algos.split(","):
            search = args.search if algo == "prdc" else "auto"
            # the curve file's name: the learner, then what differs from its defaults
            label = algo + (f"@{args.precision}" if args.precision != "float32" else "") + (
                f"@{search}" if search != "auto" else "") + (f"@t{args.threads}" if args.threads != 1 else "") + (
                f"@{args.label}" if args.label else "")
            done = find_run(args.dataset, algo, seed, args.steps, args.precision, search, args.threads)
            t0 = time.time()
            if done is not None and done.info.status == "FINISHED":
                print(f"{label}-s{seed}: finished earlier ({done.info.run_id})", flush=True)
                save_curve(done.info.run_id, args.dataset, label, seed, None)
                continue
            result = None
            if done is not None:
                print(f"{label}-s{seed}: resuming {done.info.run_id}", flush=True)
                try:
                    result = training.resume(done.info.run_id, progress=False)
                except ConfigError as err:  # killed before its first checkpoint: start over (the newer run wins)
                    print(f"{label}-s{seed}: cannot resume ({err}); starting a new run", flush=True)
            if result is None:
                sets = [f"eval_every={args.eval_every}", f"eval_episodes={args.eval_episodes}", f"threads={args.threads}",
                        "checkpoint_every=10000", f"precision={args.precision}"]
                if search != "auto":
                    sets.append(f"nn_search={search}")
                cfg, _ = resolve_run(None, {"dataset": args.dataset, "algo": algo, "steps": args.steps, "seed": seed},
                                     sets)
                print(f"{label}-s{seed}: training {args.steps} steps on {args.dataset}", flush=True)
                result = training.fit(cfg, progress=False)
            if result.interrupted:
                return
            path = save_curve(result.run_id, args.dataset, label, seed, time.time() - t0)
            print(f"{label}-s{seed}: {result.final_eval} in {time.time() - t0:.0f} s -> {path}", flush=True)


PARTIAL: set[tuple[str, str, int]] = set()  # (dataset, algo, seed) read from a .partial.csv


def read_curves() -> dict[str, dict[str, dict[int, list[tuple[int, float, float]]]]]:
    out: dict = {}
    for f in sorted(CURVES.glob("*/*.csv")):
        stem = f.name.removesuffix(".csv")
        if stem.endswith(".partial"):
            if (f.parent / f"{stem.removesuffix('.partial')}.csv").exists():
                continue  # finished since
            stem = stem.removesuffix(".partial")
            PARTIAL.add((f.parent.name, *stem.rsplit("-s", 1)[:1], int(stem.rsplit("-s", 1)[1])))
        algo, seed = stem.rsplit("-s", 1)
        rows = [(int(r["step"]), float(r["normalized_score"]), float(r["return"])) for r in csv.DictReader(f.open())]
        out.setdefault(f.parent.name, {}).setdefault(algo, {})[int(seed)] = rows
    return out


def base_algo(label: str) -> str:
    """The learner behind a curve's label: td3bc for td3bc, td3bc@bf16 and d3rlpy-td3bc."""
    return label.split("@")[0].removeprefix("d3rlpy-")


def data_builds(dataset: str, algo: str, seeds) -> dict[int, str]:
    """Each finished seed's dataset content hash (from the run's .json beside its curve; '?' when missing)."""
    out = {}
    for seed in seeds:
        meta = CURVES / dataset / f"{algo}-s{seed}.json"
        out[seed] = (json.loads(meta.read_text()).get("dataset_hash") or "?") if meta.exists() else "?"
    return out


def report(args) -> None:
    import numpy as np

    curves = read_curves()
    mixed: list[str] = []  # rows whose seeds trained on different builds of the dataset
    lines = ["| dataset | learner | seeds | steps | final score (mean ± sd over seeds) | last-5-evals mean | "
             "best eval | published (1M steps) |", "|---|---|---|---|---|---|---|---|"]
    for dataset, algos in curves.items():
        for algo in ("bc", "td3bc", "iql", "prdc", *sorted(a for a in algos if "@" in a),
                     *sorted(a for a in algos if a.startswith("d3rlpy-"))):  # d3rlpy_learning.py's cross-checks
            if algo not in algos:
                continue
            runs = algos[algo]
            finals = [r[-1][1] for r in runs.values()]
            last5 = [np.mean([x[1] for x in r[-5:]]) for r in runs.values()]
            best = [max(x[1] for x in r) for r in runs.values()]
            steps = min(r[-1][0] for r in runs.values())
            sd = f" ± {np.std(finals, ddof=1):.1f}" if len(finals) > 1 else ""
            partial = sum((dataset, algo, seed) in PARTIAL for seed in runs)
            seeds = f"{len(runs)}" + (f" ({partial} unfinished)" if partial else "")
            builds = data_builds(dataset, algo, runs)
            if len(set(builds.values())) > 1:  # builds with other hashes (another simulator may mean other data)
                seeds += " †"
                mixed.append(f"{dataset} {algo}: " + ", ".join(f"s{s} on {h[:8]}" for s, h in sorted(builds.items())))
            lines.append(f"| {dataset} | {algo} | {seeds} | {steps:,} | {np.mean(finals):.1f}{sd} | "
                         f"{np.mean(last5):.1f} | {np.mean(best):.1f} | "
                         f"{PUBLISHED.get(dataset, {}).get(base_algo(algo), '-')} |")
    if mixed:
        lines += ["", "† seeds trained on builds with different content hashes (hopper-medium's two hold the same "
                  "transitions; their behaviour log-probs differ by float32 ulps, datasets.md):", *(f"- {m}" for m in mixed)]
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    colors = {"bc": "tab:gray", "td3bc": "tab:blue", "iql": "tab:green", "prdc": "tab:red"}
    for ax, (dataset, algos) in zip(axes[0], curves.items(), strict=True):
        for algo, runs in sorted(algos.items()):
            for i, (seed, rows) in enumerate(sorted(runs.items())):
                steps = [r[0] for r in rows]
                style = "-." if algo.startswith("d3rlpy-") else ":" if "@" in algo else "-" if i == 0 else "--"
                ax.plot(steps, [r[1] for r in rows], color=colors.get(base_algo(algo)), alpha=0.85, ls=style,
                        label=f"{algo} s{seed}")
            if algo in PUBLISHED.get(dataset, {}):
                ax.axhline(PUBLISHED[dataset][algo], color=colors.get(algo), lw=0.8, ls=":")
        ax.set_title(f"{dataset} (dotted: published at 1M steps)")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("D4RL-normalised score")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"figure: {args.png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", default="hopper-medium")
    r.add_argument("--algos", default="td3bc,prdc,bc,iql")
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--steps", type=int, default=200_000)
    r.add_argument("--eval-every", type=int, default=10_000)
    r.add_argument("--eval-episodes", type=int, default=10)
    r.add_argument("--precision", default="float32", help="float32, or bf16 (curves saved as <algo>@bf16-s<seed>)")
    r.add_argument("--search", default="auto", choices=("auto", "kdtree", "exact", "ivf"),
                   help="PRDC's nn_search (curves saved as prdc@<search>-s<seed> unless auto)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run (curves saved as <algo>@t<n> unless 1)")
    r.add_argument("--label", default="", help="a rerun's mark, e.g. s22: curves saved as <algo>@s22-s<seed>")
    r.set_defaults(fn=run)
    sub.add_parser("snapshot").set_defaults(fn=snapshot)
    s = sub.add_parser("report")
    s.add_argument("--png", type=Path, default=HERE / "learning.png")
    s.set_defaults(fn=report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
