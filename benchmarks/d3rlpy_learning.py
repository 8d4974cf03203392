"""d3rlpy 2.8.1's TD3+BC on an offlab dataset, evaluated by offlab in the same simulator (run by hand).

A cross-check of offlab's learners against an independent implementation on the very same data: when an
offlab curve does something the paper does not report (walker2d-medium's TD3+BC critic diverging after
160k steps, benchmarks/learning.md), the same learner from d3rlpy on the same transitions says whether it
is the data or offlab.

    . .venv/bin/activate
    OFFLAB_BENCH_HOME=~/.offlab-bench python benchmarks/d3rlpy_learning.py run --dataset walker2d-medium \\
        --algo td3bc --seed 0 --steps 200000          # trains in the d3rlpy venv, then evaluates here
    python benchmarks/d3rlpy_learning.py evaluate --dataset walker2d-medium --algo td3bc --seed 0

Three steps, resumable by re-running `run`:
1. `export` (offlab venv): the dataset's columns as an .npz under OFFLAB_BENCH_HOME/d3rlpy/.
2. `train` (d3rlpy venv, /work/d3rlpy-venv by default; d3rlpy is never an offlab dependency): d3rlpy's own
   `fitter` with the paper's settings (as benchmarks/_d3rlpy_worker.py), one torch thread; every
   `--every` steps it saves the policy as TorchScript (`save_policy`, observation scaler included), the
   mean Q1(s, pi(s)) over 10,000 fixed dataset states and d3rlpy's loss means.
3. `evaluate` (offlab venv): each saved policy in the real simulator with offlab's evaluator, the episodes
   and seeds offlab's own runs use (10 episodes, deterministic actions), into
   benchmarks/learning/<dataset>/d3rlpy-<algo>-s<seed>.csv, the columns of offlab's curves plus q_mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_learning import CURVES, bench_home  # stdlib-only: importable from the d3rlpy venv too


def work_dir(dataset: str, algo: str, seed: int) -> Path:
    return bench_home() / "d3rlpy" / f"{dataset}-{algo}-s{seed}"


# ------------------------------------------------------------------------------ offlab venv


def export(dataset: str) -> Path:
    import numpy as np

    from offlab import paths
    from offlab.data import registry

    out = bench_home() / "d3rlpy" / f"{dataset}.npz"
    if out.is_file():
        return out
    ds = registry.get(dataset, progress=True)
    with paths.atomic_write(out) as f:
        np.savez(f, obs=ds.obs, action=ds.action, reward=ds.reward, terminated=ds.terminated, timeouts=ds.truncated)
    return out


def evaluate(args) -> Path:
    import numpy as np
    import torch

    from offlab.data import registry
    from offlab.evaluation.online import Evaluator

    torch.set_num_threads(1)
    card = registry.get(args.dataset, progress=False).card
    ref_min, ref_max = registry.score_range(args.dataset, card)  # as offlab's training loop finds them
    folder = work_dir(args.dataset, args.algo, args.seed)
    log = {int(r["step"]): r for r in csv.DictReader((folder / "train.csv").open())}
    evaluator = Evaluator(card.env_id, args.episodes, args.seed, dict(card.env_kwargs or {}), ref_min, ref_max)
    rows = []
    for step in sorted(log):
        policy = torch.jit.load(str(folder / f"policy-{step}.pt"))

        def act(obs, policy=policy):
            with torch.no_grad():
                return policy(torch.as_tensor(np.asarray(obs, dtype=np.float32)[None]))[0].numpy()

        result = evaluator(act)
        rows.append({"step": step, "return": result.mean_return, "return_se": result.return_se,
                     "normalized_score": result.normalized_score, "q_mean": float(log[step]["q_mean"]),
                     "critic_loss": float(log[step]["critic_loss"])})
        print(f"step {step}: score {result.normalized_score:.1f}, q_mean {rows[-1]['q_mean']:.1f}", flush=True)
    out = CURVES / args.dataset / f"d3rlpy-{args.algo}-s{args.seed}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def run(args) -> None:
    npz = export(args.dataset)
    folder = work_dir(args.dataset, args.algo, args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [args.d3rlpy_python, __file__, "train", "--npz", str(npz), "--out", str(folder), "--algo", args.algo,
           "--seed", str(args.seed), "--steps", str(args.steps), "--every", str(args.every)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"trained in {time.time() - t0:.0f} s", flush=True)
    print(evaluate(args))


# ------------------------------------------------------------------------------ d3rlpy venv


def train(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import d3rlpy
    import numpy as np
    import torch
    from d3rlpy.logging import NoopAdapterFactory
    from d3rlpy.preprocessing import StandardObservationScaler

    torch.set_num_threads(1)
    out = Path(args.out)
    log_file = out / "train.csv"
    if log_file.is_file() and (out / f"policy-{args.steps}.pt").is_file():
        print("finished earlier", flush=True)
        return
    z = np.load(args.npz)
    timeouts = z["timeouts"].astype(bool).copy()
    terminals = z["terminated"].astype(bool)
    if not (terminals[-1] or timeouts[-1]):
        timeouts[-1] = True
    dataset = d3rlpy.dataset.MDPDataset(
        observations=z["obs"].astype(np.float32), actions=z["action"].astype(np.float32),
        rewards=z["reward"].astype(np.float32), terminals=terminals.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
    )
    d3rlpy.seed(args.seed)
    if args.algo != "td3bc":
        raise SystemExit(f"unknown --algo {args.algo}; this cross-check runs td3bc")
    algo = d3rlpy.algos.TD3PlusBCConfig(batch_size=256, alpha=2.5, actor_learning_rate=3e-4,
                                        critic_learning_rate=3e-4,
                                        observation_scaler=StandardObservationScaler()).create(device="cpu:0")
    probe = z["obs"][np.random.default_rng(0).choice(len(z["obs"]), 10_000, replace=False)].astype(np.float32)
    rows = []
    t0 = time.time()
    for epoch, metrics in algo.fitter(dataset, n_steps=args.steps, n_steps_per_epoch=args.every,
                                      logger_adapter=NoopAdapterFactory(), show_progress=False, save_interval=10**9):
        step = epoch * args.every
        q = float(np.mean(algo.predict_value(probe, algo.predict(probe))))
        algo.save_policy(str(out / f"policy-{step}.pt"))
        rows.append({"step": step, "q_mean": q, "critic_loss": metrics.get("critic_loss", float("nan")),
                     "actor_loss": metrics.get("actor_loss", float("nan")), "seconds": time.time() - t0})
        tmp = log_file.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        tmp.replace(log_file)
        print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "evaluate", "train"):
        s = sub.add_parser(name)
        s.add_argument("--algo", default="td3bc")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--steps", type=int, default=200_000)
        s.add_argument("--every", type=int, default=10_000)
        if name != "train":
            s.add_argument("--dataset", required=True)
            s.add_argument("--episodes", type=int, default=10)
            s.add_argument("--d3rlpy-python", default="/work/d3rlpy-venv/bin/python")
        else:
            s.add_argument("--npz", required=True)
            s.add_argument("--out", required=True)
    args = p.parse_args()
    if args.cmd != "train":  # offlab's datasets live in the benchmark home, as for bench_learning.py
        os.environ.setdefault("OFFLAB_HOME", str(bench_home()))
    {"run": run, "evaluate": lambda a: print(evaluate(a)), "train": train}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
