"""The seed pipeline for a whole batch (SPEC.md steps 1-5), lanes in parallel.

Per instance: the search for ``T`` (seven packing variants per test as lanes),
54 parametric packs, regret insertion and two memory packs as lanes, all
candidates improved together, the best selected by the score tuple, then
``refine_peak`` and the polishing ``improve_local``.
"""

from __future__ import annotations

import numpy as np

from kvgpu.batch import bounds as bb
from kvgpu.batch import local
from kvgpu.batch.array_engine import ArrayEngine, engine_for
from kvgpu.batch.arrays import argsort_stable, quiet_fp, unique_rows
from kvgpu.batch.pack import pack_lanes, regret_insertion
from kvgpu.batch.state import Batch, score
from kvgpu.kernels.params import (BEST_FIT, DUAL_MOST_FREE_SHARE, FEAS_ORDERING, FEAS_POLICY, FIRST_FIT, MOST_FREE,
                                   SIZE_ORDER, T_FACTORS)
from kvgpu.errors import NoPlacementFound

LAZY_MIN_LANES = 128


def feasible(batch: Batch, T, engine: ArrayEngine | None = None):
    """Per lane: does any of the seven packing variants pack at ``T`` (L,)?

    Wide batches run the variants lazily in the seed's order, each only on the lanes that no
    earlier variant packed (the first variant usually decides); narrow batches, where per-step
    overhead dominates, run all seven as parallel lanes.  The answer is the same."""
    xp = batch.xp
    L = batch.shape[0]
    if L < LAZY_MIN_LANES:
        V = len(FEAS_ORDERING)
        lanes = batch.take(xp.repeat(xp.arange(L), V))
        _, _, ok = pack_lanes(lanes, xp.repeat(T, V), xp.tile(xp.asarray(FEAS_ORDERING), L),
                              xp.tile(xp.asarray(FEAS_POLICY), L), engine=engine)
        return ok.reshape(L, V).any(axis=1)
    ok = xp.zeros(L, bool)
    for ordering, policy in zip(FEAS_ORDERING, FEAS_POLICY):
        todo = xp.nonzero(~ok)[0]
        if todo.shape[0] == 0:
            break
        n = todo.shape[0]
        _, _, f = pack_lanes(batch.take(todo), T[todo], xp.full(n, ordering), xp.full(n, policy), engine=engine)
        ok[todo[f]] = True
    return ok


def search_T(batch: Batch, engine: ArrayEngine | None = None):
    """``(T_high (B,), found (B,))``: doubling from the seed's ``low_T``, then 40 bisection steps.

    A bisection step whose midpoint equals an end already tested (the interval is down to one
    float) changes nothing, so it is skipped."""
    xp = batch.xp
    B = batch.shape[0]
    lo = bb.seed_start_bound(batch, bb.mem_prefix(xp, batch.gpu_mem, batch.gpu_mask))
    T = xp.maximum(lo, 1e-9)
    lo_tested = T == lo  # lo is then known infeasible whenever it differs from hi
    hi = xp.full(B, xp.nan)
    found = xp.zeros(B, bool)
    for _ in range(50):
        todo = xp.nonzero(~found)[0]
        if todo.shape[0] == 0:
            break
        f = feasible(batch.take(todo), T[todo], engine)
        hi[todo[f]] = T[todo[f]]
        found[todo[f]] = True
        T[todo[~f]] *= 2
    idx = xp.nonzero(found)[0]
    lo_, hi_, lo_known = lo[idx], hi[idx], lo_tested[idx]
    for _ in range(40):
        mid = (lo_ + hi_) / 2
        test = xp.nonzero((mid != hi_) & ~((mid == lo_) & lo_known))[0]
        if test.shape[0] == 0:
            break
        f = feasible(batch.take(idx[test]), mid[test], engine)
        hi_[test[f]] = mid[test[f]]
        lo_[test[~f]] = mid[test[~f]]
        lo_known[test[~f]] = True
    hi[idx] = hi_
    return hi, found


