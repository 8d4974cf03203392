"""The behaviour policy's log-probabilities: logged `behavior_logp`, or a behaviour-cloned density model.

METRICS.md B.1: when a dataset does not log behaviour log-probabilities, fit mu-hat by maximum
likelihood on a 90/10 split by episode, with two candidate models, and keep the one with the lower
held-out negative log-likelihood:
- `gaussian`: an MLP (2 x 256, ReLU) giving a mean and a state-dependent log-std clipped to
  [-5, 2], squashed by tanh (actions clipped to +-(1 - 1e-6) before atanh; the log-density includes
  -sum log(1 - tanh^2));
- `mdn5`: a mixture of K = 5 tanh-Gaussian components (the default for pooled, replay and
  multi-policy data, where one Gaussian cannot fit several modes).
Logged `behavior_logp` always wins. Densities are on the env's action units (the box's log-scale
is subtracted), as `behavior_logp` is logged.

Differs from the reference code: policy_eval fits its behaviour model by BC for a fixed number of
steps; offlab keeps the checkpoint with the best held-out NLL (evaluated every `eval_every` steps).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from offlab.data.schema import Dataset
from offlab.errors import DataValidationError
from offlab.nets import BATCHES, mlp, stream_generator

LOG_STD_RANGE = (-5.0, 2.0)
_EDGE = 1e-6


@dataclass
class BehaviorConfig:
    """Behaviour-cloned density settings (METRICS B.1)."""

    models: tuple[str, ...] = ("gaussian", "mdn5")
    """Candidate models; the lower held-out NLL wins."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes."""
    components: int = 5
    """Mixture components of the mdn model."""
    steps: int = 10_000
    """Gradient steps per model."""
    batch_size: int = 256
    """Transitions per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    eval_every: int = 500
    """Held-out NLL is checked every this many steps; the best checkpoint is kept."""
    holdout: float = 0.1
    """Fraction of episodes held out."""
    seed: int = 0
    """Seed of the split, initialisation and batches."""


class TanhGaussianMixture(nn.Module):
    """K tanh-Gaussian components: logits, means and log-stds from one MLP on the (normalised) state."""

    def __init__(self, obs_dim: int, action_dim: int, components: int, hidden: tuple[int, ...]):
        super().__init__()
        self.k, self.a = components, action_dim
        self.net = mlp(obs_dim, components * (1 + 2 * action_dim), hidden)

    def log_prob(self, obs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log mu(u|s) for unit-scale actions u [B, A] -> [B]."""
        out = self.net(obs)
        logits = out[:, : self.k]
        mean = out[:, self.k: self.k + self.k * self.a].reshape(-1, self.k, self.a)
        log_std = out[:, self.k + self.k * self.a:].reshape(-1, self.k, self.a).clamp(*LOG_STD_RANGE)
        y = u.clamp(-1 + _EDGE, 1 - _EDGE)
        pre = torch.atanh(y).unsqueeze(1)  # [B, 1, A]
        normal = (-0.5 * ((pre - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        mix = torch.logsumexp(torch.log_softmax(logits, -1) + normal, dim=-1)
        return mix - torch.log1p(-y * y).sum(-1)


class TanhGaussianDensity(TanhGaussianMixture):
    """One tanh-Gaussian with a state-dependent log-std (the mixture with K = 1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...]):
        super().__init__(obs_dim, action_dim, 1, hidden)


@dataclass
class BehaviorModel:
    """A fitted mu-hat: `log_prob(obs, action)` in env units, plus how it was chosen."""

    net: nn.Module
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def log_prob(self, obs: np.ndarray, action: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        log_scale = float(torch.log(self.scale).sum())
        out = []
        for i in range(0, len(obs), chunk):
            s = (torch.as_tensor(obs[i:i + chunk], dtype=torch.float32) - self.obs_mean) / self.obs_std
            u = (torch.as_tensor(action[i:i + chunk], dtype=torch.float32) - self.center) / self.scale
            out.append(self.net.log_prob(s, u) - log_scale)
        return torch.cat(out).numpy().astype(np.float64)


def episode_split(n_episodes: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) episode ids, a seeded 90/10 split by episode."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_episodes)
    n_out = max(1, int(round(holdout * n_episodes)))
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def fit_behavior(ds: Dataset, config: BehaviorConfig | None = None) -> BehaviorModel:
    """Fit every candidate model of `config` to `ds` and return the one with the lowest held-out NLL."""
    cfg = config or BehaviorConfig()
    if ds.action.ndim != 2:
        raise DataValidationError(f"dataset '{ds.card.name}' has discrete actions; offlab's OPE needs continuous actions")
    if ds.n_episodes < 2:
        raise DataValidationError(
            f"dataset '{ds.card.name}' has no behavior_logp and only {ds.n_episodes} episode, too few to fit and "
            f"validate a behaviour model (90/10 split by episode); collect more episodes or log behavior_logp"
        )
    train_ep, held_ep = episode_split(ds.n_episodes, cfg.holdout, cfg.seed)
    in_train = np.isin(ds.episode, train_ep)
    low = np.asarray(ds.card.action_low if ds.card.action_low is not None else -np.ones(ds.action.shape[1]),
                     np.float32)
    high = np.asarray(ds.card.action_high if ds.card.action_high is not None else np.ones(ds.action.shape[1]),
                      np.float32)
    center, scale = torch.from_numpy((high + low) / 2), torch.from_numpy((high - low) / 2)
    obs64 = ds.obs[in_train].astype(np.float64)
    obs_mean = torch.from_numpy(obs64.mean(0).astype(np.float32))
    obs_std = torch.from_numpy((obs64.std(0) + 1e-3).astype(np.float32))
    s_all = (torch.from_numpy(np.array(ds.obs, np.float32)) - obs_mean) / obs_std
    u_all = (torch.from_numpy(np.array(ds.action, np.float32)) - center) / scale
    train_rows = torch.from_numpy(np.flatnonzero(in_train))
    held_rows = torch.from_numpy(np.flatnonzero(~in_train))
    log_scale = float(torch.log(scale).sum())
    results = {}
    for name in cfg.models:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if name == "gaussian":
                net = TanhGaussianDensity(ds.obs.shape[1], ds.action.shape[1], cfg.hidden)
            elif name.startswith("mdn"):
                net = TanhGaussianMixture(ds.obs.shape[1], ds.action.shape[1], cfg.components, cfg.hidden)
            else:
                raise ValueError(f"unknown behaviour model {name}")
        net, nll = _train(net, s_all, u_all, train_rows, held_rows, cfg)
        results[name] = (net, nll + log_scale)
    best = min(results, key=lambda k: results[k][1])
    info = {"behavior_model": best, **{f"heldout_nll_{k}": float(v[1]) for k, v in results.items()},
            "train_episodes": int(len(train_ep)), "heldout_episodes": int(len(held_ep)), "steps": cfg.steps}
    return BehaviorModel(results[best][0].eval(), obs_mean, obs_std, center, scale, info)


def _train(net: nn.Module, s: torch.Tensor, u: torch.Tensor, train_rows: torch.Tensor, held_rows: torch.Tensor,
           cfg: BehaviorConfig) -> tuple[nn.Module, float]:
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = stream_generator(cfg.seed, BATCHES)
    best, best_state = float("inf"), copy.deepcopy(net.state_dict())
    held = held_rows[:50_000]
    for step in range(1, cfg.steps + 1):
        rows = train_rows[torch.randint(len(train_rows), (cfg.batch_size,), generator=gen)]
        loss = -net.log_prob(s[rows], u[rows]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                nll = float(-net.log_prob(s[held], u[held]).mean())
            if nll < best:
                best, best_state = nll, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net, best
