"""The inner loops of PRDC's exact host search (`offlab.neighbours`), compiled by numba.

As numpy calls they were dozens of small operations per batch and one matrix-vector product per (query, cell) pair,
each a few microseconds of call overhead on a few hundred keys: compiled, a batch of hopper-medium's queries at
update 3,000 took about 30% less time, the cells' part half (benchmarks/learner_speed.md, session 34). Both functions
are exact: every comparison that decides an answer is made in float64 from the float32 keys.

Compiled once per machine and kept in numba's cache (`cache=True`): beside this file, or in OFFLAB_HOME/numba where
that folder cannot be written (`NUMBA_CACHE_DIR` overrides both); `nogil`, so helper threads search in parallel.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numba
import numpy as np
from numba import njit

from offlab import paths


def _writable(folder: Path) -> bool:
    """Whether a file can be made in `folder` (created if missing), as numba's cache needs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# numba keeps the cache beside the module by default, else in the user's cache folder, and where it can write
# neither (an installed package read-only, a user without a home) it raises at the first decorator below, so
# PRDC could not even be imported: OFFLAB_HOME, which offlab writes anyway, takes it then
if not os.environ.get("NUMBA_CACHE_DIR") and not _writable(Path(__file__).parent / "__pycache__"):
    numba.config.CACHE_DIR = str(paths.home() / "numba")


@njit(cache=True, nogil=True)
def _squared_distance(keys, row, query):
    """|keys[row] - query|^2 in float64 (query: float64)."""
    total = 0.0
    for d in range(query.shape[0]):
        diff = np.float64(keys[row, d]) - query[d]
        total += diff * diff
    return total


@njit(cache=True, nogil=True)
def listed_nearest(keys, query, rows, lists, first, radius_first, radius, obs_dim, beta, slack):
    """`StateNeighbours.nearest`: for each query asked at dataset row rows[i], the nearest key among the row's listed
    states (first the `first` nearest, then, when they certify nothing and the whole list might, all of it) and
    whether it is certified the nearest of all keys. keys: float32 [N, dim]; query: float32 [n, dim]; rows: int64
    [n]; lists: int32 [N, k]."""
    n, dim = query.shape
    listed = lists.shape[1]
    found = np.empty(n, np.int64)
    certain = np.zeros(n, np.bool_)
    gathered = np.empty((listed, dim), np.float32)
    q = np.empty(dim)
    for i in range(n):
        row = rows[i]
        for d in range(dim):
            q[d] = query[i, d]
        own = 0.0  # beta * |s - s_row|: both states are beta * s in the keys
        for d in range(obs_dim):
            diff = np.float64(keys[row, d]) - q[d]
            own += diff * diff
        offset = math.sqrt(own)
        best, best_d2 = -1, np.inf
        begin = 0
        while True:
            end = first if begin == 0 else listed
            # the keys copied out first: their loads (random rows, mostly cache misses) do not wait on the arithmetic
            for m in range(begin, end):
                key_row = lists[row, m]
                for d in range(dim):
                    gathered[m, d] = keys[key_row, d]
            for m in range(begin, end):
                d2 = _squared_distance(gathered, m, q)
                if d2 < best_d2:
                    best, best_d2 = lists[row, m], d2
            floor = beta * (radius_first[row] if end == first else radius[row]) - offset - slack
            if floor > 0 and best_d2 < floor * floor:
                certain[i] = True
                break
            if end >= listed:
                break
            # the whole list certifies only a key nearer than its floor: from more than twice that squared, it
            # hardly ever finds one (none of 3,050 such queries on halfcheetah-medium at update 10,000, 166 of
            # 7,655 on hopper-medium at 3,000), and the cells take the query on at once
            whole = beta * radius[row] - offset - slack
            if whole <= 0 or best_d2 > 2.0 * whole * whole:
                break
            begin = end
        found[i] = best
    return found, certain


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _shell_scores(codes, half_sq, begin, end, weight, dims, out):
    """out[:end - begin] = sum_{d < dims} weight_d code_d + half_sq for the keys at positions begin:end, in float32
    (codes: int8, one row per dimension; weight_d = (q - c)_d step_d; half_sq: -|r|^2 / 2 over those dimensions).
    Four dimensions a pass over the scores (20% less time than one: fewer loads and stores of the scores) and
    reassociated, so it runs as vector instructions; the caller allows for its rounding, in any order of the sums."""
    count = end - begin
    scores = out[:count]
    for t in range(count):
        scores[t] = half_sq[begin + t]
    whole = dims - dims % 4
    for d in range(0, whole, 4):
        w0, w1, w2, w3 = weight[d], weight[d + 1], weight[d + 2], weight[d + 3]
        r0, r1 = codes[d, begin:end], codes[d + 1, begin:end]
        r2, r3 = codes[d + 2, begin:end], codes[d + 3, begin:end]
        for t in range(count):
            scores[t] += ((w0 * np.float32(r0[t]) + w1 * np.float32(r1[t]))
                          + (w2 * np.float32(r2[t]) + w3 * np.float32(r3[t])))
    for d in range(whole, dims):
        w = weight[d]
        row = codes[d, begin:end]
        for t in range(count):
            scores[t] += w * np.float32(row[t])