def candidates(batch: Batch, engine: ArrayEngine | None = None):
    """All step-1 candidates: ``(inst (C,), assign (C, N), pos (C, N))`` in the seed's order per instance."""
    xp = batch.xp
    B = batch.shape[0]
    n_models = batch.n_models
    T_high, found = search_T(batch, engine)
    fi = xp.nonzero(found)[0]
    nF = fi.shape[0]
    # 54 parametric lanes per instance: T factor, then policy, then ordering
    f_l = xp.tile(xp.repeat(xp.asarray(T_FACTORS), 9), nF)
    pol = xp.tile(xp.repeat(xp.arange(3), 3), 6 * nF)
    ordg = xp.tile(xp.arange(3), 18 * nF)
    inst_p = xp.repeat(fi, 54)
    a_p, p_p, ok_p = pack_lanes(batch.take(inst_p), T_high[inst_p] * f_l, ordg, pol, engine=engine)
    a_r, p_r, ok_r = regret_insertion(batch)
    # memory packs: "dual" (size order, 30% to the most free GPU, the rest best fit) and density
    inst_m = xp.repeat(xp.arange(B), 2)
    ordm = xp.tile(xp.asarray([SIZE_ORDER, 2]), B)
    nmf = xp.where(ordm == SIZE_ORDER, (DUAL_MOST_FREE_SHARE * n_models[inst_m]).astype(xp.int64), 0)
    a_m, p_m, ok_m = pack_lanes(batch.take(inst_m), xp.zeros(2 * B), ordm, xp.full(2 * B, BEST_FIT), nmf, engine)
    inst = xp.concatenate([inst_p, xp.arange(B), inst_m])
    rank = xp.concatenate([xp.tile(xp.arange(54), nF), xp.full(B, 54), 55 + xp.tile(xp.arange(2), B)])
    assign = xp.concatenate([a_p, a_r, a_m])
    pos = xp.concatenate([p_p, p_r, p_m])
    ok = xp.concatenate([ok_p, ok_r, ok_m])
    # fallback where nothing packed: best fit, most free, first fit (size order), first success
    has = xp.zeros(B, bool)
    has[inst[ok]] = True
    missing = xp.nonzero(~has)[0]
    if missing.shape[0]:
        inst_f = xp.repeat(missing, 3)
        polf = xp.tile(xp.asarray([BEST_FIT, MOST_FREE, FIRST_FIT]), missing.shape[0])
        a_f, p_f, ok_f = pack_lanes(batch.take(inst_f), xp.zeros(inst_f.shape[0]),
                                    xp.full(inst_f.shape[0], SIZE_ORDER), polf, engine=engine)
        first = ok_f.reshape(-1, 3)
        first = first & (xp.cumsum(first, axis=1) == 1)
        inst = xp.concatenate([inst, inst_f])
        rank = xp.concatenate([rank, 57 + xp.tile(xp.arange(3), missing.shape[0])])
        assign, pos = xp.concatenate([assign, a_f]), xp.concatenate([pos, p_f])
        ok = xp.concatenate([ok, first.reshape(-1)])
    keep = xp.nonzero(ok)[0]
    srt = argsort_stable(xp, inst[keep] * 64 + rank[keep])
    keep = keep[srt]
    return inst[keep], assign[keep], pos[keep]


def _dedupe(xp, inst, assign, pos):
    """Indices of the first occurrence of each distinct (instance, placement, list order), and the
    map back; improve_local is deterministic, so equal starts give equal results."""
    n = inst.shape[0]
    if xp is not np or n == 0:
        return xp.arange(n), xp.arange(n)
    return unique_rows(np.concatenate([inst[:, None], assign, pos], axis=1).astype(np.int64))


def select(xp, inst, B, scores):
    """Per instance, the first candidate with the smallest score tuple: indices (B,), -1 if none."""
    mx, sc, mean = scores
    perm = xp.arange(inst.shape[0])
    for key in (mean, sc, mx, inst):
        perm = perm[argsort_stable(xp, key[perm])]
    first = xp.ones(perm.shape[0], bool)
    first[1:] = inst[perm][1:] != inst[perm][:-1]
    out = xp.full(B, -1, dtype=xp.int64)
    out[inst[perm][first]] = perm[first]
    return out


