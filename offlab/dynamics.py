"""A learned dynamics-and-reward model: an ensemble of probabilistic MLPs, plus known termination rules.

Chua et al., "Deep Reinforcement Learning in a Handful of Trials using Probabilistic Dynamics Models"
(PETS), NeurIPS 2018, arXiv:1805.12114: each member outputs a diagonal Gaussian over the target, is
trained by Gaussian negative log-likelihood, and bounds its log-variance softly between learned
limits (Appendix A.1). As in MBPO (Janner et al., NeurIPS 2019, arXiv:1906.08253) and DOPE's MB-FF
(Fu et al., ICLR 2021), the target is (s' - s, r), inputs and targets are standardised, training
holds out data and keeps the best checkpoint, and a rollout picks a member uniformly at each step.

Used by model-based OPE (offlab.evaluation.ope.model_based) and meant for the model-based learners.
Termination: the known MuJoCo v5 rules (Hopper, Walker2d, Ant, Humanoid healthy ranges, read from the
env so env kwargs are respected), none for envs that never terminate, else a learned classifier.

Differs from the reference code:
- Early stopping tracks the ensemble's mean held-out NLL (MBPO tracks each member's MSE).
- The held-out set is 10% of episodes (by episode), not of transitions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from offlab.data.schema import Dataset
from offlab.nets import BATCHES, EnsembleMLP, mlp, stream_generator
from offlab.threads import denormals_flushed

Termination = Callable[[torch.Tensor], torch.Tensor]
"""next observations [B, obs_dim] -> bool [B] (True: a true terminal)."""


@dataclass
class DynamicsConfig:
    """Ensemble dynamics settings (METRICS B.2 MB-FF: 5 members of 4 x 200, Gaussian NLL)."""

    members: int = 5
    """Ensemble members."""
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden layer sizes of each member."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 2.5e-5
    """L2 penalty on the weights (MBPO uses 2.5e-5 to 1e-4 by layer)."""
    batch_size: int = 256
    """Transitions per member per step."""
    max_updates: int = 20_000
    """Upper bound on gradient steps."""
    eval_every: int = 1_000
    """Steps between held-out evaluations."""
    patience: int = 5
    """Stop after this many evaluations without a 0.1% held-out improvement."""
    holdout: float = 0.1
    """Fraction of episodes held out."""
    seed: int = 0
    """Seed of the split, initialisation and batches."""


class DynamicsEnsemble(nn.Module):
    """E probabilistic MLPs predicting N(mean, var) over (s' - s, r) from (s, a), standardised inside."""

    def __init__(self, obs_dim: int, action_dim: int, members: int = 5,
                 hidden: tuple[int, ...] = (200, 200, 200, 200)):
        super().__init__()
        self.obs_dim, self.action_dim, self.members = obs_dim, action_dim, members
        out = obs_dim + 1
        self.net = EnsembleMLP(members, obs_dim + action_dim, 2 * out, hidden, activation=nn.SiLU)
        self.max_logvar = nn.Parameter(torch.full((out,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((out,), -10.0))
        for name, dim in (("in_mean", obs_dim + action_dim), ("in_std", obs_dim + action_dim),
                          ("out_mean", out), ("out_std", out)):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name else torch.ones(dim))
        self.register_buffer("obs_low", torch.full((obs_dim,), -math.inf))
        self.register_buffer("obs_high", torch.full((obs_dim,), math.inf))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised inputs [B, in] or [E, B, in] -> standardised mean and log-variance [E, B, out]."""
        out = self.net(x)
        mean, logvar = out.chunk(2, dim=-1)
        # PETS' soft bounds on the log-variance (Appendix A.1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def _inputs(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return (torch.cat([obs, action], -1) - self.in_mean) / self.in_std

    def nll(self, obs: torch.Tensor, action: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL per member [E] of raw targets (s' - s, r); obs/action/target [E, B, .] or [B, .]."""
        mean, logvar = self(self._inputs(obs, action))
        z = (target - self.out_mean) / self.out_std
        return (((mean - z) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(-2, -1))

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's mean and variance of (s' - s, r) in raw units: [E, B, obs_dim + 1] each."""
        mean, logvar = self(self._inputs(obs, action))
        return mean * self.out_std + self.out_mean, torch.exp(logvar) * self.out_std**2

    @torch.no_grad()
    def step(self, obs: torch.Tensor, action: torch.Tensor, generator: torch.Generator | None = None,
             member: int | None = None, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(next_obs, reward) for a batch, each row from a uniformly chosen member (or `member`).

        Rows are shuffled into E equal groups, one per member, so each row's member is uniform and the
        cost is one member's forward pass. Next states are clipped to the data range +- 10%.
        """
        b = len(obs)
        x = self._inputs(obs, action)
        if member is not None:
            mean, logvar = self.net_member(x, member)
        else:
            e = self.members
            perm = torch.randperm(b, generator=generator)
            pad = (-b) % e
            xp = x[torch.cat([perm, perm.repeat(pad // b + 1)[:pad]])] if pad else x[perm]
            mean, logvar = self(xp.reshape(e, -1, x.shape[-1]))
            mean, logvar = mean.reshape(-1, mean.shape[-1])[:b], logvar.reshape(-1, mean.shape[-1])[:b]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(b)
            mean, logvar = mean[inv], logvar[inv]
        if sample:
            mean = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        out = mean * self.out_std + self.out_mean
        next_obs = torch.maximum(torch.minimum(obs + out[:, :-1], self.obs_high), self.obs_low)
        return next_obs, out[:, -1]

    def net_member(self, x: torch.Tensor, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One member's standardised mean and log-variance for inputs x [B, in] (that member's weights only)."""
        for layer in self.net.net:
            x = torch.addmm(layer.bias[member], x, layer.weight[member]) if hasattr(layer, "weight") else layer(x)
        mean, logvar = x.chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    # -- fitting --------------------------------------------------------------------------------

    def set_statistics(self, ds: Dataset, rows: np.ndarray) -> None:
        """Standardisation from the training rows; the state clip box from all data, widened by 10%."""
        x = np.concatenate([ds.obs[rows], ds.action[rows]], 1).astype(np.float64)
        y = np.concatenate([ds.next_obs[rows] - ds.obs[rows], ds.reward[rows, None]], 1).astype(np.float64)
        self.in_mean.copy_(torch.from_numpy(x.mean(0)))
        self.in_std.copy_(torch.from_numpy(x.std(0) + 1e-6))
        self.out_mean.copy_(torch.from_numpy(y.mean(0)))
        self.out_std.copy_(torch.from_numpy(y.std(0) + 1e-6))
        both = np.concatenate([ds.obs, ds.next_obs])
        lo, hi = both.min(0).astype(np.float64), both.max(0).astype(np.float64)
        margin = 0.1 * (hi - lo)
        self.obs_low.copy_(torch.from_numpy(lo - margin))
        self.obs_high.copy_(torch.from_numpy(hi + margin))


@denormals_flushed()
def fit_dynamics(ds: Dataset, config: DynamicsConfig | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[DynamicsEnsemble, dict]:
    """Train an ensemble on `ds` (each member its own batches), early-stopped on held-out episodes; subnormal floats
    flushed to zero as in a learner's training (`offlab.threads.denormals_flushed`)."""
    cfg = config or DynamicsConfig()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(ds.n_episodes)
    n_out = max(1, int(round(cfg.holdout * ds.n_episodes))) if ds.n_episodes > 1 else 0
    held = np.isin(ds.episode, order[:n_out])
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(held_rows):  # one episode: hold out its last 10% of steps
        cut = int(len(ds) * (1 - cfg.holdout))
        train_rows, held_rows = np.arange(cut), np.arange(cut, len(ds))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DynamicsEnsemble(ds.obs.shape[1], ds.action.shape[1], cfg.members, cfg.hidden)
    model.set_statistics(ds, train_rows)
    obs = torch.from_numpy(np.array(ds.obs, np.float32))
    action = torch.from_numpy(np.array(ds.action, np.float32))
    target = torch.cat([torch.from_numpy(np.ascontiguousarray(ds.next_obs - ds.obs, np.float32)),
                        torch.from_numpy(ds.reward.astype(np.float32)).unsqueeze(-1)], -1)
    decay = [p for n, p in model.named_parameters() if n.startswith("net.") and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not (n.startswith("net.") and n.endswith("weight"))]
    opt = torch.optim.Adam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}], lr=cfg.lr)
    gen = stream_generator(cfg.seed, BATCHES)
    train_t = torch.from_numpy(train_rows)
    held_t = torch.from_numpy(held_rows[:20_000])
    best, best_state, stale, history = math.inf, copy.deepcopy(model.state_dict()), 0, []
    step = 0
    for step in range(1, cfg.max_updates + 1):
        rows = train_t[torch.randint(len(train_t), (cfg.members, cfg.batch_size), generator=gen)]
        loss = model.nll(obs[rows], action[rows], target[rows]).sum()
        loss = loss + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.max_updates:
            if progress:
                progress(cfg.eval_every if step % cfg.eval_every == 0 else step % cfg.eval_every)
            with torch.no_grad():
                held_nll = float(model.nll(obs[held_t], action[held_t], target[held_t]).mean())
            history.append((step, held_nll))
            if not math.isfinite(best) or held_nll < best - 1e-3 * abs(best):
                best, best_state, stale = held_nll, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        mean, _ = model.predict(obs[held_t], action[held_t])
        mse = ((mean - target[held_t]) ** 2).mean(dim=1)  # [E, out]
    info = {"updates": step, "heldout_nll": best, "heldout_state_mse": float(mse[:, :-1].mean()),
            "heldout_reward_mse": float(mse[:, -1].mean()), "heldout_episodes": int(n_out), "history": history}
    return model, info


# ------------------------------------------------------------------------------------ termination


def known_termination(env_id: str, env_kwargs: dict | None = None) -> Termination | None | bool:
    """The env's termination rule on next observations, read from the env itself.

    Returns a function for the MuJoCo envs with healthy ranges (Hopper, Walker2d, Ant, Humanoid),
    False for envs that never terminate (no `is_healthy`, e.g. HalfCheetah, Swimmer, Pendulum, or
    terminate_when_unhealthy=False), and None when the rule is unknown (learn it from the data).
    """
    from offlab.envs.make import make_env

    env = make_env(env_id, **(env_kwargs or {}))
    try:
        u = env.unwrapped
        family = type(u).__name__
        if not hasattr(type(u), "is_healthy"):
            return False if not _terminates_somehow(u) else None
        if not getattr(u, "_terminate_when_unhealthy", True):
            return False
        off = 0 if getattr(u, "_exclude_current_positions_from_observation", True) else 1
        if family == "HopperEnv":
            (z0, z1), (a0, a1), (s0, s1) = u._healthy_z_range, u._healthy_angle_range, u._healthy_state_range

            def hopper(o: torch.Tensor) -> torch.Tensor:
                z, angle, state = o[:, off], o[:, off + 1], o[:, off + 1:]
                healthy = (z > z0) & (z < z1) & (angle > a0) & (angle < a1) & ((state > s0) & (state < s1)).all(1)
                return ~healthy

            return hopper
        if family == "Walker2dEnv":
            (z0, z1), (a0, a1) = u._healthy_z_range, u._healthy_angle_range

            def walker(o: torch.Tensor) -> torch.Tensor:
                z, angle = o[:, off], o[:, off + 1]
                return ~((z > z0) & (z < z1) & (angle > a0) & (angle < a1))

            return walker
        if family in ("AntEnv", "HumanoidEnv"):
            z0, z1 = u._healthy_z_range
            zi = 0 if getattr(u, "_exclude_current_positions_from_observation", True) else 2
            strict = family == "HumanoidEnv"

            def upright(o: torch.Tensor) -> torch.Tensor:
                z = o[:, zi]
                ok = ((z > z0) & (z < z1)) if strict else ((z >= z0) & (z <= z1))
                return ~(ok & torch.isfinite(o).all(1))

            return upright
        return None
    finally:
        env.close()


def _terminates_somehow(u) -> bool:
    """Envs known never to terminate: classic-control Pendulum, MuJoCo locomotion without a health check."""
    return type(u).__name__ not in ("PendulumEnv", "HalfCheetahEnv", "SwimmerEnv", "ReacherEnv", "PusherEnv")


class TerminationClassifier(nn.Module):
    """P(terminal | s') learned from the data's `terminated` flags, when no rule is known."""

    def __init__(self, obs_dim: int, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.net = mlp(obs_dim, 1, (64, 64))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, next_obs: torch.Tensor) -> torch.Tensor:
        """Logit of P(terminal | s')."""
        return self.net((next_obs - self.mean) / self.std).squeeze(-1)


def learn_termination(ds: Dataset, steps: int = 3000, seed: int = 0) -> Termination:
    """A classifier of `terminated` from next_obs (class-balanced logistic loss)."""
    term = ds.terminated.astype(np.float32)
    x = torch.from_numpy(np.array(ds.next_obs, np.float32))
    y = torch.from_numpy(term)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = TerminationClassifier(x.shape[1], ds.next_obs.mean(0), ds.next_obs.std(0) + 1e-6)
    pos = max(float(term.mean()), 1e-6)
    weight = torch.tensor(min((1 - pos) / pos, 1e3))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = stream_generator(seed, BATCHES)
    for _ in range(steps):
        rows = torch.randint(len(x), (512,), generator=gen)
        logits = clf(x[rows])
        loss = F.binary_cross_entropy_with_logits(logits, y[rows], pos_weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()

    @torch.no_grad()
    def terminal(next_obs: torch.Tensor) -> torch.Tensor:
        return clf(next_obs) > 0

    return terminal


def termination_for(ds: Dataset) -> tuple[Termination | None, str]:
    """The termination rule for rollouts of `ds`'s env and how it was chosen."""
    rule = known_termination(ds.card.env_id, ds.card.env_kwargs)
    if rule is False:
        return None, "none (the env never terminates)"
    if rule is not None:
        return rule, f"known {ds.card.env_id} healthy ranges"
    if not ds.terminated.any():
        return None, "none (no terminal in the data)"
    return learn_termination(ds), "learned classifier on next_obs"
