"""Does autograd's bookkeeping slow offlab's TD3+BC update? A hand-written backward says no (run by hand).

    . .venv/bin/activate
    python benchmarks/onenode_backward.py                 # ~1 minute: equivalence, then 6 interleaved rounds

About 3 of the ~9 ms of a TD3+BC update on one CPU thread are not matrix multiplies
(benchmarks/d3rlpy_speed.md). This prototype tests whether that time is autograd's: it replaces the
twin critics' ensemble MLP, the actor's MLP and Q1(s, pi(s)) by ReLU MLPs that are one autograd node each,
with the forward pass and the backward pass written out (batched matmuls, in-place ReLU, the ReLU mask
applied by `threshold_backward`, only the gradients autograd asks for). The learner, its losses and its
draws are unchanged; offlab/ is not edited (the prototype patches the classes in this process only).

Printed: the largest parameter gap to the stock update after 50 updates on the same batches (float
rounding only), then the process CPU ms per update of both, interleaved A-B / B-A so that a busy
machine slows both alike, and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.td3bc import TD3BC, TD3BCConfig
from offlab.data.store import Batch
from offlab.nets import DeterministicActor, EnsembleCritic, EnsembleMLP, VectorizedLinear

relu_backward = torch.ops.aten.threshold_backward


def _backward(saved, n, need, g, weight_grad, input_grad, bias_dim):
    """Backward through n layers (ReLU between): gradients of (x, W0, b0, ..., W_{n-1}, b_{n-1}) asked for."""
    hs, params = saved[:n], saved[n:]
    grads: list[torch.Tensor | None] = [None] * (2 * n)
    gx = None
    for i in reversed(range(n)):
        w, h_in = params[2 * i], hs[i]
        if need[1 + 2 * i]:
            grads[2 * i] = weight_grad(h_in, g)
        if need[2 + 2 * i]:
            grads[2 * i + 1] = g.sum(bias_dim, keepdim=bias_dim == 1)
        if i == 0 and not need[0]:
            break
        g_in = input_grad(g, w)
        if i > 0:
            g = relu_backward(g_in, h_in, 0.0)
        else:
            gx = g_in
    return (gx, *grads)


def _forward(ctx, x, params, layer):
    """Forward through n layers, `layer(x, W, b)` each, ReLU (in place) between; saves what backward needs."""
    n = len(params) // 2
    hs, h = [x], x
    for i in range(n - 1):
        h = layer(h, params[2 * i], params[2 * i + 1]).clamp_min_(0.0)
        hs.append(h)
    ctx.save_for_backward(*hs, *params)
    ctx.n = n
    return layer(h, params[-2], params[-1])


def _ensemble_layer(x, w, b):
    if w.shape[-1] == 1:  # the critics' scalar head as a batched dot product, as offlab's VectorizedLinear
        return torch.linalg.vecdot(x, w.transpose(1, 2)).unsqueeze(-1) + b
    return torch.baddbmm(b, x, w)


class EnsembleReLUMLP(torch.autograd.Function):
    """x [N, B, in], weights [N, in, out], biases [N, 1, out]; a 1-wide last layer as a batched dot product."""

    @staticmethod
    def forward(ctx, x, *params):
        return _forward(ctx, x, params, _ensemble_layer)

    @staticmethod
    def backward(ctx, g):
        def input_grad(g, w):
            return g * w.transpose(1, 2) if w.shape[-1] == 1 else torch.bmm(g, w.transpose(1, 2))

        return _backward(ctx.saved_tensors, ctx.n, ctx.needs_input_grad, g,
                         lambda h, g: torch.bmm(h.transpose(1, 2), g), input_grad, 1)


class ReLUMLP(torch.autograd.Function):
    """x [B, in], nn.Linear weights [out, in] and biases [out]."""

    @staticmethod
    def forward(ctx, x, *params):
        return _forward(ctx, x, params, lambda h, w, b: torch.addmm(b, h, w.t()))

    @staticmethod
    def backward(ctx, g):
        return _backward(ctx.saved_tensors, ctx.n, ctx.needs_input_grad, g,
                         lambda h, g: torch.mm(g.t(), h), lambda g, w: torch.mm(g, w), 0)


def ensemble_forward(self, x):
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(self.n_members, -1, -1)
    params = [p for m in self.net if isinstance(m, VectorizedLinear) for p in (m.weight, m.bias)]
    return EnsembleReLUMLP.apply(x, *params)


def actor_forward(self, obs):
    params = [p for m in self.net if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)]
    return self.max_action * torch.tanh(ReLUMLP.apply(obs, *params))


def critic_member(self, obs, action, i=0):
    params = [p for m in self.net.net if isinstance(m, VectorizedLinear) for p in (m.weight[i].t(), m.bias[i, 0])]
    return ReLUMLP.apply(torch.cat([obs, action], dim=-1), *params).squeeze(-1)


STOCK = (EnsembleMLP.forward, DeterministicActor.forward, EnsembleCritic.member)


def use_onenode(on: bool) -> None:
    EnsembleMLP.forward, DeterministicActor.forward, EnsembleCritic.member = (
        (ensemble_forward, actor_forward, critic_member) if on else STOCK)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="timed updates per round")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    obs_dim, act_dim, batch_size = 11, 3, 256  # hopper's widths
    spec = LearnerSpec(obs_dim=obs_dim, action_dim=act_dim, action_low=-np.ones(act_dim, np.float32),
                       action_high=np.ones(act_dim, np.float32), obs_mean=np.zeros(obs_dim, np.float32),
                       obs_std=np.ones(obs_dim, np.float32))
    gen = torch.Generator().manual_seed(0)

    def batch():
        return Batch(torch.randn(batch_size, obs_dim, generator=gen),
                     torch.rand(batch_size, act_dim, generator=gen) * 2 - 1,
                     torch.randn(batch_size, generator=gen), torch.randn(batch_size, obs_dim, generator=gen),
                     (torch.rand(batch_size, generator=gen) < 0.01).float())

    warm, timed = [batch() for _ in range(50)], [batch() for _ in range(args.steps)]
    stock, onenode = TD3BC(TD3BCConfig(), spec), TD3BC(TD3BCConfig(), spec)
    for b in warm:
        use_onenode(False)
        stock.update(b)
        use_onenode(True)
        onenode.update(b)
    nets = ("actor", "critic", "actor_target", "critic_target")
    gap = max((a - b).abs().max().item() for net in nets
              for a, b in zip(getattr(stock, net).parameters(), getattr(onenode, net).parameters(), strict=True))
    print(f"after {len(warm)} updates on the same batches: largest parameter gap {gap:.1e}")

    ms: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            use_onenode(on)
            learner = onenode if on else stock
            t = time.process_time()
            for b in timed:
                learner.update(b)
            ms[on].append((time.process_time() - t) / len(timed) * 1e3)
        print(f"round {r}: stock {ms[False][-1]:.2f} ms, one-node backward {ms[True][-1]:.2f} ms", flush=True)
    ratio = statistics.median(b / a for a, b in zip(ms[False], ms[True], strict=True))
    print(f"median CPU ms per update: stock {statistics.median(ms[False]):.2f}, one-node backward "
          f"{statistics.median(ms[True]):.2f} (median per-round ratio {ratio:.3f})")


if __name__ == "__main__":
    main()
