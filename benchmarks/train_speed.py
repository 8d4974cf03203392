"""Wall and CPU time per update of offlab learners on a stored dataset, in interleaved blocks (run by hand).

    # PRDC against TD3+BC from initialisation on 1M walker2d transitions, blocks of 500 updates
    python benchmarks/train_speed.py --dataset walker2d-medium --algos td3bc,prdc --threads 2 --blocks 12
    python benchmarks/train_speed.py --dataset walker2d-medium --set prdc.nn_search=ivf     # faiss's inverted file
    # one learner twice: PRDC with and without its state neighbours
    python benchmarks/train_speed.py --dataset hopper-medium --algos td3bc,prdc,prdc@tree \
        --set prdc@tree.state_neighbours=0
    # PRDC at step 50,000 of a run (its checkpoint) against TD3+BC: the cost later in training
    python benchmarks/train_speed.py --dataset halfcheetah-medium --algos td3bc,prdc \
        --start prdc=~/.offlab/runs/<run id>/checkpoint.pt --threads 2 --warmup 2100 --block 500 --blocks 6
    # one learner under an OpenMP setting (it must be in the environment before torch loads)
    GOMP_SPINCOUNT=10000 python benchmarks/train_speed.py --dataset bench-hopper-medium-100000 --algos td3bc \\
        --threads 2 --warmup 500 --block 300 --blocks 5

`--threads` is the cores each learner gets: torch takes them less the cores the learner keeps busy beside torch
(`side_cores`: PRDC's search process on a machine with two or more cores, as under `offlab fit`). For PRDC on one
core, add `--set prdc.search_process=false`. PRDC's CPU time includes its search process.

Each learner (its paper settings for the dataset) runs `--warmup` untimed updates, then the learners take turns,
one block of `--block` updates each, so drift in the machine's speed reaches all of them alike. Printed per block:
wall and CPU ms per update, and each learner's wall ratio to the first; at the end the medians and the ratio of
the total wall times. The OpenMP setting is the environment's, with `offlab fit`'s default filled in
(`offlab.threads.openmp_for_training`: 30,000 spins). `bench_d3rlpy.py --home` stores `bench-hopper-medium-100000`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from offlab.threads import (
    OPENMP_WAIT_VARS,
    openmp_defaults,
    openmp_for_training,
    set_flush_denormals,
    torch_threads_beside,
)

openmp_defaults()  # as `offlab fit` runs, before torch loads OpenMP
openmp_for_training()

import torch  # noqa: E402

from offlab.algos import get_algo  # noqa: E402
from offlab.algos.base import LearnerSpec  # noqa: E402
from offlab.config import learner_config, parse_assignments  # noqa: E402
from offlab.data import registry  # noqa: E402
from offlab.data.store import Transitions  # noqa: E402
from offlab.training import AnnouncedBatches  # noqa: E402


def process_and_helpers_cpu(learner) -> float:
    """CPU seconds of this process and of the learner's worker process, if it has one (PRDC's search process)."""
    index = getattr(learner, "nearest_dataset_action", None)
    process = getattr(index, "process", None)
    return time.process_time() + (process.cpu_seconds() if process is not None else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a stored dataset (OFFLAB_HOME)")
    p.add_argument("--algos", default="td3bc,prdc", help="the first is the reference of the ratios")
    p.add_argument("--threads", type=int, default=1,
                   help="cores: torch threads, less the cores a learner keeps busy beside them (PRDC's search process)")
    p.add_argument("--warmup", type=int, default=0, help="untimed updates per learner first")
    p.add_argument("--block", type=int, default=500, help="updates per block")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="ALGO.KEY=VALUE",
                   help="a learner setting, e.g. prdc.nn_search=ivf (repeatable)")
    p.add_argument("--start", action="append", default=[], metavar="ALGO=CHECKPOINT",
                   help="start a learner from the learner state of an `offlab fit` checkpoint.pt (its run's settings "
                        "must match), e.g. prdc=~/.offlab/runs/<run id>/checkpoint.pt: the cost at that point of a run")
    p.add_argument("--keep-denormals", action="store_true",
                   help="train without `offlab fit`'s flush of subnormal floats (threads.set_flush_denormals)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.keep_denormals:  # as `offlab fit` trains (offlab.training.Trainer)
        set_flush_denormals(True)

    ds = registry.get(args.dataset, download=False, build=False)
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data, ds.card.env_id, args.dataset)
    learners, batches, threads = {}, {}, {}
    for name in args.algos.split(","):
        cls = get_algo(name.split("@")[0])  # prdc@label: PRDC again, with its own --set prdc@label.key=value
        # this learner's `--set name.key=value`, typed and checked as `offlab fit --set` does
        settings = parse_assignments([item[len(name) + 1:] for item in args.set if item.startswith(f"{name}.")])
        learners[name] = cls(learner_config(cls, args.dataset, settings, seed=args.seed), spec, "cpu")
        for item in args.start:
            if item.split("=", 1)[0] == name:
                checkpoint = torch.load(os.path.expanduser(item.split("=", 1)[1]), weights_only=True)
                learners[name].load_state_dict(checkpoint["learner"])
                print(f"{name}: from step {checkpoint['step']:,} of its run", flush=True)
        # as `offlab fit` with its thread count left to the machine: torch gets the cores a learner leaves free
        # (PRDC's search process keeps one busy: `side_cores`)
        threads[name] = torch_threads_beside(learners[name], args.threads)
        torch.set_num_threads(threads[name])
        gen = torch.Generator().manual_seed(args.seed)  # every learner sees the same batches
        # each batch announced one update ahead (learner.lookahead), as `offlab fit` does
        batches[name] = AnnouncedBatches(learners[name], lambda gen=gen: data.sample(256, gen))
        for _ in range(args.warmup):
            learners[name].update(batches[name].take())
    first = next(iter(learners))
    openmp = {k: os.environ[k] for k in OPENMP_WAIT_VARS if k in os.environ}
    print(f"{args.dataset}: {len(data):,} transitions; {args.threads} core(s), torch threads {threads}; OpenMP "
          f"{openmp}{'' if args.keep_denormals else ', subnormals flushed'}; warm-up {args.warmup}; {args.blocks} blocks of {args.block}", flush=True)

    rows = []
    for b in range(args.blocks):
        row = {"updates": args.warmup + (b + 1) * args.block}
        for name, learner in learners.items():
            # the cores the learner leaves free now (PRDC's `SearchLayout` may have moved its search inline)
            torch.set_num_threads(torch_threads_beside(learner, args.threads))
            t, c = time.perf_counter(), process_and_helpers_cpu(learner)
            for _ in range(args.block):
                learner.update(batches[name].take())
            row[name] = {"wall_ms": (time.perf_counter() - t) / args.block * 1e3,
                         "cpu_ms": (process_and_helpers_cpu(learner) - c) / args.block * 1e3}
        for name in learners:
            row[name]["wall_ratio"] = row[name]["wall_ms"] / row[first]["wall_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n| learner | median wall ms/update | median CPU ms/update | median wall ratio to {first} "
          f"| total wall ratio |\n|---|---|---|---|---|")
    total_first = sum(r[first]["wall_ms"] for r in rows)
    for name in learners:
        med = {k: statistics.median(r[name][k] for r in rows) for k in ("wall_ms", "cpu_ms", "wall_ratio")}
        total = sum(r[name]["wall_ms"] for r in rows) / total_first
        print(f"| {name} | {med['wall_ms']:.2f} | {med['cpu_ms']:.2f} | {med['wall_ratio']:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
