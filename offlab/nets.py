"""Shared network pieces: MLPs, vectorised ensembles, actors, target updates, the state normaliser.

Every learner assembles its networks from here; nothing in this module knows about any algorithm.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


PRECISIONS = ("float32", "bf16")
"""Training precisions: float32, or bf16 mixed precision (see `mixed_precision`)."""


def mixed_precision(device: torch.device | str, precision: str = "float32"):
    """Context for a learner's update: float32 (a no-op) or bf16 mixed precision.

    Under bf16 the hidden layers' matmuls run in bfloat16 (about twice float32's rate on CPUs with
    AVX512-BF16 or AMX, and on recent GPUs) while weights, gradients, optimiser state and every
    network's output layer stay float32 (`OutputLinear`, the ensembles' last layer), so Q-values,
    values and actions keep float32 resolution. Numbers differ from a float32 run.
    """
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")


# Random streams of one seed. torch.manual_seed(seed) draws a learner's initial weights; every other
# stream gets its own seed from SeedSequence, so no stream replays the numbers the weights were made of
# (a torch.Generator seeded with the same integer would restart the initialisation's Mersenne Twister).
BATCHES, EXPLORATION, NOISE, VALUE_SAMPLES = 1, 2, 3, 4


def derived_seed(seed: int, stream: int) -> int:
    """An independent seed for one random stream of `seed` (BATCHES, EXPLORATION, NOISE, VALUE_SAMPLES)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x0FF1AB, stream]).generate_state(1)[0])


def stream_generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for one random stream of `seed`, apart from the initialisation's."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, stream))


def _float32_region(x: torch.Tensor):
    """Leave autocast for an output layer (a no-op outside mixed precision)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class OutputLinear(nn.Linear):
    """nn.Linear that computes in its weights' precision even under mixed precision (a network's output layer:
    float32, or float64 for a network made double)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _float32_region(x):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256), activation=nn.ReLU,
        output_activation: type[nn.Module] | None = None, layer_norm: bool = False) -> nn.Sequential:
    """Linear-activation stack; `hidden` sizes in order; the output layer is float32 under mixed precision."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, h))
        if layer_norm:
            layers.append(nn.LayerNorm(h))
        layers.append(activation())
        d = h
    layers.append(OutputLinear(d, out_dim))
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


class VectorizedLinear(nn.Module):
    """N independent linear layers applied in one batched matmul: x [N, B, in] -> [N, B, out].

    `output=True` marks an ensemble's last layer, computed in float32 under mixed precision.
    """

    def __init__(self, in_features: int, out_features: int, n_members: int, output: bool = False):
        super().__init__()
        self.output = output
        self.weight = nn.Parameter(torch.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_members, 1, out_features))
        # each member its own default (Kaiming-uniform) init, as nn.Linear would give it
        for i in range(n_members):
            nn.init.kaiming_uniform_(self.weight[i].T, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.output:
            return torch.baddbmm(self.bias, x, self.weight)
        with _float32_region(x):
            x = x.float()
            if self.weight.shape[-1] == 1:
                # a critic's scalar head as a batched dot product: on CPU a bmm with one output column takes
                # a slow path (~5x slower forward and backward; benchmarks/d3rlpy_speed.md)
                return torch.linalg.vecdot(x, self.weight.transpose(1, 2)).unsqueeze(-1) + self.bias
            return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """N MLPs with the same shape in one set of batched matmuls.

    Input [B, in] is shared by all members (broadcast) or [N, B, in] gives each its own batch;
    output is [N, B, out].
    """

    def __init__(self, n_members: int, in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256),
                 activation=nn.ReLU, layer_norm: bool = False):
        super().__init__()
        self.n_members = n_members
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(VectorizedLinear(d, h, n_members))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(activation())
            d = h
        layers.append(VectorizedLinear(d, out_dim, n_members, output=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n_members, -1, -1)
        return self.net(x)


class EnsembleCritic(nn.Module):
    """Q ensemble (twin critics when n=2): Q(s, a) -> [N, B]."""

    def __init__(self, obs_dim: int, action_dim: int, n_members: int = 2, hidden: Sequence[int] = (256, 256),
                 layer_norm: bool = False):
        super().__init__()
        self.net = EnsembleMLP(n_members, obs_dim + action_dim, 1, hidden, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)

    def member(self, obs: torch.Tensor, action: torch.Tensor, i: int = 0) -> torch.Tensor:
        """Q_i(s, a) -> [B] alone (e.g. TD3's Q1 in the actor loss), without running the other members."""
        x = torch.cat([obs, action], dim=-1)
        *body, head = self.net.net
        for layer in body:
            x = torch.addmm(layer.bias[i], x, layer.weight[i]) if isinstance(layer, VectorizedLinear) else layer(x)
        with _float32_region(x):
            return torch.linalg.vecdot(x.float(), head.weight[i, :, 0]) + head.bias[i, 0, 0]


class ValueNet(nn.Module):
    """V(s) -> [B]."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class DeterministicActor(nn.Module):
    """a = max_action * tanh(f(s)) (TD3, TD3+BC, PRDC, BC)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256), max_action: float = 1.0):
        super().__init__()
        self.net = mlp(obs_dim, action_dim, hidden, output_activation=nn.Tanh)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(obs)


