"""OPE benchmarks (run by hand; results go to benchmarks/ope.md).

    python benchmarks/ope_bench.py speed --n 1000000 --steps 300 --rounds 3
        FQE update cost against a TD3+BC update on the same 1M-transition table (one thread, interleaved
        rounds so a busy machine slows both alike), and the projected cost of a whole FQE fit
        (setup + default updates + initial-state values) against a 100k-step TD3+BC run.
    python benchmarks/ope_bench.py validate benchmarks/ope_suites/hopper-medium-cpu.yaml --out /tmp/hopper.html
        `validate_suite` on a suite (DOPE metrics per estimator, time per estimator), printed as Markdown.
    python benchmarks/ope_bench.py inverted-pendulum-zoo --out benchmarks/ope_suites/inverted-pendulum
        writes the InvertedPendulum-v5 policy set (saturating linear controllers as offlab tanh-Gaussian actors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def speed(args) -> None:
    from benchmarks.learner_speed import random_dataset
    from offlab.algos import get_algo
    from offlab.algos.base import LearnerSpec
    from offlab.data.store import Transitions
    from offlab.evaluation.ope.fqe import FQE, FQEConfig
    from offlab.evaluation.ope.policy import tanh_gaussian_policy
    from offlab.nets import TanhGaussianActor

    ds = random_dataset(args.n, 11, 3)
    data = Transitions(ds)
    spec = LearnerSpec.from_transitions(data)
    td3 = get_algo("td3bc")(get_algo("td3bc").Config(), spec)
    torch.manual_seed(0)
    actor = TanhGaussianActor(11, 3)
    policy = tanh_gaussian_policy({k: v.detach().numpy() for k, v in actor.state_dict().items()}, "pi",
                                  -np.ones(3), np.ones(3))
    variants = {"fqe (default: 1 member, 1 target draw)": FQEConfig(),
                "fqe, 3 members (METRICS' seeds)": FQEConfig(members=3),
                "fqe, 10 target draws (METRICS)": FQEConfig(target_samples=10)}
    fqes, setup = {}, {}
    for name, cfg in variants.items():
        t0 = time.perf_counter()
        fqes[name] = FQE(policy, ds, 0.995, cfg)
        setup[name] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        td3.update(data.sample(256, gen))
    for f in fqes.values():
        for _ in range(30):
            f.update()
    per = {"td3bc": [], **{k: [] for k in fqes}}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):  # sampling included, as in the training loop (FQE samples inside update)
            td3.update(data.sample(256, gen))
        per["td3bc"].append((time.perf_counter() - t0) / args.steps * 1e3)
        for name, f in fqes.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f.update()
            per[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in per.items()), flush=True)
    t0 = time.perf_counter()
    fqes["fqe (default: 1 member, 1 target draw)"].initial_values()
    v0 = time.perf_counter() - t0
    td3_ms = statistics.median(per["td3bc"])
    print(f"\nn={args.n:,} transitions, 1 thread, {args.steps} updates x {args.rounds} rounds")
    print("| learner | ms/update (median) | ratio to TD3+BC (median per round) | setup s |")
    print("|---|---|---|---|")
    print(f"| TD3+BC | {td3_ms:.2f} | 1.00 | |")
    for name in fqes:
        ratio = statistics.median([a / b for a, b in zip(per[name], per["td3bc"], strict=True)])
        print(f"| {name} | {statistics.median(per[name]):.2f} | {ratio:.2f} | {setup[name]:.1f} |")
    d = "fqe (default: 1 member, 1 target draw)"
    ratio = statistics.median([a / b for a, b in zip(per[d], per["td3bc"], strict=True)])
    fqe_total = setup[d] + FQEConfig().updates * statistics.median(per[d]) / 1e3 + v0
    td3_total = 100_000 * td3_ms / 1e3
    print(f"\nwhole FQE fit (setup {setup[d]:.1f} s + {FQEConfig().updates:,} updates + V(s0) {v0:.1f} s): "
          f"{fqe_total:.0f} s; 100k TD3+BC updates: {td3_total:.0f} s; ratio {fqe_total / td3_total:.2f} "
          f"(per-update ratio {ratio:.2f} x 2.5)")


def validate(args) -> None:
    from offlab.evaluation.ope.validate import load_suite, metrics_table_rows, validate_suite

    torch.set_num_threads(1)
    suite = load_suite(args.suite)
    t0 = time.perf_counter()
    report = validate_suite(suite, out_html=args.out, log=not args.no_log, progress=False,
                            echo=lambda m: print(m, flush=True))
    print(f"\nsuite {suite.name}: {len(report['policies'])} policies, dataset {report['dataset']['name']} "
          f"({report['dataset']['transitions']:,} transitions), gamma {suite.gamma}, "
          f"{time.perf_counter() - t0:.0f} s in all")
    print("| estimator | AbsErr | Spearman | Kendall | Regret@1 | Regret@5 | CI coverage | unreliable | s/policy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in metrics_table_rows(report):
        print(f"| {r['estimator']} | {r['abs_err']:.3f} ± {r['abs_err_std']:.3f} | {r['spearman']:.3f} ± "
              f"{r['spearman_std']:.3f} | {r['kendall']:.3f} | {r['regret@1']:.3f} | {r['regret@5']:.3f} | "
              f"{r['ci_coverage']:.2f} | {r['unreliable']:.2f} | {r['seconds']:.1f} |")
    print("\n| policy | V_gamma (truth) | return | " + " | ".join(report["estimators"]) + " |")
    print("|---|---|---|" + "---|" * len(report["estimators"]))
    for p in report["policies"]:
        t = p["truth"]
        print(f"| {p['policy']} | {t['v_gamma']:.1f} ± {t['v_gamma_sem']:.1f} | {t['return']:.0f} | "
              + " | ".join(f"{p['estimates'][e]['value']:.1f}" for e in report["estimators"]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


# InvertedPendulum-v5 (obs: cart x, pole angle, their velocities; a in [-3, 3]): linear controllers from
# falling at once to balancing for the whole 1000 steps. name: (gains on obs, log-std of u)
INVERTED_PENDULUM_ZOO = {
    "behaviour": ((0.3, 2.5, 0.4, 0.4), -2.0),
    "zero": ((0.0, 0.0, 0.0, 0.0), -2.0),
    "wrong-sign": ((0.0, -2.0, 0.0, -0.3), -3.0),
    "weak": ((0.0, 1.0, 0.0, 0.2), -3.0),
    "weak-damped": ((0.1, 1.5, 0.2, 0.2), -3.0),
    "mid": ((0.2, 2.0, 0.3, 0.3), -3.0),
    "mid-angle": ((0.0, 2.0, 0.0, 0.3), -3.0),
    "good": ((0.5, 3.0, 0.5, 0.5), -3.0),
    "good-noisy": ((0.5, 3.0, 0.5, 0.5), -1.5),
    "expert": ((1.0, 5.0, 1.0, 1.0), -3.0),
    "expert-stiff": ((1.0, 10.0, 1.0, 2.0), -3.0),
}


def inverted_pendulum_zoo(args) -> None:
    from safetensors.numpy import save_file

    from tests.test_ope_support import linear_actor_tensors

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (gains, log_std) in INVERTED_PENDULUM_ZOO.items():
        save_file(linear_actor_tensors(gains, log_std), str(out / f"{name}.safetensors"))
    print(f"wrote {len(INVERTED_PENDULUM_ZOO)} InvertedPendulum-v5 actors to {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--rounds", type=int, default=3)
    v = sub.add_parser("validate")
    v.add_argument("suite")
    v.add_argument("--out", default=None)
    v.add_argument("--json", default=None)
    v.add_argument("--no-log", action="store_true")
    z = sub.add_parser("inverted-pendulum-zoo")
    z.add_argument("--out", default="benchmarks/ope_suites/inverted-pendulum")
    args = p.parse_args()
    torch.set_num_threads(1)
    {"speed": speed, "validate": validate, "inverted-pendulum-zoo": inverted_pendulum_zoo}[args.cmd](args)


if __name__ == "__main__":
    main()
