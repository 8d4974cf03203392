"""Store benchmark: load 1M hopper-sized transitions into Transitions, import a 1M-step Minari dataset,
and sample 256-batches. Run by hand; results go to benchmarks/store.md.

    python benchmarks/bench_store.py                 # everything, 1M steps (1000 episodes x 1000 steps)
    python benchmarks/bench_store.py --steps 100000  # a quick look

The data are synthetic but schema-valid: every episode is a chain of T+1 observations (obs 11 wide,
actions 3 wide, as Hopper), so next_obs[t] == obs[t+1] inside episodes; about a third of the
episodes end in a termination, the rest are truncated. Everything runs in a temporary OFFLAB_HOME
and MINARI_DATASETS_PATH, so nothing of the user's is touched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np

OBS_DIM, ACT_DIM = 11, 3


def synthetic_episodes(n_episodes: int, length: int, seed: int = 0):
    """Per-episode arrays (T+1 observations, T actions/rewards/flags) like a Minari episode."""
    rng = np.random.default_rng(seed)
    for i in range(n_episodes):
        obs = rng.standard_normal((length + 1, OBS_DIM))
        action = rng.uniform(-1, 1, (length, ACT_DIM)).astype(np.float32)
        reward = rng.standard_normal(length)
        terminated = np.zeros(length, bool)
        truncated = np.zeros(length, bool)
        (terminated if i % 3 == 0 else truncated)[-1] = True
        yield i, obs, action, reward, terminated, truncated


def synthetic_dataset(n_episodes: int, length: int, name: str = "bench"):
    from offlab.data.schema import DatasetCard, coerce_columns

    cols = {k: [] for k in ("obs", "next_obs", "action", "reward", "terminated", "truncated")}
    for _, obs, action, reward, terminated, truncated in synthetic_episodes(n_episodes, length):
        for k, v in zip(cols, (obs[:-1], obs[1:], action, reward, terminated, truncated), strict=True):
            cols[k].append(v)
    n = n_episodes * length
    card = DatasetCard(name=name, env_id="Hopper-v5", obs_dim=OBS_DIM, action_dim=ACT_DIM,
                       ref_min_score=-20.272305, ref_max_score=3234.3, source={"kind": "synthetic"})
    return coerce_columns(
        card,
        episode=np.repeat(np.arange(n_episodes), length),
        step=np.tile(np.arange(length), n_episodes),
        **{k: np.concatenate(v) for k, v in cols.items()},
    ), n


def timed(fn, repeat: int = 3):
    """(best wall seconds, median wall seconds, best CPU seconds of this process, result of the last call)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), statistics.median(walls), min(cpus), out


def bench_store(n_episodes: int, length: int) -> None:
    import torch

    from offlab.data.store import Transitions, load_dataset, write_dataset

    ds, n = synthetic_dataset(n_episodes, length)
    best, med, cpu, _ = timed(lambda: write_dataset(ds, "bench", overwrite=True), repeat=1)
    print(f"write_dataset           {n:>9,} rows  wall {best:6.3f} s                  cpu {cpu:6.3f} s")
    best, med, cpu, loaded = timed(lambda: load_dataset("bench"), repeat=5)
    print(f"load_dataset            {n:>9,} rows  best {best:6.3f} s  median {med:6.3f} s  cpu {cpu:6.3f} s")
    best, med, cpu, tr = timed(lambda: Transitions(load_dataset("bench")), repeat=5)
    print(f"load -> Transitions     {n:>9,} rows  best {best:6.3f} s  median {med:6.3f} s  cpu {cpu:6.3f} s"
          "   <- goal <= 1 s")
    assert len(tr) == n and np.array_equal(tr.obs.numpy(), ds.obs)
    best, med, cpu, _ = timed(lambda: Transitions(load_dataset("bench")).normalizer_stats(), repeat=3)
    print(f"  ... + normalizer_stats {n:>8,} rows  best {best:6.3f} s  median {med:6.3f} s  cpu {cpu:6.3f} s")

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        tr.sample(256, g)
    k = 20_000
    t, c = time.perf_counter(), time.process_time()
    for _ in range(k):
        tr.sample(256, g)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"sample(256)             {k / dt:>9,.0f} batches/s wall  {k / dc:>9,.0f} per CPU-second "
          f"({1e6 * dc / k:.1f} us CPU per batch)")
    k = 2_000
    t, c = time.perf_counter(), time.process_time()
    for _ in range(k):
        tr.sample_segments(64, 20, g)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"sample_segments(64, 20) {k / dt:>9,.0f} batches/s wall  {k / dc:>9,.0f} per CPU-second "
          f"({1e6 * dc / k:.1f} us CPU per batch)")


def bench_minari_import(n_episodes: int, length: int, data_format: str) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    from offlab.data import minari_io

    dataset_id = f"bench/hopper/{data_format}-v0"
    env = gym.make("Hopper-v5")
    buffers = [
        EpisodeBuffer(id=i, observations=o, actions=a, rewards=r, terminations=te, truncations=tr)
        for i, o, a, r, te, tr in synthetic_episodes(n_episodes, length)
    ]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env.spec, observation_space=env.observation_space,
            action_space=env.action_space, algorithm_name="synthetic", author="bench", author_email="bench@localhost",
            code_permalink="benchmarks/bench_store.py", description="synthetic benchmark data",
            data_format=data_format,
        )
    print(f"minari create ({data_format:6s}) {n_episodes * length:>9,} steps  {time.perf_counter() - t:7.2f} s")
    del buffers
    best, med, cpu, ds = timed(
        lambda: minari_io.import_minari(dataset_id, f"bench-{data_format}", overwrite=True), repeat=2)
    print(f"import_minari ({data_format:6s}) {len(ds):>9,} steps  best {best:6.2f} s  median {med:6.2f} s  "
          f"cpu {cpu:6.2f} s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = minari.load_dataset(dataset_id)
        best, _, cpu, _ = timed(lambda: sum(len(ep["rewards"]) for ep in minari_io._episodes(md)), repeat=1)
        print(f"  reading the episodes directly:      wall {best:6.2f} s  cpu {cpu:6.2f} s")
        best, _, cpu, _ = timed(lambda: sum(len(ep.rewards) for ep in md.iterate_episodes()), repeat=1)
        print(f"  minari's own iterate_episodes:      wall {best:6.2f} s  cpu {cpu:6.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1_000_000, help="total steps (episodes of --length steps)")
    p.add_argument("--length", type=int, default=1000, help="episode length")
    p.add_argument("--skip-minari", action="store_true", help="only the store and sampling figures")
    p.add_argument("--formats", default="hdf5,arrow", help="Minari storage formats to import from")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    n_episodes = args.steps // args.length
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OFFLAB_HOME"] = os.path.join(tmp, "offlab")
        os.environ["MINARI_DATASETS_PATH"] = os.path.join(tmp, "minari")
        print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
        bench_store(n_episodes, args.length)
        if not args.skip_minari:
            for fmt in args.formats.split(","):
                bench_minari_import(n_episodes, args.length, fmt)
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
