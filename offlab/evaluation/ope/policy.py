"""The target-policy interface of OPE: action distributions with log-densities, and adapters.

Every estimator sees a policy as a `TargetPolicy`: `distribution(obs)` gives pi(.|s) for a batch of
states, on the unit action scale [-1, 1]^A, from which it samples actions and takes log-densities.
Environment units are mapped in and out here (a = center + scale * u, log-density minus
sum log scale), so estimators never see the action box.

Evaluation modes (METRICS.md B.2 "Deterministic target policies"); the mode is part of the target,
and the ground truth is computed for the same mode:
- `stochastic`: the policy's own density (shipped tanh-Gaussian actors: exact log-probs; uniform).
- `smoothed` (default for deterministic policies): pi_sigma(a|s) = N(a; pi(s), sigma^2 I) on the
  [-1, 1] scale, sigma = 0.1 as policy_eval's `target_policy_std`. Samples are clipped to the box;
  the log-density is the Gaussian's before clipping, which is how `offlab data collect --noise`
  logs `behavior_logp`, so data collected with `--noise sigma` is exactly on-policy for pi_sigma.
  Exact wherever the action stays inside the box.
- `kernel` (Kallus & Zhou 2018): the target is the deterministic pi itself; IS estimators replace
  pi(a|s) by the Gaussian kernel K_h(a - pi(s)) with bandwidth h = sigma (bias O(h^2)).
- `deterministic`: pi itself with no density (FQE and model-based OPE only).

Adapters: a learner object (`act(obs, deterministic=True)`), a shipped or snapshot tanh-Gaussian
actor (.safetensors, offlab actor format), an MLflow pyfunc model URI, a run id, a numpy callable,
the uniform random policy. `as_target_policy` picks the adapter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offlab.errors import ConfigError, PolicyError

MODES = ("auto", "stochastic", "smoothed", "kernel", "deterministic")
DEFAULT_SIGMA = 0.1
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_EDGE = 1e-6


# ------------------------------------------------------------------------------------ distributions


@dataclass
class ActionDistribution:
    """pi(.|s) for a batch of B states on the unit action scale.

    kind: `tanh_gaussian` (loc = pre-tanh mean, spread = log-std [B, A]); `gaussian` (loc = action,
    spread = sigma, samples clipped to [-1, 1]); `point` (loc = action; spread = kernel bandwidth h or
    None: no density); `uniform` (loc only gives the shape).
    """

    kind: str
    loc: torch.Tensor
    spread: torch.Tensor | float | None = None

    def __len__(self) -> int:
        return self.loc.shape[0]

    def __getitem__(self, rows) -> ActionDistribution:
        spread = self.spread[rows] if isinstance(self.spread, torch.Tensor) else self.spread
        return ActionDistribution(self.kind, self.loc[rows], spread)

    def mode_action(self) -> torch.Tensor:
        """The distribution's deterministic action (tanh of the mean for tanh-Gaussians)."""
        if self.kind == "tanh_gaussian":
            return torch.tanh(self.loc)
        if self.kind == "uniform":
            return torch.zeros_like(self.loc)
        return self.loc

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples per state: [n, *loc.shape], unit scale."""
        shape = (n, *self.loc.shape)
        if self.kind == "point":
            return self.loc.expand(shape)
        if self.kind == "uniform":
            return torch.rand(shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device) * 2 - 1
        eps = torch.randn(shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        if self.kind == "tanh_gaussian":
            return torch.tanh(self.loc + self.spread.exp() * eps)
        return (self.loc + self.spread * eps).clamp(-1.0, 1.0)

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """Log-density of unit-scale actions u [..., B, A] -> [..., B]."""
        if self.kind == "uniform":
            return torch.full(u.shape[:-1], -u.shape[-1] * math.log(2.0), dtype=u.dtype)
        if self.kind == "tanh_gaussian":
            y = u.clamp(-1 + _EDGE, 1 - _EDGE)
            pre = torch.atanh(y)
            log_std = self.spread
            normal = -0.5 * ((pre - self.loc) / log_std.exp()) ** 2 - log_std - _LOG_SQRT_2PI
            return (normal - torch.log1p(-y * y)).sum(-1)
        if self.spread is None:
            raise PolicyError(
                "a deterministic target policy has no density; importance sampling needs --sigma > 0 "
                "(Gaussian smoothing) or --mode kernel"
            )
        s = float(self.spread)
        return (-0.5 * ((u - self.loc) / s) ** 2 - math.log(s) - _LOG_SQRT_2PI).sum(-1)


# ------------------------------------------------------------------------------------ the target policy


class TargetPolicy:
    """A policy as OPE sees it: batched distributions over env-unit actions, with log-densities.

    `base(obs [B, obs_dim] float32 tensor) -> ActionDistribution` on the unit scale, before the mode
    is applied; `stochastic_base` says whether that distribution is already a density worth keeping.
    """

    def __init__(self, name: str, base: Callable[[torch.Tensor], ActionDistribution], action_low: np.ndarray,
                 action_high: np.ndarray, *, obs_dim: int | None = None, stochastic_base: bool = False,
                 mode: str = "auto", sigma: float = DEFAULT_SIGMA, fingerprint: str | None = None,
                 source: dict[str, Any] | None = None, chunk: int = 65_536):
        if mode not in MODES:
            raise ConfigError(f"unknown policy mode '{mode}'; use one of {', '.join(MODES)}")
        if mode == "auto":
            mode = "stochastic" if stochastic_base else "smoothed"
        if mode == "stochastic" and not stochastic_base:
            raise ConfigError(f"policy '{name}' is deterministic; evaluate it with --mode smoothed (sigma > 0), "
                              f"kernel or deterministic")
        if mode in ("smoothed", "kernel") and not sigma > 0:
            raise ConfigError(f"--sigma must be > 0 for mode '{mode}', got {sigma}; use --mode deterministic for "
                              f"FQE and model-based OPE of the unsmoothed policy")
        self.name = name
        self._base = base
        self.action_low = np.asarray(action_low, np.float32).reshape(-1)
        self.action_high = np.asarray(action_high, np.float32).reshape(-1)
        self.action_dim = len(self.action_low)
        self.obs_dim = obs_dim
        self.stochastic_base = stochastic_base
        self.mode = mode
        self.sigma = float(sigma) if mode in ("smoothed", "kernel") else None
        self.fingerprint = fingerprint
        self.source = dict(source or {})
        self.chunk = chunk
        self._center = torch.from_numpy((self.action_high + self.action_low) / 2)
        self._scale = torch.from_numpy((self.action_high - self.action_low) / 2)
        self._log_scale = float(np.log((self.action_high - self.action_low) / 2).sum())

    def __repr__(self) -> str:
        return f"TargetPolicy('{self.name}', mode={self.mode}, sigma={self.sigma}, action_dim={self.action_dim})"

    # -- what the policy is --------------------------------------------------------------

    @property
    def has_density(self) -> bool:
        return self.mode != "deterministic"

    @property
    def samples_actions(self) -> bool:
        """True when acting draws random actions (the evaluated policy is stochastic)."""
        return self.mode in ("stochastic", "smoothed")

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "mode": self.mode, "sigma_or_h": self.sigma, **self.source}
        if self.mode == "smoothed":
            out["note"] = (f"evaluates pi_sigma = N(pi(s), {self.sigma}^2 I) clipped to the action box, not the "
                           f"deterministic policy; the truth is computed for pi_sigma too")
        elif self.mode == "kernel":
            out["note"] = f"IS weights use a Gaussian kernel h={self.sigma} around pi(s) (bias O(h^2))"
        return out

    def with_mode(self, mode: str, sigma: float | None = None) -> TargetPolicy:
        """The same policy evaluated in another mode (e.g. a sigma sweep)."""
        return TargetPolicy(self.name, self._base, self.action_low, self.action_high, obs_dim=self.obs_dim,
                            stochastic_base=self.stochastic_base, mode=mode,
                            sigma=self.sigma if sigma is None else sigma, fingerprint=self.fingerprint,
                            source=self.source, chunk=self.chunk)

    def check_fits(self, obs_dim: int, action_dim: int, what: str) -> None:
        """PolicyError (one line) when the policy's widths do not match the data's."""
        if self.action_dim != action_dim or (self.obs_dim is not None and self.obs_dim != obs_dim):
            raise PolicyError(
                f"policy '{self.name}' maps observations of width {self.obs_dim or '?'} to actions of width "
                f"{self.action_dim}, but {what} has observations of width {obs_dim} and actions of width "
                f"{action_dim}; evaluate a policy trained on that env"
            )
        try:
            probe = self._base(torch.zeros(1, obs_dim))
        except (RuntimeError, ValueError) as e:
            raise PolicyError(
                f"policy '{self.name}' cannot act on observations of width {obs_dim} from {what} "
                f"({str(e).splitlines()[0][:120]}); evaluate a policy trained on that env"
            ) from None
        if probe.loc.shape[-1] != action_dim:
            raise PolicyError(
                f"policy '{self.name}' returns actions of width {probe.loc.shape[-1]}, but {what} has actions of "
                f"width {action_dim}; evaluate a policy trained on that env"
            )

    # -- distributions ---------------------------------------------------------------------

    @torch.no_grad()
    def distribution(self, obs: torch.Tensor | np.ndarray) -> ActionDistribution:
        """pi(.|s) of the evaluated mode for a batch of observations (unit action scale)."""
        obs = torch.as_tensor(np.asarray(obs, np.float32) if isinstance(obs, np.ndarray) else obs,
                              dtype=torch.float32)
        if obs.dim() == 1:
            obs = obs.unsqueeze(0)
        parts = [self._base(obs[i:i + self.chunk]) for i in range(0, len(obs), self.chunk)]
        d = parts[0] if len(parts) == 1 else _cat(parts)
        if self.mode == "stochastic":
            return d
        action = d.mode_action()
        if self.mode == "smoothed":
            return ActionDistribution("gaussian", action, self.sigma)
        if self.mode == "kernel":
            return ActionDistribution("point", action, self.sigma)
        return ActionDistribution("point", action, None)

    @property
    def log_scale(self) -> float:
        """sum_j log(half-width_j) of the action box: env-unit log-density = unit log-density - log_scale."""
        return self._log_scale

    def to_env(self, u: torch.Tensor) -> torch.Tensor:
        return self._center + self._scale * u

    def to_unit(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self._center) / self._scale

    @torch.no_grad()
    def sample(self, obs: torch.Tensor | np.ndarray, generator: torch.Generator | None = None, n: int = 1
               ) -> torch.Tensor:
        """Env-unit actions of the evaluated policy: [n, B, A]."""
        return self.to_env(self.distribution(obs).sample(n, generator))

    @torch.no_grad()
    def log_prob(self, obs: torch.Tensor | np.ndarray, action: torch.Tensor | np.ndarray) -> torch.Tensor:
        """log pi(a|s) in env units (the kernel log K_h in kernel mode): [B]."""
        action = torch.as_tensor(np.asarray(action, np.float32)) if isinstance(action, np.ndarray) else action
        out = []
        for i in range(0, len(action), self.chunk):
            d = self.distribution(obs[i:i + self.chunk])
            out.append(d.log_prob(self.to_unit(action[i:i + self.chunk])) - self._log_scale)
        return torch.cat(out) if out else torch.zeros(0)

    def numpy_sampler(self, seed: int) -> Callable[[np.ndarray], np.ndarray]:
        """obs [B, obs_dim] -> env-unit actions [B, A] sampled as the evaluated policy acts (seeded)."""
        gen = torch.Generator().manual_seed(int(seed))

        def act(obs: np.ndarray) -> np.ndarray:
            return self.sample(obs, gen, 1)[0].numpy()

        return act


def _cat(parts: list[ActionDistribution]) -> ActionDistribution:
    spread = parts[0].spread
    if isinstance(spread, torch.Tensor):
        spread = torch.cat([p.spread for p in parts])
    return ActionDistribution(parts[0].kind, torch.cat([p.loc for p in parts]), spread)


# ------------------------------------------------------------------------------------ adapters


def tanh_gaussian_policy(tensors: dict[str, np.ndarray], name: str, action_low, action_high, *,
                         mode: str = "auto", sigma: float = DEFAULT_SIGMA, source: dict | None = None
                         ) -> TargetPolicy:
    """An offlab tanh-Gaussian actor (shipped behaviour policies, SAC snapshots): exact log-probs.

    The actor acts on raw observations and outputs u-space mean and log-std; a = center + scale * tanh(u).
    """
    from offlab.nets import TanhGaussianActor

    n_hidden = len([k for k in tensors if k.startswith("hidden.") and k.endswith(".weight")])
    sizes = [int(tensors[f"hidden.{i}.weight"].shape[0]) for i in range(n_hidden)]
    obs_dim = int(tensors["hidden.0.weight"].shape[1])
    action_dim = int(tensors["mean.weight"].shape[0])
    actor = TanhGaussianActor(obs_dim, action_dim, sizes, max_action=1.0)
    actor.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()})
    actor.eval()
    low = np.asarray(action_low, np.float32).reshape(-1)
    high = np.asarray(action_high, np.float32).reshape(-1)
    if len(low) != action_dim:
        raise PolicyError(
            f"policy '{name}' outputs actions of width {action_dim} but the data has actions of width {len(low)}; "
            f"evaluate a policy trained on that env"
        )

    def base(obs: torch.Tensor) -> ActionDistribution:
        mean, log_std = actor.distribution_params(obs)
        return ActionDistribution("tanh_gaussian", mean, log_std)

    h = hashlib.blake2b(digest_size=12)
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k], dtype=np.float32).tobytes())
    return TargetPolicy(name, base, low, high, obs_dim=obs_dim, stochastic_base=True, mode=mode, sigma=sigma,
                        fingerprint=h.hexdigest(), source={"kind": "tanh_gaussian", **(source or {})})


def uniform_policy(action_low, action_high, obs_dim: int | None = None) -> TargetPolicy:
    """The uniform random policy over the action box (D4RL's random reference)."""
    low = np.asarray(action_low, np.float32).reshape(-1)

    def base(obs: torch.Tensor) -> ActionDistribution:
        return ActionDistribution("uniform", torch.zeros(len(obs), len(low)))

    return TargetPolicy("uniform", base, low, action_high, obs_dim=obs_dim, stochastic_base=True,
                        fingerprint="uniform", source={"kind": "uniform"})


def deterministic_policy(fn: Callable[[np.ndarray], np.ndarray], name: str, action_low, action_high, *,
                         obs_dim: int | None = None, mode: str = "auto", sigma: float = DEFAULT_SIGMA,
                         fingerprint: str | None = None, source: dict | None = None) -> TargetPolicy:
    """A deterministic policy given as numpy obs [B, obs_dim] -> env-unit actions [B, A]."""
    low = np.asarray(action_low, np.float32).reshape(-1)
    high = np.asarray(action_high, np.float32).reshape(-1)
    center, scale = (high + low) / 2, (high - low) / 2

    def base(obs: torch.Tensor) -> ActionDistribution:
        a = np.asarray(fn(obs.numpy()), dtype=np.float32).reshape(len(obs), -1)
        if a.shape[1] != len(low):
            raise PolicyError(
                f"policy '{name}' returns actions of width {a.shape[1]}, but the data has actions of width "
                f"{len(low)}; evaluate a policy trained on that env"
            )
        u = np.clip((a - center) / scale, -1.0, 1.0)
        return ActionDistribution("point", torch.from_numpy(u.astype(np.float32)))

    return TargetPolicy(name, base, low, high, obs_dim=obs_dim, stochastic_base=False, mode=mode, sigma=sigma,
                        fingerprint=fingerprint, source={"kind": "deterministic", **(source or {})})


def learner_policy(learner, name: str, action_low, action_high, *, mode: str = "auto",
                   sigma: float = DEFAULT_SIGMA, source: dict | None = None) -> TargetPolicy:
    """A learner object (`act(obs, deterministic=True)`), evaluated as deployed: its deterministic action."""
    spec = getattr(learner, "spec", None)
    obs_dim = getattr(spec, "obs_dim", None)
    fingerprint = None
    try:
        state = learner.state_dict()
        actor = state.get("actor") if isinstance(state, dict) else None
        if actor:
            h = hashlib.blake2b(digest_size=12)
            h.update(type(learner).__name__.encode())
            for k in sorted(actor):
                h.update(k.encode())
                h.update(actor[k].detach().cpu().numpy().tobytes())
            for k, v in sorted((state.get("normalizer") or {}).items()):
                h.update(k.encode())
                h.update(v.detach().cpu().numpy().tobytes())
            fingerprint = h.hexdigest()
    except Exception:  # a learner without a torch state: no truth cache
        fingerprint = None
    return deterministic_policy(lambda o: learner.act(o, deterministic=True), name, action_low, action_high,
                                obs_dim=obs_dim, mode=mode, sigma=sigma, fingerprint=fingerprint,
                                source={"kind": "learner", "algo": getattr(learner, "name", type(learner).__name__),
                                        **(source or {})})


def pyfunc_policy(uri: str, action_low, action_high, *, mode: str = "auto", sigma: float = DEFAULT_SIGMA
                  ) -> TargetPolicy:
    """An MLflow pyfunc policy (offlab's `policy` model of a run, or any model mapping obs -> actions)."""
    from offlab.data.build import _load_pyfunc

    model = _load_pyfunc(uri)
    learner = None
    try:
        learner = getattr(model.unwrap_python_model(), "learner", None)
    except Exception:
        learner = None
    if learner is not None and hasattr(learner, "act"):
        return learner_policy(learner, uri, action_low, action_high, mode=mode, sigma=sigma,
                              source={"uri": uri})
    return deterministic_policy(lambda o: model.predict(o), uri, action_low, action_high, mode=mode, sigma=sigma,
                                fingerprint=None, source={"kind": "mlflow", "uri": uri})


def as_target_policy(policy: Any, action_low, action_high, *, mode: str = "auto", sigma: float = DEFAULT_SIGMA
                     ) -> TargetPolicy:
    """Whatever names a policy -> TargetPolicy.

    Accepts a TargetPolicy (as is, or in `mode` when one is given), "uniform", a shipped name (hopper/expert), a
    .safetensors actor file, an MLflow model URI (runs:/<id>/policy, models:/...), a learner object
    with `act`, or a numpy callable (deterministic).
    """
    if isinstance(policy, TargetPolicy):  # its own mode, unless another is asked for
        return policy if mode == "auto" else policy.with_mode(mode, sigma)
    if isinstance(policy, (str, Path)):
        ref = str(policy)
        if ref in ("uniform", "random-uniform"):
            return uniform_policy(action_low, action_high)
        from offlab.data.build import resolve_policy

        src = resolve_policy(ref)
        if src.kind == "mlflow":
            return pyfunc_policy(src.uri, action_low, action_high, mode=mode, sigma=sigma)
        return tanh_gaussian_policy(src.tensors, ref, action_low, action_high, mode=mode, sigma=sigma,
                                    source={"path": ref})
    if hasattr(policy, "act"):
        return learner_policy(policy, getattr(policy, "name", type(policy).__name__), action_low, action_high,
                              mode=mode, sigma=sigma)
    if callable(policy):
        return deterministic_policy(policy, getattr(policy, "__name__", "callable"), action_low, action_high,
                                    mode=mode, sigma=sigma)
    raise PolicyError(f"cannot evaluate {type(policy).__name__} as a policy; give a learner, a .safetensors actor, "
                      f"a shipped name (hopper/expert) or an MLflow model URI")


def run_policy_uri(run_id: str) -> str:
    """The model URI of an offlab run's logged policy."""
    return f"runs:/{run_id}/policy"
