"""Per-update cost of offlab's TD3+BC, PRDC and IQL on one 100k-transition dataset (run by hand).

    python benchmarks/learner_speed.py --data random --steps 2000 --rounds 5
    python benchmarks/learner_speed.py --data hopper --steps 2000 --rounds 5

`random`: 100k rows of Gaussian states (Hopper's widths, 11 + 3), the KD-tree's hard case.
`hopper`: 100k random-action transitions rolled out in the real Hopper-v5 simulator.
Learners run interleaved in rounds (same batches, one thread) so a busy machine slows all alike;
the ratio is taken per round and the median reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from offlab.algos import get_algo
from offlab.algos.base import LearnerSpec
from offlab.data.schema import DatasetCard, coerce_columns, finalize
from offlab.data.store import Transitions


def random_dataset(n: int, obs_dim: int, act_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ep_len = 1000
    episode = np.arange(n) // ep_len
    step = np.arange(n) % ep_len
    obs = rng.normal(size=(n + 1, obs_dim)).astype(np.float32)
    next_obs = obs[1:].copy()
    next_obs[step == ep_len - 1] = rng.normal(size=(int((step == ep_len - 1).sum()), obs_dim))
    card = DatasetCard(name="speed-random", env_id="Hopper-v5", obs_dim=obs_dim, action_dim=act_dim,
                       action_low=[-1.0] * act_dim, action_high=[1.0] * act_dim, source={"kind": "benchmark"})
    return finalize(coerce_columns(
        card, episode=episode, step=step,
        obs=obs[:n], next_obs=next_obs,
        action=rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        reward=rng.normal(size=n).astype(np.float32), terminated=np.zeros(n, bool), truncated=step == ep_len - 1,
    ))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["random", "hopper"], default="random")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=2000, help="updates per learner per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--algos", default="td3bc,prdc,iql")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.data == "random":
        ds = random_dataset(args.n, 11, 3)
    else:
        from tests.helpers import make_sim_dataset
        ds = make_sim_dataset("Hopper-v5", steps=args.n, seed=0, name="speed-hopper")
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data)
    names = args.algos.split(",")
    gen = torch.Generator().manual_seed(0)
    batches = [data.sample(256, gen) for _ in range(args.steps)]
    learners = {}
    for name in names:
        cls = get_algo(name)
        t0 = time.perf_counter()
        learners[name] = cls(cls.Config(), spec, "cpu")
        print(f"{name}: built in {time.perf_counter() - t0:.2f}s")
    for learner in learners.values():  # warm-up
        for b in batches[:50]:
            learner.update(b)
    per_update = {n: [] for n in names}
    for r in range(args.rounds):
        for name, learner in learners.items():
            t0 = time.perf_counter()
            for b in batches:
                learner.update(b)
            per_update[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"round {r}: " + ", ".join(f"{n} {per_update[n][-1]:.3f} ms" for n in names))
    print(f"\ndata={args.data} n={len(data)} threads={args.threads} steps/round={args.steps} rounds={args.rounds}")
    for name in names:
        print(f"{name:6s} median {statistics.median(per_update[name]):.3f} ms/update "
              f"({1e3 / statistics.median(per_update[name]):.0f} updates/s)")
    if "td3bc" in names:
        for name in names:
            ratios = [a / b for a, b in zip(per_update[name], per_update["td3bc"], strict=True)]
            print(f"{name}/td3bc per-round ratio: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
