"""PRDC's dataset constraint (Ran et al. 2023): the BC target is the action of the nearest dataset
point under the key [beta * s, a], found by an exact index over the whole dataset."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from offlab.algos.base import LearnerSpec
from offlab.algos.prdc import PRDC, PRDCConfig
from offlab.data.schema import DatasetCard, coerce_columns, finalize
from offlab.data.store import Transitions
from offlab.errors import ConfigError
from offlab.neighbour_scan import interval_bounds_available
from offlab.neighbours import NearestDatasetAction, SearchLayout
from offlab.threads import same_bits_on_thread_counts, usable_cores
from offlab.training import update_on

# the cells' scan in float32, and with interval bounds first where this CPU has AVX-512 BW or AVX2 (else they cannot
# run here)
SCAN_LAYOUTS = [False] + [True] * interval_bounds_available()

SMALL = (64, 64)


def table(obs, action) -> Transitions:
    """A hand-made dataset: one single-step (truncated) episode per row, so any rows are allowed."""
    obs = np.asarray(obs, np.float32).reshape(len(obs), -1)
    action = np.asarray(action, np.float32).reshape(len(action), -1)
    n = len(obs)
    card = DatasetCard(name="hand", env_id="Pendulum-v1", obs_dim=obs.shape[1], action_dim=action.shape[1],
                       action_low=[-1.0] * action.shape[1], action_high=[1.0] * action.shape[1])
    ds = coerce_columns(card, episode=np.arange(n), step=np.zeros(n), obs=obs, next_obs=obs + 0.1, action=action,
                        reward=np.zeros(n), terminated=np.zeros(n, bool), truncated=np.ones(n, bool))
    return Transitions(finalize(ds))


def make(data, **overrides) -> PRDC:
    """A small PRDC searching in this process (the tests below look into its index); the search process has tests
    of its own."""
    overrides.setdefault("search_process", False)
    return PRDC(PRDCConfig(hidden=SMALL, **overrides), LearnerSpec.from_transitions(data))


def nearest(learner: PRDC, obs, policy_action) -> np.ndarray:
    s = learner.normalizer(torch.as_tensor(np.asarray(obs, np.float32).reshape(len(obs), -1)))
    a = torch.as_tensor(np.asarray(policy_action, np.float32).reshape(len(policy_action), -1))
    return learner.nearest_dataset_action(s, a).numpy()


def key_distances(learner: PRDC, data, s: torch.Tensor, a: torch.Tensor, beta: float = 2.0) -> np.ndarray:
    """Squared float64 distances from each query [beta * s, a] (s already normalised) to every dataset key
    [beta * s_i, a_i]: their argmin is the brute-force neighbour."""
    keys = np.concatenate([beta * learner.normalizer(data.obs).numpy(), data.action.numpy()], 1).astype(np.float64)
    query = np.concatenate([beta * s.numpy(), a.numpy()], 1).astype(np.float64)
    return ((query[:, None, :] - keys[None, :, :]) ** 2).sum(-1)


# states 0, 0, 1, 2 and actions -1, 1, 0.5, -0.5 (1-D each), raw keys when normalisation is off
HAND_OBS = [0.0, 0.0, 1.0, 2.0]
HAND_ACTIONS = [-1.0, 1.0, 0.5, -0.5]


@pytest.mark.parametrize("search", ["kdtree", "exact", "ivf"])
def test_constraint_target_is_the_action_of_the_nearest_beta_state_action_pair(search):
    learner = make(table(HAND_OBS, HAND_ACTIONS), beta=1.0, normalize_states=False, nn_search=search)
    # key (0, 0.8): nearest (0, 1) -> 1;  (0.9, -0.2): nearest (1, 0.5) [d^2 .5] over (0,-1) [1.45] -> 0.5
    # (1.9, 0.9): nearest (1, .5) [.97] over (2, -.5) [1.97] -> 0.5;  (2.2, -1): nearest (2, -.5) -> -0.5
    target = nearest(learner, [0.0, 0.9, 1.9, 2.2], [0.8, -0.2, 0.9, -1.0])
    np.testing.assert_array_equal(target[:, 0], [1.0, 0.5, 0.5, -0.5])


def test_constraint_target_uses_normalised_states():
    """Keys hold the learner's normalised states. States (0, 200, 1000) with actions (1, -1, 0): for the
    query (s=20, a=-1) raw keys let the state decide (nearest: s=0, action 1), while in normalised
    units (std ~432) the states 0 and 200 are close and the action decides (s=200, action -1)."""
    obs, actions = [0.0, 200.0, 1000.0], [1.0, -1.0, 0.0]
    normalised = make(table(obs, actions), beta=1.0, normalize_states=True)
    raw = make(table(obs, actions), beta=1.0, normalize_states=False)
    assert nearest(normalised, [20.0], [-1.0])[0, 0] == -1.0
    assert nearest(raw, [20.0], [-1.0])[0, 0] == 1.0


def test_beta_zero_reduces_the_search_to_actions():
    """beta = 0: the neighbour is the dataset action nearest to pi(s), whatever its state; on a dense
    action grid the constraint is at most half the grid spacing."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-1, 1, 41)  # spacing 0.05
    data = table(rng.normal(size=(41, 3)), grid)
    learner = make(data, beta=0.0)
    queries = rng.uniform(-1, 1, size=(200, 1))
    target = nearest(learner, rng.normal(size=(200, 3)) * 50.0, queries)
    expected = grid[np.abs(grid[None, :] - queries).argmin(axis=1)]
    np.testing.assert_allclose(target[:, 0], expected, atol=1e-7)
    assert np.abs(target - queries).max() <= 0.025 + 1e-6


def test_large_beta_makes_the_neighbour_the_same_states_action(hopper_random):
    """beta -> infinity: a dataset state's neighbour is its own row, so the constraint equals the BC
    term of TD3+BC with the logged action."""
    data = Transitions(hopper_random)
    learner = make(data, beta=1e4)
    rows = torch.arange(0, len(data), 37)
    policy_actions = torch.rand(len(rows), data.action.shape[1]) * 2 - 1
    s = learner.normalizer(data.obs[rows])
    target = learner.nearest_dataset_action(s, policy_actions)
    torch.testing.assert_close(target, data.action[rows], rtol=0, atol=0)


@pytest.mark.parametrize("search", ["kdtree", "exact"])
def test_index_equals_brute_force_argmin_on_100_random_queries(hopper_random, search):
    data = Transitions(hopper_random)
    learner = make(data, beta=2.0, nn_search=search)
    rng = np.random.default_rng(1)
    s = learner.normalizer(data.obs[rng.integers(0, len(data), 100)]) + 0.3 * torch.randn(
        100, data.obs.shape[1], generator=torch.Generator().manual_seed(1))
    a = torch.from_numpy(rng.uniform(-1, 1, size=(100, data.action.shape[1])).astype(np.float32))
    dist = key_distances(learner, data, s, a)
    brute = dist.argmin(axis=1)
    idx = learner.nearest_dataset_action.nearest_index(s, a).numpy()
    if search == "kdtree":
        np.testing.assert_array_equal(idx, brute)
    else:  # float32 distances: the same point, or one at the same distance to within rounding
        found = dist[np.arange(100), idx]
        np.testing.assert_allclose(found, dist.min(axis=1), rtol=1e-5, atol=1e-6)
        assert (idx == brute).mean() >= 0.95


def test_state_neighbours_decide_only_what_they_certify():
    """1-D states 0, 1, 2, 3 with actions 0, 0, 0, 5 (raw keys, beta 1), two listed states per row: row 0
    lists states 0 and 1, so any other key is at least 1 away. Asked at row 0 with action 0.1, the listed
    key (0, 0) at 0.1 is certified; with action 5 the best listed key is 5 away, nothing is certified, and
    the tree finds (3, 5) at 3."""
    learner = make(table([0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0]), beta=1.0, normalize_states=False,
                   state_neighbours=2)
    index = learner.nearest_dataset_action
    assert index.neighbours.rows[0].tolist() == [0, 1] and index.neighbours.radius[0] == 1.0
    query = np.array([[0.0, 0.1], [0.0, 5.0]], np.float32)
    found, certain = index.neighbours.nearest(index.keys32, 1.0, query, np.array([0, 0]), index.slack)
    assert found.tolist() == [0, 0] and certain.tolist() == [True, False]
    s, a = torch.zeros(2, 1), torch.tensor([[0.1], [5.0]])
    assert index.nearest_index(s, a, torch.tensor([0, 0])).tolist() == [0, 3]
    assert index.nearest_index(s, a).tolist() == [0, 3]


