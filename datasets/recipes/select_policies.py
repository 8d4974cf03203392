"""Choose the shipped behaviour policies of one env from a train_behavior.py run, and write their cards.

    python datasets/recipes/select_policies.py --family hopper --env Hopper-v5 --run datasets/recipes/runs/hopper

- expert: the snapshot with the best evaluation among the run's last five (D4RL: the fully trained policy);
- medium: the first snapshot whose evaluated return reaches --medium-fraction of the expert's
  (D4RL: "roughly one third"; the D4RL medium datasets sit at 0.3-0.5 of expert);
- medium-replay: every snapshot up to and including medium;
- random: a freshly initialised actor (seeded), which D4RL also uses.
Each chosen policy is evaluated with offlab's own torch actor, sampled as in a build, over >= 50 episodes;
the card records env, algorithm, training steps, seed and that return ± standard error.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import torch
from safetensors.numpy import save_file

from offlab.data.build import evaluate_policy, load_policy_file
from offlab.envs.make import env_spaces, normalized_score
from offlab.nets import TanhGaussianActor
from offlab.paths import catalog_dir

REF = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--medium-fraction", type=float, default=0.4)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--expert-step", type=int, default=None, help="force the expert snapshot")
    p.add_argument("--medium-step", type=int, default=None, help="force the medium snapshot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    curve = [(int(r[0]), float(r[1])) for r in csv.reader(open(args.run / "curve.csv"))]
    snaps = {s: args.run / "snapshots" / f"step_{s:07d}.safetensors" for s, _ in curve}
    out = catalog_dir() / "policies" / args.family
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = REF[args.family]

    def card(path: Path, level: str, step: int | None) -> dict:
        src = load_policy_file(path)
        ev = evaluate_policy(src, args.env, episodes=args.episodes, workers=2)
        c = {
            "env": args.env, "level": level, "algorithm": "SBX SAC (sbx-rl), tanh-Gaussian actor 256-256",
            "training_steps": step, "seed": args.seed, "sampled": True, **ev,
            "normalized_score": float(normalized_score(ev["return_mean"], lo, hi)),
            "recipe": "datasets/recipes/train_behavior.py",
        }
        path.with_suffix(".json").write_text(json.dumps(c, indent=2) + "\n")
        print(level, step, f"{ev['return_mean']:.1f} ± {ev['return_se']:.1f} ({c['normalized_score']:.1f})", flush=True)
        return c

    last = curve[-5:]
    expert_step = args.expert_step or max(last, key=lambda t: t[1])[0]
    shutil.copy(snaps[expert_step], out / "expert.safetensors")
    expert = card(out / "expert.safetensors", "expert", expert_step)
    target = args.medium_fraction * expert["return_mean"]
    medium_step = args.medium_step or next(s for s, r in curve if r >= target)
    shutil.copy(snaps[medium_step], out / "medium.safetensors")
    card(out / "medium.safetensors", "medium", medium_step)

    shutil.copy(args.run / "curve.csv", out / "training_curve.csv")  # step, eval return, se, seconds
    replay = out / "replay"
    shutil.rmtree(replay, ignore_errors=True)
    replay.mkdir()
    for s, _ in curve:
        if s <= medium_step:
            shutil.copy(snaps[s], replay / snaps[s].name)

    sp = env_spaces(args.env)
    torch.manual_seed(args.seed)
    actor = TanhGaussianActor(sp.obs_shape[0], sp.action_dim)
    tensors = {k: v.detach().numpy().copy() for k, v in actor.state_dict().items()}
    save_file(tensors, str(out / "random.safetensors"), {"env": args.env, "init_seed": str(args.seed)})
    card(out / "random.safetensors", "random", 0)


if __name__ == "__main__":
    main()