class TanhGaussianActor(nn.Module):
    """SAC's squashed Gaussian: u ~ N(mu(s), sigma(s)), a = max_action * tanh(u).

    Parameter names (`hidden.<i>`, `mean`, `log_std`) match the shipped behaviour-policy files.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256), max_action: float = 1.0,
                 log_std_min: float = LOG_STD_MIN, log_std_max: float = LOG_STD_MAX):
        super().__init__()
        dims = [obs_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.mean = OutputLinear(dims[-1], action_dim)
        self.log_std = OutputLinear(dims[-1], action_dim)
        self.max_action = max_action
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = obs
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.mean(x), self.log_std(x).clamp(self.log_std_min, self.log_std_max)

    def forward(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, log-prob of that action), sampled with the reparameterisation trick."""
        mean, log_std = self.distribution_params(obs)
        std = log_std.exp()
        u = mean if deterministic else mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.max_action * torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std, self.max_action)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """log pi(a|s) of given actions (clipped inside the box before atanh)."""
        mean, log_std = self.distribution_params(obs)
        y = (action / self.max_action).clamp(-1 + eps, 1 - eps)
        return tanh_gaussian_log_prob(torch.atanh(y), mean, log_std, self.max_action)


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, max_action: float = 1.0
                           ) -> torch.Tensor:
    """log-density of a = max_action*tanh(u), u ~ N(mean, exp(log_std)), summed over action dims."""
    normal = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    # log |d tanh(u)/du| = log(1 - tanh(u)^2) written stably
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (normal - log_det).sum(-1) - mean.shape[-1] * math.log(max_action)


class GaussianActor(nn.Module):
    """IQL's actor: N(tanh(f(s)) * max_action, exp(log_std)) with a state-independent log-std."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256), max_action: float = 1.0):
        super().__init__()
        self.net = mlp(obs_dim, action_dim, hidden, output_activation=nn.Tanh)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.max_action = max_action

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(obs)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        mean = self.mean(obs)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        return (-0.5 * ((action - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def forward(self, obs: torch.Tensor, deterministic: bool = True, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        mean = self.mean(obs)
        if deterministic:
            return mean
        std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise).clamp(-self.max_action, self.max_action)


class Normalizer(nn.Module):
    """State normalisation (s - mu) / sigma with dataset statistics, saved in the state_dict."""

    def __init__(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32).clone())

    @classmethod
    def identity(cls, dim: int) -> Normalizer:
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


_PARAMETERS: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def parameter_list(module: nn.Module) -> list[nn.Parameter]:
    """`list(module.parameters())`, looked up once per module: the recursive walk costs about 30 us of Python,
    paid on every target update and actor step otherwise. A network's parameters stay the same tensors for its
    life (`load_state_dict` and `.to()` write into them); a module that gains parameters later must not use it."""
    params = _PARAMETERS.get(module)
    if params is None:
        params = _PARAMETERS[module] = list(module.parameters())
    return params


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * online (one foreach call: the same per-tensor lerp on CPU)."""
    targets, onlines = parameter_list(target), parameter_list(online)
    if len(targets) != len(onlines):
        raise ValueError(f"polyak: the target has {len(targets)} parameters, the online network {len(onlines)}")
    torch._foreach_lerp_(targets, onlines, tau)


