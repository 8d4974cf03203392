"""d3rlpy side of benchmarks/bench_d3rlpy.py: run with the d3rlpy venv's python, driven over stdin/stdout.

    /work/d3rlpy-venv/bin/python benchmarks/_d3rlpy_worker.py     (started by bench_d3rlpy.py, not by hand)

Imports nothing from offlab (d3rlpy lives in its own venv and is never an offlab dependency). The
driver sends one JSON object per line; the worker answers each with one line `@@{json}` on the
original stdout (everything d3rlpy prints goes to stderr):

    {"cmd": "setup", "npz": PATH, "algos": [...], "steps": N, "warmup": W, "seed": S, "batch": 256}
    {"cmd": "round", "algo": "td3bc", "what": "update" | "sample" | "fit"}  -> {"wall": s, "cpu": s, "n": N}

`update`: algo.update on the pre-drawn batches; `sample`: sample_transition_batch alone; `fit`:
algo.fit(n_steps=N + 1) with logging off (NoopAdapterFactory, no progress bar), timed from the end
of its first step to the end of its last (the callback runs after each step), so the scaler refit
and logger setup before the loop are not counted: d3rlpy's own loop, sampling included.
    {"cmd": "quit"}

Settings are the papers' defaults as in offlab (256-256 MLPs, batch 256, Adam, lr 3e-4):
BC deterministic MSE with standardised states; TD3PlusBC alpha 2.5 with standardised states;
IQL expectile 0.7, weight_temp (beta) 3, max_weight 100, rewards scaled by 1000 / return range;
PRDC alpha 2.5, beta 2 with standardised states and a one-job sklearn NearestNeighbors index
(d3rlpy's default is n_jobs=-1, all cores; one job keeps both libraries on one thread).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

_OUT = os.fdopen(os.dup(1), "w", buffering=1)  # replies only
os.dup2(2, 1)  # d3rlpy's own prints and logs go to stderr

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))  # bench_d3rlpy.py --threads
if os.environ.get("BENCH_FLUSH_DENORMALS"):  # bench_d3rlpy.py --d3rlpy-flush-denormals (before torch's threads start)
    torch.set_flush_denormal(True)

import d3rlpy  # noqa: E402
from d3rlpy.preprocessing import ReturnBasedRewardScaler, StandardObservationScaler  # noqa: E402


def reply(obj) -> None:
    _OUT.write("@@" + json.dumps(obj) + "\n")
    _OUT.flush()


def make_dataset(path: str):
    z = np.load(path)
    timeouts = z["timeouts"].astype(bool).copy()
    terminals = z["terminated"].astype(bool)
    if not (terminals[-1] or timeouts[-1]):
        timeouts[-1] = True  # the last episode was cut by the step budget
    return d3rlpy.dataset.MDPDataset(
        observations=z["obs"].astype(np.float32),
        actions=z["action"].astype(np.float32),
        rewards=z["reward"].astype(np.float32),
        terminals=terminals.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
    ), z


def make_algo(name: str, batch: int):
    if name == "bc":
        return d3rlpy.algos.BCConfig(batch_size=batch, learning_rate=3e-4, policy_type="deterministic",
                                     observation_scaler=StandardObservationScaler()).create(device="cpu:0")
    if name == "td3bc":
        return d3rlpy.algos.TD3PlusBCConfig(batch_size=batch, alpha=2.5,
                                            observation_scaler=StandardObservationScaler()).create(device="cpu:0")
    if name == "iql":
        return d3rlpy.algos.IQLConfig(batch_size=batch, expectile=0.7, weight_temp=3.0, max_weight=100.0,
                                      reward_scaler=ReturnBasedRewardScaler(multiplier=1000.0)).create(device="cpu:0")
    if name == "prdc":
        return d3rlpy.algos.PRDCConfig(batch_size=batch, alpha=2.5, beta=2.0,
                                       observation_scaler=StandardObservationScaler()).create(device="cpu:0")
    raise ValueError(f"unknown algo {name}")


def build(name: str, dataset, arrays, batch: int):
    """What fit() does before its loop: fit the scalers, build the networks (and PRDC's index)."""
    from d3rlpy.algos.utility import build_scalers_with_transition_picker
    from sklearn.neighbors import NearestNeighbors

    algo = make_algo(name, batch)
    build_scalers_with_transition_picker(algo, dataset)
    if name == "prdc":
        algo._nbsr = NearestNeighbors(n_neighbors=1, algorithm="auto", n_jobs=1)
    algo.create_impl(dataset.sample_transition().observation_signature.shape[0], dataset.dataset_info.action_size)
    if name == "prdc":  # PRDC.fit's index: [beta * scaled s, a] over every transition
        obs = arrays["obs"].astype(np.float32)
        obs = algo.observation_scaler.transform_numpy(obs)
        algo._nbsr.fit(np.concatenate([obs * algo.config.beta, arrays["action"].astype(np.float32)], axis=1))
    return algo


def main() -> None:
    state: dict = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "setup":
            d3rlpy.seed(msg["seed"])
            t0 = time.perf_counter()
            dataset, arrays = make_dataset(msg["npz"])
            t_data = time.perf_counter() - t0
            batch = msg["batch"]
            batches = [dataset.sample_transition_batch(batch) for _ in range(msg["steps"])]
            algos, built = {}, {}
            for name in msg["algos"]:
                t0 = time.perf_counter()
                algos[name] = build(name, dataset, arrays, batch)
                for _ in range(msg["warmup"]):
                    algos[name].update(dataset.sample_transition_batch(batch))
                built[name] = time.perf_counter() - t0
            state = {"dataset": dataset, "batches": batches, "algos": algos, "batch": batch}
            reply({"ok": True, "dataset_s": t_data, "build_and_warmup_s": built, "version": d3rlpy.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "transitions": int(dataset.transition_count)})
        elif cmd == "round":
            batches = state["batches"]
            if msg["what"] == "fit":
                from d3rlpy.logging import NoopAdapterFactory

                algo, n = state["algos"][msg["algo"]], len(batches)
                marks = {}

                def mark(_algo, _epoch, step, marks=marks, n=n):
                    if step == 1:
                        marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()
                    elif step == n + 1:
                        marks["t1"], marks["c1"] = time.perf_counter(), time.process_time()

                algo.fit(state["dataset"], n_steps=n + 1, n_steps_per_epoch=n + 1, show_progress=False,
                         logger_adapter=NoopAdapterFactory(), save_interval=10**9, callback=mark)
                reply({"wall": marks["t1"] - marks["t0"], "cpu": marks["c1"] - marks["c0"], "n": n})
                continue
            if msg["what"] == "sample":
                ds, b = state["dataset"], state["batch"]
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(len(batches)):
                    ds.sample_transition_batch(b)
            else:
                algo = state["algos"][msg["algo"]]
                t0, c0 = time.perf_counter(), time.process_time()
                for bt in batches:
                    algo.update(bt)
            reply({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "n": len(batches)})
        elif cmd == "quit":
            reply({"ok": True})
            return
        else:
            reply({"error": f"unknown cmd {cmd}"})


if __name__ == "__main__":
    main()
