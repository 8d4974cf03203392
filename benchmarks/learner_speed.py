"""Per-update cost of offlab's TD3+BC, PRDC and IQL on one 100k-transition dataset (run by hand).

    python benchmarks/learner_speed.py --data policy --policy datasets/policies/hopper/medium.safetensors
    python benchmarks/learner_speed.py --data hopper --warmup 5000
    python benchmarks/learner_speed.py --data random --warmup 0

`policy`: 100k transitions of a SAC actor (offlab's safetensors layout), sampled, in the real
Hopper-v5 simulator: one behaviour policy's data, as in D4RL's medium/expert datasets.
`hopper`: 100k uniform-random-action transitions in the real Hopper-v5 simulator.
`random`: 100k rows of Gaussian states and uniform actions (Hopper's widths, 11 + 3): no structure
at all, the KD-tree's hard case.
Every learner first runs `--warmup` updates (PRDC's query cost depends on how far pi(s) is from the
data, which is largest at initialisation), then the learners run interleaved in rounds on the same
batches with one thread, so a busy machine slows all alike; the ratio is taken per round and the
median reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from offlab.algos import get_algo
from offlab.algos.base import LearnerSpec
from offlab.data import store
from offlab.data.schema import DatasetCard, coerce_columns, finalize
from offlab.data.store import Transitions
from offlab.training import update_on


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


def sac_policy(path: str):
    """A sampled tanh-Gaussian SAC actor from a safetensors file in offlab's layout."""
    from safetensors.torch import load_file

    from offlab.nets import TanhGaussianActor

    tensors = load_file(path)
    obs_dim, hidden = tensors["hidden.0.weight"].shape[1], tensors["hidden.0.weight"].shape[0]
    actor = TanhGaussianActor(obs_dim, tensors["mean.weight"].shape[0], (hidden, hidden))
    actor.load_state_dict(tensors)
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return actor(torch.as_tensor(obs, dtype=torch.float32)[None], generator=gen)[0][0].numpy()

    return act


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["random", "hopper", "policy"], default="policy")
    p.add_argument("--policy", default="", help="SAC actor (safetensors) for --data policy")
    p.add_argument("--warmup", type=int, default=5000, help="updates per learner before timing")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=2000, help="updates per learner per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--algos", default="td3bc,prdc,iql")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = f"{Path(args.policy).parent.name}-{Path(args.policy).stem}" if args.data == "policy" else args.data
    name = f"speed-{source}-{args.n}"
    if store.exists(name):  # built by an earlier run (in $OFFLAB_HOME)
        ds = store.load_dataset(name)
    elif args.data == "random":
        ds = store.write_dataset(random_dataset(args.n, 11, 3), name)
    else:
        from tests.helpers import make_sim_dataset
        ds = store.write_dataset(make_sim_dataset(
            "Hopper-v5", steps=args.n, seed=0, name=name,
            policy=sac_policy(args.policy) if args.data == "policy" else None))
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
    warm_gen = torch.Generator().manual_seed(1)
    for name, learner in learners.items():  # warm-up: same batches for every learner
        warm_gen.manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 20)):
            learner.update(data.sample(256, warm_gen))
        print(f"{name}: {max(args.warmup, 20)} warm-up updates in {time.perf_counter() - t0:.1f}s", flush=True)
    per_update = {n: [] for n in names}  # wall-clock ms per update, per round
    cpu_per_update = {n: [] for n in names}  # process CPU ms per update (all threads), per round
    for r in range(args.rounds):
        for name, learner in learners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            update_on(learner, batches)  # each batch announced one update ahead, as in fit
            per_update[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            cpu_per_update[name].append((time.process_time() - c0) / args.steps * 1e3)
        print(f"round {r}: " + ", ".join(
            f"{n} {per_update[n][-1]:.2f} ms wall / {cpu_per_update[n][-1]:.2f} ms cpu" for n in names), flush=True)
    print(f"\ndata={args.data} n={len(data)} warmup={args.warmup} threads={args.threads} steps/round={args.steps} rounds={args.rounds}")
    for label, table in (("wall", per_update), ("cpu", cpu_per_update)):
        for name in names:
            print(f"{label} {name:6s} median {statistics.median(table[name]):.3f} ms/update "
                  f"({1e3 / statistics.median(table[name]):.0f} updates/s)")
        if "td3bc" in names:
            for name in names:
                ratios = [a / b for a, b in zip(table[name], table["td3bc"], strict=True)]
                print(f"{label} {name}/td3bc per-round ratio: median {statistics.median(ratios):.3f} "
                      f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
