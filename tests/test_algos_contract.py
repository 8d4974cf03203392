"""The contract every registered learner keeps (run over all of ALGOS): configs are plain documented
data, update returns finite train/* floats, act has the right shapes and bounds, state_dict
round-trips through torch.save/torch.load(weights_only=True) exactly, and the same seed gives the
same numbers on CPU. Plus a smoke test that each learner fits a small real-simulator dataset."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap

import numpy as np
import pytest
import torch

from offlab.algos import ALGOS
from offlab.algos.base import LearnerSpec
from offlab.data.store import Transitions
from offlab.nets import (
    DeterministicActor,
    EnsembleCritic,
    FusedAdam,
    ValueNet,
    freeze,
    mixed_precision,
    polyak,
    take_step,
)
from tests.helpers import make_sim_dataset

SMALL = (64, 64)
NAMES = sorted(ALGOS)


def scripted_pendulum_action(obs: np.ndarray) -> np.ndarray:
    """A smooth deterministic controller on Pendulum-v1 (obs = cos, sin, angular velocity)."""
    return np.clip(np.array([-3.0 * obs[1] - 1.0 * obs[2]]), -2.0, 2.0)


@pytest.fixture(scope="module")
def pendulum_data() -> Transitions:
    """3,000 steps of the scripted controller plus Gaussian noise (std 0.3) in the real Pendulum-v1
    simulator: 15 time-limit truncated episodes, action box [-2, 2]."""
    rng = np.random.default_rng(0)

    def policy(obs):
        return np.clip(scripted_pendulum_action(obs) + 0.3 * rng.normal(size=1), -2.0, 2.0)

    return Transitions(make_sim_dataset("Pendulum-v1", steps=3000, seed=0, name="pendulum-scripted", policy=policy))


def build(name: str, data: Transitions, **overrides):
    cls = ALGOS[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "hidden" in fields:
        overrides.setdefault("hidden", SMALL)
    return cls(cls.Config(**overrides), LearnerSpec.from_transitions(data), "cpu")


def batches(data: Transitions, n: int, size: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [data.sample(size, gen) for _ in range(n)]


def assert_same_state(a, b, path: str = "state") -> None:
    """Recursive exact equality of state_dict-like trees (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_baseline_is_registered():
    assert {"td3bc", "iql", "prdc"} <= set(ALGOS)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_plain_documented_data_with_defaults(name):
    """Each field has a default and a one-line docstring (it becomes --help); defaults_for names fields."""
    cls = ALGOS[name]
    assert cls.name == name
    fields = dataclasses.fields(cls.Config)
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields)
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.Config)))
    body = tree.body[0].body
    documented = {}
    for stmt, following in zip(body, body[1:] + [None], strict=True):
        if isinstance(stmt, ast.AnnAssign):
            doc = following.value.value if isinstance(following, ast.Expr) and isinstance(
                following.value, ast.Constant) else None
            documented[stmt.target.id] = doc
    for f in fields:
        assert isinstance(documented.get(f.name), str) and "\n" not in documented[f.name].strip(), f.name
    config = cls.Config()
    assert all(isinstance(getattr(config, f.name), (int, float, bool, str, tuple)) for f in fields)
    for dataset in ("hopper-medium", "halfcheetah-medium-expert", "walker2d-medium-replay", "pendulum"):
        assert set(cls.defaults_for(dataset)) <= {f.name for f in fields}, dataset
        cls.Config(**cls.defaults_for(dataset))  # the paper's values lie inside the config's LIMITS
    # every learner range-checks its numeric settings; LIMITS names real fields
    assert getattr(cls.Config, "LIMITS", None) and set(cls.Config.LIMITS) <= {f.name for f in fields}
    for name_, interval in cls.Config.LIMITS.items():
        assert interval[0] in "([" and interval[-1] in ")]" and interval.count(",") == 1, (name_, interval)


