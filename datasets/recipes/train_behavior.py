"""Train a behaviour policy with SBX SAC and keep actor snapshots along training.

D4RL's protocol: one SAC run per env; `expert` is the final policy, `medium` a snapshot of the same
run at roughly a third of expert return, `medium-replay` the learner's experience up to `medium`
(rebuilt by offlab from the snapshots, see catalog.yaml), `random` a randomly initialised actor.

Every --snapshot-every steps this script writes the actor as safetensors in offlab's own layout
(`hidden.<i>.weight`, `mean.*`, `log_std.*`; torch orientation [out, in]) and appends its
deterministic evaluation return to curve.csv. Every --checkpoint-every steps it saves the whole
SBX model and replay buffer, so a killed run continues with `--resume`.

    pip install 'offlab[recipes]'
    python datasets/recipes/train_behavior.py --env Hopper-v5 --steps 1000000 --out datasets/recipes/runs/hopper

To continue on another machine, `--export-resume DIR` packs the latest checkpoint into DIR
(model.zip plus the filled part of the replay buffer as compressed npz, small enough to commit),
and `--resume-from DIR` starts from such a pack.

Needs sbx-rl (JAX); offlab itself never imports it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from safetensors.numpy import save_file
from sbx import SAC
from stable_baselines3.common.callbacks import BaseCallback


def actor_tensors(model) -> dict[str, np.ndarray]:
    """The SBX SquashedGaussianActor's flax params in offlab's torch layout."""
    params = model.policy.actor_state.params["params"]
    dense = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    *hidden, mean, log_std = dense
    out = {}
    for i, k in enumerate(hidden):
        out[f"hidden.{i}.weight"] = np.asarray(params[k]["kernel"], dtype=np.float32).T.copy()
        out[f"hidden.{i}.bias"] = np.asarray(params[k]["bias"], dtype=np.float32).copy()
    for name, k in (("mean", mean), ("log_std", log_std)):
        out[f"{name}.weight"] = np.asarray(params[k]["kernel"], dtype=np.float32).T.copy()
        out[f"{name}.bias"] = np.asarray(params[k]["bias"], dtype=np.float32).copy()
    return out


def evaluate(model, env_id: str, episodes: int, seed: int) -> tuple[float, float]:
    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(action)
            ret += float(r)
            done = term or trunc
        returns.append(ret)
    env.close()
    return float(np.mean(returns)), float(np.std(returns) / np.sqrt(len(returns)))


class Snapshots(BaseCallback):
    def __init__(self, args, out: Path):
        super().__init__()
        self.args, self.out = args, out
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def _on_step(self) -> bool:
        step = self.num_timesteps
        if step % self.args.snapshot_every == 0:
            meta = {
                "env": self.args.env,
                "algorithm": "SBX SAC",
                "step": str(step),
                "seed": str(self.args.seed),
                "activation": "relu",
                "log_std_min": "-20",
                "log_std_max": "2",
            }
            save_file(actor_tensors(self.model), str(self.out / "snapshots" / f"step_{step:07d}.safetensors"), meta)
            mean, se = evaluate(self.model, self.args.env, self.args.eval_episodes, seed=10_000 + step)
            with open(self.out / "curve.csv", "a", newline="") as f:
                csv.writer(f).writerow([step, f"{mean:.2f}", f"{se:.2f}", f"{time.time() - self.t0:.0f}"])
            print(f"step {step}: return {mean:.1f} ± {se:.1f}", flush=True)
        if step % self.args.checkpoint_every == 0:
            # write beside, then rename: a run killed mid-save keeps its previous checkpoint whole
            ckpt = self.out / "ckpt"
            self.model.save_replay_buffer(ckpt / "replay.tmp.pkl")
            self.model.save(ckpt / "model.tmp.zip")
            os.replace(ckpt / "replay.tmp.pkl", ckpt / "replay.pkl")
            os.replace(ckpt / "model.tmp.zip", ckpt / "model.zip")
        return True


REPLAY_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def export_resume(run: Path, out: Path, with_replay: bool = True, replay_rows: int | None = None) -> None:
    """Pack run/ckpt (model.zip [+ replay.pkl]) into out/ (model.zip [+ replay.npz of the filled rows, or of
    the most recent `replay_rows` of them])."""
    import shutil

    model = SAC.load(run / "ckpt" / "model.zip")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "ckpt" / "model.zip", out / "model.zip")
    n = 0
    if with_replay:
        model.load_replay_buffer(run / "ckpt" / "replay.pkl")
        rb = model.replay_buffer
        # rows in the order they were written (oldest first), then the most recent replay_rows of them
        order = np.r_[rb.pos:rb.buffer_size, 0:rb.pos] if rb.full else np.arange(rb.pos)
        if replay_rows is not None:
            order = order[-replay_rows:]
        n = len(order)
        # float32 halves the pack (the envs' float64 observations lose nothing SAC's float32 networks see)
        np.savez_compressed(out / "replay.npz",
                            **{k: getattr(rb, k)[order].astype(np.float32) for k in REPLAY_FIELDS})
    shutil.copy(run / "curve.csv", out / "curve.csv")
    # snapshots: every one up to 300k steps (medium and medium-replay come from there), then every 50k
    snaps = sorted((run / "snapshots").glob("step_*.safetensors"))
    (out / "snapshots").mkdir(exist_ok=True)
    for f in snaps:
        step = int(f.stem.split("_")[1])
        if step <= 300_000 or step % 50_000 == 0 or f == snaps[-1]:
            shutil.copy(f, out / "snapshots" / f.name)
    print(f"packed step {model.num_timesteps} with {n} replay rows into {out}")


def load_resume_pack(pack: Path, env) -> SAC:
    model = SAC.load(pack / "model.zip", env=env)
    if not (pack / "replay.npz").exists():  # a pack without replay: the buffer refills from the current policy
        return model
    data = np.load(pack / "replay.npz")
    rb = model.replay_buffer
    n = len(data["rewards"])
    for k in REPLAY_FIELDS:
        getattr(rb, k)[:n] = data[k]
    rb.pos, rb.full = n % rb.buffer_size, n >= rb.buffer_size
    return model


def trim_curve(path: Path, step: int) -> None:
    """Drop curve rows written after the checkpoint we resume from, so a resumed run has one row per step."""
    if not path.exists():
        return
    rows = [r for r in csv.reader(path.open()) if r and int(r[0]) <= step]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", required=True)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-starts", type=int, default=10_000)
    p.add_argument("--snapshot-every", type=int, default=10_000)
    p.add_argument("--checkpoint-every", type=int, default=20_000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-from", type=Path, default=None, help="a pack written by --export-resume")
    p.add_argument("--export-resume", type=Path, default=None, help="pack the latest checkpoint and exit")
    p.add_argument("--no-replay", action="store_true", help="with --export-resume: leave the replay buffer out")
    p.add_argument("--replay-rows", type=int, default=None,
                   help="with --export-resume: keep only the most recent N replay rows (a smaller pack)")
    args = p.parse_args()
    if args.export_resume:
        export_resume(args.out, args.export_resume, with_replay=not args.no_replay, replay_rows=args.replay_rows)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps(vars(args), default=str, indent=2))
    env = gym.make(args.env)
    ckpt = args.out / "ckpt" / "model.zip"
    if args.resume_from is not None:
        import shutil

        model = load_resume_pack(args.resume_from, env)
        if not (args.out / "curve.csv").exists():
            shutil.copy(args.resume_from / "curve.csv", args.out / "curve.csv")
            shutil.copytree(args.resume_from / "snapshots", args.out / "snapshots", dirs_exist_ok=True)
        done = model.num_timesteps
        args.resume = True
        print(f"resuming from pack at step {done}", flush=True)
    elif args.resume and ckpt.exists():
        model = SAC.load(ckpt, env=env)
        replay = args.out / "ckpt" / "replay.pkl"
        if replay.exists():
            model.load_replay_buffer(replay)
        done = model.num_timesteps
        print(f"resuming at step {done}", flush=True)
    else:
        model = SAC("MlpPolicy", env, learning_starts=args.learning_starts, seed=args.seed, verbose=0)
        done = 0
    trim_curve(args.out / "curve.csv", done)
    model.learn(args.steps - done, callback=Snapshots(args, args.out), reset_num_timesteps=not args.resume)
    model.save(ckpt)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
