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


def byte_products_available() -> bool:
    """Whether the compiled scan can score the leading axes with AVX-512 VNNI's byte dot products (`vpdpbusd`: 64
    one-byte products a instruction, against 16 float multiply-adds and two conversions of the float scan): on
    this machine's CPU (numba compiles for it unless NUMBA_CPU_NAME says otherwise), and unless
    OFFLAB_BYTE_PRODUCTS=0 turns them off."""
    if os.environ.get("OFFLAB_BYTE_PRODUCTS", "1") == "0" or numba.config.CPU_NAME not in (None, "host"):
        return False
    if numba.config.CPU_FEATURES:  # NUMBA_CPU_FEATURES: what numba compiles for, whatever this CPU has
        named = numba.config.CPU_FEATURES.split(",")
        return "+avx512vnni" in named and "+avx512bw" in named
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


_WORDS = ir.VectorType(ir.IntType(32), 16)
_FLOATS = ir.VectorType(ir.FloatType(), 16)


def _splat(builder, value, vector_type):
    """`value` in every lane of `vector_type`."""
    one = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None))


@intrinsic
def _byte_product_run(typingctx, out, codes, begin, count, groups, packed, scale, offset, half_sq, limit, found):
    """Scores of the `count` keys from position `begin` into out[:count] (16 at a time; up to 15 more written), in
    float32: scale * (sum_g vpdpbusd(their codes' group g, packed[g]) - offset) + half_sq[position], the codes as
    code + 128 (unsigned bytes), the packed weights signed bytes four to a word (the sum is exact, in int32).
    Returns how many of the count are >= limit, found as they are made, their indices in order in found (int32)."""
    sig = types.int64(out, codes, begin, count, groups, packed, scale, offset, half_sq, limit, found)

    def codegen(context, builder, signature, args):
        out_v, codes_v, begin_v, count_v, groups_v, packed_v, scale_v, offset_v, half_v, limit_v, found_v = args
        found_a = context.make_array(signature.args[10])(context, builder, found_v)
        out_a = context.make_array(signature.args[0])(context, builder, out_v)
        codes_a = context.make_array(signature.args[1])(context, builder, codes_v)
        packed_a = context.make_array(signature.args[5])(context, builder, packed_v)
        half_a = context.make_array(signature.args[8])(context, builder, half_v)
        i64 = ir.IntType(64)
        # declared with three <16 x i32> operands, the form LLVM 14-20 take (numba >= 0.59); LLVM 21+ take the bytes
        # as <64 x i8> but upgrade this form (checked: LLVM 14 and 22)
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_WORDS, [_WORDS, _WORDS, _WORDS]),
                                             "llvm.x86.avx512.vpdpbusd.512")
        # the indices of the passing lanes, packed in order after those found so far (vpcompressd)
        compress = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_WORDS, ir.IntType(32).as_pointer(),
                                                            ir.VectorType(ir.IntType(1), 16)]),
            "llvm.masked.compressstore.v16i32")
        popcount = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        stride = builder.mul(cgutils.unpack_tuple(builder, codes_a.shape)[1], ir.Constant(i64, 4))
        lanes = ir.Constant(ir.VectorType(i64, 16), [ir.Constant(i64, k) for k in range(16)])
        scales = _splat(builder, scale_v, _FLOATS)
        offsets = _splat(builder, offset_v, _WORDS)
        limits = _splat(builder, limit_v, _FLOATS)
        counts = _splat(builder, count_v, ir.VectorType(i64, 16))
        blocks = builder.sdiv(builder.add(count_v, ir.Constant(i64, 15)), ir.Constant(i64, 16))
        passing = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        total = cgutils.alloca_once(builder, _WORDS)
        with cgutils.for_range(builder, blocks) as block_loop:
            first = builder.mul(block_loop.index, ir.Constant(i64, 16))
            position = builder.add(begin_v, first)
            builder.store(ir.Constant(_WORDS, None), total)
            with cgutils.for_range(builder, groups_v) as loop:
                at = builder.add(builder.mul(position, ir.Constant(i64, 4)), builder.mul(loop.index, stride))
                block = builder.load(builder.bitcast(builder.gep(codes_a.data, [at]), _WORDS.as_pointer()), align=1)
                word = builder.load(builder.gep(packed_a.data, [loop.index]))
                weights = _splat(builder, word, _WORDS)  # the word's four signed bytes, in every lane
                builder.store(builder.call(dot, [builder.load(total), block, weights]), total)
            exact = builder.sub(builder.load(total), offsets)
            half = builder.load(builder.bitcast(builder.gep(half_a.data, [position]), _FLOATS.as_pointer()), align=4)
            score = builder.fadd(builder.fmul(builder.sitofp(exact, _FLOATS), scales), half)
            builder.store(score, builder.bitcast(builder.gep(out_a.data, [first]), _FLOATS.as_pointer()), align=4)
            indices = builder.add(_splat(builder, first, ir.VectorType(i64, 16)), lanes)  # in the run
            over = builder.and_(builder.fcmp_ordered(">=", score, limits), builder.icmp_signed("<", indices, counts))
            bits = builder.zext(builder.bitcast(over, ir.IntType(16)), i64)
            so_far = builder.load(passing)
            with builder.if_then(builder.icmp_unsigned("!=", bits, ir.Constant(i64, 0)), likely=False):  # rare
                builder.call(compress, [builder.trunc(indices, _WORDS), builder.gep(found_a.data, [so_far]), over])
            builder.store(builder.add(so_far, builder.call(popcount, [bits])), passing)
        return builder.load(passing)

    return sig, codegen