@pytest.mark.parametrize("name", NAMES)
def test_update_returns_finite_train_floats(name, pendulum_data):
    learner = build(name, pendulum_data)
    seen = set()
    for batch in batches(pendulum_data, 4):
        metrics = learner.update(batch)
        assert metrics and all(k.startswith("train/") for k in metrics)
        assert all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics
        seen |= set(metrics)
    assert seen & {"train/critic_loss", "train/actor_loss", "train/bc_loss", "train/value_loss", "train/q_mean"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_act_shapes_and_bounds(name, deterministic, pendulum_data):
    learner = build(name, pendulum_data)
    for batch in batches(pendulum_data, 2):
        learner.update(batch)
    obs = pendulum_data.obs[:7].numpy()
    single = learner.act(obs[0], deterministic=deterministic)
    assert single.shape == (1,) and single.dtype == np.float32
    many = learner.act(obs, deterministic=deterministic)
    assert many.shape == (7, 1) and many.dtype == np.float32
    wild = learner.act(1e3 * obs, deterministic=deterministic)
    for a in (single, many, wild):
        assert np.isfinite(a).all() and (a >= -2.0).all() and (a <= 2.0).all()
    if deterministic:
        np.testing.assert_array_equal(learner.act(obs), many)
        np.testing.assert_allclose(learner.act(obs[3]), many[3], rtol=1e-5, atol=1e-6)  # BLAS paths differ


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip_gives_identical_actions_and_next_update(name, pendulum_data):
    original = build(name, pendulum_data, seed=0)
    data = batches(pendulum_data, 6)
    for batch in data[:5]:
        original.update(batch)
    restored = build(name, pendulum_data, seed=123)  # a different init, overwritten by the load
    restored.load_state_dict(roundtrip(original.state_dict()))
    obs = pendulum_data.obs[:32].numpy()
    np.testing.assert_array_equal(restored.act(obs), original.act(obs))
    np.testing.assert_array_equal(restored.act(obs, deterministic=False), original.act(obs, deterministic=False))
    assert restored.update(data[5]) == original.update(data[5])
    assert_same_state(restored.state_dict(), original.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_bit_identical_parameters_on_cpu(name, pendulum_data):
    runs = []
    global_rng = torch.get_rng_state()
    for seed in (7, 7, 8):
        learner = build(name, pendulum_data, seed=seed)
        for batch in batches(pendulum_data, 6):
            learner.update(batch)
        learner.act(pendulum_data.obs[:4].numpy(), deterministic=False)
        runs.append(learner.state_dict())
    assert_same_state(runs[0], runs[1])
    with pytest.raises(AssertionError):
        assert_same_state(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), global_rng), "learners must draw from their own generator"


@pytest.mark.parametrize("name", NAMES)
def test_random_draws_do_not_replay_the_initialisations_numbers(name, pendulum_data):
    """Weights come from torch.manual_seed(seed); a generator seeded with the same integer would hand the
    update (TD3's smoothing noise, a policy's samples) the very numbers the weights were made of."""
    seed = 3
    learner = build(name, pendulum_data, seed=seed)
    generators = [v for v in vars(learner).values() if isinstance(v, torch.Generator)]
    init_stream = torch.Generator().manual_seed(seed).get_state()
    for gen in generators:
        assert not torch.equal(gen.get_state(), init_stream)
    states = [g.get_state() for g in generators]
    assert all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1:])


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mixed_precision_keeps_float32_outputs_and_state_and_still_fits(name, pendulum_data):
    """Under `mixed_precision(bf16)` (`--precision bf16`) the update runs its hidden matmuls in bfloat16
    but every network output (Q, V, actions) is float32, the state stays float32 and deterministic,
    and the learner moves towards the data as in float32; its numbers differ from a float32 run."""
    runs = []
    for precision in ("bf16", "bf16", "float32"):
        learner = build(name, pendulum_data, seed=3)
        for batch in batches(pendulum_data, 30, size=128, seed=2):
            with mixed_precision("cpu", precision):
                metrics = learner.update(batch)
            assert all(math.isfinite(v) for v in metrics.values()), metrics
        runs.append(learner)
    states = [r.state_dict() for r in runs]
    assert_same_state(states[0], states[1])  # deterministic in bf16 too
    with pytest.raises(AssertionError):
        assert_same_state(states[0], states[2])  # hidden layers really ran in bfloat16

    def tensors(tree):
        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, dict):
            for v in tree.values():
                yield from tensors(v)
    assert all(t.dtype in (torch.float32, torch.int64, torch.uint8, torch.bool) or not t.is_floating_point()
               for t in tensors(states[0]))
    obs = pendulum_data.obs[:64]
    with mixed_precision("cpu", "bf16"):
        for module in vars(runs[0]).values():
            if isinstance(module, EnsembleCritic):
                q = module(obs, pendulum_data.action[:64])
                assert q.dtype == torch.float32
                torch.testing.assert_close(module.member(obs, pendulum_data.action[:64], 0), q[0])
            elif isinstance(module, (DeterministicActor, ValueNet)):
                assert module(obs).dtype == torch.float32
    a32, a16 = runs[2].act(obs.numpy()), runs[0].act(obs.numpy())
    assert np.abs(a16 - a32).max() < 0.5  # the same learning, up to bf16 rounding along 30 updates