@quiet_fp
def seed_pipeline(batch: Batch, trace: dict | None = None, engine: ArrayEngine | None = None):
    """The seed pipeline on every instance of ``batch``: returns ``(assign (B, N), pos (B, N))``.

    ``trace`` receives the score tuples (three (B,) arrays each) after selection, after
    refine_peak and at the end.  ``engine``: see :class:`kvgpu.batch.array_engine.ArrayEngine`
    (None: the plain array code).  Raises ``NoPlacementFound`` naming instances with no candidate.
    """
    engine = engine_for(batch, engine)
    xp = engine.xp
    B = batch.shape[0]
    inst, assign, pos = candidates(batch, engine)
    first, back = _dedupe(xp, inst, assign, pos)
    ub = batch.take(inst[first])
    ua, up = local.improve_local(ub, assign[first], pos[first], 4000, engine)
    assign, pos = ua[back], up[back]
    sc = tuple(x[back] for x in score(ub, ua, up))
    pick = select(xp, inst, B, sc)
    if bool((pick < 0).any()):
        bad = xp.nonzero(pick < 0)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}", bad)
    assign, pos = assign[pick], pos[pick]
    if trace is not None:
        trace["selected"] = tuple(x[pick] for x in sc)
    assign, pos = local.refine_peak(batch, assign, pos, engine=engine)
    if trace is not None:
        trace["after_refine_peak"] = score(batch, assign, pos)
    assign, pos = local.improve_local(batch, assign, pos, 1500, engine)
    if trace is not None:
        trace["final"] = score(batch, assign, pos)
    return assign, pos


def shape_buckets(n_models, n_gpus, min_size: int = 32, growth: float = 1.3):
    """Group instances of similar shape: sort by ``G * N`` and cut where the product has grown
    by ``growth`` since the group's first instance (groups hold at least ``min_size``).
    Returns a list of index arrays (NumPy); padding then costs little inside a group."""
    cost = np.asarray(n_models, dtype=np.int64) * np.asarray(n_gpus, dtype=np.int64)
    order = np.argsort(cost, kind="stable")
    groups, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or (k - start >= min_size and cost[order[k]] > growth * max(cost[order[start]], 1)):
            groups.append(order[start:k])
            start = k
    return groups


def compact(batch: Batch):
    """Move each instance's real models and GPUs to the front and trim the padding.

    Returns ``(trimmed batch, model_perm (B, N'), gpu_perm (B, G'))`` where ``model_perm[b, j]``
    is the original slot of compact model ``j`` (likewise GPUs)."""
    xp = batch.xp
    pm = argsort_stable(xp, ~batch.model_mask)
    pg = argsort_stable(xp, ~batch.gpu_mask)
    n = max(1, int(batch.n_models.max()))
    g = max(1, int(batch.n_gpus.max()))
    pm, pg = pm[:, :n], pg[:, :g]
    t = lambda a, p: xp.take_along_axis(a, p, axis=1)  # noqa: E731
    return (Batch(t(batch.sizes, pm), t(batch.demand, pm), t(batch.model_mask, pm),
                  t(batch.gpu_mem, pg), t(batch.gpu_mask, pg)), pm, pg)


@quiet_fp
def solve_seed(batch: Batch, engine: ArrayEngine | None = None):
    """The seed pipeline on any padded batch, instances grouped by shape so that little work is
    spent on padding; returns ``assign (B, N)`` in the batch's own model and GPU slots (-1 for
    padding) and ``pos (B, N)`` (list order).  ``engine``: see
    :class:`kvgpu.batch.array_engine.ArrayEngine` (None: the plain array code of the batch's
    namespace)."""
    engine = engine_for(batch, engine)
    xp = engine.xp
    B, N, _ = batch.shape
    assign = xp.full((B, N), -1, dtype=xp.int64)
    pos = xp.full((B, N), -1, dtype=xp.int64)
    n_models, n_gpus = batch.n_models, batch.n_gpus
    if xp is not np:
        n_models, n_gpus = n_models.get(), n_gpus.get()
    for idx in shape_buckets(n_models, n_gpus):
        idx = xp.asarray(idx)
        sub, pm, pg = compact(batch.take(idx))
        try:
            a, p = seed_pipeline(sub, engine=engine)
        except NoPlacementFound as e:  # name the instances by their index in ``batch``
            bad = [int(idx[k]) for k in e.instances]
            raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) "
                                   f"{bad[:10]}", bad) from None
        scatter_back(xp, assign, pos, idx, a, p, pm, pg)
    return assign, pos


def scatter_back(xp, assign, pos, idx, a, p, pm, pg):
    """Write results ``a``, ``p`` of the compacted instances ``idx`` (see :func:`compact`) into
    ``assign``/``pos`` in the original model and GPU slots."""
    real = a >= 0
    rows = xp.broadcast_to(idx[:, None], a.shape)[real]
    cols = pm[real]
    assign[rows, cols] = xp.take_along_axis(pg, xp.where(real, a, 0), axis=1)[real]
    pos[rows, cols] = p[real]
