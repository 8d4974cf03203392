"""PRDC: TD3+BC whose BC target is the action of the nearest dataset state-action pair.

Ran, Li, Zhang, Zhang & Yu, "Policy Regularization with Dataset Constraint for Offline Reinforcement
Learning", ICML 2023, arXiv:2306.06569. The dataset constraint: for the policy's pair (s, pi(s))
find the dataset point (s_i, a_i) nearest under the key [beta * s, a] (k = 1) and penalise
||pi(s) - a_i||^2; the actor objective is TD3+BC's with that penalty in place of the BC term:
-lambda * Q1(s, pi(s)) + ||pi(s) - a_nn||^2, lambda = alpha / mean|Q1(s, pi(s))| (detached).
The critic, target smoothing, delayed actor update and Polyak targets are TD3+BC's. Per-family
settings (PAPER_OVERRIDES) are the official repository's README run commands.

The neighbour search is `offlab.neighbours.NearestDatasetAction`, built once from the whole dataset; this file is
the learner. Differs from the reference code:
- The KD-tree query uses one thread (`workers=1`; the official code uses all cores, which only
  adds contention beside the networks' own threads), and the tree holds the keys rotated to their
  principal axes (distances, hence neighbours, unchanged; the query costs less).
- The search runs beside the critic steps (`overlap_search`): the critic step leaves the actor unchanged,
  so the neighbours are the same, and on a free core the search costs no wall time up to the length of a
  critic step. When the training loop announces the next batch (`lookahead`), the search for an actor step
  begins in the critic-only update before it (the actor is the same until then), so it runs beside two
  critic steps. With two or more cores it runs in a worker process (`SearchProcess`, `search_process`), and
  a training loop left to choose torch's thread count gives torch one core fewer (`side_cores`): a helper
  thread would share the interpreter's lock with the critic step, whose torch ops then wait for it (a TD3+BC
  update took 60% longer beside a search thread, 0-10% beside a search process; walker2d-medium, session
  28). Where that search outlasts the two critic steps (halfcheetah's first ~25,000 updates: the policy is far
  from the data), the training process, which would only wait for it, searches the last queries of each batch
  itself, as many as make both finish together (`share_search`, `NearestDatasetAction._balance`; a second copy
  of the index): PRDC's updates on halfcheetah-medium took 70 ms against 105 ms without (session 30). Where the
  search is cheap (the policy near the data) torch's second thread is worth more than the overlap, so torch
  takes the search process's core whenever it has nothing to search (`lend_core`, `SearchLayout.searching`):
  from the start of an update, or from the critic's backward pass, once the search has answered, to the start of
  the next search. On an Intel Xeon: 1.20x TD3+BC's time against 1.48x without (100k hopper rows, updates
  800-3,500), 1.25-1.46x against 1.46-1.50x (hopper-medium, updates 500-5,500), 1.31x against 1.47x
  (halfcheetah-medium from update 60,000; session 32, under the short OpenMP spin; under `offlab fit`'s spin since,
  TD3+BC and PRDC are both faster, the ratios 1.28-1.39x). Opt-in (`switch_layout`): time the search inline, in the
  training process with torch on every core, against the process as training goes, and keep the faster; beside
  lending it gained nothing, and its trials of inline cost up to 2.5x TD3+BC's time per update on hopper-medium.
  The numbers are the same in every layout (checked: torch's bits on both thread counts, else torch keeps one
  count). On one
  core, or with `search_process=false`: with one torch thread the search runs on a helper
  thread, the main thread taking the queries not yet begun if it outlasts the critic steps (they come in
  chunks, `SplitWork`); with several, inline after the critic step, its queries shared out over as many
  threads as torch has (the official code's `workers=-1` uses every core too; the compiled search releases the
  interpreter's lock: 1.49-1.63x TD3+BC's time against 1.72x on hopper-medium's updates 500-3,500, session 34).
- Before the tree, each query asked at a dataset row tries that row's nearest dataset states
  (`StateNeighbours`, 128 found once per dataset and kept on disk; the first 32 first): when the
  nearest of their keys is nearer than any key off the list can be, it is the exact neighbour and the
  tree is skipped. Once the policy is near the data that answers most queries (same neighbours as the
  tree; `state_neighbours=0` turns it off). A query they leave open still has their nearest key as a
  candidate; only the keys of faiss k-means cells that can hold a nearer key, in the shell around the cell's
  centroid that can, are scanned (`VoronoiCells`, on one thread): exact, and 3-6 times as fast as the tree on
  1M keys (6-8 times on hopper-medium's early batches since the scan is compiled, `offlab.neighbour_scan`, as
  the lists' stage is: together 30% less time per batch than as numpy calls, session 34; the keys' offsets read as
  one-byte codes, cell by cell over the batch: halfcheetah-medium's far batches in less than half the time,
  session 35; scored over the action's and the state's leading axes first, the rest only for the few keys those
  leave in: a quarter less again, session 36; in about 0.3 sqrt(N) cells rather than sqrt(N): half the time again
  on halfcheetah-medium, a fifth on hopper-medium, session 37; where the CPU has AVX-512 BW or AVX2, bounded first from
  each key's 4-bit interval codes by byte table lookups, which leave about 120 of a far query's 48,000 keys to
  score: a fifth less on halfcheetah-medium and hopper-medium than scoring them all by AVX-512 VNNI byte products,
  session 38). Whichever of the two took less time per query lately takes the open queries (the
  slower is timed again now and then, on 16 of a batch's open queries); the answer is the same either way. The
  cells cost a k-means over the keys once per dataset (2-6 s on 1M keys, one thread; kept
  on disk) and a copy of the keys stored cell by cell, a byte per component (and half a byte per leading axis for
  the interval codes). Without the lists (`state_neighbours=0`) a
  query asked at a row takes that row's own key as its candidate: on halfcheetah-medium, where the lists settle
  about a quarter of the queries, updates took 15% longer than with them (session 30); the tree alone, which
  took such queries before, took 1.8 s per 256.
- On CUDA an exact chunked search on the device replaces the KD-tree (`nn_search`), so the actor
  step never waits on a host round trip.
- Opt-in `nn_search=ivf`: faiss's inverted-file index in place of the exact search, an approximate
  neighbour. Where pi(s) is far from every dataset pair (halfcheetah, whose alpha of 40 lets the Q term
  dominate) an exact search over 1M keys has to visit many of them: 1.8 s per 256 queries on one core for
  the tree, 25-30 ms with the state neighbours and the cells (session 35), where the inverted file takes
  about 35 ms and returns the exact neighbour for >= 99.6% of queries, the others at most 4.5% farther
  (benchmarks/prdc_search.py, benchmarks/learner_speed.md). In training it is no longer faster: updates
  1,000-3,000 on halfcheetah-medium took 25.4 ms exact and 26.2 ms with `ivf` (TD3+BC 5.2 ms; session 35).
  With several torch threads an inline search's queries are shared out over them, as the tree's.
  When the exact search keeps actor steps 501-520 waiting 0.03 s or more, the learner leaves a notice
  saying why (`notices`, printed once by the training loop).
- The index keys hold the states exactly as the learner normalises them, so queries and keys can
  never disagree about normalisation.
- The twin critics are one 2-member vectorised ensemble.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from offlab.algos.base import LearnerSpec, check_settings, register
from offlab.algos.losses import q_normalised_bc_actor_loss, td3_critic_loss
from offlab.errors import ConfigError
from offlab.neighbours import NearestDatasetAction, PendingSearch, SearchLayout, SearchProcess
from offlab.nets import (
    NOISE,
    DeterministicActor,
    EnsembleCritic,
    Normalizer,
    act_on_numpy,
    adam,
    freeze,
    grads_off,
    learner_state,
    load_learner_state,
    polyak,
    stream_generator,
    take_step,
)
from offlab.threads import same_bits_on_thread_counts, usable_cores

SEARCHES = ("auto", "kdtree", "exact", "ivf")


@dataclass
class PRDCConfig:
    """PRDC settings; defaults are the paper's for hopper/walker2d (see PAPER_OVERRIDES for the rest)."""

    seed: int = 0
    """Seed for network initialisation and the target-smoothing noise."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target networks."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of actor and critics."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise, as a fraction of max_action."""
    noise_clip: float = 0.5
    """Clip of the smoothing noise, as a fraction of max_action."""
    policy_freq: int = 2
    """Actor and target networks update once every this many critic updates."""
    alpha: float = 2.5
    """Q-term trade-off: lambda = alpha / mean|Q| (40 for halfcheetah in the paper)."""
    beta: float = 2.0
    """Weight of the state in the neighbour key [beta * s, a]; large beta means nearest state."""
    k: int = 1
    """Neighbours per query; the paper (and offlab) uses only k = 1."""
    normalize_states: bool = True
    """Normalise states by the dataset's mean and std (+1e-3), in training and in the index keys."""
    nn_search: str = "auto"
    """Neighbour search: kdtree (scipy), exact (chunked torch), auto (kdtree on CPU, exact on CUDA), ivf (approximate)."""
    ivf_probe: int = 8
    """nn_search=ivf: cells searched per query, out of about sqrt(N); more is slower and closer to exact."""
    overlap_search: bool = True
    """Run the host search (kdtree, ivf) beside the critic steps: in the search process, or on a helper thread when torch has one thread (same results, faster)."""
    search_process: bool = True
    """With 2+ cores, run the host search (kdtree, ivf) in a worker process beside the critic steps, with torch on one core fewer (same results, faster)."""
    share_search: bool = True
    """With the search process: when it is slower than the critic steps, the training process searches a share of each batch too (a second copy of the index: about 1 GB for 1M rows; same results, faster)."""
    switch_layout: bool = False
    """With the search process: time training with the search inline (torch on every core) against the process, and keep the faster (`SearchLayout`; same results: used only where torch gives the same bits on both thread counts). Off by default: with `lend_core` the process was as fast or faster, without the trials or a second copy of the index."""
    lend_core: bool = True
    """With the search process: while it has nothing to search (the actor step once its neighbours have come), torch runs on its core too (same results: used only where torch gives the same bits on both thread counts)."""
    state_neighbours: int = 128
    """kdtree: each dataset state's this many nearest states (4 bytes each per row: 512 MB for 1M rows) answer most queries without the tree (exact; 0: off)."""

    LIMITS: ClassVar[dict[str, str]] = {
        "gamma": "[0, 1]", "tau": "(0, 1]", "actor_lr": "(0, inf)", "critic_lr": "(0, inf)",
        "policy_noise": "[0, inf)", "noise_clip": "[0, inf)", "policy_freq": "[1, inf)", "alpha": "[0, inf)",
        "beta": "[0, inf)", "ivf_probe": "[1, inf)", "state_neighbours": "[0, inf)"
    }
    """Valid interval of each numeric setting, checked when the config is built."""

    def __post_init__(self):
        if self.nn_search not in SEARCHES:
            raise ConfigError(f"nn_search '{self.nn_search}' is not one of {', '.join(SEARCHES)}; e.g. --set nn_search=auto")
        if self.k != 1:
            raise ConfigError(f"PRDC supports k=1 only (got k={self.k}); the paper uses k=1, --set k=1")
        check_settings(self)