def test_the_whole_list_settles_what_its_first_states_leave_open():
    """1-D states 0, 1, 2, 3 with actions 0, 0.5, 0, 5 (raw keys, beta 1). Row 0's list holds states 0, 1, 2
    (any other key is at least 2 away); its first stage only state 0 (radius 0: it certifies nothing). Asked
    at row 0: action 0.5 keeps (0, 0) at 0.5 and the whole list certifies it; action 1.6 finds (1, 0.5) at
    1.49 in the second stage, certified; action 2.3 finds (1, 0.5) at 2.06 there, above 2: not certified.
    Action 5 leaves (0, 0) at 5 after the first stage, more than twice the whole list's floor squared (25 > 8):
    the second stage is skipped, and the open search finds (3, 5)."""
    from offlab.neighbours import StateNeighbours

    learner = make(table([0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.0, 5.0]), beta=1.0, normalize_states=False,
                   state_neighbours=3)
    index = learner.nearest_dataset_action
    index.neighbours = StateNeighbours(np.array([[0.0], [1.0], [2.0], [3.0]], np.float32), 3, first=1)
    assert index.neighbours.rows[0].tolist() == [0, 1, 2]
    assert index.neighbours.radius_first[0] == 0.0 and index.neighbours.radius[0] == 2.0
    query = np.array([[0.0, 0.5], [0.0, 1.6], [0.0, 2.3], [0.0, 5.0]], np.float32)
    found, certain = index.neighbours.nearest(index.keys32, 1.0, query, np.array([0, 0, 0, 0]), index.slack)
    assert found.tolist() == [0, 1, 1, 0] and certain.tolist() == [True, True, False, False]
    s, a = torch.zeros(4, 1), torch.tensor([[0.5], [1.6], [2.3], [5.0]])
    assert index.nearest_index(s, a, torch.tensor([0, 0, 0, 0])).tolist() == [0, 1, 1, 3]