@intrinsic
def _weights_in_bytes(typingctx, weight, dims, packed):
    """Each of weight[:dims] (float32, with room for 16 past a multiple of 16) as one signed byte, w_d ~ scale w8_d
    with scale the largest |w_d| / 127 (1 if all are 0), into packed's bytes (four to a word, the bytes past dims
    0). Returns (scale, sum_d |w_d - scale w8_d| in float64, sum_d w8_d): in vector instructions, 16 weights at a
    time (as numba's scalar code, 160 ns a shell, half the time the products took on halfcheetah-medium)."""
    sig = types.Tuple((types.float32, types.float64, types.int64))(weight, dims, packed)

    def codegen(context, builder, signature, args):
        weight_v, dims_v, packed_v = args
        weight_a = context.make_array(signature.args[0])(context, builder, weight_v)
        packed_a = context.make_array(signature.args[2])(context, builder, packed_v)
        i64, f32, f64 = ir.IntType(64), ir.FloatType(), ir.DoubleType()
        longs, doubles = ir.VectorType(i64, 16), ir.VectorType(f64, 16)
        lanes = ir.Constant(longs, [ir.Constant(i64, k) for k in range(16)])
        dims_lanes = _splat(builder, dims_v, longs)
        chunks = builder.sdiv(builder.add(dims_v, ir.Constant(i64, 15)), ir.Constant(i64, 16))
        module = builder.module

        def vector_call(name, result, *values):
            function = cgutils.get_or_insert_function(module, ir.FunctionType(result, [v.type for v in values]), name)
            return builder.call(function, list(values))

        def chunk_of(index):  # weight[16 index:16 index + 16], the lanes past dims 0
            at = builder.mul(index, ir.Constant(i64, 16))
            values = builder.load(builder.bitcast(builder.gep(weight_a.data, [at]), _FLOATS.as_pointer()), align=4)
            inside = builder.icmp_signed("<", builder.add(_splat(builder, at, longs), lanes), dims_lanes)
            return at, builder.select(inside, values, ir.Constant(_FLOATS, None))

        largest = cgutils.alloca_once_value(builder, ir.Constant(_FLOATS, None))
        with cgutils.for_range(builder, chunks) as loop:
            _, values = chunk_of(loop.index)
            size = vector_call("llvm.fabs.v16f32", _FLOATS, values)
            builder.store(vector_call("llvm.maxnum.v16f32", _FLOATS, builder.load(largest), size), largest)
        top = vector_call("llvm.vector.reduce.fmax.v16f32", f32, builder.load(largest))
        zero = builder.fcmp_ordered("==", top, ir.Constant(f32, 0.0))
        scale = builder.select(zero, ir.Constant(f32, 1.0), builder.fdiv(top, ir.Constant(f32, 127.0)))
        inverse = _splat(builder, builder.fdiv(ir.Constant(f32, 1.0), scale), _FLOATS)
        scale_wide = _splat(builder, builder.fpext(scale, f64), doubles)
        error = cgutils.alloca_once_value(builder, ir.Constant(doubles, None))
        total = cgutils.alloca_once_value(builder, ir.Constant(_WORDS, None))
        with cgutils.for_range(builder, chunks) as loop:
            at, values = chunk_of(loop.index)
            whole = vector_call("llvm.rint.v16f32", _FLOATS, builder.fmul(values, inverse))
            whole = vector_call("llvm.minnum.v16f32", _FLOATS, whole, ir.Constant(_FLOATS, [127.0] * 16))
            whole = vector_call("llvm.maxnum.v16f32", _FLOATS, whole, ir.Constant(_FLOATS, [-127.0] * 16))
            # exact in float64: a float32 product of float32 values, then one rounding of the difference
            miss = builder.fsub(builder.fpext(values, doubles), builder.fmul(builder.fpext(whole, doubles), scale_wide))
            builder.store(builder.fadd(builder.load(error), vector_call("llvm.fabs.v16f64", doubles, miss)), error)
            words = builder.fptosi(whole, _WORDS)
            builder.store(builder.add(builder.load(total), words), total)
            target = builder.gep(builder.bitcast(packed_a.data, ir.IntType(8).as_pointer()), [at])
            builder.store(builder.trunc(words, ir.VectorType(ir.IntType(8), 16)),
                          builder.bitcast(target, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        error_sum = vector_call("llvm.vector.reduce.fadd.v16f64", f64, ir.Constant(f64, 0.0), builder.load(error))
        total_sum = builder.sext(vector_call("llvm.vector.reduce.add.v16i32", ir.IntType(32), builder.load(total)), i64)
        return context.make_tuple(builder, signature.return_type, [scale, error_sum, total_sum])

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _float32_below(limit):
    """The float64 `limit` in float32, moved down by more than that rounding: a float32 score that passes `limit`
    passes this."""
    return np.float32(limit - abs(limit) * 2.0**-22)


@njit(cache=True, nogil=True)
def _byte_product_pass(codes, half_sq, begin, end, weight, dims, out, packed, limit, found):
    """`_lead_pass` by VNNI byte products: the weights in one signed byte each (w_d ~ scale w8_d, scale 1/127 of
    the largest |w_d|), the codes' dot products 64 bytes an instruction, 16 keys at a time (codes: uint8 [groups,
    keys + 16, 4], code + 128, four axes a word; half_sq and out have room for 16 past the last key). The scores are
    off by at most 127 sum_d |w_d - scale w8_d| more than the float32 scan's (a code is at most 127 in size)."""
    scale, error, total = _weights_in_bytes(weight, dims, packed)
    weights_off = 127.0 * error
    first_limit = _float32_below(limit - weights_off)
    passing = _byte_product_run(out, codes, begin, end - begin, codes.shape[0], packed, scale, np.int32(128 * total),
                                half_sq, first_limit, found)
    return weights_off, passing


def _lead_pass(codes, half_sq, begin, end, weight, dims, out, packed, limit, found):
    """The scores of the keys at positions begin:end over the leading axes into out[:end - begin] (as
    `_shell_scores`), then the indices of those that pass `limit` into found, in order: returns what the scores are off
    by beyond the float32 scan's and how many were found. The limit is lowered by that error and moved below its
    float32 rounding, so that a score that passes the float64 limit is found. By VNNI byte products where the codes
    are laid out for them (uint8, 3-d), else in float32 (off by no more)."""


@overload(_lead_pass, jit_options={"nogil": True})
def _lead_pass_for(codes, half_sq, begin, end, weight, dims, out, packed, limit, found):
    if codes.ndim == 3:
        return lambda codes, half_sq, begin, end, weight, dims, out, packed, limit, found: _byte_product_pass(
            codes, half_sq, begin, end, weight, dims, out, packed, limit, found)

    def in_float32(codes, half_sq, begin, end, weight, dims, out, packed, limit, found):
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
        return 0.0, passing

    return in_float32


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
                half_sq_lead, half_sq_rest, lead, order, start, radius, centroids_axes, centroid_sq, weight, scores,
                packed, found):
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
    # |q - k|^2 = |q - c_j|^2 - 2 score, and over the leading dimensions alone, |q - k|^2 >= lead_sq - 2 score_lead:
    # only a key whose leading score is within the error of beating the best is scored over the rest, and only
    # one whose whole score is within it is compared in float64, from its float32 key
    rounding = 4.0 * (dim + 2) * 2.0**-24 * (terms + (centre + reach) ** 2) + moved * (2.0 * centre + reach + moved)
    # the keys that pass the first limit, then those, in order, each against the limits as they are then (which
    # only rise)
    weights_off, passing = _lead_pass(codes, half_sq_lead, begin, end, weight, lead, scores, packed,
                                      0.5 * (lead_sq - best_d2) - coded_lead - rounding, found)
    coded_lead += weights_off
    coded += weights_off
    limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
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
                d2 = _squared_distance(keys, key_row, q)
                if d2 < best_d2:
                    best, best_d2 = key_row, d2
                    limit_lead = 0.5 * (lead_sq - best_d2) - coded_lead - rounding
                    limit = 0.5 * (to_cell - best_d2) - coded - rounding
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
    weight = np.zeros(dim + 16, np.float32)  # 16 more: the byte products read weights 16 at a time
    largest_cell = 1
    for j in range(cells):
        largest_cell = max(largest_cell, start[j + 1] - start[j])
    # made once: an array returned by each scan cost a reference count (16 past the largest cell: the byte
    # products write whole blocks of 16)
    scores = np.empty(largest_cell + 16, np.float32)
    packed = np.zeros(dim + 16, np.int32)
    found = np.empty(largest_cell + 16, np.int32)  # the positions in a run whose scores pass the first limit
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
                                          lead, order, start, radius, centroids_axes, centroid_sq, weight, scores,
                                          packed, found)
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
                                                  centroids_axes, centroid_sq, weight, scores, packed, found)
    return best