@njit(cache=True, nogil=True)
def _at_least(scores, count, limit):
    """How many of scores[:count] are >= limit: a vector count, where looking at each score in a branch took 30% of
    halfcheetah-medium's scan (and a running maximum twice this)."""
    passing = 0
    for t in range(count):
        passing += scores[t] >= limit
    return passing


@njit(cache=True, nogil=True)
def _cell_may_hold_nearer(to_cell, centroid_sq, base, gap, bound, rounding):
    """The half-space bound of a cell, multiplied out: (|q - c_j|^2 - |q - c_1|^2 - error) <= 2 d |c_j - c_1|, its
    keys' possible float32 misassignment taken off (`base`: |q - c_1|^2 and the query's part of the error)."""
    return to_cell - rounding * centroid_sq - base <= 2.0 * bound * gap


@njit(cache=True, nogil=True, inline="always")
def _scan_shell(j, q, q_axes, q_norm, best, best_d2, to_cell, keys, codes, codes_rest, step, code_error,
                half_sq_lead, half_sq_rest, lead, order, start, radius, centroids_axes, centroid_sq, weight, scores):
    """Cell j's keys in the shell |k - c_j| in |q - c_j| +- d (d: the best distance so far; one run of positions,
    sorted by |k - c_j|), scored from their codes into `scores` (room for the largest cell): (best row, its squared
    distance). q: the query, q_axes: the same in the codes' axes (float64); to_cell: |q - c_j|^2 (float64)."""
    dim = q.shape[0]
    # the score (q - c_j).r - |r|^2 / 2 from the codes r_d ~ step_d code_d: off by at most
    # coded = sum_d |q - c_j|_d code_error_d, plus float32's rounding (2^-24, twice over per term, on terms
    # bounded by terms = sum_d |q - c_j|_d max|r_d| and |r|^2 / 2 with |r| <= centre + reach); the same over the
    # leading dimensions alone (coded_lead) is off by no more
    coded = 0.0
    coded_lead = 0.0
    terms = 0.0
    lead_sq = 0.0  # |q - c_j|^2 over the leading dimensions
    for d in range(dim):
        w = q_axes[d] - centroids_axes[j, d]
        weight[d] = np.float32(w * step[j, d])
        coded += abs(w) * code_error[j, d]
        terms += abs(w) * 127.0 * step[j, d]
        if d < lead:
            coded_lead += abs(w) * code_error[j, d]
            lead_sq += w * w
    # q_axes and the centroid's axes are float64 products: q - c_j in them is off by at most moved (the products'
    # rounding, dim^1.5 2^-53 (|q| + |c_j|), with room to spare), so a squared distance over them, or a score, by
    # 2 moved (2 |q - c_j| + |r|) at most
    moved = dim * dim * 2.0**-52 * (q_norm + math.sqrt(centroid_sq[j]))
    bound = math.sqrt(best_d2)
    centre = math.sqrt(to_cell)
    reach = bound + 1e-9 * (centre + bound)
    first, last = start[j], start[j + 1]
    begin = first + np.searchsorted(radius[first:last], centre - reach, "left")
    end = first + np.searchsorted(radius[first:last], centre + reach, "right")
    if end <= begin:
        return best, best_d2
    _shell_scores(codes, half_sq_lead, begin, end, weight, lead, scores)
    # |q - k|^2 = |q - c_j|^2 - 2 score, and over the leading dimensions alone, |q - k|^2 >= lead_sq - 2 score_lead:
    # only a key whose leading score is within the error of beating the best is scored over the rest, and only
    # one whose whole score is within it is compared in float64, from its float32 key
    rounding = 4.0 * (dim + 2) * 2.0**-24 * (terms + (centre + reach) ** 2) + moved * (2.0 * centre + reach + moved)
    limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
    limit = 0.5 * (to_cell - best_d2) - coded - rounding
    # how many keys pass the first limit (a vector count: none in most shells), then those, in order, each against
    # the limits as they are then (which only rise), stopping after the last. The count compares in float32 against
    # the limit moved down by more than its float32 rounding, so that it counts every key the limit passes
    first_limit = np.float32(limit_lead - abs(limit_lead) * 2.0**-22)
    passing = _at_least(scores, end - begin, first_limit)
    t = 0
    while passing > 0:
        if scores[t] >= first_limit:
            passing -= 1
            if scores[t] >= limit_lead:
                at = begin + t
                score = scores[t] + half_sq_rest[at]
                rest = codes_rest[at]
                for d in range(lead, dim):
                    score += weight[d] * np.float32(rest[d - lead])
                if score >= limit:
                    key_row = order[at]
                    d2 = _squared_distance(keys, key_row, q)
                    if d2 < best_d2:
                        best, best_d2 = key_row, d2
                        limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
                        limit = 0.5 * (to_cell - best_d2) - coded - rounding
        t += 1
    return best, best_d2


