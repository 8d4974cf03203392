"""offlab's TD3+BC update against d3rlpy 2.8.1's, fed the very same inputs (run by hand, in the d3rlpy venv).

Session 14's test of whether walker2d-medium's TD3+BC collapse (offlab 3 runs of 3, d3rlpy 0 of 2) comes from
the update rule or from what feeds it. d3rlpy's TD3PlusBC is built, then given offlab's initial weights and
state normaliser; every step both libraries get the same batch (offlab's sampler) and the same target-smoothing
noise (d3rlpy draws it from the global torch RNG, which is set to offlab's generator state before its step).

    PY=/work/d3rlpy-venv/bin/python   # d3rlpy 2.8.1, plus pyarrow and pyyaml so that offlab imports
    PYTHONPATH=. OFFLAB_HOME=$OFFLAB_BENCH_HOME $PY benchmarks/learning_experiments/td3bc_lockstep.py \\
        lockstep --steps 3000                      # both updates side by side: parameter gaps and Q
    PYTHONPATH=. OFFLAB_HOME=$OFFLAB_BENCH_HOME $PY benchmarks/learning_experiments/td3bc_lockstep.py \\
        alone --learner d3rlpy --seed 0 --steps 200000 --out d3rlpy-update-offlab-pipeline-s0.csv

`lockstep`: after each of the first steps, the largest absolute gap between the two libraries' parameters (actor,
critics and their targets), both critic losses and both mean Q1(s, pi(s)) over 4,096 fixed dataset states.
`--scaler d3rlpy` keeps d3rlpy's own fitted normaliser instead (its std differs from offlab's by up to 2e-4).

`alone`: one library's update for --steps steps in offlab's pipeline (offlab's sampler seeded as `offlab fit`
seeds it, offlab's normaliser, initial weights and noise stream), with no evaluation: `--learner d3rlpy` is
offlab fit's run of that seed with only the update rule swapped; every 1,000 steps it writes the critic
loss averaged over those steps (offlab fit's train/critic_loss) and the mean Q1(s, pi(s)) over 10,000 fixed
dataset states to --out. A diverging critic shows there as Q(s, pi(s)) leaving its plateau (walker2d-medium:
172-189) for hundreds. `--scaler d3rlpy` puts d3rlpy's fitted normaliser in offlab's place and
`--drop-timeouts` samples as d3rlpy does, never the last transition of a time-limited episode (session 16).
`--streams d3rlpy` also takes d3rlpy's own initial weights and random streams (session 16); `--streams d3rlpy-weights`
takes d3rlpy's initial weights alone, with offlab's batch and noise streams, and `--streams d3rlpy-draws` d3rlpy's
batch and noise streams alone, with offlab's initial weights (session 18).
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np
import torch

torch.set_num_threads(1)

import d3rlpy  # noqa: E402  (the d3rlpy venv only)
from d3rlpy.algos.utility import build_scalers_with_transition_picker  # noqa: E402
from d3rlpy.preprocessing import StandardObservationScaler  # noqa: E402
from d3rlpy.torch_utility import TorchMiniBatch  # noqa: E402

from offlab.algos.base import LearnerSpec  # noqa: E402
from offlab.algos.td3bc import TD3BC, TD3BCConfig  # noqa: E402
from offlab.data import registry  # noqa: E402
from offlab.data.store import Transitions  # noqa: E402
from offlab.nets import Normalizer, derived_seed  # noqa: E402


def d3rlpy_dataset(ds) -> d3rlpy.dataset.MDPDataset:
    """The dataset as d3rlpy sees it (as benchmarks/_d3rlpy_worker.py builds it): episodes cut at terminals and
    time limits, the last transition of a time-limited episode dropped."""
    timeouts = ds.truncated.astype(bool).copy()
    if not (ds.terminated[-1] or timeouts[-1]):
        timeouts[-1] = True
    return d3rlpy.dataset.MDPDataset(
        observations=ds.obs.astype(np.float32), actions=ds.action.astype(np.float32),
        rewards=ds.reward.astype(np.float32), terminals=ds.terminated.astype(np.float32),
        timeouts=timeouts.astype(np.float32))


def d3rlpy_td3bc(ds, alpha: float = 2.5):
    """d3rlpy's TD3PlusBC and the dataset as d3rlpy sees it, its StandardObservationScaler fitted as `fit` fits it
    (on the transitions it samples); the networks are not built yet."""
    algo = d3rlpy.algos.TD3PlusBCConfig(
        batch_size=256, alpha=alpha, observation_scaler=StandardObservationScaler()).create("cpu:0")
    mdp = d3rlpy_dataset(ds)
    build_scalers_with_transition_picker(algo, mdp)
    return algo, mdp


class D3rlpyTwin:
    """d3rlpy's TD3PlusBC holding a copy of an offlab TD3BC's weights, stepped on offlab's batches."""

    def __init__(self, learner: TD3BC, ds, use_offlab_scaler: bool, weights_from: str = "offlab"):
        self.algo, mdp = d3rlpy_td3bc(ds, learner.cfg.alpha)
        self.algo.create_impl(mdp.sample_transition().observation_signature.shape[0], mdp.dataset_info.action_size)
        self.scaler = self.algo.config.observation_scaler
        self.std_gap = float(np.abs(self.scaler.std - learner.spec.obs_std).max())
        if use_offlab_scaler:
            self.scaler.mean = learner.spec.obs_mean.astype(np.float64)
            self.scaler.std = learner.spec.obs_std.astype(np.float64)
            self.scaler._torch_mean = None  # re-read on the next transform
        self.m = self.algo._impl._modules
        with torch.no_grad():  # one set of initial weights for both: offlab's, or d3rlpy's own draw
            for ours, theirs in self.pairs(learner):
                (theirs.copy_(ours) if weights_from == "offlab" else ours.copy_(theirs))

    def pairs(self, learner: TD3BC):
        """(offlab tensor, d3rlpy tensor) for every parameter, in d3rlpy's [out, in] layout."""
        def actor(ours, theirs):
            lins = [layer for layer in ours.net if isinstance(layer, torch.nn.Linear)]
            for a, b in zip(lins, [theirs._encoder._layers[0], theirs._encoder._layers[2], theirs._fc], strict=True):
                yield a.weight, b.weight
                yield a.bias, b.bias

        def critic(ours, theirs):
            layers = [layer for layer in ours.net.net if hasattr(layer, "weight")]
            for i in range(2):
                for v, b in zip(layers, [theirs[i]._encoder._layers[0], theirs[i]._encoder._layers[2], theirs[i]._fc],
                                strict=True):
                    yield v.weight[i].T, b.weight
                    yield v.bias[i, 0], b.bias

        yield from actor(learner.actor, self.m.policy)
        yield from actor(learner.actor_target, self.m.targ_policy)
        yield from critic(learner.critic, self.m.q_funcs)
        yield from critic(learner.critic_target, self.m.targ_q_funcs)

    def update(self, batch, step: int) -> float:
        s = self.scaler.transform
        n = len(batch.reward)
        tb = TorchMiniBatch(observations=s(batch.obs), actions=batch.action, rewards=batch.reward[:, None],
                            next_observations=s(batch.next_obs), next_actions=batch.action,
                            returns_to_go=torch.zeros(n, 1), terminals=batch.terminated[:, None],
                            intervals=torch.ones(n, 1), device="cpu:0")
        return self.algo._impl.update(tb, step)["critic_loss"]  # step % 2 == 0: actor and targets too

    def q_mean(self, obs: torch.Tensor) -> float:
        with torch.no_grad():
            s = self.scaler.transform(obs)
            return self.m.q_funcs[0](s, self.m.policy(s).squashed_mu).q_value.mean().item()