PAPER_OVERRIDES: dict[str, dict[str, Any]] = {
    # official README run commands for the D4RL -v2 datasets
    "halfcheetah": {"alpha": 40.0, "beta": 2.0, "k": 1},
    "hopper": {"alpha": 2.5, "beta": 2.0, "k": 1},
    "walker2d": {"alpha": 2.5, "beta": 2.0, "k": 1},
}


@dataclass
class EarlySearch:
    """The next update's neighbour search, begun in this one: its batch, normalised s, pi(s) (with its graph)
    and the search."""

    batch: Any
    s: torch.Tensor
    pi: torch.Tensor
    search: PendingSearch


@register
class PRDC:
    name: ClassVar[str] = "prdc"
    Config: ClassVar[type] = PRDCConfig
    SLOW_SEARCH_S: ClassVar[float] = 0.03
    """An exact search that keeps the actor step waiting this long (mean over `TIMED_SEARCHES` after the first
    `UNTIMED_SEARCHES`) earns a notice saying why training is slow. With the search process beside two critic
    steps, actor steps 500-1,000 waited 2-3 ms on walker2d-medium and hopper-medium, and 70-100 ms on
    halfcheetah-medium (alpha 40: the policy is far from the data for its first ~25,000 updates), where PRDC then
    took 10x TD3+BC's time per update (benchmarks/learner_speed.md, sessions 29-30; 2-5x since session 35)."""
    UNTIMED_SEARCHES: ClassVar[int] = 500
    """Actor steps before the timing: the freshly initialised policy is far from the data everywhere (walker2d's
    first actor steps wait as long as halfcheetah's, 0.36 against 0.39 s), and only a policy that stays far
    needs the advice."""
    TIMED_SEARCHES: ClassVar[int] = 20

    def __init__(self, config: PRDCConfig, spec: LearnerSpec, device: torch.device | str = "cpu"):
        self.cfg = config
        self.spec = spec
        self.device = torch.device(device)
        self.max_action = spec.max_action
        with torch.random.fork_rng(devices=[]):  # initialise from the config's seed, leave the global RNG alone
            torch.manual_seed(config.seed)
            self.actor = DeterministicActor(spec.obs_dim, spec.action_dim, config.hidden, self.max_action)
            self.critic = EnsembleCritic(spec.obs_dim, spec.action_dim, 2, config.hidden)
        self.actor_target = freeze(copy.deepcopy(self.actor))
        self.critic_target = freeze(copy.deepcopy(self.critic))
        if config.normalize_states:
            self.normalizer = Normalizer(spec.obs_mean, np.asarray(spec.obs_std) + 1e-3)
        else:
            self.normalizer = Normalizer.identity(spec.obs_dim)
        for net in (self.actor, self.critic, self.actor_target, self.critic_target, self.normalizer):
            net.to(self.device)
        self.actor_opt = adam(self.actor.parameters(), config.actor_lr)
        self.critic_opt = adam(self.critic.parameters(), config.critic_lr)
        self.generator = stream_generator(config.seed, NOISE, self.device)  # apart from the init's numbers
        self.updates = 0
        self._upcoming = None  # the next update's batch, when the loop announced it (lookahead)
        self._early: EarlySearch | None = None  # that batch's search, begun one update early
        self.notices: list[str] = []  # advice for the user; the training loop prints and clears it
        self._search_wait: list[float] | None = None  # seconds the timed actor steps waited for an exact search
        self._untimed = self.UNTIMED_SEARCHES  # actor steps still to go before the timing
        # The index is built once from the whole dataset. Without data (a policy rebuilt from its saved
        # state, e.g. the MLflow pyfunc model) the learner can act but not update.
        self.nearest_dataset_action: NearestDatasetAction | None = None
        self.layout: SearchLayout | None = None  # with the search process: where the search runs, timed
        if spec.data is not None:
            search = config.nn_search
            if search == "auto":
                search = "exact" if self.device.type == "cuda" else "kdtree"
            with torch.no_grad():
                norm_obs = self.normalizer(spec.data.obs.to(self.device)).cpu()
            # the search process needs a core of its own beside torch's (see side_cores)
            in_process = (config.search_process and search in ("kdtree", "ivf") and usable_cores() >= 2
                          and SearchProcess.available())
            self.nearest_dataset_action = NearestDatasetAction(norm_obs, spec.data.action, config.beta, search,
                                                               self.device, ivf_probe=config.ivf_probe,
                                                               state_neighbours=config.state_neighbours,
                                                               search_process=in_process,
                                                               share_search=config.share_search)
            if in_process and (config.switch_layout or config.lend_core):
                index = self.nearest_dataset_action
                self.layout = SearchLayout(index, self._same_numbers, usable_cores,
                                           inline_floor=lambda: index.batch_seconds / config.policy_freq,
                                           switch=config.switch_layout, lend=config.lend_core)
            if search == "kdtree":
                self._search_wait = []

    @property
    def side_cores(self) -> int:
        """Cores the learner keeps busy beside torch's threads now: 1 while its search process searches. A training
        loop left to choose torch's thread count gives torch that many cores fewer (`SearchLayout` gives torch the
        core back while the search runs inline)."""
        index = self.nearest_dataset_action
        return 1 if index is not None and index.in_process else 0

    def hold_threads(self) -> None:
        """The caller chose torch's thread count (`offlab fit --threads`): keep it. The search stays in its process
        (when it has one) and torch never takes its core (`lend_core`) nor moves it inline (`switch_layout`)."""
        self.layout = None

    @classmethod
    def defaults_for(cls, dataset_name: str) -> dict[str, Any]:
        """The paper's config overrides for a dataset's env family (empty when none apply)."""
        name = dataset_name.lower()
        return next((dict(v) for family, v in PAPER_OVERRIDES.items() if family in name), {})

    def update(self, batch) -> dict[str, float]:
        cfg = self.cfg
        index = self.nearest_dataset_action
        if index is None:
            raise ConfigError("PRDC needs the dataset to build its neighbour index; pass LearnerSpec.from_transitions(data)")
        if self.layout is not None:
            self.layout.tick(batch)
        actor_step = (self.updates + 1) % cfg.policy_freq == 0
        # The search process has a core of its own (`side_cores`) and shares no interpreter lock with torch: it
        # always overlaps the critic steps. A helper thread overlaps them only when torch runs on one thread
        # (the search then has a core of its own); with more, torch's critic step keeps every core busy and
        # a search beside it would contend with it: inline after the critic step it cost less on two cores
        # (1.19-1.37x TD3+BC against 1.42-1.51x, benchmarks/d3rlpy_speed.md, session 21).
        overlap = cfg.overlap_search and index.on_host and (index.in_process or torch.get_num_threads() == 1)
        pending = pi = s = None
        early, self._early = self._early, None
        if early is not None:
            if early.batch is batch:  # this batch's search began in the previous update (lookahead)
                s, pi, pending = early.s, early.pi, early.search
            else:  # the caller sent another batch than it announced: that search is wasted
                early.search.result()
        if self.layout is not None:  # torch takes the search process's core unless a search is under way (`lend_core`)
            self.layout.searching(pending is not None and not pending.ready())
        s = self.normalizer(batch.obs) if s is None else s
        s2 = self.normalizer(batch.next_obs)
        if actor_step and overlap and pending is None:
            # The critic step does not change the actor, so pi(s) (kept for the actor step) and its neighbour
            # are known now: search on the helper thread (scipy and faiss release the GIL) while torch runs the
            # critic step.
            pi = self.actor(s)
            pending = index.start_search(s, pi, batch.rows)
        upcoming, self._upcoming = self._upcoming, None
        if upcoming is not None and overlap and not actor_step and (self.updates + 2) % cfg.policy_freq == 0:
            # The next update steps the actor and this one leaves it alone: the actor of the next update's
            # actor step is this one, so its search can start now and run beside two critic steps.
            s_next = self.normalizer(upcoming.obs)
            pi_next = self.actor(s_next)
            self._early = EarlySearch(upcoming, s_next, pi_next, index.start_search(s_next, pi_next, upcoming.rows))
        # torch off the search process's core while it searches (a search begun above included), and on it once the
        # search is done
        in_flight = self._early.search if self._early is not None else pending
        busy = self.layout is not None and in_flight is not None and not in_flight.ready()
        if busy:
            self.layout.searching(True)
        critic_loss = self._critic_loss(s, s2, batch, self.generator)
        if busy and in_flight.ready():  # done before the backward pass: torch takes the core for that
            self.layout.searching(False)
        take_step(self.critic_opt, critic_loss)
        self.updates += 1
        metrics = {"train/critic_loss": critic_loss.item()}

        if actor_step:  # delayed actor and target update, as TD3+BC
            with grads_off(self.critic):  # the actor loss trains the actor only
                pi = self.actor(s) if pi is None else pi
                # dataset constraint: the action of the nearest (beta * s_i, a_i) to the detached (beta * s, pi(s))
                waited = time.perf_counter()
                nearest_action = index.actions[pending.result()] if pending is not None else index(s, pi, batch.rows)
                if self._search_wait is not None and not index.inline:
                    self._time_search(time.perf_counter() - waited)
                if self.layout is not None and pending is not None:
                    self.layout.searching(False)
                q = self.critic.member(s, pi, 0)  # Q1(s, pi(s))
                # -lambda * mean Q + mean ||pi(s) - a_nn||^2, lambda = alpha / mean|Q| detached
                actor_loss, constraint = q_normalised_bc_actor_loss(q, pi, nearest_action, cfg.alpha)
                take_step(self.actor_opt, actor_loss)
            polyak(self.actor_target, self.actor, cfg.tau)
            polyak(self.critic_target, self.critic, cfg.tau)
            metrics |= {"train/actor_loss": actor_loss.item(), "train/bc_loss": constraint.item(),
                        "train/q_mean": q.mean().item()}
        if self.layout is not None:
            self.layout.rest()
        return metrics

    def _critic_loss(self, s: torch.Tensor, s2: torch.Tensor, batch, generator: torch.Generator) -> torch.Tensor:
        """TD3's clipped double-Q loss on normalised s, s2, the smoothing noise drawn from `generator`."""
        cfg = self.cfg
        return td3_critic_loss(
            self.critic, self.critic_target, self.actor_target, s, batch.action, batch.reward, s2,
            batch.terminated, gamma=cfg.gamma, policy_noise=cfg.policy_noise * self.max_action,
            noise_clip=cfg.noise_clip * self.max_action, max_action=self.max_action, generator=generator,
        )

    def _same_numbers(self, threads: tuple[int, ...], batch) -> bool:
        """Whether torch computes this learner's losses and gradients on `batch` with the same bits on each of the
        `threads` counts (`SearchLayout` switches between them). Nothing is changed: the gradients are returned,
        not accumulated, and the smoothing noise comes from a generator of its own."""
        cfg = self.cfg
        actor_params, critic_params = list(self.actor.parameters()), list(self.critic.parameters())

        def compute() -> list:
            s, s2 = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
            critic_loss = self._critic_loss(s, s2, batch, torch.Generator(device=self.device).manual_seed(0))
            critic_grads = torch.autograd.grad(critic_loss, critic_params)
            with grads_off(self.critic):  # as the actor step
                pi = self.actor(s)
                actor_loss, _ = q_normalised_bc_actor_loss(self.critic.member(s, pi, 0), pi, batch.action, cfg.alpha)
                actor_grads = torch.autograd.grad(actor_loss, actor_params)
            return [critic_loss, actor_loss, pi, *critic_grads, *actor_grads]

        return same_bits_on_thread_counts(threads, compute)

    def _time_search(self, seconds: float) -> None:
        """Time some actor steps' waits for the exact search; when they are slow, leave a notice (once). Only the
        advice depends on the timing, never the numbers."""
        if self._untimed > 0:
            self._untimed -= 1
            return
        self._search_wait.append(seconds)
        if len(self._search_wait) < self.TIMED_SEARCHES:
            return
        mean, self._search_wait = sum(self._search_wait) / len(self._search_wait), None
        if mean >= self.SLOW_SEARCH_S:
            self.notices.append(
                f"PRDC: the exact neighbour search kept actor steps {self.UNTIMED_SEARCHES + 1}-"
                f"{self.UNTIMED_SEARCHES + self.TIMED_SEARCHES} waiting {mean * 1e3:.0f} ms each on average: the "
                f"policy is still far from the data, so each search scans many keys. On halfcheetah-medium that "
                f"lasts about 20,000 updates, at about 1.5 times TD3+BC's time per update, and about 1.25 times "
                f"after; --set nn_search=ivf (approximate) was no faster there on 2 cores "
                f"(benchmarks/learner_speed.md)")

    def lookahead(self, batch) -> None:
        """The batch the next `update` will get (the training loop announces it before the current update):
        when the current update leaves the actor alone, the next one's neighbour search starts at once."""
        self._upcoming = batch

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """The deterministic policy's action."""
        return act_on_numpy(lambda o: self.actor(self.normalizer(o)), obs, self.device,
                            self.spec.action_low, self.spec.action_high)

    STATE_PARTS = ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt", "normalizer")

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, normaliser, counter and RNG; the index is rebuilt from the dataset."""
        return learner_state(self, self.STATE_PARTS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_learner_state(self, state, self.STATE_PARTS)
