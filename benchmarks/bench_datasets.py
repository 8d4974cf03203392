"""Build every buildable catalog dataset at its D4RL size and report size, return, score and build time.

    python benchmarks/bench_datasets.py [--names hopper-medium,...] [--workers 2] [--out benchmarks/datasets.json]

Writes the JSON and prints a Markdown table (paste it into benchmarks/datasets.md), and draws the
shipped policies' training curves to benchmarks/behavior_training.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

# D4RL -v2 dataset scores (normalised mean episode return of the dataset itself), where known
D4RL_SCORES = {
    "hopper-random": 1.2, "hopper-medium": 44.3, "hopper-medium-replay": 14.9, "hopper-expert": 108.5,
    "hopper-medium-expert": 64.8, "halfcheetah-random": -0.3, "halfcheetah-medium": 40.7,
    "halfcheetah-medium-replay": 27.2, "halfcheetah-expert": 88.1, "halfcheetah-medium-expert": 64.3,
    "walker2d-random": 0.0, "walker2d-medium": 62.1, "walker2d-medium-replay": 14.8, "walker2d-expert": 106.7,
    "walker2d-medium-expert": 82.7,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", default="")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/datasets.json"))
    p.add_argument("--keep", action="store_true", help="keep the built datasets in OFFLAB_HOME")
    args = p.parse_args()
    os.environ.setdefault("OFFLAB_HOME", tempfile.mkdtemp(prefix="offlab-bench-"))
    from offlab.data import build, registry, store
    from offlab.envs.make import normalized_score

    names = args.names.split(",") if args.names else sorted(registry.catalog())
    rows = []
    for name in names:
        e = registry.entry(name)
        if not registry.buildable(e):
            rows.append({"name": name, "built": False})
            continue
        load = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        ds = build.build_dataset(name, workers=args.workers, overwrite=True)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        ret = ds.episode_returns()
        ends = (ds.terminated | ds.truncated)[np.r_[ds.episode_starts[1:] - 1, len(ds) - 1]]
        whole = ret[ends]  # episodes cut by a stream's budget are left out of the return statistics
        se = whole.std(ddof=1) / np.sqrt(len(whole))
        row = {
            "name": name, "built": True, "transitions": len(ds), "episodes": ds.n_episodes,
            "return_mean": float(whole.mean()), "return_se": float(se),
            "normalized_score": float(normalized_score(whole.mean(), e.ref_min_score, e.ref_max_score)),
            "normalized_se": float(100 * se / (e.ref_max_score - e.ref_min_score)),
            "d4rl_score": D4RL_SCORES.get(name), "build_seconds": round(seconds, 1),
            "build_cpu_seconds": round(cpu, 1), "load_before": round(load, 1), "workers": args.workers,
            "content_hash": ds.card.content_hash,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            store.delete_dataset(name)
    # rows of earlier runs (other --names) are kept; this run's rows replace theirs
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    merged = {r["name"]: r for r in old} | {r["name"]: r for r in rows}
    rows = [merged[n] for n in sorted(merged)]
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| dataset | transitions | episodes | mean return | normalised (± se) | D4RL | build s (wall) | "
          "build s (CPU, all processes) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["built"]:
            print(f"| {r['name']} | not buildable yet (no shipped policy) | | | | | | |")
            continue
        print(f"| {r['name']} | {r['transitions']:,} | {r['episodes']:,} | {r['return_mean']:.1f} | "
              f"{r['normalized_score']:.1f} ± {r['normalized_se']:.1f} | {r['d4rl_score']} | {r['build_seconds']} | "
              f"{r.get('build_cpu_seconds', '')} |")
    plot_curves()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the rollout workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def plot_curves() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offlab.paths import catalog_dir

    fig, ax = plt.subplots(figsize=(7, 4))
    for f in sorted((catalog_dir() / "policies").glob("*/training_curve.csv")):
        rows = [(int(r[0]), float(r[1])) for r in csv.reader(open(f))]
        ax.plot([s for s, _ in rows], [r for _, r in rows], label=f.parent.name)
    ax.set_xlabel("SAC environment steps")
    ax.set_ylabel("evaluation return (5 episodes, deterministic)")
    ax.set_title("offlab behaviour policies: SBX SAC training")
    ax.legend()
    fig.tight_layout()
    fig.savefig("benchmarks/behavior_training.png", dpi=110)


if __name__ == "__main__":
    main()
