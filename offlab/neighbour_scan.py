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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

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
def _squared_distance(keys, row, queries, i):
    """|keys[row] - queries[i]|^2 in float64 (queries: float64)."""
    total = 0.0
    for d in range(queries.shape[1]):
        diff = np.float64(keys[row, d]) - queries[i, d]
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
    q = np.empty((1, dim))
    ahead = min(first, listed)
    for i in range(n):
        row = rows[i]
        if i + 1 < n:  # the next query's first listed keys on their way while this one is answered
            for m in range(ahead):
                _prefetch(keys, lists[rows[i + 1], m])
        for d in range(dim):
            q[0, d] = query[i, d]
        own = 0.0  # beta * |s - s_row|: both states are beta * s in the keys
        for d in range(obs_dim):
            diff = np.float64(keys[row, d]) - q[0, d]
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
                d2 = _squared_distance(gathered, m, q, 0)
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


def _splat(builder, value, vector_type):
    """`value` in every lane of `vector_type`."""
    one = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None))


def interval_lanes() -> int:
    """How many keys' bytes the compiled scan's table lookups (`vpshufb`) take at once on the CPU numba compiles for:
    64 with AVX-512 BW, 32 with AVX2, else 0 (no interval bounds). NUMBA_CPU_FEATURES is what numba compiles for,
    whatever this CPU has; a CPU named by NUMBA_CPU_NAME without it may lack the instructions: 0."""
    if numba.config.CPU_FEATURES:
        named = numba.config.CPU_FEATURES.split(",")
    elif numba.config.CPU_NAME in (None, "host"):
        from llvmlite import binding

        named = ["+" + name for name, on in binding.get_host_cpu_features().items() if on]
    else:
        return 0
    return 64 if "+avx512bw" in named else 32 if "+avx2" in named else 0


def interval_bounds_available() -> bool:
    """Whether the compiled scan can bound the leading axes by byte table lookups (`interval_lanes`: AVX-512 BW or
    AVX2), unless OFFLAB_INTERVAL_BOUNDS=0 turns them off."""
    return os.environ.get("OFFLAB_INTERVAL_BOUNDS", "1") != "0" and INTERVAL_LANES > 0


INTERVAL_LANES = interval_lanes()
"""`interval_lanes` of this process's CPU: fixed in the compiled scan (numba's cache is kept per CPU and features)."""
MARK_EVERY = 32
"""Keys between two of a cell's marks (`VoronoiCells.marks`), which bound its shells' runs."""
INTERVALS = 16
"""Intervals per leading axis and cell (`interval_bins`): a key's interval on an axis is a 4-bit code."""
BOUND_LIMIT = 250
"""The squared distance to beat, in the units the interval tables count in (one byte, saturating at 255)."""

