"""PRDC's neighbour search on a built dataset: the exact KD-tree against the opt-in faiss inverted file (run by hand).

    OFFLAB_HOME=~/.offlab-bench python benchmarks/prdc_search.py --dataset halfcheetah-medium \\
        --checkpoint ~/.offlab-bench/runs/<run_id>/checkpoint.pt

Builds PRDC's index over every (beta * s, a) of the dataset (the paper's beta = 2, offlab's normalised states)
with `nn_search=kdtree` and `nn_search=ivf`, then times 256-query searches, one thread, for four query sets on
the same 256 dataset states: the actions of a PRDC learner's policy (`--checkpoint`, any offlab PRDC run's
checkpoint; skipped without one) and the logged actions plus Gaussian noise of std 0.1, 0.3 and 1.0 (clipped
to the action box). For the inverted file it reports, against the KD-tree's exact answer, the share of queries
whose neighbour is the exact one (recall) and how much farther the returned neighbour is (distance ratio).
"""

from __future__ import annotations

import argparse
import time

import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.prdc import PRDC, NearestDatasetAction, PRDCConfig
from offlab.data import registry
from offlab.data.store import Transitions


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm the caches
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="halfcheetah-medium")
    p.add_argument("--checkpoint", help="an offlab PRDC run's checkpoint.pt: adds the queries of its policy")
    p.add_argument("--probes", default="4,8,16", help="ivf_probe values to try")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    ds = registry.get(args.dataset, progress=True)
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data, ds.card.env_id, args.dataset)
    learner = PRDC(PRDCConfig(**PRDC.defaults_for(args.dataset), nn_search="kdtree"), spec)
    if args.checkpoint:
        learner.load_state_dict(torch.load(args.checkpoint, weights_only=True)["learner"])
    beta = learner.cfg.beta
    with torch.no_grad():
        norm_obs = learner.normalizer(data.obs)
    tree = learner.nearest_dataset_action
    batch = data.sample(256, torch.Generator().manual_seed(1))
    s = learner.normalizer(batch.obs)
    g = torch.Generator().manual_seed(2)
    queries = {}
    if args.checkpoint:
        with torch.no_grad():
            queries["policy"] = learner.actor(s)
    for std in (0.1, 0.3, 1.0):
        noisy = batch.action + std * torch.randn(batch.action.shape, generator=g)
        queries[f"logged + N(0, {std})"] = noisy.clamp(torch.as_tensor(spec.action_low), torch.as_tensor(spec.action_high))

    keys = torch.cat([beta * norm_obs, data.action], 1).double()
    print(f"{args.dataset}: {len(data)} keys of width {keys.shape[1]}, 256 queries per search, best of "
          f"{args.repeats}, one thread")
    exact = {}
    for name, a in queries.items():
        ms, idx = timed(lambda a=a: tree.nearest_index(s, a), args.repeats)
        q = torch.cat([beta * s, a], 1).double()
        exact[name] = (idx, (keys[idx] - q).norm(dim=1))
        print(f"  kdtree    {name:20s} {ms:8.1f} ms   median distance to the neighbour {exact[name][1].median():.3f}")
    for probe in [int(x) for x in args.probes.split(",")]:
        t = time.perf_counter()
        ivf = NearestDatasetAction(norm_obs, data.action, beta, "ivf", torch.device("cpu"), ivf_probe=probe)
        build = time.perf_counter() - t
        print(f"  ivf, {ivf.ivf.nprobe} of {ivf.ivf.nlist} cells (built in {build:.1f} s)")
        for name, a in queries.items():
            ms, idx = timed(lambda a=a, ivf=ivf: ivf.nearest_index(s, a), args.repeats)
            q = torch.cat([beta * s, a], 1).double()
            ratio = (keys[idx] - q).norm(dim=1) / exact[name][1].clamp_min(1e-12)
            recall = (idx == exact[name][0]).double().mean()
            print(f"    {name:24s} {ms:8.1f} ms   recall {recall:.3f}   distance ratio mean {ratio.mean():.4f} "
                  f"max {ratio.max():.3f}")


if __name__ == "__main__":
    main()
