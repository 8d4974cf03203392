"""offlab vs d3rlpy 2.8.1: updates/s of BC, TD3+BC, IQL and PRDC on the same data, side by side (run by hand).

    . .venv/bin/activate
    python benchmarks/bench_d3rlpy.py                       # ~5 minutes on a busy 2-core machine (+1-2 to build data)
    python benchmarks/bench_d3rlpy.py --rounds 3 --steps 200 --json /tmp/d3rlpy_speed.json
    python benchmarks/bench_d3rlpy.py --algos td3bc --prototypes lean+vecdot+fused,lean+vecdot+fused+compile

d3rlpy lives in its own venv (default /work/d3rlpy-venv; `--d3rlpy-python`) and runs in a worker
subprocess (benchmarks/_d3rlpy_worker.py); it is never an offlab dependency.

- Data: the shipped `hopper/medium` SAC actor rolled out in the real Hopper-v5 simulator with
  `offlab.data.build.collect` (100k transitions by default), stored once under `--home` (a separate
  OFFLAB_HOME) and saved as an .npz (obs, action, reward, next_obs, terminated, timeouts) that the
  d3rlpy worker turns into an MDPDataset. Later runs reuse both.
- Same work in both libraries: 256-256 MLPs for actor, critics and value net, batch 256, Adam,
  lr 3e-4, each paper's defaults (TD3+BC alpha 2.5, policy delay 2, smoothing 0.2/0.5; IQL
  expectile 0.7, beta 3, max weight 100, reward scale 1000 / return range; PRDC alpha 2.5, beta 2,
  k 1; BC deterministic MSE), states standardised where the paper does (BC, TD3+BC, PRDC), CPU,
  `--threads` torch threads each (default one per core, both libraries' default; OMP/MKL_NUM_THREADS to
  match; d3rlpy's PRDC index n_jobs=1). offlab's PRDC, as under `offlab fit`, runs its neighbour search in a
  worker process on one of those cores and torch on the rest (`side_cores`); its CPU includes that process.
  offlab runs under the OpenMP spin that `offlab fit` sets (`offlab.threads.openmp_for_training`: GOMP_SPINCOUNT=30000 unless the shell set one), its subnormal floats flushed as `fit` trains (`--keep-denormals`: not), d3rlpy under libgomp's default (`--same-openmp`: offlab's too).
- Timed: `algo.update(batch)` on `--steps` batches drawn before timing (offlab: `Transitions.sample`,
  as the training loop samples, each batch announced one update ahead as `offlab fit` does, which lets
  PRDC begin its next neighbour search early; d3rlpy: `ReplayBuffer.sample_transition_batch`, whose numpy batch
  d3rlpy's `update` converts to tensors, so that conversion counts as update time). Sampling a batch
  is timed on its own (`sample` row): a training-loop step costs sample + update. The TD3+BC loop
  row times offlab's sample-then-update loop against d3rlpy's own `fit()` loop (logging off, no
  progress bar; timed inside fit from the end of its first step to the end of its last).
- `--bf16`: the same offlab learners again under `--precision bf16` (mixed precision, rows
  `<algo>@bf16`), against d3rlpy's float32 update of the same learner.
- Prototypes (`--prototypes`, see `prototype_td3bc`): offlab TD3+BC with proposed changes to its
  update, timed in the same rounds, to show what would reach a 2x speed-up; offlab/ is not changed.
- Every learner first runs `--warmup` untimed updates (allocator, first-call costs; PRDC's search is
  slowest while pi(s) is far from the data). Then rounds interleave the two libraries (offlab then
  d3rlpy, then d3rlpy then offlab, ...) so a busy machine slows both alike. Reported: the median
  over rounds of process CPU ms per update (main figure: the machine is shared) and of wall
  updates/s, and the median per-round ratio d3rlpy / offlab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# offlab's side runs under the OpenMP spin `offlab fit` sets (since session 33 30,000 spins); d3rlpy's under
# libgomp's default, as its users run it, unless the shell set a policy or spin count (then both get it) or
# --same-openmp is given
from offlab.threads import (  # noqa: E402
    OPENMP_WAIT_VARS,
    flushes_denormals,
    openmp_defaults,
    openmp_for_training,
    set_flush_denormals,
    torch_threads_beside,
    usable_cores,
)

USER_OPENMP = {k: os.environ[k] for k in OPENMP_WAIT_VARS if k in os.environ}

openmp_defaults()  # as the CLI, then as `offlab fit`
openmp_for_training()

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_d3rlpy_worker.py")
POLICY = REPO / "datasets" / "policies" / "hopper" / "medium.safetensors"
LABELS = {"bc": "BC", "td3bc": "TD3+BC", "iql": "IQL", "prdc": "PRDC"}


# ------------------------------------------------------------------------------------ data


def dataset_and_npz(home: Path, n: int):
    """The offlab dataset (built once with collect) and the .npz of the same arrays for d3rlpy."""
    from offlab.data import store
    from offlab.data.build import collect

    name = f"bench-hopper-medium-{n}"
    npz = home / f"{name}.npz"
    if store.exists(name):
        ds = store.load_dataset(name)
    else:
        t0 = time.perf_counter()
        ds = collect("Hopper-v5", str(POLICY), n, name, seed=0)
        print(f"collected {n} Hopper-v5 transitions in {time.perf_counter() - t0:.0f}s", flush=True)
    if not npz.is_file():
        np.savez(npz, obs=ds.obs, action=ds.action, reward=ds.reward, next_obs=ds.next_obs,
                 terminated=ds.terminated, timeouts=ds.truncated, episode=ds.episode, step=ds.step)
    return ds, npz


# ------------------------------------------------------------------------------------ prototypes


def prototype_td3bc(variant: str):
    """An offlab TD3+BC with changes to its update (the benchmark's what-if; offlab/ is untouched).

    `variant` joins any of these with '+':
    - `lean`: the actor step evaluates only Q1 (one ensemble member, the only one its loss uses),
      with the critic's parameters not requiring grad, so its backward computes no critic weight
      gradients (offlab and d3rlpy compute both members and their weight gradients, which the next
      critic step's zero_grad throws away).
    - `fused`: Adam(fused=True) for both optimisers (one kernel over all parameters on CPU).
    - `vecdot`: the critics' last layer (256 -> 1 per member) as a batched dot product
      (`torch.linalg.vecdot`) instead of `baddbmm`: a [N, B, 256] x [N, 256, 1] bmm takes MKL's slow
      path on CPU (~150 us forward, ~10x a plain matmul of the same size), in forward and backward.
    - `compile`: the critic loss and the actor loss (forward and backward) through torch.compile
      (inductor, default mode); the smoothing noise is drawn outside with the learner's generator.
    - `bf16`: forward and backward under torch.autocast("cpu", bfloat16): matmuls in bfloat16 with
      float32 weights, optimiser state and losses (mixed precision: numbers change; CPUs with
      AVX512-BF16 or AMX run bf16 matmuls at about twice the float32 rate).
    Every variant keeps the algorithm (same losses, same update order, same random draws).
    """
    from offlab.algos.losses import bootstrap_target, ensemble_mse, q_normalised_bc_actor_loss
    from offlab.algos.td3bc import TD3BC
    from offlab.nets import VectorizedLinear, polyak, take_step

    parts = set(variant.split("+"))
    unknown = parts - {"lean", "fused", "vecdot", "compile", "bf16"}
    if unknown:
        raise SystemExit(f"unknown prototype part(s) {sorted(unknown)}; use lean, fused, vecdot, compile, bf16")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in parts else contextlib.nullcontext

    class DotVectorizedLinear(VectorizedLinear):
        """VectorizedLinear with out_features == 1: y = <x, w> + b per member, without bmm."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vecdot(x, self.weight.transpose(1, 2)).unsqueeze(-1) + self.bias

    def q1_of(critic, s, a):
        """Q1(s, a) alone: member 0's slices of the ensemble's [N, in, out] weights, plain addmm."""
        x = torch.cat([s, a], dim=-1)
        for layer in critic.net.net:
            x = torch.addmm(layer.bias[0], x, layer.weight[0]) if hasattr(layer, "weight") else layer(x)
        return x.squeeze(-1)

    def critic_loss_fn(critic, critic_target, actor_target, s, a, r, s2, term, noise, gamma, noise_std,
                       noise_clip, max_action):
        """td3_critic_loss with the smoothing noise drawn by the caller (same maths, same draws)."""
        with autocast():
            with torch.no_grad():
                next_a = (actor_target(s2) + (noise * noise_std).clamp(-noise_clip, noise_clip)).clamp(
                    -max_action, max_action)
                target = bootstrap_target(r, term, critic_target(s2, next_a).min(dim=0).values.float(), gamma)
            return ensemble_mse(critic(s, a).float(), target)

    def actor_loss_fn(actor, critic, s, a, alpha):
        with autocast():
            pi = actor(s)
            q = (q1_of(critic, s, pi) if "lean" in parts else critic(s, pi)[0]).float()
            loss, bc = q_normalised_bc_actor_loss(q, pi.float(), a, alpha)
        return loss, bc, q

    if "compile" in parts:
        critic_loss_fn = torch.compile(critic_loss_fn)
        actor_loss_fn = torch.compile(actor_loss_fn)

    class ProtoTD3BC(TD3BC):
        def __init__(self, config, spec, device="cpu"):
            super().__init__(config, spec, device)
            if "fused" in parts:
                self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=True)
                self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=True)
            if "vecdot" in parts:
                for net in (self.critic, self.critic_target):
                    for m in net.modules():
                        if isinstance(m, VectorizedLinear) and m.weight.shape[-1] == 1:
                            m.__class__ = DotVectorizedLinear

        def update(self, batch):
            cfg = self.cfg
            s, s2, a = self.normalizer(batch.obs), self.normalizer(batch.next_obs), batch.action
            noise = torch.randn(a.shape, generator=self.generator, device=a.device, dtype=a.dtype)
            critic_loss = critic_loss_fn(
                self.critic, self.critic_target, self.actor_target, s, a, batch.reward, s2, batch.terminated, noise,
                cfg.gamma, cfg.policy_noise * self.max_action, cfg.noise_clip * self.max_action, self.max_action)
            take_step(self.critic_opt, critic_loss)
            self.updates += 1
            metrics = {"train/critic_loss": critic_loss.item()}
            if self.updates % cfg.policy_freq == 0:
                if "lean" in parts:
                    self.critic.requires_grad_(False)
                actor_loss, bc, q = actor_loss_fn(self.actor, self.critic, s, a, cfg.alpha)
                take_step(self.actor_opt, actor_loss)
                if "lean" in parts:
                    self.critic.requires_grad_(True)
                polyak(self.actor_target, self.actor, cfg.tau)
                polyak(self.critic_target, self.critic, cfg.tau)
                metrics |= {"train/actor_loss": actor_loss.item(), "train/bc_loss": bc.item(),
                            "train/q_mean": q.mean().item()}
            return metrics

    return ProtoTD3BC