@njit(cache=True, nogil=True)
def cells_nearest(query, candidate, keys, codes, codes_rest, step, code_error, half_sq_lead, half_sq_rest, lead,
                  order, start, radius, centroids_t, axes, centroids_axes, centroid_gap, centroid_sq, key_sq_max,
                  rounding_per_dim):
    """`VoronoiCells.nearest`: the row of each query's nearest key, from a candidate row each. See its doc for the
    bounds and the keys' codes. Each query's nearest cell is scanned first, for a tight bound; then cell by cell,
    every query whose bound (its best distance so far) still admits the cell, so that the queries after the first
    read a cell's codes from cache (a batch of halfcheetah-medium's far queries took 25% less time than scanning
    query by query)."""
    n, dim = query.shape
    cells = centroids_t.shape[1]
    row = np.empty(cells)  # |q_i - c_j|^2, float64
    query_axes = np.zeros((n, dim))  # the queries in the codes' axes
    qs = np.empty((n, dim))
    base = np.empty(n)
    q_norm = np.empty(n)
    best = np.empty(n, np.int64)
    best_d2 = np.empty(n)
    weight = np.empty(dim, np.float32)
    largest_cell = 1
    for j in range(cells):
        largest_cell = max(largest_cell, start[j + 1] - start[j])
    scores = np.empty(largest_cell, np.float32)  # made once: an array returned by each scan cost a reference count
    rounding = rounding_per_dim * dim
    pair_query = np.empty(16 * n, np.int64)  # the (query, cell) pairs left after each query's first cell
    pair_cell = np.empty(16 * n, np.int64)
    pair_to_cell = np.empty(16 * n)  # the pair's |q_i - c_j|^2 and |c_j - c_1|: read in order below, not at random
    pair_gap = np.empty(16 * n)
    pairs = 0
    per_cell = np.zeros(cells + 1, np.int64)
    for i in range(n):
        q = qs[i]
        for d in range(dim):
            q[d] = query[i, d]
        best[i] = candidate[i]
        best_d2[i] = _squared_distance(keys, best[i], q)
        q_sq = 0.0
        for d in range(dim):
            q_sq += q[d] * q[d]
        q_norm[i] = math.sqrt(q_sq)
        for e in range(dim):
            for d in range(dim):
                query_axes[i, e] += axes[e, d] * q[d]
        # here, not as numpy products: numpy's BLAS would start threads of its own beside torch's
        row[:] = 0.0
        for d in range(dim):
            qd = q[d]
            for j in range(cells):
                diff = qd - centroids_t[d, j]
                row[j] += diff * diff
        first = np.argmin(row)
        # |q - c_1|^2 and the query's part of the error allowed for the keys' float32 cell assignment
        base[i] = row[first] + rounding * (2.0 * q_sq + 2.0 * key_sq_max + 2.0 * centroid_sq[first])
        best[i], best_d2[i] = _scan_shell(first, q, query_axes[i], q_norm[i], best[i], best_d2[i], row[first],
                                          keys, codes, codes_rest, step, code_error, half_sq_lead, half_sq_rest,
                                          lead, order, start, radius, centroids_axes, centroid_sq, weight, scores)
        # room for every cell, made here: grown inside the loop below, the arrays made numba compile that loop
        # into one that took the cells twice as long on hopper-medium
        if pair_query.shape[0] < pairs + cells:
            pair_query = np.concatenate((pair_query[:pairs], np.empty(pairs + cells, np.int64)))
            pair_cell = np.concatenate((pair_cell[:pairs], np.empty(pairs + cells, np.int64)))
            pair_to_cell = np.concatenate((pair_to_cell[:pairs], np.empty(pairs + cells)))
            pair_gap = np.concatenate((pair_gap[:pairs], np.empty(pairs + cells)))
        gap = centroid_gap[first]
        bound = math.sqrt(best_d2[i])
        for j in range(cells):
            if j != first and _cell_may_hold_nearer(row[j], centroid_sq[j], base[i], gap[j], bound, rounding):
                pair_query[pairs], pair_cell[pairs] = i, j
                pair_to_cell[pairs], pair_gap[pairs] = row[j], gap[j]
                pairs += 1
                per_cell[j + 1] += 1
    # the pairs by cell (a counting sort: within a cell, by query), each tested again against the query's best
    # distance so far
    for j in range(cells):
        per_cell[j + 1] += per_cell[j]
    filled = per_cell[:-1].copy()
    by_cell = np.empty(pairs, np.int64)
    to_cell = np.empty(pairs)
    cell_gap = np.empty(pairs)
    for p in range(pairs):
        at = filled[pair_cell[p]]
        by_cell[at], to_cell[at], cell_gap[at] = pair_query[p], pair_to_cell[p], pair_gap[p]
        filled[pair_cell[p]] = at + 1
    for j in range(cells):
        for p in range(per_cell[j], per_cell[j + 1]):
            i = by_cell[p]
            if _cell_may_hold_nearer(to_cell[p], centroid_sq[j], base[i], cell_gap[p], math.sqrt(best_d2[i]),
                                     rounding):
                best[i], best_d2[i] = _scan_shell(j, qs[i], query_axes[i], q_norm[i], best[i], best_d2[i],
                                                  to_cell[p], keys, codes, codes_rest, step, code_error,
                                                  half_sq_lead, half_sq_rest, lead, order, start, radius,
                                                  centroids_axes, centroid_sq, weight, scores)
    return best
