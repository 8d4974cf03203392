"""What the training loop costs per step on top of the learner's update.

    python benchmarks/loop_overhead.py [--steps 3000] [--repeats 3] [--algos bc td3bc prdc]

`null` is a learner whose update does nothing: its row is the loop's own cost per step.
For each learner, alternately: a bare loop (`learner.update(data.sample(256, g))`) and the real
training loop (`offlab.training.Trainer.loop`, what `offlab fit` runs) on the same data, with MLflow
logging every 1000 steps into a throwaway sqlite store, a checkpoint at the end, no evaluation.
Reports the median process-CPU and wall-clock microseconds per step of each and their difference. One CPU thread; the dataset
is 20,000 random-action Hopper-v5 transitions from the real simulator. Results go to
benchmarks/loop_overhead.md (overwritten).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def register_null_learner() -> None:
    """`null`: a learner whose update does nothing, so the loop's own cost per step shows without noise."""
    from dataclasses import dataclass

    import numpy as np

    from offlab.algos.base import register

    @dataclass
    class NullConfig:
        seed: int = 0
        """Unused."""

    @register
    class Null:
        name = "null"
        Config = NullConfig

        def __init__(self, config, spec, device):
            self.cfg, self.spec = config, spec

        def update(self, batch):
            return {"train/bc_loss": 0.0}

        def act(self, obs, deterministic=True):
            return np.zeros((*np.shape(obs)[:-1], self.spec.action_dim), np.float32)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algos", nargs="+", default=["null", "bc", "td3bc", "prdc"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="offlab-bench-"))
    os.environ["OFFLAB_HOME"] = str(tmp / "home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(tmp)

    from mlflow import MlflowClient

    from offlab import tracking, training
    from offlab.algos import LearnerSpec, get_algo
    from offlab.config import learner_config, resolve_run
    from offlab.data.store import Transitions, write_dataset
    from tests.helpers import make_sim_dataset

    register_null_learner()
    ds = write_dataset(make_sim_dataset("Hopper-v5", steps=20_000, seed=0, name="bench"))
    data = Transitions(ds)
    MlflowClient().search_experiments()  # create the store's tables outside the timings

    rows = []
    for algo in args.algos:
        cls = get_algo(algo)
        bare_cpu, bare_wall, loop_cpu, loop_wall = [], [], [], []
        for rep in range(args.repeats):
            learner = cls(learner_config(cls, "bench", {}, seed=rep), LearnerSpec.from_transitions(data), "cpu")
            g = torch.Generator().manual_seed(rep)
            for _ in range(50):
                learner.update(data.sample(256, g))
            c, w = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                learner.update(data.sample(256, g))
            bare_cpu.append((time.process_time() - c) / args.steps * 1e6)
            bare_wall.append((time.perf_counter() - w) / args.steps * 1e6)

            run, _ = resolve_run(None, {"dataset": "bench", "algo": algo, "steps": args.steps, "seed": rep,
                                        "eval_episodes": 0}, ["dataset_quality=false", "log_every=1000"])
            tracker = tracking.Tracker()
            trainer = training.Trainer(run, ds, torch.device("cpu"), tracker, progress=True)
            tracker.start_run(run, ds, "cpu")
            for _ in range(50):  # the same warm-up as the bare loop, outside the clock
                trainer.learner.update(trainer.sample_offline(256))
            c, w = time.process_time(), time.perf_counter()
            trainer.loop()
            loop_cpu.append((time.process_time() - c) / args.steps * 1e6)
            loop_wall.append((time.perf_counter() - w) / args.steps * 1e6)
            tracker.end()
            trainer.close()
        med = statistics.median
        row = (algo, med(bare_cpu), med(loop_cpu), med(bare_wall), med(loop_wall))
        rows.append(row)
        print(f"{algo}: cpu bare {row[1]:.0f} loop {row[2]:.0f} us/step ({row[2] - row[1]:+.0f}); "
              f"wall bare {row[3]:.0f} loop {row[4]:.0f} us/step ({row[4] - row[3]:+.0f})")

    lines = [
        "# Training-loop overhead per step",
        "",
        f"`python benchmarks/loop_overhead.py --steps {args.steps} --repeats {args.repeats}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        "1 thread, batch 256, 256-256 networks, 20k Hopper-v5 transitions.",
        "",
        "The offlab loop is `Trainer.loop()` between evaluations: sampling, update, metric accumulation, the rich",
        "progress bar, MLflow logging every 1000 steps (sqlite) and a checkpoint at the end of each run (every",
        "10,000 steps by default); medians over repeats. CPU time is the process's (robust to other load on a",
        "shared machine); wall time also counts waiting for the disk and for the CPU.",
        "",
        "| learner | bare CPU us/step | loop CPU us/step | CPU overhead | bare wall us/step | loop wall us/step | wall overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {a} | {bc:.0f} | {lc:.0f} | {lc - bc:+.0f} us ({100 * (lc - bc) / bc:+.1f}%) | {bw:.0f} | {lw:.0f} | "
              f"{lw - bw:+.0f} us ({100 * (lw - bw) / bw:+.1f}%) |" for a, bc, lc, bw, lw in rows]
    lines += [
        "",
        f"Load average while measuring: {os.getloadavg()[0]:.1f}. On a shared, oversubscribed machine the learners'",
        "own step times swing by several hundred microseconds between repeats, so their overhead columns are noise",
        "around zero; the `null` row (an update that does nothing) is the loop's own cost per step: sampling is the",
        "bare column, the rest is bookkeeping, and its wall column also carries the end-of-run checkpoint and MLflow",
        "writes amortised over --steps.",
        "",
    ]
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