@intrinsic
def _interval_bound_run(typingctx, intervals, begin, end, tables, found, lanes):
    """For the keys at positions begin:end: each key's bound sum_d tables[d, code_d] over the leading axes (codes:
    intervals [keys / 64, axes / 2, 64], block by block of 64 keys, two 4-bit codes a byte, axis 2p in the low
    half; tables: uint8 [axes, 16]), summed in bytes that saturate at 255, `lanes` (a literal: 64 for AVX-512 BW, 32
    for AVX2) keys at a time by `vpshufb`. The indices (position - begin) of the keys whose bound is at most
    BOUND_LIMIT go into found (int32), in order; returns how many."""
    if intervals.dtype != types.uint8 or tables.dtype != types.uint8 or found.dtype != types.int32:
        raise numba.TypingError("_interval_bound_run: uint8 codes and tables, int32 found")
    if not isinstance(lanes, types.IntegerLiteral) or lanes.literal_value not in (32, 64):
        raise numba.TypingError("_interval_bound_run: lanes a literal 32 or 64")
    width = lanes.literal_value
    sig = types.int64(intervals, begin, end, tables, found, lanes)

    def codegen(context, builder, signature, args):
        intervals_v, begin_v, end_v, tables_v, found_v, _ = args
        intervals_a = context.make_array(signature.args[0])(context, builder, intervals_v)
        tables_a = context.make_array(signature.args[3])(context, builder, tables_v)
        found_a = context.make_array(signature.args[4])(context, builder, found_v)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vector = ir.VectorType(ir.IntType(8), width)
        module = builder.module
        shuffle_name = "llvm.x86.avx512.pshuf.b.512" if width == 64 else "llvm.x86.avx2.pshuf.b"
        shuffle = cgutils.get_or_insert_function(module, ir.FunctionType(vector, [vector, vector]), shuffle_name)
        add_saturating = cgutils.get_or_insert_function(module, ir.FunctionType(vector, [vector, vector]),
                                                        f"llvm.uadd.sat.v{width}i8")
        trailing = cgutils.get_or_insert_function(module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
        popcount = cgutils.get_or_insert_function(module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        pairs = cgutils.unpack_tuple(builder, intervals_a.shape)[1]
        block_bytes = builder.mul(pairs, ir.Constant(i64, 64))
        sixteen = ir.VectorType(ir.IntType(8), INTERVALS)
        repeat = ir.Constant(ir.VectorType(i32, width), [ir.Constant(i32, k % INTERVALS) for k in range(width)])

        def repeated(at):  # an axis's 16-byte table in each of the 128-bit lanes `vpshufb` looks up in
            values = builder.load(builder.bitcast(builder.gep(tables_a.data, [at]), sixteen.as_pointer()), align=1)
            return builder.shuffle_vector(values, values, repeat)

        def lanes_below(count):  # the 64-bit mask of lanes < count, count in 0..64
            full = builder.icmp_signed(">=", count, ir.Constant(i64, 64))
            ones = builder.sub(builder.shl(ir.Constant(i64, 1), builder.select(full, ir.Constant(i64, 0), count)),
                               ir.Constant(i64, 1))
            return builder.select(full, ir.Constant(i64, -1), ones)

        low = ir.Constant(vector, [0x0F] * width)
        four = ir.Constant(vector, [4] * width)
        limit = ir.Constant(vector, [BOUND_LIMIT] * width)
        sixty_four = ir.Constant(i64, 64)
        first_block = builder.sdiv(begin_v, sixty_four)
        blocks = builder.sub(builder.sdiv(builder.add(end_v, ir.Constant(i64, 63)), sixty_four), first_block)
        passing = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        totals = [cgutils.alloca_once(builder, vector) for _ in range(64 // width)]
        bits_left = cgutils.alloca_once(builder, i64)
        with cgutils.for_range(builder, blocks) as block_loop:
            block = builder.add(first_block, block_loop.index)
            start = builder.mul(block, sixty_four)  # the block's first position
            base = builder.mul(block, block_bytes)
            for total in totals:
                builder.store(ir.Constant(vector, None), total)
            with cgutils.for_range(builder, pairs) as loop:
                table = builder.mul(loop.index, ir.Constant(i64, 2 * INTERVALS))
                even = repeated(table)
                odd = repeated(builder.add(table, ir.Constant(i64, INTERVALS)))
                for part_index, total in enumerate(totals):  # the block's 64 keys, `width` at a time
                    at = builder.add(base, builder.add(builder.mul(loop.index, sixty_four),
                                                       ir.Constant(i64, part_index * width)))
                    codes = builder.load(builder.bitcast(builder.gep(intervals_a.data, [at]), vector.as_pointer()),
                                         align=width)
                    part = builder.call(add_saturating, [builder.call(shuffle, [even, builder.and_(codes, low)]),
                                                         builder.call(shuffle, [odd, builder.lshr(codes, four)])])
                    builder.store(builder.call(add_saturating, [builder.load(total), part]), total)
            bits = ir.Constant(i64, 0)
            for part_index, total in enumerate(totals):
                inside = builder.icmp_unsigned("<=", builder.load(total), limit)
                part_bits = builder.zext(builder.bitcast(inside, ir.IntType(width)), i64)
                bits = builder.or_(bits, builder.shl(part_bits, ir.Constant(i64, part_index * width)))
            # only the lanes of positions begin:end
            below_end = lanes_below(builder.sub(end_v, start))
            before_begin = lanes_below(builder.sub(begin_v, start))  # 0 lanes but in the first block
            before_begin = builder.select(builder.icmp_signed(">", begin_v, start), before_begin, ir.Constant(i64, 0))
            bits = builder.and_(bits, builder.and_(below_end, builder.not_(before_begin)))
            builder.store(bits, bits_left)
            with builder.if_then(builder.icmp_unsigned("!=", bits, ir.Constant(i64, 0)), likely=False):  # rare
                offset = builder.sub(start, begin_v)
                with cgutils.for_range(builder, builder.call(popcount, [bits])):
                    now = builder.load(bits_left)
                    lane = builder.call(trailing, [now, ir.Constant(ir.IntType(1), 1)])
                    so_far = builder.load(passing)
                    builder.store(builder.trunc(builder.add(offset, lane), i32), builder.gep(found_a.data, [so_far]))
                    builder.store(builder.add(so_far, ir.Constant(i64, 1)), passing)
                    builder.store(builder.and_(now, builder.sub(now, ir.Constant(i64, 1))), bits_left)
        return builder.load(passing)

    return sig, codegen


@njit(cache=True, nogil=True)
def interval_bins(offsets, intervals):
    """Each column of offsets [n, axes] (float64) cut into `intervals` intervals by one-dimensional k-means (Lloyd's
    iterations from equal counts): each value's interval (uint8 [n, axes]) and each interval's smallest and largest
    value ([axes, intervals] each; +inf and -inf where an interval holds none)."""
    n, axes = offsets.shape
    codes = np.zeros((n, axes), np.uint8)
    lowest = np.full((axes, intervals), np.inf)
    highest = np.full((axes, intervals), -np.inf)
    if n == 0:
        return codes, lowest, highest
    centre = np.empty(intervals)
    edges = np.empty(intervals - 1)
    sums = np.empty(intervals)
    counts = np.empty(intervals)
    for d in range(axes):
        values = np.sort(offsets[:, d])
        for m in range(intervals):
            a = min(m * n // intervals, n - 1)
            b = max((m + 1) * n // intervals, a + 1)
            centre[m] = values[a:b].mean()
        for _ in range(8):  # as fast a scan as 16 (halfcheetah-medium), in half the build
            for m in range(intervals - 1):
                edges[m] = 0.5 * (centre[m] + centre[m + 1])
            sums[:] = 0.0
            counts[:] = 0.0
            m = 0
            for t in range(n):
                while m < intervals - 1 and values[t] > edges[m]:
                    m += 1
                sums[m] += values[t]
                counts[m] += 1.0
            for m in range(intervals):
                if counts[m] > 0:
                    centre[m] = sums[m] / counts[m]
            centre.sort()
        for m in range(intervals - 1):
            edges[m] = 0.5 * (centre[m] + centre[m + 1])
        for t in range(n):
            value = offsets[t, d]
            m = np.searchsorted(edges, value)
            codes[t, d] = m
            lowest[d, m] = min(lowest[d, m], value)
            highest[d, m] = max(highest[d, m], value)
    return codes, lowest, highest


@njit(cache=True, nogil=True, inline="always")
def _float32_below(limit):
    """The float64 `limit` in float32, moved down by more than that rounding: a float32 score that passes `limit`
    passes this."""
    return np.float32(limit - abs(limit) * 2.0**-22)


@njit(cache=True, nogil=True, inline="always")
def _lead_pass(codes, half_sq, begin, end, weight, dims, out, limit, found):
    """The scores of the keys at positions begin:end over the leading axes into out[:end - begin] (`_shell_scores`),
    then the indices of those that pass `limit` (moved below its float32 rounding, so that a score that passes the
    float64 limit is found) into found, in order: how many."""
    _shell_scores(codes, half_sq, begin, end, weight, dims, out)
    first_limit = _float32_below(limit)
    passing = _at_least(out, end - begin, first_limit)  # a vector count: none in most shells
    seen = 0
    t = 0
    while seen < passing:
        if out[t] >= first_limit:
            found[seen] = t
            seen += 1
        t += 1
    return passing


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


@intrinsic
def _interval_tables(typingctx, lowest, highest, j, query_axes, i, centroids_axes, dims, slack, units, tables):
    """tables[d, m] (uint8) = the squared distance from x_d = query_axes[i, d] - centroids_axes[j, d] to the interval
    [lowest[j, d, m], highest[j, d, m]] (float32, rounded outwards) less slack (the distance, then squared), times
    units, rounded down and at most 255, for d < dims and the INTERVALS intervals of each: 16 at a time in float32
    vector instructions, every rounding of float32 taken off (a relative 2^-20 and |x_d| 2^-22; numba's float64
    loop took about 270 ns a shell, as long as the bound's run on 1,000 keys)."""
    if lowest.dtype != types.float32 or highest.dtype != types.float32 or tables.dtype != types.uint8:
        raise numba.TypingError("_interval_tables: float32 intervals and uint8 tables")
    sig = types.void(lowest, highest, j, query_axes, i, centroids_axes, dims, slack, units, tables)

    def codegen(context, builder, signature, args):
        lowest_v, highest_v, j_v, q_v, i_v, centroids_v, dims_v, slack_v, units_v, tables_v = args
        lowest_a = context.make_array(signature.args[0])(context, builder, lowest_v)
        highest_a = context.make_array(signature.args[1])(context, builder, highest_v)
        q_a = context.make_array(signature.args[3])(context, builder, q_v)
        centroids_a = context.make_array(signature.args[5])(context, builder, centroids_v)
        tables_a = context.make_array(signature.args[9])(context, builder, tables_v)
        i64, f32, f64 = ir.IntType(64), ir.FloatType(), ir.DoubleType()
        floats = ir.VectorType(f32, INTERVALS)
        module = builder.module

        def vector_call(name, *values):
            function = cgutils.get_or_insert_function(module, ir.FunctionType(floats, [v.type for v in values]), name)
            return builder.call(function, list(values))

        axes = cgutils.unpack_tuple(builder, lowest_a.shape)[1]
        cell = builder.mul(builder.mul(j_v, axes), ir.Constant(i64, INTERVALS))
        centroid = builder.mul(j_v, cgutils.unpack_tuple(builder, centroids_a.shape)[1])
        query = builder.mul(i_v, cgutils.unpack_tuple(builder, q_a.shape)[1])
        shrink = _splat(builder, ir.Constant(f32, 1.0 - 2.0**-20), floats)
        unit = _splat(builder, builder.fptrunc(builder.fmul(units_v, ir.Constant(f64, 1.0 - 2.0**-20)), f32), floats)
        zero, most = ir.Constant(floats, [0.0] * INTERVALS), ir.Constant(floats, [255.0] * INTERVALS)
        fabs = cgutils.get_or_insert_function(module, ir.FunctionType(f64, [f64]), "llvm.fabs.f64")
        with cgutils.for_range(builder, dims_v) as loop:
            at = builder.add(cell, builder.mul(loop.index, ir.Constant(i64, INTERVALS)))
            low = builder.load(builder.bitcast(builder.gep(lowest_a.data, [at]), floats.as_pointer()), align=4)
            high = builder.load(builder.bitcast(builder.gep(highest_a.data, [at]), floats.as_pointer()), align=4)
            x = builder.fsub(builder.load(builder.gep(q_a.data, [builder.add(query, loop.index)])),
                             builder.load(builder.gep(centroids_a.data, [builder.add(centroid, loop.index)])))
            # what float32 may have moved the distance by, beyond the relative 2^-20: x's rounding and slack
            off = builder.fadd(builder.fmul(slack_v, ir.Constant(f64, 1.0 + 2.0**-20)),
                               builder.fmul(builder.call(fabs, [x]), ir.Constant(f64, 2.0**-22)))
            xs = _splat(builder, builder.fptrunc(x, f32), floats)
            gap = vector_call("llvm.maxnum.v16f32", builder.fsub(low, xs), builder.fsub(xs, high))
            gap = builder.fsub(builder.fmul(gap, shrink), _splat(builder, builder.fptrunc(off, f32), floats))
            gap = vector_call("llvm.maxnum.v16f32", gap, zero)
            value = vector_call("llvm.minnum.v16f32", builder.fmul(builder.fmul(builder.fmul(gap, gap), unit), shrink),
                                most)
            target = builder.gep(tables_a.data, [builder.mul(loop.index, ir.Constant(i64, INTERVALS))])
            builder.store(builder.fptoui(value, ir.VectorType(ir.IntType(8), INTERVALS)),
                          builder.bitcast(target, ir.VectorType(ir.IntType(8), INTERVALS).as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


def _interval_pass(intervals, lowest, highest, tables, found, j, query_axes, i, centroids_axes, lead, slack, best_d2,
                   begin, end):
    """The keys at positions begin:end whose interval bound over the leading axes does not rule them out against
    best_d2, into found (indices in the run, in order): how many, or -1 without interval codes (intervals None).
    The arrays one by one: given the cells' tuple, the call took a fifth of the cells' time more on
    halfcheetah-medium."""


@overload(_interval_pass, jit_options={"nogil": True}, inline="always")
def _interval_pass_for(intervals, lowest, highest, tables, found, j, query_axes, i, centroids_axes, lead, slack,
                       best_d2, begin, end):
    if isinstance(intervals, types.NoneType):
        return lambda intervals, lowest, highest, tables, found, j, query_axes, i, centroids_axes, lead, slack, \
            best_d2, begin, end: -1

    def bounded(intervals, lowest, highest, tables, found, j, query_axes, i, centroids_axes, lead, slack, best_d2,
                begin, end):
        if best_d2 <= 0.0:  # an exact match: no key is nearer
            return 0
        units = BOUND_LIMIT / (best_d2 * (1.0 + 1e-9)) * (1.0 - 1e-12)
        _interval_tables(lowest, highest, j, query_axes, i, centroids_axes, lead, slack, units, tables)
        return _interval_bound_run(intervals, begin, end, tables, found, INTERVAL_LANES)

    return bounded


@intrinsic
def _prefetch(typingctx, array, row):
    """Ask for array[row] (2-d, C-contiguous: its first and last byte's cache lines) ahead of its use."""
    sig = types.void(array, row)

    def codegen(context, builder, signature, args):
        array_a = context.make_array(signature.args[0])(context, builder, args[0])
        stride = cgutils.unpack_tuple(builder, array_a.strides)[0]
        row_v = context.cast(builder, args[1], signature.args[1], types.int64)
        first = builder.gep(builder.bitcast(array_a.data, ir.IntType(8).as_pointer()), [builder.mul(row_v, stride)])
        last = builder.gep(first, [builder.sub(stride, ir.Constant(ir.IntType(64), 1))])
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8")
        for pointer in (first, last):
            builder.call(prefetch, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _found_scores(codes, half_sq, begin, found, passing, weight, dims, scores):
    """scores[t] = sum_{d < dims} weight_d code_d + half_sq for the keys found (at positions begin + t), in float32:
    the leading scores of the few keys the intervals left in (codes: int8, a row per key)."""
    for m in range(passing):  # the rows' cache misses all under way at once, not one after another
        _prefetch(codes, begin + found[m])
    for m in range(passing):
        t = found[m]
        row = codes[begin + t]
        score = half_sq[begin + t]
        for d in range(dims):
            score += weight[d] * np.float32(row[d])
        scores[t] = score


@njit(cache=True, nogil=True, inline="always")
def _scan_shell(j, qs, query_axes, i, q_norm, best, best_d2, to_cell, lead, key_norm, data, buffers):
    """Cell j's keys in the shell |k - c_j| in |q - c_j| +- d (d: the best distance so far; one run of positions,
    sorted by |k - c_j|), scored from their codes into `scores` (room for the largest cell): (best row, its squared
    distance). The query q: qs[i], and in the codes' axes query_axes[i] (float64); to_cell: |q - c_j|^2 (float64).
    data: the keys and their cells (`cells_nearest`); buffers: (weight, scores, found, tables)."""
    (keys, codes, codes_rest, step, code_error, half_sq_lead, half_sq_rest, order, start, marks, mark_start,
     centroids_axes, centroid_sq, intervals, lowest, highest) = data
    weight, scores, found, tables = buffers
    dim = qs.shape[1]
    # query_axes and the centroid's axes are float64 products: q - c_j in them is off by at most moved (the products'
    # rounding, dim^1.5 2^-53 (|q| + |c_j|), with room to spare), so a squared distance over them, or a score, by
    # 2 moved (2 |q - c_j| + |r|) at most
    moved = dim * dim * 2.0**-52 * (q_norm + math.sqrt(centroid_sq[j]))
    bound = math.sqrt(best_d2)
    centre = math.sqrt(to_cell)
    reach = bound + 1e-9 * (centre + bound)
    # the run from the cell's marks (every MARK_EVERY-th key's |k - c_j|, a few cache lines to bisect, where the
    # keys' own took a cache miss a step): up to MARK_EVERY keys more at each end
    first, last = start[j], start[j + 1]
    marked = marks[mark_start[j]:mark_start[j + 1]]
    begin = first + max(np.searchsorted(marked, centre - reach, "left") - 1, 0) * MARK_EVERY
    end = min(first + np.searchsorted(marked, centre + reach, "right") * MARK_EVERY, last)
    if end <= begin:
        return best, best_d2
    # with interval codes, first the keys their bound leaves in (a key's offsets r in the axes are off by at most
    # dim^2 2^-52 (|k| + |c_j|), as q - c_j by moved)
    slack = moved + dim * dim * 2.0**-52 * (key_norm + math.sqrt(centroid_sq[j]))
    passing = _interval_pass(intervals, lowest, highest, tables, found, j, query_axes, i, centroids_axes, lead,
                             slack, best_d2, begin, end)
    if passing == 0:
        return best, best_d2
    # the score (q - c_j).r - |r|^2 / 2 from the codes r_d ~ step_d code_d: off by at most
    # coded = sum_d |q - c_j|_d code_error_d, plus float32's rounding (2^-24, twice over per term, on terms
    # bounded by terms = sum_d |q - c_j|_d max|r_d| and |r|^2 / 2 with |r| <= centre + reach); the same over the
    # leading dimensions alone (coded_lead) is off by no more
    coded = 0.0
    coded_lead = 0.0
    terms = 0.0
    lead_sq = 0.0  # |q - c_j|^2 over the leading dimensions
    for d in range(dim):
        w = query_axes[i, d] - centroids_axes[j, d]
        weight[d] = np.float32(w * step[j, d])
        coded += abs(w) * code_error[j, d]
        terms += abs(w) * 127.0 * step[j, d]
        if d < lead:
            coded_lead += abs(w) * code_error[j, d]
            lead_sq += w * w
    # |q - k|^2 = |q - c_j|^2 - 2 score, and over the leading dimensions alone, |q - k|^2 >= lead_sq - 2 score_lead:
    # only a key whose leading score is within the error of beating the best is scored over the rest, and only
    # one whose whole score is within it is compared in float64, from its float32 key
    rounding = 4.0 * (dim + 2) * 2.0**-24 * (terms + (centre + reach) ** 2) + moved * (2.0 * centre + reach + moved)
    # the keys that pass the first limit, then those, in order, each against the limits as they are then (which
    # only rise)
    limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
    if passing < 0:  # no interval codes: every key of the run scored over the leading axes
        passing = _lead_pass(codes, half_sq_lead, begin, end, weight, lead, scores, limit_lead, found)
    else:
        _found_scores(codes, half_sq_lead, begin, found, passing, weight, lead, scores)
    limit = 0.5 * (to_cell - best_d2) - coded - rounding
    for m in range(passing):
        t = found[m]
        if scores[t] >= limit_lead:
            at = begin + t
            score = scores[t] + half_sq_rest[at]
            rest = codes_rest[at]
            for d in range(lead, dim):
                score += weight[d] * np.float32(rest[d - lead])
            if score >= limit:
                key_row = order[at]
                d2 = _squared_distance(keys, key_row, qs, i)
                if d2 < best_d2:
                    best, best_d2 = key_row, d2
                    limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
                    limit = 0.5 * (to_cell - best_d2) - coded - rounding
    return best, best_d2


@njit(cache=True, nogil=True)
def cells_nearest(query, candidate, keys, codes, codes_rest, step, code_error, half_sq_lead, half_sq_rest, lead,
                  order, start, marks, mark_start, centroids_t, axes, centroids_axes, centroid_gap, centroid_sq,
                  key_sq_max, rounding_per_dim, intervals, lowest, highest):
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
    weight = np.zeros(dim, np.float32)
    largest_cell = 1
    for j in range(cells):
        largest_cell = max(largest_cell, start[j + 1] - start[j])
    # made once: an array returned by each scan cost a reference count
    scores = np.empty(largest_cell, np.float32)
    found = np.empty(largest_cell, np.int32)  # the positions in a run that pass the first limit
    tables = np.zeros((lead, INTERVALS), np.uint8)  # the interval bounds' lookup tables, made per shell
    key_norm = math.sqrt(key_sq_max)
    # the cells' arrays and the buffers as two tuples: numba would not inline `_scan_shell` with all 33 arguments
    # ("Calling a closure with *args")
    data = (keys, codes, codes_rest, step, code_error, half_sq_lead, half_sq_rest, order, start, marks, mark_start,
            centroids_axes, centroid_sq, intervals, lowest, highest)
    buffers = (weight, scores, found, tables)
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
        best_d2[i] = _squared_distance(keys, best[i], qs, i)
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
        best[i], best_d2[i] = _scan_shell(first, qs, query_axes, i, q_norm[i], best[i], best_d2[i], row[first], lead,
                                          key_norm, data, buffers)
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
                best[i], best_d2[i] = _scan_shell(j, qs, query_axes, i, q_norm[i], best[i], best_d2[i], to_cell[p],
                                                  lead, key_norm, data, buffers)
    return best
