"""Rollouts of a policy in the real simulator: mean return, D4RL-normalised score, standard error.

Episode i of an evaluation starts from `env.reset(seed=episode_seed(seed, "eval", i))`, so every
evaluation of a run sees the same start states (curves compare policies, not luck) and the numbers
depend on nothing but the policy and the seed. The episodes run in lockstep: one batched `act`
call per step for all episodes still running.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from offlab.envs.make import make_env, normalized_score

Policy = Callable[[np.ndarray], np.ndarray]
"""Observations [B, obs_dim] -> actions [B, action_dim] (numpy in, numpy out)."""

_TAGS = {"eval": 1, "online": 2, "second": 3}


def episode_seed(seed: int, purpose: str, index: int) -> int:
    """A reset seed for episode `index` of `purpose` ('eval', 'online', 'second'), distinct across all three."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _TAGS[purpose], int(index)]).generate_state(1)[0])


@dataclass(frozen=True)
class EvalResult:
    """Returns of the evaluation episodes and their summaries."""

    returns: np.ndarray
    lengths: np.ndarray
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    normalized: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def episodes(self) -> int:
        return len(self.returns)

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def return_se(self) -> float:
        """Standard error of the mean return (0 with one episode)."""
        n = len(self.returns)
        return float(np.std(self.returns, ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    @property
    def normalized_score(self) -> float | None:
        """D4RL-normalised mean return, 100 * (R - R_min) / (R_max - R_min); None without reference scores."""
        return float(np.mean(self.normalized)) if len(self.normalized) else None

    @property
    def normalized_se(self) -> float | None:
        n = len(self.normalized)
        if not n:
            return None
        return float(np.std(self.normalized, ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/return": self.mean_return, f"{prefix}/return_se": self.return_se}
        if self.normalized_score is not None:
            out[f"{prefix}/normalized_score"] = self.normalized_score
            out[f"{prefix}/normalized_score_se"] = self.normalized_se
        return out

    def to_dict(self) -> dict:
        return {"episodes": self.episodes, "mean_return": self.mean_return, "return_se": self.return_se,
                "normalized_score": self.normalized_score, "normalized_se": self.normalized_se,
                "returns": [float(r) for r in self.returns], "lengths": [int(n) for n in self.lengths]}


class Evaluator:
    """Evaluates policies on one env with fixed, seeded start states; the envs are made once and reused."""

    def __init__(self, env_id: str, episodes: int = 10, seed: int = 0, env_kwargs: dict | None = None,
                 ref_min_score: float | None = None, ref_max_score: float | None = None):
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.episodes = episodes
        self.seed = seed
        self.ref_min_score, self.ref_max_score = ref_min_score, ref_max_score
        self._envs: list = []

    def __call__(self, policy: Policy) -> EvalResult:
        n = self.episodes
        while len(self._envs) < n:
            self._envs.append(make_env(self.env_id, **self.env_kwargs))
        envs = self._envs[:n]
        obs = np.stack([env.reset(seed=episode_seed(self.seed, "eval", i))[0] for i, env in enumerate(envs)])
        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        running = np.ones(n, dtype=bool)
        while running.any():
            idx = np.flatnonzero(running)
            actions = np.asarray(policy(obs[idx].astype(np.float32)))
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = envs[i].step(actions[j])
                obs[i] = o
                returns[i] += float(r)
                lengths[i] += 1
                if terminated or truncated:
                    running[i] = False
        normalized = np.zeros(0)
        if self.ref_min_score is not None and self.ref_max_score is not None:
            normalized = np.asarray(normalized_score(returns, self.ref_min_score, self.ref_max_score))
        return EvalResult(returns, lengths, self.ref_min_score, self.ref_max_score, normalized)

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []


def evaluate_policy(policy: Policy, env_id: str, episodes: int = 10, seed: int = 0, env_kwargs: dict | None = None,
                    ref_min_score: float | None = None, ref_max_score: float | None = None) -> EvalResult:
    """Run `episodes` seeded episodes of `policy` in `env_id`; see `Evaluator`."""
    evaluator = Evaluator(env_id, episodes, seed, env_kwargs, ref_min_score, ref_max_score)
    try:
        return evaluator(policy)
    finally:
        evaluator.close()