@pytest.mark.parametrize("name", NAMES)
def test_learner_fits_a_small_real_simulator_dataset(name, pendulum_data):
    """500 updates on scripted Pendulum data bring every (behaviour-regularised) learner's state-action
    pairs (s, pi(s)) much closer to the dataset than at initialisation (squared distance to the nearest
    dataset pair under PRDC's key [2 s_norm, a]), and the critic fits its targets better than at first.
    (PRDC may drift from the scripted controller itself: its constraint only asks for a nearby pair.)"""
    learner = build(name, pendulum_data)
    mean, std = pendulum_data.obs_mean, pendulum_data.obs_std + 1e-3
    keys = np.concatenate([2 * (pendulum_data.obs.numpy() - mean) / std, pendulum_data.action.numpy()], 1)
    probe = pendulum_data.obs[::10].numpy()

    def distance_to_data() -> float:
        pairs = np.concatenate([2 * (probe - mean) / std, learner.act(probe)], 1)
        return float(((pairs[:, None, :] - keys[None, :, :]) ** 2).sum(-1).min(axis=1).mean())

    before = distance_to_data()
    critic_losses = []
    for batch in batches(pendulum_data, 500, size=128, seed=1):
        metrics = learner.update(batch)
        if "train/critic_loss" in metrics:
            critic_losses.append(metrics["train/critic_loss"])
    after = distance_to_data()
    assert after < 0.25 * before, (before, after)
    if critic_losses:
        assert np.mean(critic_losses[-50:]) < 0.5 * np.mean(critic_losses[:50])


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_fused_adams_short_step_gives_torchs_numbers_and_state(weight_decay, monkeypatch):
    """FusedAdam's own step (every step after the first) must equal torch's fused Adam bit for bit, load and
    save torch's state_dict, and leave a step with a missing gradient to torch."""
    torch.manual_seed(0)
    reference = EnsembleCritic(3, 2, 2, SMALL)
    lean = EnsembleCritic(3, 2, 2, SMALL)
    lean.load_state_dict(reference.state_dict())
    torch_opt = torch.optim.Adam(reference.parameters(), lr=1e-3, fused=True, weight_decay=weight_decay)
    lean_opt = FusedAdam(lean.parameters(), lr=1e-3, weight_decay=weight_decay)
    torch_steps = []
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None, _step=torch.optim.Adam.step:
                        torch_steps.append(type(self).__name__) or _step(self, closure))
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        obs, act = torch.randn(32, 3, generator=gen), torch.randn(32, 2, generator=gen)
        torch_opt.zero_grad(set_to_none=True)
        (reference(obs, act) ** 2).mean().backward()
        torch_opt.step()
        take_step(lean_opt, (lean(obs, act) ** 2).mean())  # the learners' way: FusedAdam.apply_gradients
    assert torch_steps.count("FusedAdam") == 1  # only the first step, which creates the state, is torch's
    assert_same_state(lean.state_dict(), reference.state_dict())
    assert_same_state(lean_opt.state_dict(), torch_opt.state_dict())

    # a state_dict saved by torch's Adam resumes in FusedAdam with the same next step
    resumed = FusedAdam(lean.parameters(), lr=1e-3, weight_decay=weight_decay)
    resumed.load_state_dict(roundtrip(torch_opt.state_dict()))
    for net, opt in ((reference, torch_opt), (lean, resumed)):
        opt.zero_grad()
        (net(obs, act) ** 2).mean().backward()
        opt.step()
    assert_same_state(lean.state_dict(), reference.state_dict())

    # a parameter without a gradient: torch's step, which skips it
    frozen_bias = lean.net.net[0].bias.detach().clone()
    resumed.zero_grad()
    (lean(obs, act) ** 2).mean().backward()
    lean.net.net[0].bias.grad = None
    before = torch_steps.count("FusedAdam")
    resumed.step()
    assert torch_steps.count("FusedAdam") == before + 1
    assert torch.equal(lean.net.net[0].bias, frozen_bias)


def test_polyak_moves_every_target_parameter_by_tau_and_refuses_mismatched_networks():
    torch.manual_seed(0)
    online, target = EnsembleCritic(3, 2, 2, SMALL), EnsembleCritic(3, 2, 2, SMALL)
    before = [p.detach().clone() for p in target.parameters()]
    polyak(target, online, 0.25)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        assert torch.equal(t, torch.lerp(b, o, 0.25))  # (1 - tau) * target + tau * online, per tensor
    assert not any(p.requires_grad for p in freeze(target).parameters())
    with pytest.raises(ValueError, match="parameters"):
        polyak(target, EnsembleCritic(3, 2, 2, (64,)), 0.25)


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_act_gives_the_same_actions_for_a_column_major_batch(name, hopper_random):
    """A pandas frame's values are column-major; the policy must see them as the row-major batch they equal (on an
    Intel Xeon MKL's kernel for the transposed layout rounded differently, and the pyfunc model's `predict` gave
    other actions for a DataFrame than for the same array)."""
    data = Transitions(hopper_random)
    cls = ALGOS[name]
    learner = cls(cls.Config(), LearnerSpec.from_transitions(data))  # the default 256-256 networks
    for rows in (7, 64):
        obs = np.ascontiguousarray(data.obs[:rows].numpy())
        assert np.array_equal(learner.act(np.asfortranarray(obs)), learner.act(obs)), rows