def offlab_q_mean(learner: TD3BC, obs: torch.Tensor) -> float:
    with torch.no_grad():
        s = learner.normalizer(obs)
        return learner.critic.member(s, learner.actor(s), 0).mean().item()


def setup(args):
    ds = registry.get(args.dataset, progress=False)
    data = Transitions(ds, "cpu")
    spec = LearnerSpec.from_transitions(data, ds.card.env_id, args.dataset)
    learner = TD3BC(TD3BCConfig(seed=args.seed), spec)
    sampler = torch.Generator().manual_seed(derived_seed(args.seed, 1))  # as offlab fit seeds its sampler
    return ds, data, learner, sampler


def lockstep(args) -> None:
    ds, data, ours, sampler = setup(args)
    twin = D3rlpyTwin(ours, ds, use_offlab_scaler=args.scaler == "offlab")
    print(f"d3rlpy's fitted std differs from offlab's by up to {twin.std_gap:.2e}; using {args.scaler}'s normaliser")
    probe = data.sample(4096, torch.Generator().manual_seed(7)).obs
    marks = {1, 2, 5, 10, 20, 50, 100, 200, 500, *range(1000, args.steps + 1, 1000)}
    for step in range(1, args.steps + 1):
        batch = data.sample(256, sampler)
        noise_state = ours.generator.get_state()
        loss_ours = ours.update(batch)["train/critic_loss"]
        torch.set_rng_state(noise_state)  # d3rlpy's torch.randn draws offlab's noise
        loss_theirs = twin.update(batch, step)
        if step in marks:
            gap = max((a - b).abs().max().item() for a, b in twin.pairs(ours))
            print(f"step {step:6d}  max |param gap| {gap:.2e}  critic loss {loss_ours:.6f} / {loss_theirs:.6f}  "
                  f"Q(s, pi(s)) {offlab_q_mean(ours, probe):.4f} / {twin.q_mean(probe):.4f}", flush=True)


