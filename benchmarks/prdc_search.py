"""PRDC's neighbour search on a built dataset: the exact KD-tree against the opt-in faiss inverted file (run by hand).

    OFFLAB_HOME=~/.offlab-bench python benchmarks/prdc_search.py --dataset halfcheetah-medium \\
        --checkpoint ~/.offlab-bench/runs/<run_id>/checkpoint.pt

Builds PRDC's index over every (beta * s, a) of the dataset (the paper's beta = 2, offlab's normalised states)
with `nn_search=kdtree` and `nn_search=ivf`, then times 256-query searches, one thread, for four query sets on
the same 256 dataset states: the actions of a PRDC learner's policy (`--checkpoint`, any offlab PRDC run's
checkpoint; skipped without one) and the logged actions plus Gaussian noise of std 0.1, 0.3 and 1.0 (clipped
to the action box). For the inverted file it reports, against the KD-tree's exact answer, the share of queries
whose neighbour is the exact one (recall) and how much farther the returned neighbour is (distance ratio).

`--certified` also times an exact search tried in session 15 and not adopted (`certified_ivf_index`): the same
k-means cells, scanned in order of a lower bound on the distance to each cell's keys until no unscanned cell
can hold a nearer key. `--noise` sets the noise levels, `--rows` searches a random subset of the dataset.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.prdc import PRDC, PRDCConfig
from offlab.data import registry
from offlab.data.store import Transitions
from offlab.neighbours import NearestDatasetAction


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm the caches
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000, out


def certified_ivf_index(index, query: np.ndarray, first: int = 8) -> tuple[np.ndarray, float]:
    """Exact nearest key of each query from faiss's inverted file, and the mean number of cells scanned.

    Every key lies in the Voronoi cell of its nearest centroid, so no key of cell j is nearer to q than
    the half-space bound (|q - c_j|^2 - |q - c_1|^2) / (2 |c_j - c_1|), c_1 the centroid nearest q. The
    cells are scanned in order of that bound, `first` at a time and then four times as many, until the
    nearest key found is nearer than the next cell's bound (less a 1e-5 margin for float rounding).
    """
    cent = torch.from_numpy(index.quantizer.reconstruct_n(0, index.nlist)).double()
    csq = (cent**2).sum(1)
    q = torch.from_numpy(query).double()
    dist = ((q**2).sum(1)[:, None] + csq[None, :] - 2 * q @ cent.T).clamp_min(0)
    d1, c1 = dist.min(1)
    gap = ((cent[c1] ** 2).sum(1)[:, None] + csq[None, :] - 2 * cent[c1] @ cent.T).clamp_min(0).sqrt()
    bound = torch.where(gap > 0, (dist - d1[:, None]) / (2 * gap), torch.zeros_like(dist)).clamp_min(0)
    n_cells = index.nlist
    best_d, best_i = np.full(len(q), np.inf), np.full(len(q), -1, np.int64)
    todo, done, k, scanned = np.arange(len(q)), 0, first, 0
    while len(todo):
        k = min(k, n_cells)
        bounds, cells = torch.topk(bound[todo], min(k + 1, n_cells), dim=1, largest=False)
        assign = np.ascontiguousarray(cells[:, done:k].numpy().astype(np.int64))
        index.nprobe = assign.shape[1]
        d, i = index.search_preassigned(np.ascontiguousarray(query[todo]), 1, assign, np.zeros(assign.shape, np.float32))
        scanned += assign.size
        better = (i[:, 0] >= 0) & (d[:, 0] < best_d[todo])
        best_d[todo[better]], best_i[todo[better]] = d[better, 0], i[better, 0]
        if k >= n_cells:
            break
        certain = np.sqrt(best_d[todo]) * (1 + 1e-5) + 1e-6 <= bounds[:, k].numpy()
        todo, done, k = todo[~certain], k, 4 * k
    return best_i, scanned / len(q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="halfcheetah-medium")
    p.add_argument("--checkpoint", help="an offlab PRDC run's checkpoint.pt: adds the queries of its policy")
    p.add_argument("--probes", default="4,8,16", help="ivf_probe values to try")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--noise", default="0.1,0.3,1.0", help="std of the Gaussian noise on the logged actions")
    p.add_argument("--rows", type=int, default=None, help="search a random subset of this many dataset rows")
    p.add_argument("--certified", action="store_true", help="also time the certified inverted file (not adopted)")
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
    actions = data.action
    if args.rows:  # a random subset stands for a smaller dataset
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.rows]
        norm_obs, actions = norm_obs[rows], actions[rows]
        tree = NearestDatasetAction(norm_obs, actions, beta, "kdtree", torch.device("cpu"))
        pick = torch.randint(len(actions), (256,), generator=torch.Generator().manual_seed(1))
        s, logged = norm_obs[pick], actions[pick]
    else:
        tree = learner.nearest_dataset_action
        batch = data.sample(256, torch.Generator().manual_seed(1))
        s, logged = learner.normalizer(batch.obs), batch.action
    g = torch.Generator().manual_seed(2)
    queries = {}
    if args.checkpoint:
        with torch.no_grad():
            queries["policy"] = learner.actor(s)
    for std in [float(x) for x in args.noise.split(",")]:
        noisy = logged + std * torch.randn(logged.shape, generator=g)
        queries[f"logged + N(0, {std})"] = noisy.clamp(torch.as_tensor(spec.action_low), torch.as_tensor(spec.action_high))

    keys = torch.cat([beta * norm_obs, actions], 1).double()
    print(f"{args.dataset}: {len(keys)} keys of width {keys.shape[1]}, 256 queries per search, best of "
          f"{args.repeats}, one thread")
    exact = {}
    for name, a in queries.items():
        ms, idx = timed(lambda a=a: tree.nearest_index(s, a), args.repeats)
        q = torch.cat([beta * s, a], 1).double()
        exact[name] = (idx, (keys[idx] - q).norm(dim=1))
        print(f"  kdtree    {name:20s} {ms:8.1f} ms   median distance to the neighbour {exact[name][1].median():.3f}")
    for probe in [int(x) for x in args.probes.split(",")]:
        t = time.perf_counter()
        ivf = NearestDatasetAction(norm_obs, actions, beta, "ivf", torch.device("cpu"), ivf_probe=probe)
        build = time.perf_counter() - t
        print(f"  ivf, {ivf.ivf.nprobe} of {ivf.ivf.nlist} cells (built in {build:.1f} s)")
        for name, a in queries.items():
            ms, idx = timed(lambda a=a, ivf=ivf: ivf.nearest_index(s, a), args.repeats)
            q = torch.cat([beta * s, a], 1).double()
            ratio = (keys[idx] - q).norm(dim=1) / exact[name][1].clamp_min(1e-12)
            recall = (idx == exact[name][0]).double().mean()
            print(f"    {name:24s} {ms:8.1f} ms   recall {recall:.3f}   distance ratio mean {ratio.mean():.4f} "
                  f"max {ratio.max():.3f}")

    if args.certified:
        index = ivf.ivf  # the last inverted file built above: its cells and keys
        print(f"  certified inverted file, {index.nlist} cells, exact (not adopted)")
        for name, a in queries.items():
            q = torch.cat([beta * s, a], 1)
            ms, (idx, cells) = timed(lambda q=q: certified_ivf_index(index, q.float().numpy()), args.repeats)
            ratio = (keys[idx] - q.double()).norm(dim=1) / exact[name][1].clamp_min(1e-12)
            print(f"    {name:24s} {ms:8.1f} ms   cells scanned per query {cells:5.1f}   "
                  f"max distance ratio {ratio.max():.6f}")


if __name__ == "__main__":
    main()
