"""The learner protocol, the learner registry `ALGOS`, and `LearnerSpec` (what a learner is built from).

A learner is a class registered by name with a config dataclass. The training loop (training.py)
owns the clock, sampling, evaluation, checkpoints and logging; the learner owns its networks and
its update:

    algo = ALGOS["prdc"](config, spec, device)
    metrics = algo.update(batch)                       # one gradient step -> {"train/...": float}
    action = algo.act(obs, deterministic=True)         # numpy in, numpy out, [B, obs] or [obs]
    sd = algo.state_dict(); algo.load_state_dict(sd)   # tensors and plain numbers only

Hybrid learners also implement `online_step(env, ...)`; they declare what they need in class
attributes (`needs_env`, `needs_second_env`), and the loop provides it. A learner may also take
`lookahead(batch)`, the next offline update's batch told before the current update (PRDC starts
its neighbour search early); its numbers must not depend on being told. A learner may keep a list
`notices` of advice for the user (PRDC: a slow exact search); the loop prints each once and clears it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from offlab.errors import ConfigError, did_you_mean


@dataclass
class LearnerSpec:
    """Everything a learner may need to know about the problem, fixed before training starts."""

    obs_dim: int
    action_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    obs_mean: np.ndarray
    obs_std: np.ndarray
    env_id: str = ""
    dataset_name: str = ""
    data: Any = None
    """The offline data as `offlab.data.store.Transitions` (PRDC's index, IQL's reward scale)."""
    episode_returns: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def max_action(self) -> float:
        return float(np.max(np.abs(np.r_[self.action_low, self.action_high])))

    @classmethod
    def from_transitions(cls, data, env_id: str = "", dataset_name: str = "") -> LearnerSpec:
        ds = data.dataset
        card = ds.card
        low = np.asarray(card.action_low if card.action_low is not None else -np.ones(card.action_dim), np.float32)
        high = np.asarray(card.action_high if card.action_high is not None else np.ones(card.action_dim), np.float32)
        return cls(
            obs_dim=int(ds.obs.shape[1]),
            action_dim=int(ds.action.shape[1]) if ds.action.ndim == 2 else 1,
            action_low=low,
            action_high=high,
            obs_mean=data.obs_mean,
            obs_std=data.obs_std,
            env_id=env_id or card.env_id,
            dataset_name=dataset_name or card.name,
            data=data,
            episode_returns=ds.episode_returns(),
        )


@runtime_checkable
class Algorithm(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type]

    def update(self, batch) -> dict[str, float]: ...

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ALGOS: dict[str, type] = {}


def register(cls):
    """Class decorator: add a learner to ALGOS under `cls.name`."""
    if cls.name in ALGOS:
        raise RuntimeError(f"learner '{cls.name}' registered twice")
    ALGOS[cls.name] = cls
    return cls


def get_algo(name: str) -> type:
    import offlab.algos  # noqa: F401  (importing the package registers every learner)

    if name not in ALGOS:
        raise ConfigError(
            f"unknown learner '{name}'{did_you_mean(name, ALGOS)}; known learners: {', '.join(sorted(ALGOS))}"
        )
    return ALGOS[name]


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def check_settings(config: Any) -> None:
    """Raise ConfigError (one line) for the first setting outside its interval in the config's `LIMITS`.

    `LIMITS` (a ClassVar of the config dataclass, shown by `offlab algos`) maps settings to intervals read
    as written: `{"gamma": "[0, 1]", "tau": "(0, 1]", "alpha": "[0, inf)"}`. A config with a `hidden`
    field must give a non-empty list of positive layer widths. Configs call this in `__post_init__`, so a
    bad `--set` fails before any data is loaded; the message suggests the field's default as a value that works.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    hidden = getattr(config, "hidden", None)
    if hidden is not None and (len(hidden) == 0 or any(int(h) < 1 for h in hidden)):
        example = ",".join(str(h) for h in defaults["hidden"])
        raise ConfigError(f"hidden must list positive layer widths, got {list(hidden)}; e.g. --set hidden={example}")
    for name, interval in getattr(config, "LIMITS", {}).items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        value = getattr(config, name)
        above = value > low if interval[0] == "(" else value >= low
        below = value < high if interval[-1] == ")" else value <= high
        if not (above and below) or math.isnan(value):
            raise ConfigError(f"{name} must be in {interval}, got {value}; e.g. --set {name}={defaults[name]}")