def alone(args) -> None:
    ds, data, ours, sampler = setup(args)
    if args.scaler == "d3rlpy":  # (s - mean) / (std + eps) with d3rlpy's fitted statistics and eps
        sc = d3rlpy_td3bc(ds)[0].config.observation_scaler
        gap = float(np.abs(sc.std - ours.spec.obs_std).max())
        ours.normalizer = Normalizer(sc.mean, sc.std + sc.eps)
        print(f"offlab's normaliser replaced by d3rlpy's (std gap up to {gap:.2e})", flush=True)
    d3rlpy_draws = args.streams in ("d3rlpy", "d3rlpy-draws")  # batches from numpy, noise from the global torch RNG
    if args.streams != "offlab":  # d3rlpy.seed(seed), then d3rlpy draws its initial weights from the global torch RNG
        d3rlpy.seed(args.seed)
        weights = "offlab" if args.streams == "d3rlpy-draws" else "d3rlpy"  # d3rlpy-draws: its draw made, not used
        D3rlpyTwin(ours, ds, use_offlab_scaler=args.scaler == "offlab", weights_from=weights)
        if d3rlpy_draws:
            ours.generator.set_state(torch.get_rng_state())  # smoothing noise: the global torch stream from here on
        print({"d3rlpy": "d3rlpy's initial weights and random streams",
               "d3rlpy-weights": "d3rlpy's initial weights; offlab's batch and noise streams",
               "d3rlpy-draws": "offlab's initial weights; d3rlpy's batch and noise streams"}[args.streams], flush=True)
    if args.drop_timeouts or d3rlpy_draws:  # never the last transition of a time-limited episode
        keep = torch.nonzero(~data.truncated.bool().cpu()).squeeze(1)
        print(f"sampling {len(keep)} of {len(data)} rows (time-limit rows dropped)", flush=True)
    if d3rlpy_draws:
        def draw():  # d3rlpy: np.random.randint(transition_count) per transition, from numpy's global generator
            return data.batch(keep[torch.from_numpy(np.random.randint(len(keep), size=256))])
    elif args.drop_timeouts:
        def draw():
            return data.batch(keep[torch.randint(len(keep), (256,), generator=sampler)])
    else:
        def draw():
            return data.sample(256, sampler)
    twin = D3rlpyTwin(ours, ds, use_offlab_scaler=args.scaler == "offlab") if args.learner == "d3rlpy" else None
    probe = data.sample(10_000, torch.Generator().manual_seed(7)).obs
    noise = ours.generator  # the smoothing-noise stream offlab's own update would draw from
    t0 = time.perf_counter()
    with open(args.out, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "critic_loss", "q_mean", "seconds"])
        loss_sum = 0.0
        for step in range(1, args.steps + 1):
            batch = draw()
            if twin is None:
                loss = ours.update(batch)["train/critic_loss"]
            else:
                torch.set_rng_state(noise.get_state())
                loss = twin.update(batch, step)
                noise.set_state(torch.get_rng_state())
            loss_sum += loss
            if step % 1000 == 0:
                q = offlab_q_mean(ours, probe) if twin is None else twin.q_mean(probe)
                out.writerow([step, f"{loss_sum / 1000:.5f}", f"{q:.3f}", f"{time.perf_counter() - t0:.0f}"])
                f.flush()
                loss_sum = 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("lockstep")
    a.add_argument("--steps", type=int, default=3000)
    a.add_argument("--scaler", choices=("offlab", "d3rlpy"), default="offlab")
    b = sub.add_parser("alone")
    b.add_argument("--learner", choices=("offlab", "d3rlpy"), required=True)
    b.add_argument("--steps", type=int, default=200_000)
    b.add_argument("--out", required=True)
    b.add_argument("--scaler", choices=("offlab", "d3rlpy"), default="offlab",
                   help="d3rlpy's fitted normaliser in place of offlab's")
    b.add_argument("--drop-timeouts", action="store_true",
                   help="never sample the last transition of a time-limited episode, as d3rlpy does")
    b.add_argument("--streams", choices=("offlab", "d3rlpy", "d3rlpy-weights", "d3rlpy-draws"), default="offlab",
                   help="offlab learner: d3rlpy's initial weights, batch stream (numpy) and noise stream after "
                        "d3rlpy.seed(seed), sampling as --drop-timeouts; d3rlpy-weights: its initial weights only; "
                        "d3rlpy-draws: its batch and noise streams only")
    for q in (a, b):
        q.add_argument("--dataset", default="walker2d-medium")
        q.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lockstep(args) if args.cmd == "lockstep" else alone(args)


if __name__ == "__main__":
    main()