def take_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Zero the gradients, backpropagate `loss`, step. A FusedAdam steps without torch's optimizer hooks and
    profiler label (`FusedAdam.apply_gradients`); offlab registers no optimizer hooks."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(optimizer, FusedAdam):
        optimizer.apply_gradients()
    else:
        optimizer.step()


class FusedAdam(torch.optim.Adam):
    """torch's fused Adam (`fused=True`) with a short step for the learners' case: one parameter group whose
    parameters all have gradients. That step calls the same kernel with the same arguments as torch's, so the
    numbers and the state_dict are torch's; it only skips torch's generic bookkeeping (312 against 157 us per
    step on a 2.45 GHz Zen 3; about 4% of a TD3+BC update, benchmarks/d3rlpy_speed.md, session 23). The first
    step, which creates the state, and every other case (several groups, a parameter without a gradient, amsgrad,
    a closure) take torch's own step. `apply_gradients` is the step without torch's optimizer hooks and profiler
    label (`take_step` uses it).
    """

    def __init__(self, params, lr: float, **kwargs: Any):
        super().__init__(params, lr=lr, fused=True, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self, closure=None):
        """torch's `step` interface (hooks and profiler label included), with the short step inside."""
        if closure is not None:
            return super().step(closure)
        return self.apply_gradients()

    @torch.no_grad()
    def apply_gradients(self) -> None:
        """One Adam step from the parameters' current gradients, without torch's step hooks (`take_step`'s)."""
        if len(self.param_groups) != 1:
            return super().step()
        group = self.param_groups[0]
        params = group["params"]
        grads = [p.grad for p in params]
        states = [self.state.get(p) for p in params]
        torch_only = ("amsgrad", "decoupled_weight_decay", "differentiable", "capturable")  # (not all in old torch)
        if any(group.get(flag) for flag in torch_only) or any(g is None for g in grads) or not all(states):
            return super().step()
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                           steps, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                           eps=group["eps"], amsgrad=False, maximize=group["maximize"])
        return None


def adam(params, lr: float, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters; same maths as the per-tensor loop), as a
    FusedAdam (the same step with less Python around it)."""
    return FusedAdam(params, lr=lr, **kwargs)


@contextlib.contextmanager
def grads_off(module: nn.Module):
    """Within the block, `module`'s parameters record no gradient: a loss that only trains another network
    (the actor through Q(s, pi(s))) skips the weight gradients the critic step would discard anyway."""
    params = [p for p in parameter_list(module) if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def freeze(module: nn.Module) -> nn.Module:
    """A module with requires_grad off (target networks)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def learner_state(learner: Any, parts: Sequence[str]) -> dict[str, Any]:
    """A learner's resumable state: the named modules' and optimisers' state dicts, its update counter and
    its generator's state (every learner keeps `updates` and `generator`)."""
    state = {name: getattr(learner, name).state_dict() for name in parts}
    state["updates"] = learner.updates
    state["generator"] = learner.generator.get_state()
    return state


def load_learner_state(learner: Any, state: dict[str, Any], parts: Sequence[str]) -> None:
    """The inverse of `learner_state`."""
    for name in parts:
        getattr(learner, name).load_state_dict(state[name])
    learner.updates = int(state["updates"])
    learner.generator.set_state(state["generator"].cpu())


@torch.no_grad()
def act_on_numpy(policy, obs: np.ndarray, device: torch.device | str, low: np.ndarray, high: np.ndarray
                 ) -> np.ndarray:
    """Run a torch policy (normalised inside) on numpy observations [obs_dim] or [B, obs_dim].

    Returns float32 actions of the same leading shape, clipped to the action box [low, high].
    """
    # C order: a column-major batch (a pandas frame's values) would take another matrix kernel, whose float32 sums
    # round differently on some CPUs (MKL's AVX-512 path on an Intel Xeon), so the same observations would get
    # other actions
    x = torch.as_tensor(np.ascontiguousarray(obs, dtype=np.float32), device=device)
    single = x.dim() == 1
    action = policy(x.unsqueeze(0) if single else x).cpu().numpy()
    action = np.clip(action, low, high).astype(np.float32, copy=False)
    return action[0] if single else action