@pytest.mark.parametrize("noise", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("first", [4, 16])
@pytest.mark.parametrize("open_search", ["cells", "tree"])
def test_state_neighbours_give_the_trees_answer(hopper_random, noise, first, open_search):
    """Queries at dataset rows (the learner's case), at rows whose state was moved a little, and with no
    row: the answer with the state neighbours is the brute-force argmin, as without them, whether the Voronoi
    cells or the tree settle the queries the lists leave open. first=4: most queries go on to the second stage
    (the whole list of 16)."""
    from offlab.neighbours import StateNeighbours

    data = Transitions(hopper_random)
    learner = make(data, beta=2.0, state_neighbours=16)
    index = learner.nearest_dataset_action
    index.neighbours = StateNeighbours(learner.normalizer(data.obs).numpy(), 16, first=first)
    index.open_cost = {"cells": 0.0, "tree": 1.0} if open_search == "cells" else {"cells": 1.0, "tree": 0.0}
    index.OPEN_RETRY = 10**9  # no retiming: every open search takes `open_search`
    gen = torch.Generator().manual_seed(2)
    rows = torch.randint(0, len(data), (200,), generator=gen)
    s = learner.normalizer(data.obs[rows])
    a = (data.action[rows] + noise * torch.randn(200, data.action.shape[1], generator=gen)).clamp(-1, 1)
    moved = s + 1e-3 * torch.randn(s.shape, generator=gen)
    for states in (s, moved):
        brute = key_distances(learner, data, states, a).argmin(axis=1)
        told = rows.clone()
        told[::7] = -1  # some queries come from elsewhere (online replay): the tree answers them
        np.testing.assert_array_equal(index.nearest_index(states, a, told).numpy(), brute)
        np.testing.assert_array_equal(index.nearest_index(states, a).numpy(), brute)
    query = np.concatenate([2.0 * s.numpy(), a.numpy()], 1).astype(np.float32)
    certified = index.neighbours.nearest(index.keys32, 2.0, query, rows.numpy(), index.slack)[1].mean()
    assert certified > 0.9  # 16 listed states settle most queries on this data (100%, 98.5%, 95.5% here) ...
    if noise == 1.0:
        assert certified < 1.0  # ... but not every one asked at a row: the tree answers the rest


@pytest.mark.parametrize("noise", [0.05, 1.0])
def test_without_state_neighbours_a_query_at_a_row_starts_the_cells_from_that_rows_key(hopper_random, noise):
    """state_neighbours=0: no lists are found, and a query asked at a dataset row goes to the Voronoi cells with
    the row's own key [beta * s_i, a_i] as its candidate (before, every query went to the tree, which took 1.8 s
    per 256 queries on halfcheetah-medium against the cells' 0.15 s); a query from elsewhere (row -1) goes to the
    tree. Either way the answer is the brute-force argmin."""
    data = Transitions(hopper_random)
    learner = make(data, beta=2.0, state_neighbours=0)
    index = learner.nearest_dataset_action
    assert index.neighbours is None and index.cells is not None
    index.open_cost = {"cells": 0.0, "tree": 1.0}
    index.OPEN_RETRY = 10**9  # no retiming: the open queries all go to the cells
    candidates, tree_queries = [], []
    cells_nearest, tree_index = index.cells.nearest, index._tree_index
    index.cells.nearest = lambda q, cand: candidates.append(cand.copy()) or cells_nearest(q, cand)
    index._tree_index = lambda q: tree_queries.append(len(q)) or tree_index(q)
    gen = torch.Generator().manual_seed(5)
    rows = torch.randint(0, len(data), (120,), generator=gen)
    s = learner.normalizer(data.obs[rows])
    a = (data.action[rows] + noise * torch.randn(120, data.action.shape[1], generator=gen)).clamp(-1, 1)
    told = rows.clone()
    told[::6] = -1
    brute = key_distances(learner, data, s, a).argmin(axis=1)
    np.testing.assert_array_equal(index.nearest_index(s, a, told).numpy(), brute)
    np.testing.assert_array_equal(np.concatenate(candidates), told[told >= 0].numpy())
    assert tree_queries == [20]
    if noise == 1.0:  # far from the data the row's own key is not always the answer: the cells find nearer ones
        assert (brute != rows.numpy()).mean() > 0.1  # 17.5% here


def count_split_work(monkeypatch) -> list:
    """Record each `SplitWork` the neighbour index starts: (its chunks' lengths, its helper threads)."""
    import offlab.neighbours as neighbours_module

    shares = []
    split_work = neighbours_module.SplitWork

    def counted(purpose, fn, chunks, helpers=1):
        shares.append(([len(c) for c in chunks], helpers))
        return split_work(purpose, fn, chunks, helpers)

    monkeypatch.setattr(neighbours_module, "SplitWork", counted)
    return shares


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("search", ["kdtree", "ivf"])
def test_an_inline_search_on_several_torch_threads_shares_the_tree_with_helpers(hopper_random, monkeypatch,
                                                                                search, threads):
    """With torch on n threads the search runs inline (nothing beside it), so its queries (here all left to the
    tree, or the inverted file) are shared out in n equal shares, n - 1 of them to helper threads; the neighbours
    are the one-thread search's. Too few queries for shares of 8 stay on the calling thread."""
    data = Transitions(hopper_random)
    # without state neighbours, and asked at no row, every query goes to the tree
    index = make(data, beta=2.0, state_neighbours=0, nn_search=search).nearest_dataset_action
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(100, data.obs.shape[1], generator=gen)
    a = torch.rand(100, data.action.shape[1], generator=gen) * 2 - 1
    alone = index.nearest_index(s, a)
    shares = count_split_work(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shared = index.nearest_index(s, a)
        few = index.nearest_index(s[:15], a[:15])
    finally:
        torch.set_num_threads(before)
    assert shares == [([100 // threads] * threads, threads - 1)]
    assert torch.equal(alone, shared)
    assert torch.equal(alone[:15], few)


def test_an_inline_search_on_two_threads_shares_the_lists_and_cells_too(hopper_random, monkeypatch):
    """Asked at dataset rows (the learner's case), the whole search, the state neighbours and the cells as well
    as the tree, is shared out in one share per thread (the compiled loops release the interpreter's lock), once
    per batch, and gives the one-thread search's neighbours."""
    data = Transitions(hopper_random)
    learner = make(data, beta=2.0, state_neighbours=16)
    index = learner.nearest_dataset_action
    gen = torch.Generator().manual_seed(4)
    rows = torch.randint(0, len(data), (64,), generator=gen)
    s = learner.normalizer(data.obs[rows])
    a = torch.rand(64, data.action.shape[1], generator=gen) * 2 - 1  # far from the data: the cells take many
    alone = index.nearest_index(s, a, rows)
    shares = count_split_work(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shared = index.nearest_index(s, a, rows)
    finally:
        torch.set_num_threads(before)
    assert shares == [([32, 32], 1)]
    assert torch.equal(alone, shared)


def test_split_work_runs_every_chunk_once_and_returns_them_in_order_with_several_helpers():
    from offlab.threads import SplitWork, helper_thread

    calls, lock = [], threading.Lock()

    def square(x):
        with lock:
            calls.append((x, threading.current_thread().name))
        return x * x

    out = SplitWork("test-split", square, list(range(50)), helpers=3).result()
    assert out == [x * x for x in range(50)]
    assert sorted(x for x, _ in calls) == list(range(50))  # each chunk once
    assert {name for _, name in calls} <= {threading.current_thread().name} | {f"test-split_{i}" for i in range(3)}
    # one pool per purpose, grown when more helpers are asked for
    first = helper_thread("test-split")
    assert helper_thread("test-split", 2) is first and helper_thread("test-split", 3) is first
    grown = helper_thread("test-split", 4)
    assert grown is not first and helper_thread("test-split", 3) is grown and helper_thread("test-split") is grown
    assert SplitWork("test-split", square, [1, 2, 3]).result() == [1, 4, 9]


@pytest.mark.parametrize("interval_bounds", SCAN_LAYOUTS)
def test_voronoi_cells_find_the_exact_neighbour_from_any_candidate(interval_bounds):
    """The cells scanned are those whose half-space bound is below the candidate's distance: from the true
    neighbour, from a random key or from the farthest one (then nearly every cell), near the data and far from
    it, the answer is the float64 brute-force argmin."""
    from offlab.neighbours import VoronoiCells

    rng = np.random.default_rng(5)
    centres = rng.normal(0, 3, size=(20, 6))
    keys = (centres[rng.integers(0, 20, 4000)] + rng.normal(0, 0.5, size=(4000, 6))).astype(np.float32)
    cells = VoronoiCells(keys, interval_bounds=interval_bounds)
    assert len(cells.centroids) == VoronoiCells.cell_count(4000) == round(0.3 * np.sqrt(4000))
    # the scan's layout: every key once, cell by cell, as its offset from its own (the nearest) centroid
    assert sorted(cells.order) == list(range(4000))
    sizes = np.diff(cells.start)
    cell_of = np.repeat(np.arange(len(sizes)), sizes)
    to_centroids = ((keys[cells.order, None, :].astype(np.float64) - cells.centroids[None]) ** 2).sum(-1)
    assert (to_centroids[np.arange(4000), cell_of] <= to_centroids.min(1) * (1 + 1e-5) + 1e-6).all()
    offset = keys[cells.order].astype(np.float64) - cells.centroids[cell_of]
    radius = np.sqrt((offset**2).sum(1))
    for cell in range(len(sizes)):  # in each cell, nearest the centroid first: a shell is one run of keys
        assert (np.diff(radius[cells.start[cell]:cells.start[cell + 1]]) >= 0).all()
    # the offsets are coded in orthonormal axes (no action part here: their principal axes, largest spread first)
    np.testing.assert_allclose(cells.axes @ cells.axes.T, np.eye(6), atol=1e-12)
    offset = offset @ cells.axes.T
    assert (np.diff((offset**2).mean(0)) <= 0).all()
    # each offset component in one byte: within its cell's code error, at most half a step (1/127 of the cell's
    # largest component), and that bound is attained within rounding somewhere (it is the largest error)
    # (the leading axes' codes a row per axis, the rest a row per key: see the scan)
    codes = np.concatenate([cells.lead_codes().T, cells.codes_rest], axis=1)
    step, error = cells.step[cell_of], cells.code_error[cell_of]
    assert np.abs(codes).max() == 127 and (error <= 0.5 * step * (1 + 1e-9)).all()
    miss = np.abs(offset - codes * step)
    assert (miss <= error).all() and np.allclose(np.maximum.reduceat(miss, cells.start[:-1], axis=0),
                                                 cells.code_error, rtol=1e-6, atol=1e-12)
    # -|r|^2 / 2 split at the leading axes the scan scores first (4 of 6), and the rest
    assert cells.lead == 4
    np.testing.assert_allclose(cells.half_sq_lead, -0.5 * (offset[:, :4]**2).sum(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cells.half_sq_rest, -0.5 * (offset[:, 4:]**2).sum(1), rtol=1e-6, atol=1e-7)
    query = np.concatenate([keys[:100] + rng.normal(0, 0.05, (100, 6)), rng.normal(0, 6, (100, 6))]).astype(np.float32)
    dist = ((query[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    brute = dist.argmin(1)
    for candidate in (brute, rng.integers(0, 4000, len(query)), dist.argmax(1)):
        np.testing.assert_array_equal(cells.nearest(query, candidate), brute)


@pytest.mark.parametrize("interval_bounds", SCAN_LAYOUTS)
def test_voronoi_cells_settle_what_float32_scores_cannot_tell_apart_in_float64(interval_bounds):
    """Keys in near-copies (2e-5 apart) and queries far from them: the scores the scan ranks keys by (from their
    offsets to the centroid in one-byte codes, summed in float32) misorder many queries' nearest keys, yet every
    answer is the float64 brute-force argmin, from any candidate, because a key whose score comes within the codes'
    error and float32's rounding of the best is compared in float64."""
    from offlab.neighbours import VoronoiCells

    rng = np.random.default_rng(7)
    base = rng.normal(0, 1, size=(400, 4))
    keys = np.concatenate([base] + [base + rng.normal(0, 2e-5, size=base.shape) for _ in range(3)]).astype(np.float32)
    cells = VoronoiCells(keys, interval_bounds=interval_bounds)
    query = (rng.normal(0, 1, size=(300, 4)) * 40).astype(np.float32)
    dist = ((query[:, None].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    brute = dist.argmin(1)
    # the squared distances |q - c|^2 - 2 ((q - c).r - |r|^2 / 2) of every key, as the scan scores them
    cell_of = np.repeat(np.arange(len(cells.start) - 1), np.diff(cells.start))
    to_centroid = query[:, None, :].astype(np.float64) - cells.centroids[cell_of][None]
    weight = (to_centroid @ cells.axes.T * cells.step[cell_of][None]).astype(np.float32)
    codes = np.concatenate([cells.lead_codes().T, cells.codes_rest], axis=1)
    score = (weight * codes[None]).sum(-1, dtype=np.float32) + cells.half_sq_lead + cells.half_sq_rest
    by_score = cells.order[((to_centroid**2).sum(-1) - 2 * score).argmin(1)]
    assert (by_score != brute).sum() >= 3  # the case is one the scores alone get wrong
    for candidate in (brute, rng.integers(0, len(keys), len(query)), dist.argmax(1)):
        np.testing.assert_array_equal(cells.nearest(query, candidate), brute)


@pytest.mark.parametrize("offset", [0.0, 300.0])
@pytest.mark.parametrize("interval_bounds", SCAN_LAYOUTS)
def test_voronoi_cells_scan_the_action_axes_first_and_give_the_exact_neighbour(offset, interval_bounds):
    """Keys [state (5), action (2)]: the scan's axes take the two action components first as they are, then the
    states' principal axes; the leading 4 axes are scored for every key of a shell and the rest only for the keys
    they leave in. Queries with dataset states and actions far off (the policy early in training), and keys in
    near-copies: every answer is still the float64 brute-force argmin, also with everything moved 300 from the
    origin (the axes' float64 rounding then grows with |q| and |c|, and the scan allows for it)."""
    from offlab.neighbours import VoronoiCells

    rng = np.random.default_rng(13)
    states = rng.normal(0, 1, size=(1500, 5)) @ np.diag([3.0, 2.0, 1.0, 0.5, 0.2])
    actions = np.tanh(states[:, :2] + rng.normal(0, 0.3, size=(1500, 2)))
    base = np.concatenate([states, actions], axis=1)
    keys = (np.concatenate([base, base + rng.normal(0, 1e-3, size=base.shape)]) + offset).astype(np.float32)
    cells = VoronoiCells(keys, action_dim=2, interval_bounds=interval_bounds)
    np.testing.assert_array_equal(cells.axes[:2], np.eye(7)[5:])  # the action, as it is
    np.testing.assert_allclose(cells.axes[2:, 5:], 0.0)
    np.testing.assert_allclose(cells.axes @ cells.axes.T, np.eye(7), atol=1e-12)
    assert cells.lead == 4 and cells.lead_codes().shape == (4, len(keys)) and cells.codes_rest.shape == (len(keys), 3)
    rows = rng.integers(0, len(keys), 300)
    query = keys[rows].astype(np.float64)
    query[:, 5:] = offset + rng.uniform(-3, 3, size=(300, 2))
    query = query.astype(np.float32)
    dist = ((query[:, None].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    brute = dist.argmin(1)
    for candidate in (rows, brute, dist.argmax(1)):
        np.testing.assert_array_equal(cells.nearest(query, candidate), brute)


@pytest.mark.parametrize("interval_bounds", SCAN_LAYOUTS)
def test_voronoi_cells_scan_a_run_longer_than_the_scan_buffer(interval_bounds):
    """3,000 copies of one key fill one cell far beyond 1,024 keys (the scan's score buffer is sized for the largest
    cell); beside them, one key near each query. From the farthest key as candidate, a query nearest that cell's
    centroid scans it first, whole, in one run, and every answer is still the float64 brute-force argmin."""
    from offlab.neighbours import VoronoiCells

    rng = np.random.default_rng(11)
    centre = np.full(5, 2.0)
    offset = rng.normal(0, 1e-2, size=(50, 5))
    keys = np.concatenate([np.tile(centre, (3000, 1)), centre + 0.9 * offset, rng.normal(0, 3, size=(1000, 5))]
                          ).astype(np.float32)
    cells = VoronoiCells(keys, interval_bounds=interval_bounds)
    full = int(np.argmax(np.diff(cells.start)))
    assert cells.start[full + 1] - cells.start[full] > 1024
    query = (centre + offset).astype(np.float32)
    to_centroids = ((query[:, None].astype(np.float64) - cells.centroids[None].astype(np.float64)) ** 2).sum(-1)
    assert (to_centroids.argmin(1) == full).sum() >= 3  # queries whose first cell is the full one
    dist = ((query[:, None].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    assert (dist.argmin(1) >= 3000).all()  # each query's nearest is one of the keys beside the copies
    np.testing.assert_array_equal(cells.nearest(query, dist.argmax(1)), dist.argmin(1))


def test_interval_bounds_only_where_numba_compiles_for_a_cpu_with_them(monkeypatch):
    """64 lanes with AVX-512 BW, 32 with AVX2, none without either, as NUMBA_CPU_FEATURES names them (what numba
    compiles for), none for a CPU named by NUMBA_CPU_NAME alone (the instructions may not be there); and off with
    OFFLAB_INTERVAL_BOUNDS=0."""
    import numba

    from offlab.neighbour_scan import INTERVAL_LANES, interval_lanes

    assert interval_lanes() == INTERVAL_LANES and interval_bounds_available() == (INTERVAL_LANES > 0)
    monkeypatch.setenv("OFFLAB_INTERVAL_BOUNDS", "0")
    assert not interval_bounds_available()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    assert interval_lanes() == 0
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse4.2,+avx")
    assert interval_lanes() == 0
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx,+avx2,+fma")
    assert interval_lanes() == 32
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
    assert interval_lanes() == 64


@pytest.mark.parametrize("interval_bounds", SCAN_LAYOUTS)
@pytest.mark.parametrize("rows, dim", [(1, 4), (5, 3), (40, 4), (200, 1), (300, 6)])
def test_voronoi_cells_of_few_keys_or_axes_give_the_exact_neighbour(rows, dim, interval_bounds):
    """One cell, cells smaller than a block of 64 or than the 16 intervals, keys of 1 or 3 axes (an odd number of
    leading axes: the float32 scan, the interval codes being two a byte): still the brute-force argmin."""
    from offlab.neighbours import VoronoiCells

    rng = np.random.default_rng(rows + dim)
    keys = rng.normal(0, 1, size=(rows, dim)).astype(np.float32)
    cells = VoronoiCells(keys, interval_bounds=interval_bounds)
    assert cells.interval_bounds == (interval_bounds and cells.lead % 2 == 0)
    query = rng.normal(0, 3, size=(50, dim)).astype(np.float32)
    dist = ((query[:, None].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    for candidate in (rng.integers(0, rows, 50), dist.argmax(1)):
        np.testing.assert_array_equal(cells.nearest(query, candidate), dist.argmin(1))


def test_interval_bins_hold_every_value_in_sorted_disjoint_intervals():
    """One-dimensional k-means per column: each value is inside its interval, the intervals are sorted and do not
    overlap, the empty ones are (+inf, -inf), and a column of few distinct values gets one interval each."""
    from offlab.neighbour_scan import interval_bins

    rng = np.random.default_rng(19)
    few = np.repeat([-1.0, 0.5, 3.0], [100, 300, 100])
    offsets = np.column_stack([rng.normal(0, 1, 500), rng.exponential(2.0, 500), few])
    codes, lowest, highest = interval_bins(offsets, 16)
    assert codes.shape == (500, 3) and codes.max() < 16 and lowest.shape == highest.shape == (3, 16)
    for d in range(3):
        assert (lowest[d, codes[:, d]] <= offsets[:, d]).all() and (offsets[:, d] <= highest[d, codes[:, d]]).all()
        held = np.isfinite(lowest[d])
        assert (np.isfinite(highest[d]) == held).all() and (lowest[d, ~held] == np.inf).all()
        assert (highest[d, held][:-1] < lowest[d, held][1:]).all()  # sorted, disjoint
    assert np.isfinite(lowest[0]).all() and np.isfinite(lowest[2]).sum() == 3
    np.testing.assert_array_equal(np.unique(codes[:, 2], return_counts=True)[1], [100, 300, 100])


@pytest.mark.skipif(not interval_bounds_available(), reason="this CPU has neither AVX-512 BW nor AVX2")
def test_voronoi_cells_interval_bounds_are_lower_bounds_and_the_run_finds_every_key_under_the_limit():
    """The interval codes: every key's offset on each leading axis lies in its interval (float32, rounded outwards),
    two 4-bit codes a byte, 64 keys a block. The tables never exceed units times the squared distance from x to the
    interval less slack, and fall short of it by little more than the rounding down; the run over any positions
    (from mid-block to mid-block, across blocks) finds exactly the keys whose byte sum (saturating at 255) is at most
    BOUND_LIMIT, in order."""
    from numba import njit

    from offlab.neighbour_scan import BOUND_LIMIT, INTERVAL_LANES, _interval_bound_run, _interval_tables
    from offlab.neighbours import VoronoiCells

    make_tables = njit(lambda lowest, highest, j, query_axes, i, centroids_axes, dims, slack, units, tables:
                       _interval_tables(lowest, highest, j, query_axes, i, centroids_axes, dims, slack, units, tables))
    # the AVX2 form (32 keys an instruction) runs on an AVX-512 CPU too; the AVX-512 one only there
    runs = {32: njit(lambda intervals, begin, end, tables, found:
                     _interval_bound_run(intervals, begin, end, tables, found, 32))}
    if INTERVAL_LANES == 64:
        runs[64] = njit(lambda intervals, begin, end, tables, found:
                        _interval_bound_run(intervals, begin, end, tables, found, 64))
    rng = np.random.default_rng(23)
    keys = rng.normal(0, 1, size=(3000, 7)).astype(np.float32)
    cells = VoronoiCells(keys, interval_bounds=True)
    assert cells.lead == 4 and cells.codes.shape == (3000, 4) and cells.intervals.shape == (47, 2, 64)
    assert cells.lowest.dtype == np.float32 and cells.intervals.ctypes.data % 64 == 0
    cell_of = np.repeat(np.arange(len(cells.start) - 1), np.diff(cells.start))
    offset = (keys[cells.order].astype(np.float64) - cells.centroids[cell_of]) @ cells.axes[:4].T
    flat = cells.intervals.transpose(1, 0, 2).reshape(2, -1)[:, :3000]
    code = np.stack([flat[0] & 15, flat[0] >> 4, flat[1] & 15, flat[1] >> 4], axis=1)
    for d in range(4):
        assert (cells.lowest[cell_of, d, code[:, d]] <= offset[:, d]).all()
        assert (offset[:, d] <= cells.highest[cell_of, d, code[:, d]]).all()
    # the tables of cell 2 for a query
    query_axes = rng.normal(0, 2, size=(3, 7))
    units, slack = 250.0 / 7.3, 1e-3
    tables = np.zeros((4, 16), np.uint8)
    make_tables(cells.lowest, cells.highest, 2, query_axes, 1, cells.centroids_axes, 4, slack, units, tables)
    x = query_axes[1, :4] - cells.centroids_axes[2, :4]
    gap = np.maximum(np.maximum(cells.lowest[2].astype(np.float64) - x[:, None],
                                x[:, None] - cells.highest[2].astype(np.float64)) - slack, 0.0)
    exact = np.minimum(units * gap**2, 255.0)
    assert (tables <= exact).all() and (tables >= np.floor(exact * (1 - 1e-5)) - 1).all() and tables.max() > 0
    # the run, against the byte sums in numpy
    tables = rng.integers(0, 130, size=(4, 16)).astype(np.uint8)
    bound = np.minimum(tables[np.arange(4), code].astype(np.int64).sum(1), 255)
    for run in runs.values():
        for begin, end in ((0, 3000), (5, 60), (70, 1000), (2990, 3000), (100, 101), (40, 90)):
            found = np.zeros(end - begin, np.int32)
            passing = run(cells.intervals, begin, end, tables, found)
            np.testing.assert_array_equal(found[:passing], np.flatnonzero(bound[begin:end] <= BOUND_LIMIT))
    assert 0 < (bound <= BOUND_LIMIT).sum() < 3000


def test_kmeans_cells_are_kept_on_disk_and_rebuild_the_index_trained_the_first_time():
    """The centroids and each key's cell are stored once per set of keys; read back, every cell holds the same keys
    in the same order as faiss's own train-then-add, so searches give the same answers. Other keys train again."""
    import faiss

    from offlab import paths
    from offlab.neighbours import kmeans_cells, kmeans_on_disk

    rng = np.random.default_rng(3)
    keys = rng.normal(size=(6000, 5)).astype(np.float32)
    trained = faiss.IndexIVFFlat(faiss.IndexFlatL2(5), 5, 77)  # round(sqrt(6000)) cells, as kmeans_cells
    trained.cp.seed = 0
    trained.train(keys)
    trained.add(keys)
    store = paths.home() / "prdc" / "kmeans_cells"
    assert not kmeans_on_disk(keys)
    first = kmeans_cells(keys)
    assert len(list(store.glob("*.npz"))) == 1
    assert kmeans_on_disk(keys) and not kmeans_on_disk(keys[:5000])
    stamp = next(store.glob("*.npz")).stat().st_mtime_ns
    again = kmeans_cells(keys)
    assert next(store.glob("*.npz")).stat().st_mtime_ns == stamp  # read back, not trained again
    query = rng.normal(size=(200, 5)).astype(np.float32)
    for index in (trained, first, again):
        index.nprobe = 6
    want = trained.search(query, 3)
    for index in (first, again):
        assert index.nlist == 77 and index.ntotal == 6000
        for cell in range(index.nlist):
            size = index.invlists.list_size(cell)
            assert size == trained.invlists.list_size(cell)
            np.testing.assert_array_equal(faiss.rev_swig_ptr(index.invlists.get_ids(cell), size),
                                          faiss.rev_swig_ptr(trained.invlists.get_ids(cell), size))
        got = index.search(query, 3)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    kmeans_cells(keys[:5000])
    assert len(list(store.glob("*.npz"))) == 2


def test_the_faster_of_tree_and_cells_settles_open_queries_and_the_other_is_retimed(monkeypatch):
    """Each open search is timed; once both are, the cheaper per query answers, and the other is timed again after
    OPEN_RETRY searches times how much slower it was (at most OPEN_RETRY_MAX), on the batch's first
    OPEN_TRIAL_QUERIES open queries only, the faster taking the rest. The neighbours never depend on it."""
    import types

    from offlab import neighbours

    clock = iter(range(10**6))  # every search takes 1 ms of this clock: the cells' cost stays 1 ms per query
    monkeypatch.setattr(neighbours, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 1e-3))
    learner = make(table([0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0]), beta=1.0, normalize_states=False,
                   state_neighbours=2)
    index = learner.nearest_dataset_action
    used = []
    tree_index, cells = index._tree_index, index.cells.nearest
    sizes = []
    index._tree_index = lambda *a: used.append("tree") or sizes.append(len(a[0])) or tree_index(*a)
    index.cells.nearest = lambda *a: used.append("cells") or sizes.append(len(a[0])) or cells(*a)
    s, a, rows = torch.zeros(1, 1), torch.tensor([[5.0]]), torch.tensor([0])  # open: the tree or the cells find (3, 5)
    answers = [index.nearest_index(s, a, rows).item() for _ in range(2)]
    assert used == ["cells", "tree"] and set(index.open_cost) == {"cells", "tree"}
    index.open_cost, index._since_retime = {"cells": 1e-3, "tree": 2e-3}, 0
    index.OPEN_RETRY = 2
    used.clear()
    answers += [index.nearest_index(s, a, rows).item() for _ in range(4)]
    assert used == ["cells", "cells", "cells", "tree"]  # twice as slow: retimed after 2 x 2 searches
    index.open_cost, index._since_retime = {"cells": 1e-3, "tree": 1.0}, 0
    index.OPEN_RETRY_MAX = 5
    used.clear()
    answers += [index.nearest_index(s, a, rows).item() for _ in range(5)]
    assert used == ["cells"] * 4 + ["tree"]  # 1000 times as slow: after OPEN_RETRY_MAX searches
    assert answers == [3] * 11
    # a batch of 5 open queries when the tree is retimed: it takes the first 2, the cells the other 3
    index.open_cost, index._since_retime = {"cells": 1e-3, "tree": 1.0}, 0
    index.OPEN_TRIAL_QUERIES = 2
    used.clear()
    sizes.clear()
    batch = [index.nearest_index(s.repeat(5, 1), a.repeat(5, 1), rows.repeat(5)).tolist() for _ in range(5)]
    assert used == ["cells"] * 4 + ["tree", "cells"] and sizes == [5] * 4 + [2, 3]
    assert batch == [[3] * 5] * 5
    assert index.open_cost["tree"] == pytest.approx(0.8 * 1.0 + 0.2 * 1e-3 / 2)  # 1 ms of the clock for 2 queries


def test_state_neighbours_are_kept_on_disk_and_read_back_bit_for_bit(hopper_random):
    from offlab.neighbours import StateNeighbours

    states = hopper_random.obs[:500]
    assert not StateNeighbours.on_disk(states, 8)
    built = StateNeighbours(states, 8)  # the default first stage: what `on_disk` (the search process's check) asks
    assert not built.reused and StateNeighbours.on_disk(states, 8) and not StateNeighbours.on_disk(states, 7)
    assert StateNeighbours(states, 8).reused
    first, again = StateNeighbours(states, 8, first=3), StateNeighbours(states, 8, first=3)
    other, other_stage = StateNeighbours(states, 4, first=3), StateNeighbours(states, 8, first=2)
    assert not first.reused and again.reused and not other.reused and not other_stage.reused
    np.testing.assert_array_equal(first.rows, again.rows)
    np.testing.assert_array_equal(first.radius, again.radius)
    np.testing.assert_array_equal(first.radius_first, again.radius_first)
    assert first.rows.shape == (500, 8) and other.rows.shape == (500, 4)
    assert (first.rows[:, 0] == np.arange(500)).mean() > 0.99  # a state is its own nearest (but for duplicates)
    dist = np.sqrt(((states[:, None].astype(np.float64) - states[None].astype(np.float64)) ** 2).sum(-1))
    np.testing.assert_allclose(first.radius, np.sort(dist, axis=1)[:, 7], rtol=1e-9)
    np.testing.assert_allclose(first.radius_first, np.sort(dist, axis=1)[:, 2], rtol=1e-9)


def test_ivf_search_is_reproducible_and_finds_the_exact_neighbour_for_nearly_every_query(hopper_random):
    """nn_search=ivf is approximate: it scans the 8 of ~sqrt(N) k-means cells nearest each query. On real
    data, for policy-like queries (a dataset state, an action 0.3 off the logged one), it returns the exact
    neighbour for nearly all and a near-equal one for the rest; a dataset key finds itself."""
    data = Transitions(hopper_random)
    norm_obs = data.obs  # any fixed normalisation: the index does not care
    ivf = NearestDatasetAction(norm_obs, data.action, 2.0, "ivf", torch.device("cpu"))
    again = NearestDatasetAction(norm_obs, data.action, 2.0, "ivf", torch.device("cpu"))
    tree = NearestDatasetAction(norm_obs, data.action, 2.0, "kdtree", torch.device("cpu"))
    assert ivf.ivf.nlist == 45 and ivf.ivf.nprobe == 8  # round(sqrt(2000)) cells
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(len(data), (500,), generator=g)
    s = norm_obs[rows]
    a = (data.action[rows] + 0.3 * torch.randn(500, data.action.shape[1], generator=g)).clamp(-1, 1)
    found, exact = ivf.nearest_index(s, a), tree.nearest_index(s, a)
    torch.testing.assert_close(again.nearest_index(s, a), found, rtol=0, atol=0)
    keys = torch.cat([2.0 * norm_obs, data.action], 1).double()
    query = torch.cat([2.0 * s, a], 1).double()
    ratio = (keys[found] - query).norm(dim=1) / (keys[exact] - query).norm(dim=1)
    assert (found == exact).float().mean() >= 0.98
    assert ratio.min() >= 1.0 - 1e-6 and ratio.mean() <= 1.005 and ratio.max() <= 1.2
    own = ivf.nearest_index(norm_obs[:300], data.action[:300])
    assert (keys[own] - keys[:300]).norm(dim=1).max() <= 1e-6


def test_ivf_search_falls_back_to_every_cell_when_the_probed_cells_are_empty():
    """A query whose probed cells hold no key (here: the one cell a probe of 1 scans, emptied by hand) still
    gets the nearest of the remaining keys, never faiss's -1."""
    g = torch.Generator().manual_seed(5)
    obs, actions = torch.randn(4000, 3, generator=g), torch.rand(4000, 1, generator=g) * 2 - 1
    ivf = NearestDatasetAction(obs, actions, 1.0, "ivf", torch.device("cpu"), ivf_probe=1)
    query_s, query_a = obs[:1], actions[:1]
    _, cell = ivf.ivf.quantizer.search(torch.cat([query_s, query_a], 1).numpy(), 1)
    ivf.ivf.invlists.resize(int(cell[0, 0]), 0)  # empty the one cell a probe of 1 would scan
    found = int(ivf.nearest_index(query_s, query_a)[0])
    keys = torch.cat([obs, actions], 1)
    listed = np.concatenate([faiss_list(ivf.ivf, c) for c in range(ivf.ivf.nlist)])
    d = (keys[listed] - keys[0]).norm(dim=1)
    assert found in set(listed.tolist()) and (keys[found] - keys[0]).norm() == d.min()


def faiss_list(index, cell: int) -> np.ndarray:
    import faiss

    n = index.invlists.list_size(cell)
    return faiss.rev_swig_ptr(index.invlists.get_ids(cell), n).copy() if n else np.zeros(0, np.int64)


def test_exact_search_chunks_agree_with_one_chunk(hopper_random):
    data = Transitions(hopper_random)
    s = torch.randn(64, data.obs.shape[1], generator=torch.Generator().manual_seed(2))
    a = torch.rand(64, data.action.shape[1], generator=torch.Generator().manual_seed(3)) * 2 - 1
    whole = NearestDatasetAction(data.obs, data.action, 2.0, "exact", torch.device("cpu"))
    chunked = NearestDatasetAction(data.obs, data.action, 2.0, "exact", torch.device("cpu"), chunk_rows=333)
    torch.testing.assert_close(chunked.nearest_index(s, a), whole.nearest_index(s, a), rtol=0, atol=0)


def test_actor_is_pulled_to_the_nearest_dataset_action_not_the_logged_one(hopper_random):
    """alpha = 0: the actor gradient is that of mean ||pi(s) - a_nn||^2 with a_nn from a brute-force
    search over (beta * s_i, a_i), and differs from the plain BC gradient."""
    data = Transitions(hopper_random)
    learner = make(data, alpha=0.0, beta=0.5)
    batch = data.sample(64, torch.Generator().manual_seed(4))
    reference = copy.deepcopy(learner.actor)
    s = learner.normalizer(batch.obs)
    pi = reference(s)
    keys = torch.cat([0.5 * learner.normalizer(data.obs), data.action], 1).double()
    query = torch.cat([0.5 * s, pi.detach()], 1).double()
    a_nn = data.action[torch.cdist(query, keys).argmin(dim=1)]
    assert not torch.equal(a_nn, batch.action)
    ((pi - a_nn) ** 2).mean().backward()
    learner.update(batch)
    metrics = learner.update(batch)
    for p, p_ref in zip(learner.actor.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-9)
    assert metrics["train/bc_loss"] == pytest.approx(((pi - a_nn) ** 2).mean().item(), rel=1e-6)


def test_actor_and_targets_move_only_on_delayed_steps(hopper_random):
    data = Transitions(hopper_random)
    learner = make(data)
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 5):
        actor_before = [p.clone() for p in learner.actor_target.parameters()]
        metrics = learner.update(data.sample(32, gen))
        moved = any(not torch.equal(a, b) for a, b in zip(actor_before, learner.actor_target.parameters(), strict=True))
        assert moved == (step % 2 == 0)
        assert ("train/bc_loss" in metrics) == (step % 2 == 0)


def test_paper_overrides_per_env_family():
    assert PRDC.defaults_for("halfcheetah-medium") == {"alpha": 40.0, "beta": 2.0, "k": 1}
    assert PRDC.defaults_for("hopper-medium-replay") == {"alpha": 2.5, "beta": 2.0, "k": 1}
    assert PRDC.defaults_for("mujoco/walker2d/medium-v0")["alpha"] == 2.5
    assert PRDC.defaults_for("pendulum-scripted") == {}
    cfg = PRDCConfig()
    assert (cfg.alpha, cfg.beta, cfg.k, cfg.policy_freq) == (2.5, 2.0, 1, 2)


def test_bad_settings_are_config_errors(hopper_random):
    data = Transitions(hopper_random)
    spec = LearnerSpec.from_transitions(data)
    with pytest.raises(ConfigError, match="nn_search"):
        PRDC(PRDCConfig(hidden=SMALL, nn_search="faiss"), spec)
    with pytest.raises(ConfigError, match="k=1"):
        PRDC(PRDCConfig(hidden=SMALL, k=3), spec)
    with pytest.raises(ConfigError, match="ivf_probe"):
        PRDC(PRDCConfig(hidden=SMALL, nn_search="ivf", ivf_probe=0), spec)
    spec.data = None  # without the dataset PRDC can act (a rebuilt policy) but not train
    learner = PRDC(PRDCConfig(hidden=SMALL), spec)
    assert learner.act(hopper_random.obs[:2]).shape == (2, 3)
    with pytest.raises(ConfigError, match="needs the dataset"):
        learner.update(data.sample(4, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("search", ["kdtree", "ivf"])
def test_overlapped_search_gives_the_same_training_as_the_inline_search(hopper_random, monkeypatch, search):
    """Inline, beside the actor step's critic step, begun one update early (the loop's lookahead), and in the
    search process: the same neighbours, so the same networks bit for bit."""
    import offlab.algos.prdc as prdc_module

    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 2)  # the process needs a second core
    data = Transitions(hopper_random)
    g = torch.Generator().manual_seed(5)
    batches = [data.sample(64, g) for _ in range(12)]
    runs = []
    for overlap, lookahead, process in ((False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)):
        learner = PRDC(PRDCConfig(hidden=SMALL, overlap_search=overlap, nn_search=search, search_process=process),
                       LearnerSpec.from_transitions(data))
        assert (learner.nearest_dataset_action.process is not None) == process
        if lookahead:
            update_on(learner, batches)
            assert learner._early is None  # the last update announced nothing
        else:
            for b in batches:
                learner.update(b)
        runs.append([p.detach().clone() for p in (*learner.actor.parameters(), *learner.critic.parameters())])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_a_search_begun_for_an_announced_batch_is_dropped_when_another_batch_comes(hopper_random):
    data = Transitions(hopper_random)
    g = torch.Generator().manual_seed(1)
    batches = [data.sample(64, g) for _ in range(4)]
    told, plain = make(data), make(data)
    told.lookahead(batches[3])  # announced before a critic-only update: its actor-step search starts early
    told.update(batches[0])
    assert told._early is not None and told._early.batch is batches[3]
    told.update(batches[1])  # ... but the actor step gets another batch: searched for itself, the other dropped
    assert told._early is None
    told.update(batches[2])
    for b in batches[:3]:
        plain.update(b)
    for a, b in zip(told.actor.parameters(), plain.actor.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_search_overlaps_critic_steps_only_when_torch_has_one_thread(hopper_random, monkeypatch, threads):
    """One torch thread: each actor step's search starts on the helper thread in the update before it (the
    loop's lookahead), so it runs on the free core beside two critic steps. Several: the critic step keeps the
    cores busy, so no search starts beside it; every step runs inline at the run's thread count."""
    import offlab.algos.prdc as prdc_module

    data = Transitions(hopper_random)
    learner = make(data)
    index = learner.nearest_dataset_action
    seen, started = [], []
    critic_loss, start_search = prdc_module.td3_critic_loss, index.start_search
    monkeypatch.setattr(prdc_module, "td3_critic_loss",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or critic_loss(*a, **k))
    monkeypatch.setattr(index, "start_search", lambda *a: started.append(learner.updates) or start_search(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    batches = [data.sample(64, g) for _ in range(5)]
    try:
        for i in range(4):
            learner.lookahead(batches[i + 1])
            learner.update(batches[i])
    finally:
        torch.set_num_threads(before)
    assert seen == [threads] * 4
    assert started == ([0, 2] if threads == 1 else [])  # the searches of updates 1 and 3 (the actor steps)


def test_the_search_process_overlaps_at_any_thread_count_and_its_death_is_a_clear_error(hopper_random,
                                                                                         monkeypatch):
    """With a second core the search runs in its own process (`side_cores` 1, so the loop gives torch one core
    fewer), beside the critic steps whatever torch's thread count. If that process dies, the next search says so
    and names the way out."""
    import offlab.algos.prdc as prdc_module

    data = Transitions(hopper_random)
    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 1)
    assert make(data, search_process=True).nearest_dataset_action.process is None  # no core to spare
    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 2)
    import multiprocessing

    with monkeypatch.context() as m:  # a daemonic process (a pool's worker), which multiprocessing lets start no
        m.setitem(multiprocessing.current_process()._config, "daemon", True)  # children of its own, starts it too
        daemonic = make(data, search_process=True)
        assert daemonic.nearest_dataset_action.process is not None and daemonic.side_cores == 1
        del daemonic
    learner = make(data, search_process=True)
    index = learner.nearest_dataset_action
    assert learner.side_cores == 1 and index.process is not None and index.neighbours is None
    if sys.platform == "linux":  # numpy's BLAS on the process's one core, whatever this process was given
        environ = Path(f"/proc/{index.process._process.pid}/environ").read_bytes().split(b"\0")
        assert {b"OPENBLAS_NUM_THREADS=1", b"MKL_NUM_THREADS=1", b"OMP_NUM_THREADS=1"} <= set(environ)
    started, start_search = [], index.start_search
    monkeypatch.setattr(index, "start_search", lambda *a: started.append(learner.updates) or start_search(*a))
    g = torch.Generator().manual_seed(0)
    batches = [data.sample(64, g) for _ in range(5)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        update_on(learner, batches[:4])
    finally:
        torch.set_num_threads(before)
    assert started == [0, 2]
    # the same neighbours as the search in this process
    s = learner.normalizer(batches[4].obs)
    pi = learner.actor(s).detach()
    inline = make(data).nearest_dataset_action
    assert torch.equal(index.nearest_index(s, pi, batches[4].rows), inline.nearest_index(s, pi, batches[4].rows))
    # and without the state neighbours (the cells from each row's own key, in the process)
    without_lists = make(data, search_process=True, state_neighbours=0).nearest_dataset_action
    assert without_lists.process is not None
    assert torch.equal(without_lists.nearest_index(s, pi, batches[4].rows), inline.nearest_index(s, pi, batches[4].rows))
    del without_lists
    index.process._process.kill()
    index.process._process.wait()
    with pytest.raises(RuntimeError, match=r"search process stopped \(killed by SIGKILL; out of memory\?\); "
                                           r"--set search_process=false"):
        index.nearest_index(s, pi, batches[4].rows)
    # a process that cannot start (here an interpreter that exits at once): the same error, at the latest at
    # the first search
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(RuntimeError, match=r"search process stopped \(exit code 1; .*search_process=false"):
        make(data, search_process=True).nearest_dataset_action.nearest_index(s, pi, batches[4].rows)
    assert make(data, search_process=False).side_cores == 0


def test_the_caller_searches_its_share_of_each_batch_with_the_process_neighbours(hopper_random, monkeypatch):
    """With a share, the last queries of a batch are searched in the caller (an index of its own, built on first
    use) while the process searches the rest: the same neighbours as a search in one place."""
    import offlab.algos.prdc as prdc_module

    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 2)
    data = Transitions(hopper_random)
    index = make(data, search_process=True).nearest_dataset_action
    inline = make(data).nearest_dataset_action
    gen = torch.Generator().manual_seed(4)
    rows = torch.randint(0, len(data), (100,), generator=gen)
    s = make(data).normalizer(data.obs[rows])
    a = torch.rand(100, data.action.shape[1], generator=gen) * 2 - 1
    expected = inline.nearest_index(s, a, rows)
    assert torch.equal(index.nearest_index(s, a, rows), expected) and index._local is None  # no share: not built
    # `ready`: without a share, once the process has answered (what lending torch its core waits for)
    pending = index.start_search(s, a, rows)
    deadline = time.monotonic() + 60
    while not pending.ready() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pending.ready() and torch.equal(pending.result(), expected)
    for share in (1, 40, 99, 500):  # 500: all but one query
        index.caller_share = share
        pending = index.start_search(s, a, rows)
        time.sleep(0.05)
        assert not pending.ready()  # the caller's share is still to search
        assert torch.equal(pending.result(), expected), share
        assert torch.equal(index.nearest_index(s, a, rows), expected), share
        assert torch.equal(index.nearest_index(s, a), inline.nearest_index(s, a)), share
    assert index._local is not None and index._local.process is None


def test_the_callers_share_balances_the_two_finishes():
    """m = (n p - before) / (p + p_own): none while the process finishes within the caller's own steps (walker2d:
    7.5 ms per 256 queries against 14 ms of critic steps), nor when it outlasts them by a share below MIN_SHARE,
    about half where it takes 120 ms (halfcheetah); only after BALANCE_AFTER searches."""
    index = NearestDatasetAction.__new__(NearestDatasetAction)
    index.caller_share, index._share_estimate, index._searches, index.share_search = 0, 0.0, 0, True
    index._balance(256, 0, process_s=0.12, before_s=0.014, own_s=0.0)
    assert index.caller_share == 0  # the first searches are not balanced
    index._searches = index.BALANCE_AFTER
    for _ in range(300):
        mine = index.caller_share
        index._balance(256, mine, process_s=0.12 * (256 - mine) / 256, before_s=0.014, own_s=0.12 * mine / 256)
    assert index.caller_share == round((0.12 - 0.014) / (2 * 0.12 / 256))  # 113
    for _ in range(300):
        mine = index.caller_share
        index._balance(256, mine, process_s=0.0075 * (256 - mine) / 256, before_s=0.014, own_s=0.0075 * mine / 256)
    assert index.caller_share == 0
    for _ in range(300):  # a search just longer than the critic steps: a share below MIN_SHARE is none
        index._balance(256, 0, process_s=0.0095, before_s=0.0085, own_s=0.0)
    assert 0 < index._share_estimate < index.MIN_SHARE and index.caller_share == 0
    for step in range(100):  # one search in ten outlasts the critic steps: on average none do, so no share
        index._balance(256, 0, process_s=0.03 if step % 10 == 0 else 0.0075, before_s=0.014, own_s=0.0)
        assert index.caller_share == 0


def test_a_script_without_a_main_guard_trains_prdc_with_its_search_process(tmp_path, cli_env):
    """The search process is a fresh interpreter that imports offlab alone: a script that builds and trains PRDC at
    import time, with no `if __name__ == "__main__":` guard (multiprocessing's spawn would run it again in the
    child, which then fails), trains once and exits cleanly."""
    if usable_cores() < 2:
        pytest.skip("the search process needs a second core")
    script = tmp_path / "train_prdc.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        from offlab.algos.base import LearnerSpec
        from offlab.algos.prdc import PRDC, PRDCConfig
        from offlab.data.store import Transitions
        from offlab.training import update_on
        from tests.helpers import make_sim_dataset

        data = Transitions(make_sim_dataset("Hopper-v5", steps=300, seed=0, name="hopper-script"))
        learner = PRDC(PRDCConfig(hidden=(32, 32)), LearnerSpec.from_transitions(data))
        assert learner.nearest_dataset_action.process is not None
        g = torch.Generator().manual_seed(0)
        update_on(learner, [data.sample(32, g) for _ in range(6)])
        print("trained", learner.updates)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["trained 6"]


def test_a_slow_exact_search_leaves_one_notice_that_says_why(hopper_random, monkeypatch):
    """Some actor steps' waits for the exact search are timed (after UNTIMED_SEARCHES); when their mean reaches
    SLOW_SEARCH_S the learner leaves one notice for the loop to print (the policy far from the data), and its
    numbers are unchanged."""
    data = Transitions(hopper_random)
    g = torch.Generator().manual_seed(2)
    batches = [data.sample(64, g) for _ in range(16)]
    monkeypatch.setattr(PRDC, "UNTIMED_SEARCHES", 2)
    monkeypatch.setattr(PRDC, "TIMED_SEARCHES", 3)
    monkeypatch.setattr(PRDC, "SLOW_SEARCH_S", 0.0)  # every search counts as slow
    slow = make(data)
    update_on(slow, batches[:9])  # four actor steps: two untimed, two timed: not yet
    assert slow.notices == []
    update_on(slow, batches[9:])  # the fifth, then three more untimed
    assert len(slow.notices) == 1
    assert "actor steps 3-5 waiting" in slow.notices[0] and "far from the data" in slow.notices[0]
    assert "\n" not in slow.notices[0]
    monkeypatch.setattr(PRDC, "SLOW_SEARCH_S", 1e9)
    fast, ivf = make(data), make(data, nn_search="ivf")
    update_on(fast, batches)
    update_on(ivf, batches)  # already the approximate search: nothing to advise, nothing timed
    assert fast.notices == [] and ivf.notices == [] and ivf._search_wait is None
    for a, b in zip(slow.actor.parameters(), fast.actor.parameters(), strict=True):
        assert torch.equal(a, b)


def drive(layout: SearchLayout, cost: dict[str, float], updates: int) -> list[str]:
    """Tick `layout` through `updates` updates on a clock where each update takes `cost` seconds of the layout it
    ran in; the layout of each update."""
    now, seen = 0.0, []
    for _ in range(updates):
        layout.tick(None, now)
        seen.append(layout.layout)
        now += cost[layout.layout]
    return seen


def trial_starts(seen: list[str], layout: str) -> list[int]:
    return [i for i in range(1, len(seen)) if seen[i] == layout and seen[i - 1] != layout]


def test_the_search_layout_keeps_the_faster_and_times_the_slower_again_less_often_as_it_keeps_losing():
    """Process first; inline is tried after FIRST_TRIAL updates (once torch is found to give the same bits on
    both thread counts) and kept while faster, torch then on the search process's core too; the slower layout is
    timed again after RETRY blocks times how much slower it was, then twice, four times as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index, checked = type("Index", (), {"inline": False})(), []
        layout = SearchLayout(index, lambda threads, batch: checked.append(threads) or True, usable=lambda: 2)
        threads = []
        now = 0.0
        seen = []
        for _ in range(8000):
            layout.tick(None, now)
            seen.append(layout.layout)
            threads.append((torch.get_num_threads(), index.inline))
            now += {"process": 0.005, "inline": 0.004}[layout.layout]
        assert set(seen[:SearchLayout.FIRST_TRIAL]) == {"process"} and checked == [(1, 2)]
        assert all(t == ((2, True) if s == "inline" else (1, False)) for s, t in zip(seen, threads, strict=True))
        assert seen[-1] == "inline" and seen[1000:].count("inline") / len(seen[1000:]) > 0.9
        starts = trial_starts(seen, "process")
        gaps = np.diff(starts) // SearchLayout.BLOCK  # blocks from one trial of the slower to the next
        assert len(starts) >= 3 and gaps[0] >= SearchLayout.RETRY * 1.25 and all(np.diff(gaps) > 0)

        # inline three times slower: tried once, then after 30 blocks, then after 60 (plus the trial's own blocks)
        layout = SearchLayout(type("Index", (), {"inline": False})(), lambda threads, batch: True, usable=lambda: 2)
        seen = drive(layout, {"process": 0.003, "inline": 0.009}, 12000)
        starts = trial_starts(seen, "inline")
        assert starts[0] == SearchLayout.FIRST_TRIAL and seen[-1] == "process"
        trial = SearchLayout.TRIAL_BLOCKS
        assert [round(g / SearchLayout.BLOCK) for g in np.diff(starts)[:2]] == [30 + trial, 60 + trial]
        assert seen.count("inline") / len(seen) < 0.06  # three trials of two blocks in 12,000 updates

        # the search alone would take longer inline than a whole update in the process: no trial, nothing built
        # (not even the bits asked), until the search gets cheap
        floor, checked = [0.008], []
        layout = SearchLayout(type("Index", (), {"inline": False})(), lambda threads, batch: checked.append(1) or True,
                              usable=lambda: 2, inline_floor=lambda: floor[0])
        assert set(drive(layout, {"process": 0.005, "inline": 0.004}, 3000)) == {"process"} and checked == []
        floor[0] = 0.001
        seen = drive(layout, {"process": 0.005, "inline": 0.004}, 1000)
        assert seen[-1] == "inline" and checked == [1]

        # torch's bits differ between the thread counts: never inline, asked once
        checked = []
        layout = SearchLayout(type("Index", (), {"inline": False})(), lambda threads, batch: checked.append(1) or False,
                              usable=lambda: 2)
        assert set(drive(layout, {"process": 0.005, "inline": 0.001}, 5000)) == {"process"} and checked == [1]
    finally:
        torch.set_num_threads(before)


def test_same_bits_on_thread_counts_tells_a_thread_dependent_result_apart():
    before = torch.get_num_threads()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    assert same_bits_on_thread_counts((1, 2), lambda: [x * 2.0, x.sum(0)])
    assert not same_bits_on_thread_counts((1, 2), lambda: [torch.tensor(float(torch.get_num_threads()))])
    assert torch.get_num_threads() == before


def test_switching_the_search_layout_never_changes_the_numbers(hopper_random, monkeypatch):
    """A PRDC whose layout switches every few updates (the search inline with torch on two threads, or in the search
    process with torch on one), and one that lends torch the search process's core while it has nothing to search,
    end with the bits of one that does neither: the neighbours are exact in every layout, and the thread count
    changes only where torch gives the same bits on both counts. `side_cores` follows."""
    import offlab.algos.prdc as prdc_module

    monkeypatch.setattr(prdc_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(SearchLayout, "BLOCK", 3)
    monkeypatch.setattr(SearchLayout, "SETTLE", 0)
    monkeypatch.setattr(SearchLayout, "FIRST_TRIAL", 0)
    data = Transitions(hopper_random)
    g = torch.Generator().manual_seed(1)
    batches = [data.sample(64, g) for _ in range(40)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fixed = make(data, search_process=True, switch_layout=False, lend_core=False)
        assert fixed.layout is None
        update_on(fixed, batches)
        lending = make(data, search_process=True, switch_layout=False)
        lent = []
        searching = lending.layout.searching
        monkeypatch.setattr(lending.layout, "searching",
                            lambda busy: searching(busy) or lent.append((busy, torch.get_num_threads())))
        update_on(lending, batches)
        switching = make(data, search_process=True, switch_layout=True)
        layout = switching.layout
        same = switching._same_numbers((1, 2), batches[0])
        seen = []

        def alternate(median):  # every block, the other layout (as a trial would), through the real checks
            seen.append((layout.layout, torch.get_num_threads(), switching.side_cores))
            return layout._trial("inline" if layout.layout == "process" else "process")

        monkeypatch.setattr(layout, "next_layout", alternate)
        update_on(switching, batches)
    finally:
        torch.set_num_threads(before)
    if same:
        assert ("inline", 2, 0) in seen and ("process", 1, 1) in seen and layout.switches >= 10
        assert switching.nearest_dataset_action._local is not None
        # lending: torch on both cores for each actor step once its neighbours came, on one while a search ran
        assert (False, 2) in lent and (True, 1) in lent and lending.nearest_dataset_action._local is None
    else:  # this CPU's torch sums differently on two threads: the search stays in the process, torch on one thread
        assert {s[0] for s in seen} == {"process"} and layout.switches == 0
        assert {n for _, n in lent} == {1}
    for other in (lending, switching):
        for name in PRDC.STATE_PARTS[:4]:
            for a, b in zip(getattr(fixed, name).parameters(), getattr(other, name).parameters(), strict=True):
                assert torch.equal(a, b), name


def test_the_compiled_search_caches_in_offlab_home_where_numba_could_not_write(tmp_path):
    """A copy of the compiled loops' module whose folder cannot hold a `__pycache__` (a file of that name is in the
    way, which stops root too) for a user whose cache folder cannot be made either: numba would raise at import;
    the module imports, and its compiled code is kept under OFFLAB_HOME/numba."""
    import offlab.neighbour_scan as scan

    package = tmp_path / "readonly"
    package.mkdir()
    (package / "__pycache__").write_text("not a folder")
    (package / "scan_copy.py").write_text(Path(scan.__file__).read_text())
    home = tmp_path / "user"
    home.mkdir()
    (home / ".cache").write_text("not a folder")
    program = (
        "import importlib.util, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('scan_copy', {str(package / 'scan_copy.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module._squared_distance(np.ones((1, 2), np.float32), 0, np.zeros((1, 2)), 0))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache" / "x"), OFFLAB_HOME=str(tmp_path / "offlab"))
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2.0"
    assert list((tmp_path / "offlab" / "numba").rglob("*.nbi"))  # the cache index numba wrote there
