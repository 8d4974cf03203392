"""Run configs: the `RunConfig` dataclass, YAML run files, `--set key=value` overrides, learner settings.

A run's settings come from four layers, later ones winning:

    learner defaults  <  the learner's paper overrides for the dataset (`defaults_for`)  <  config file  <  --set / flags

`RunConfig` holds what the training loop needs (dataset, learner, budget, evaluation, online phase)
plus `algo_settings`, the learner's config fields that differ from its defaults. A config is plain
data: it flattens into MLflow params (`flatten`) and reloads from them (`from_flat`).

A run file looks like:

    dataset: hopper-medium
    algo: td3bc
    steps: 200000
    seed: 1
    algo_settings:
      actor_lr: 1.0e-4
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from offlab.errors import ConfigError, did_you_mean


@dataclass
class RunConfig:
    """One training run: data, learner, budget, evaluation, the optional online phase, checkpoints."""

    dataset: str = ""
    """Dataset name (a catalog name such as hopper-medium, or a local dataset)."""
    algo: str = ""
    """Learner name (see `offlab algos`)."""
    steps: int = 1_000_000
    """Offline gradient steps (the papers use 1M)."""
    seed: int = 0
    """Seed of everything random: networks, batches, exploration, evaluation episodes."""
    batch_size: int = 256
    """Transitions per gradient step."""
    eval_every: int = 10_000
    """Evaluate in the simulator every this many steps (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per evaluation (0: no evaluation)."""
    online_steps: int = 0
    """Environment steps of online fine-tuning after the offline phase (one gradient step each)."""
    online_ratio: float = 0.5
    """Fraction of each online-phase batch drawn from the online replay buffer (the rest is offline data)."""
    online_buffer_size: int = 1_000_000
    """Capacity of the online replay buffer (oldest transitions are overwritten)."""
    exploration_noise: float = 0.1
    """Std of the Gaussian noise added to a deterministic policy's actions online, as a fraction of max_action."""
    second_env: str = ""
    """Env id of the second simulator for learners that need one (default: the dataset's env)."""
    checkpoint_every: int = 10_000
    """Write a resumable checkpoint every this many steps (also at the end and on Ctrl-C)."""
    log_every: int = 1_000
    """Log train/* metrics, averaged, every this many steps."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    precision: str = "float32"
    """float32, or bf16: mixed precision for the updates (hidden-layer matmuls in bfloat16; ~1.4x faster on
    CPUs with AVX512-BF16/AMX; numbers differ from float32; benchmarks/d3rlpy_speed.md)."""
    threads: int = 0
    """torch CPU threads; 0: torch's default, one per core. Use 1 when several runs share the machine; the
    count is tagged on the run (torch_threads), and float sums, hence the numbers, depend on it, so a resumed
    run keeps the count it started with."""
    dataset_quality: bool = True
    """Log the dataset's quality metrics (quality/*, TQ and diagnostics) on the run; seconds on large datasets."""
    ope: str = ""
    """Off-policy estimators to run on the final policy, e.g. fqe,mb (logged as ope/<estimator>; empty: none)."""
    ope_updates: int = 0
    """Gradient updates of FQE, the dynamics ensemble and the behaviour density for `ope` (0: their defaults)."""
    algo_settings: dict[str, Any] = field(default_factory=dict)
    """The learner's settings that differ from its defaults (see `offlab algos`)."""

    @property
    def total_steps(self) -> int:
        return self.steps + self.online_steps

    @property
    def run_name(self) -> str:
        return f"{self.algo}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check(self) -> RunConfig:
        """Raise ConfigError for values no run can use; return self."""
        if not self.dataset:
            raise ConfigError("no dataset given; pass --dataset NAME or put `dataset:` in the config file")
        if not self.algo:
            raise ConfigError("no learner given; pass --algo NAME or put `algo:` in the config file (see `offlab algos`)")
        for name in ("steps", "online_steps", "eval_every", "eval_episodes", "threads", "ope_updates", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "checkpoint_every", "log_every", "online_buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.online_ratio <= 1.0:
            raise ConfigError(f"online_ratio must be in [0, 1], got {self.online_ratio}")
        if self.exploration_noise < 0:
            raise ConfigError(f"exploration_noise must be >= 0, got {self.exploration_noise}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device '{self.device}' is not one of auto, cpu, cuda")
        from offlab.nets import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.total_steps < 1:
            raise ConfigError("steps + online_steps must be at least 1")
        if self.ope:
            from offlab.evaluation.ope.runner import parse_estimators

            parse_estimators(self.ope)  # an unknown estimator fails now, not after training
        return self


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "algo_settings")
"""Keys a run file or --set may give at the top level."""


# ------------------------------------------------------------------------------------ type coercion


def plain(value: Any) -> Any:
    """Tuples to lists, recursively: the form YAML, JSON and MLflow params hold."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def field_types(config_cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass's fields."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_cls)}


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (strings from --set or YAML are parsed), or ConfigError naming the type."""
    try:
        return _coerce(value, tp)
    except (TypeError, ValueError):
        shown = value if isinstance(value, str) else repr(value)
        raise ConfigError(f"setting '{key}' expects {type_name(tp)}, got '{shown}'") from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is typing.Literal:
        for a in typing.get_args(tp):
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ValueError(value)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                f = float(text)  # 1e6 is an int a person means
                if f.is_integer():
                    return int(f)
                raise
        raise TypeError(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(value)
    return value


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}; values stay strings until coerced by type."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key=value, e.g. --set actor_lr=1e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.startswith("algo."):
            key = key[len("algo."):]
        out[key] = value.strip()
    return out


# ------------------------------------------------------------------------------------ learner settings


def learner_defaults(algo_cls: type, dataset: str) -> dict[str, Any]:
    """The learner's config as a dict: its defaults with its paper overrides for `dataset` applied."""
    base = plain(dataclasses.asdict(algo_cls.Config()))
    base.update(plain(paper_overrides(algo_cls, dataset)))
    return base


def paper_overrides(algo_cls: type, dataset: str) -> dict[str, Any]:
    """`defaults_for(dataset)` of a learner as a dict (empty when the learner has none)."""
    fn = getattr(algo_cls, "defaults_for", None)
    if fn is None or not dataset:
        return {}
    got = fn(dataset)
    if dataclasses.is_dataclass(got):
        default = dataclasses.asdict(algo_cls.Config())
        got = {k: v for k, v in dataclasses.asdict(got).items() if default.get(k) != v}
    return dict(got or {})


def learner_config(algo_cls: type, dataset: str, settings: dict[str, Any], seed: int | None = None):
    """Build the learner's Config: defaults < paper overrides for `dataset` < `settings`; seed from the run."""
    types_ = field_types(algo_cls.Config)
    values = learner_defaults(algo_cls, dataset)
    for key, value in settings.items():
        if key not in types_:
            raise unknown_key(key, algo_cls)
        values[key] = value
    typed = {k: coerce(v, types_[k], k) for k, v in values.items() if k in types_}
    if seed is not None and "seed" in types_:
        typed["seed"] = seed
    return algo_cls.Config(**typed)


def unknown_key(key: str, algo_cls: type | None) -> ConfigError:
    learner = sorted(field_types(algo_cls.Config)) if algo_cls is not None else []
    valid = [k for k in learner if k != "seed"] + list(RUN_KEYS)
    who = f"{algo_cls.name} or the run" if algo_cls is not None else "the run"
    return ConfigError(f"unknown setting '{key}' for {who}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")


# ------------------------------------------------------------------------------------ files and overrides


def read_run_file(path: str | Path) -> dict[str, Any]:
    """A run file's mapping; ConfigError (one line) when it is missing, does not parse or is not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of settings (key: value), got {type(raw).__name__}")
    return raw


def resolve_run(
    file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> tuple[RunConfig, type]:
    """The run config from a file, CLI flags (None = not given) and --set items; returns it with the learner class.

    Learner settings end up complete in `algo_settings` (every field of the learner's Config), so the
    config file a run logs reproduces it even if defaults change later.
    """
    from offlab.algos.base import get_algo

    raw = read_run_file(file) if file else {}
    run_types = field_types(RunConfig)
    values: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "algo_settings":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {file}: algo_settings must be a mapping of learner settings")
            settings.update(value)
        elif key in RUN_KEYS:
            values[key] = coerce(value, run_types[key], key)
        else:
            raise ConfigError(
                f"config file {file}: unknown key '{key}'{did_you_mean(key, RUN_KEYS + ('algo_settings',))}; "
                f"top-level keys: {', '.join(RUN_KEYS)}, algo_settings"
            )
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = coerce(value, run_types[key], key)
    run = RunConfig(**values)
    if not run.algo:
        run.check()
    algo_cls = get_algo(run.algo)
    learner_types = field_types(algo_cls.Config)
    for key, value in parse_assignments(sets or []).items():
        if key in learner_types and key != "seed":
            settings[key] = value
        elif key in ("dataset", "algo"):
            raise ConfigError(f"--set cannot change {key}; use --{key} NAME")
        elif key in RUN_KEYS:
            setattr(run, key, coerce(value, run_types[key], key))
        else:
            raise unknown_key(key, algo_cls)
    run.check()
    if "max_steps" in learner_types and "max_steps" not in settings:
        settings["max_steps"] = run.steps  # a learner's schedule (IQL's cosine decay) spans the run's offline updates
    cfg = learner_config(algo_cls, run.dataset, settings, seed=run.seed)
    run.algo_settings = config_dict(cfg)
    return run, algo_cls


def config_dict(cfg: Any) -> dict[str, Any]:
    """A learner Config as plain data (tuples as lists)."""
    return plain(dataclasses.asdict(cfg))


def run_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from its `to_dict()` form (checkpoints, config.yaml artifacts)."""
    types_ = field_types(RunConfig)
    values = {k: coerce(v, types_[k], k) for k, v in raw.items() if k in types_}
    return RunConfig(**values)


# ------------------------------------------------------------------------------------ flat params


def flatten(run: RunConfig) -> dict[str, str]:
    """Every setting as one flat string mapping: run keys as is, learner settings as `algo.<key>`."""
    out = {k: _param(getattr(run, k)) for k in RUN_KEYS}
    for k, v in run.algo_settings.items():
        out[f"algo.{k}"] = _param(v)
    return out


def _param(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_param(x) for x in v) + "]"
    return str(v)


def from_flat(params: dict[str, str]) -> RunConfig:
    """Rebuild a RunConfig (learner settings typed by the learner's Config) from `flatten`'s output."""
    from offlab.algos.base import get_algo

    types_ = field_types(RunConfig)
    run = RunConfig(**{k: coerce(params[k], types_[k], k) for k in RUN_KEYS if k in params})
    algo_types = field_types(get_algo(run.algo).Config)
    settings = {}
    for k, v in params.items():
        if k.startswith("algo."):
            key = k[len("algo."):]
            tp = algo_types.get(key, Any)
            settings[key] = plain(coerce(yaml.safe_load(v) if _is_listy(tp) else v, tp, key))
    run.algo_settings = settings
    return run


def _is_listy(tp: Any) -> bool:
    return typing.get_origin(tp) in (tuple, list) or any(
        typing.get_origin(a) in (tuple, list) for a in typing.get_args(tp)
    )


# ------------------------------------------------------------------------------------ describing settings


def field_docs(config_cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field of a config dataclass (read from its source)."""
    try:
        source = textwrap.dedent(inspect.getsource(config_cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    docs: dict[str, str] = {}
    if cls is None:
        return docs
    body = cls.body
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_settings(config_cls: type) -> list[dict[str, Any]]:
    """Each field of a config dataclass: name, type, default, valid range (its `LIMITS` entry, or ""), one-line doc."""
    docs = field_docs(config_cls)
    types_ = field_types(config_cls)
    limits = getattr(config_cls, "LIMITS", {})
    default = config_cls()
    return [
        {"name": f.name, "type": type_name(types_[f.name]), "default": plain(getattr(default, f.name)),
         "range": limits.get(f.name, ""), "doc": docs.get(f.name, "")}
        for f in dataclasses.fields(config_cls)
    ]


def family_overrides(algo_cls: type, names: list[str]) -> dict[str, dict[str, Any]]:
    """Paper overrides by dataset: `family-*` when every dataset of an env family shares them, else per name."""
    by_family: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        by_family.setdefault(name.split("-")[0], {})[name] = plain(paper_overrides(algo_cls, name))
    out: dict[str, dict[str, Any]] = {}
    for family, per_name in sorted(by_family.items()):
        values = list(per_name.values())
        if all(v == values[0] for v in values):
            if values[0]:
                out[f"{family}-*"] = values[0]
        else:
            out.update({n: v for n, v in sorted(per_name.items()) if v})
    return out
