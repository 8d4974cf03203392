"""The float32 floor of an update on this CPU: its matmul FLOPs at the core's measured sgemm peak (run by hand).

    python benchmarks/matmul_floor.py                       # hopper's widths (11 + 3), batch 256, one thread
    python benchmarks/matmul_floor.py --d3rlpy-ms 9.23       # also: the best speed-up over d3rlpy this floor allows

Counts the floating-point operations of one update of each learner with torch's FlopCounterMode (the mean
of two consecutive updates, so TD3-style delayed actor steps count half), then measures the single-thread
peak of a float32 matrix multiply on shapes like the networks' (256 x 256 x 256 and a 2-member batched
one). FLOPs / peak is the time the multiplies alone need: no implementation with the same networks, batch
and float32 arithmetic can update faster on this core. With `--d3rlpy-ms` (d3rlpy's measured CPU ms per
update, from bench_d3rlpy.py) it prints the largest speed-up over d3rlpy that the floor permits.
"""

from __future__ import annotations

import argparse
import time

import torch
from learner_speed import random_dataset
from torch.utils.flop_counter import FlopCounterMode

from offlab.algos import get_algo
from offlab.algos.base import LearnerSpec
from offlab.data.store import Transitions


def sgemm_peak(reps: int = 400) -> float:
    """Best-of-three single-thread float32 GFLOP/s over a 256^3 mm and a 2 x 256^3 baddbmm."""
    a, b, out = torch.randn(256, 256), torch.randn(256, 256), torch.empty(256, 256)
    ea, eb, bias = torch.randn(2, 256, 256), torch.randn(2, 256, 256), torch.randn(2, 1, 256)
    best = 0.0
    for _ in range(3):
        for fn, flops in ((lambda: torch.mm(a, b, out=out), 2 * 256**3),
                          (lambda: torch.baddbmm(bias, ea, eb), 2 * 2 * 256**3)):
            for _ in range(10):
                fn()
            t = time.process_time()
            for _ in range(reps):
                fn()
            best = max(best, flops * reps / (time.process_time() - t) / 1e9)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algos", default="bc,td3bc,iql,prdc")
    p.add_argument("--obs-dim", type=int, default=11)
    p.add_argument("--action-dim", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--d3rlpy-ms", type=float, default=None, help="d3rlpy's CPU ms per TD3+BC update")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = Transitions(random_dataset(20_000, args.obs_dim, args.action_dim))
    spec = LearnerSpec.from_transitions(data)
    batch = data.sample(args.batch, torch.Generator().manual_seed(0))
    peak = sgemm_peak()
    print(f"single-thread float32 matmul peak: {peak:.1f} GFLOP/s")
    for name in args.algos.split(","):
        cls = get_algo(name)
        learner = cls(cls.Config(), spec, "cpu")
        learner.update(batch)
        with FlopCounterMode(display=False) as counter:
            learner.update(batch)
            learner.update(batch)
        mflop = counter.get_total_flops() / 2 / 1e6
        floor_ms = mflop / peak
        line = f"{name:6s} {mflop:7.1f} MFLOP/update -> floor {floor_ms:.2f} ms/update"
        if args.d3rlpy_ms and name == "td3bc":
            line += f"; d3rlpy {args.d3rlpy_ms:.2f} ms allows at most {args.d3rlpy_ms / floor_ms:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