# ------------------------------------------------------------------------------------ d3rlpy worker


class Worker:
    def __init__(self, python: str, log: Path, threads: int = 1, same_openmp: bool = False,
                 flush_denormals: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "BENCH_THREADS": str(threads), "PYTHONPATH": ""}
        if flush_denormals:
            env["BENCH_FLUSH_DENORMALS"] = "1"
        env.pop("OFFLAB_HOME", None)
        if not same_openmp:  # d3rlpy's own OpenMP setting (libgomp's default) unless the user chose one
            for k in OPENMP_WAIT_VARS:
                env.pop(k, None)
            env.update(USER_OPENMP)
        self.log = open(log, "w")
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=log.parent)

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                out = json.loads(line[2:])
                if "error" in out:
                    raise SystemExit(f"d3rlpy worker: {out['error']}")
                return out
        raise SystemExit(f"d3rlpy worker exited (rc {self.proc.wait()}); see {self.log.name}")

    def call(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv()

    def close(self) -> None:
        try:
            self.call({"cmd": "quit"})
        finally:
            self.proc.wait(timeout=30)
            self.log.close()


# ------------------------------------------------------------------------------------ main


def openmp_of(environ) -> str:
    """The OpenMP wait setting a process runs under, for the report."""
    chosen = [f"{k}={environ[k]}" for k in OPENMP_WAIT_VARS if k in environ]
    return ",".join(chosen) or "libgomp default"


def timed(fn, n: int, learner=None) -> tuple[float, float]:
    """Wall and CPU seconds per item of `fn()`; the CPU includes the learner's worker process (PRDC's search)."""
    from train_speed import process_and_helpers_cpu

    t0, c0 = time.perf_counter(), process_and_helpers_cpu(learner)
    fn()
    return (time.perf_counter() - t0) / n, (process_and_helpers_cpu(learner) - c0) / n


@contextlib.contextmanager
def torch_threads_for(learner, cores: int):
    """torch on the cores the learner leaves free, as `offlab fit` gives it (PRDC's search process keeps one
    busy: `side_cores`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads_beside(learner, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", default="/tmp/offlab_d3rlpy_bench", help="OFFLAB_HOME for the benchmark dataset")
    p.add_argument("--d3rlpy-python", default="/work/d3rlpy-venv/bin/python")
    p.add_argument("--n", type=int, default=100_000, help="transitions in the dataset")
    p.add_argument("--algos", default="bc,td3bc,iql,prdc")
    p.add_argument("--steps", type=int, default=300, help="updates per learner per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=500, help="untimed updates per learner before the rounds")
    p.add_argument("--bf16", default="td3bc,prdc",
                   help="offlab learners also timed with --precision bf16 (rows '<algo>@bf16'; '' for none)")
    p.add_argument("--prototypes", default="",
                   help="offlab TD3+BC variants timed beside the rest (comma-separated, '' for none; see "
                        "prototype_td3bc)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for both libraries (default 0: one per core, both libraries' default; the "
                        "libraries are timed in turns, never at once)")
    p.add_argument("--same-openmp", action="store_true",
                   help="run d3rlpy under offlab's OpenMP spin too (default: libgomp's own, as d3rlpy's users get)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="offlab's learners without `offlab fit`'s flush of subnormal floats (threads.set_flush_denormals)")
    p.add_argument("--d3rlpy-flush-denormals", action="store_true",
                   help="d3rlpy's learners with subnormal floats flushed too (default: as d3rlpy's users run it)")
    args = p.parse_args()
    args.threads = args.threads or usable_cores()
    if not args.keep_denormals:  # as `offlab fit` trains (offlab.training.Trainer), before torch's threads start
        set_flush_denormals(True)
    openmp = {"offlab": openmp_of(os.environ), "d3rlpy": openmp_of(os.environ if args.same_openmp else USER_OPENMP)}
    openmp["d3rlpy"] += ", subnormals flushed" if args.d3rlpy_flush_denormals else ""

    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["OFFLAB_HOME"] = str(home)
    torch.set_num_threads(args.threads)
    openmp["offlab"] += ", subnormals flushed" if flushes_denormals(args.threads) else ""

    from offlab.algos import get_algo
    from offlab.algos.base import LearnerSpec
    from offlab.data.store import Transitions
    from offlab.training import AnnouncedBatches, update_on

    algos = args.algos.split(",")
    protos = [v for v in args.prototypes.split(",") if v]
    ds, npz = dataset_and_npz(home, args.n)
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data)

    worker = Worker(args.d3rlpy_python, home / "d3rlpy_worker.log", args.threads, args.same_openmp,
                    args.d3rlpy_flush_denormals)
    worker.send({"cmd": "setup", "npz": str(npz), "algos": algos, "steps": args.steps, "warmup": args.warmup,
                 "seed": 0, "batch": 256})

    # offlab learners (built and warmed while the worker does the same: untimed)
    learners = {}
    for name in algos:
        cls = get_algo(name)
        learners[name] = cls(cls.Config(), spec, "cpu")
    bf16 = [a for a in args.bf16.split(",") if a and a in algos]
    for name in bf16:
        cls = get_algo(name)
        learners[f"{name}@bf16"] = cls(cls.Config(), spec, "cpu")
    for v in protos:
        cls = prototype_td3bc(v)
        learners[f"td3bc[{v}]"] = cls(cls.Config(), spec, "cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [data.sample(256, gen) for _ in range(args.steps)]
    warm = torch.Generator().manual_seed(1)
    from offlab.nets import mixed_precision

    def precision_of(name: str) -> str:
        return "bf16" if name.endswith("@bf16") else "float32"

    for name, learner in learners.items():
        t0 = time.perf_counter()
        with mixed_precision("cpu", precision_of(name)), torch_threads_for(learner, args.threads):
            for _ in range(args.warmup):
                learner.update(data.sample(256, warm))
        print(f"offlab {name}: {args.warmup} warm-up updates in {time.perf_counter() - t0:.1f}s", flush=True)
    info = worker.recv()
    print(f"d3rlpy {info['version']} (torch {info['torch']}, {info['threads']} thread): "
          f"{info['transitions']} transitions, built+warm-up "
          + ", ".join(f"{k} {v:.1f}s" for k, v in info["build_and_warmup_s"].items()), flush=True)

    def offlab_round(name: str) -> tuple[float, float]:
        if name == "sample":
            return timed(lambda: [data.sample(256, gen) for _ in range(args.steps)], args.steps)
        if name.startswith("loop:"):  # the training loop's step: sample a batch, update
            learner = learners[name[5:]]
            feed = AnnouncedBatches(learner, lambda: data.sample(256, gen))  # as Trainer: one batch ahead
            with torch_threads_for(learner, args.threads):
                return timed(lambda: [learner.update(feed.take(i + 1 < args.steps)) for i in range(args.steps)],
                             args.steps, learner)
        learner = learners[name]
        # each batch announced one update ahead, as in fit
        with mixed_precision("cpu", precision_of(name)), torch_threads_for(learner, args.threads):
            return timed(lambda: update_on(learner, batches), args.steps, learner)

    def d3rlpy_round(name: str) -> tuple[float, float]:
        what = "sample" if name == "sample" else "fit" if name.startswith("loop:") else "update"
        r = worker.call({"cmd": "round", "algo": name.removeprefix("loop:"), "what": what})
        return r["wall"] / r["n"], r["cpu"] / r["n"]

    rows = ["sample", *algos] + (["loop:td3bc"] if "td3bc" in algos else [])
    res = {(lib, k): {"wall": [], "cpu": []} for k in [*rows, *learners] for lib in ("offlab", "d3rlpy")}
    load = [os.getloadavg()]
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for k in [*rows, *(n for n in learners if n not in rows)]:
            sides = [("offlab", offlab_round)] + ([("d3rlpy", d3rlpy_round)] if k in rows else [])
            if r % 2:
                sides.reverse()
            for lib, fn in sides:
                wall, cpu = fn(k)
                res[(lib, k)]["wall"].append(wall)
                res[(lib, k)]["cpu"].append(cpu)
        load.append(os.getloadavg())
        print(f"round {r}: " + ", ".join(
            f"{k} {res[('offlab', k)]['cpu'][-1] * 1e3:.2f}"
            + (f"/{res[('d3rlpy', k)]['cpu'][-1] * 1e3:.2f}" if res[("d3rlpy", k)]["cpu"] else "")
            for k in [*rows, *(n for n in learners if n not in rows)]) + " cpu ms (offlab/d3rlpy)", flush=True)
    worker.close()
    elapsed = time.perf_counter() - t_start

    med = statistics.median
    summary = {}
    for (lib, k), v in res.items():
        if v["cpu"]:
            summary[f"{lib}/{k}"] = {"cpu_ms": med(v["cpu"]) * 1e3, "wall_ms": med(v["wall"]) * 1e3,
                                     "updates_per_s": 1.0 / med(v["wall"]),
                                     "cpu_ms_rounds": [x * 1e3 for x in v["cpu"]],
                                     "wall_ms_rounds": [x * 1e3 for x in v["wall"]]}

    def ratio(a: str, b: str, what: str) -> float:
        return med([x / y for x, y in zip(res[a][what], res[b][what], strict=True)])

    print(f"\nHopper-v5, {len(data)} transitions; {args.rounds} rounds x {args.steps} updates, warm-up {args.warmup};"
          f" {args.threads} thread(s); OpenMP offlab {openmp['offlab']}, d3rlpy {openmp['d3rlpy']};"
          f" {platform.processor() or platform.machine()}; load avg "
          f"{load[0][0]:.1f} at start, {load[-1][0]:.1f} at end; rounds took {elapsed:.0f}s")
    head = ("| learner | offlab updates/s (wall) | d3rlpy updates/s (wall) | offlab CPU ms/update "
            "| d3rlpy CPU ms/update | d3rlpy/offlab CPU | d3rlpy/offlab wall |")
    print(head)
    print("|" + "---|" * 7)
    for k in rows:
        o, d = summary[f"offlab/{k}"], summary[f"d3rlpy/{k}"]
        label = {"sample": "sample a batch", "loop:td3bc": "TD3+BC loop step (offlab sample+update; d3rlpy fit)"
                 }.get(k, LABELS.get(k, k))
        cpu_r, wall_r = ratio(("d3rlpy", k), ("offlab", k), "cpu"), ratio(("d3rlpy", k), ("offlab", k), "wall")
        summary[f"ratio/{k}"] = {"cpu": cpu_r, "wall": wall_r}
        print(f"| {label} | {o['updates_per_s']:.0f} | {d['updates_per_s']:.0f} | {o['cpu_ms']:.2f} | "
              f"{d['cpu_ms']:.2f} | **{cpu_r:.2f}x** | {wall_r:.2f}x |")
    for k in algos:  # one training-loop step: sample + update, from the rows above
        o = summary["offlab/sample"]["cpu_ms"] + summary[f"offlab/{k}"]["cpu_ms"]
        d = summary["d3rlpy/sample"]["cpu_ms"] + summary[f"d3rlpy/{k}"]["cpu_ms"]
        summary[f"loop/{k}"] = {"offlab_cpu_ms": o, "d3rlpy_cpu_ms": d, "ratio": d / o}
        print(f"| {LABELS.get(k, k)} sample+update | {1e3 / o:.0f} (cpu) | {1e3 / d:.0f} (cpu) | {o:.2f} | {d:.2f} "
              f"| {d / o:.2f}x | |")
    if "td3bc" in algos:
        print()
        for k in [n for n in learners if n != "td3bc"]:
            r_cpu = ratio(("offlab", k), ("offlab", "td3bc"), "cpu")
            r_wall = ratio(("offlab", k), ("offlab", "td3bc"), "wall")
            summary[f"offlab_vs_td3bc/{k}"] = {"cpu": r_cpu, "wall": r_wall}
            extra = ""
            # the d3rlpy learner this variant stands against: <algo>@bf16 -> <algo>, a prototype -> TD3+BC
            base = k.removesuffix("@bf16") if k.endswith("@bf16") else "td3bc" if k.startswith("td3bc[") else None
            if base is not None:
                vs = {"cpu": ratio(("d3rlpy", base), ("offlab", k), "cpu"),
                      "wall": ratio(("d3rlpy", base), ("offlab", k), "wall")}
                extra = f"; d3rlpy {LABELS[base]} update / this: {vs['cpu']:.2f}x cpu, {vs['wall']:.2f}x wall"
                if base == "td3bc":
                    loop = summary["offlab/sample"]["cpu_ms"] + summary[f"offlab/{k}"]["cpu_ms"]
                    vs["fit_vs_sample_update_cpu"] = summary["d3rlpy/loop:td3bc"]["cpu_ms"] / loop
                    extra += f"; d3rlpy fit step / (offlab sample + this): {vs['fit_vs_sample_update_cpu']:.2f}x cpu"
                summary[f"d3rlpy_vs/{k}"] = vs
            if k.startswith("prdc"):  # the timed updates are PRDC's dearest: its policy is still far from the data
                extra += (f"; updates {args.warmup}-{args.warmup + args.rounds * args.steps} from initialisation, "
                          "where the exact search costs most (over a run: benchmarks/train_speed.py)")
            print(f"offlab {k} / offlab td3bc: {r_cpu:.2f}x cpu, {r_wall:.2f}x wall "
                  f"({summary[f'offlab/{k}']['cpu_ms']:.2f} cpu ms/update){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load, "summary": summary, "openmp": openmp,
                                               "d3rlpy": info, "python": sys.version}, indent=1))


if __name__ == "__main__":
    main()
