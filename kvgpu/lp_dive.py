"""Better placements from the configuration LP: a dive on its configurations.

The configuration LP of :mod:`kvgpu.lp_bound` at a target ``T`` covers the items with GPU
configurations (sets of items that fit one GPU at ``T``), fractionally.  Where the search's
answer stays above the LP bound, that fractional cover is a guide to a better packing (issue
17): the **dive** solves the LP at ``T`` to its optimum, fixes the configuration of largest value
``x_c`` on one concrete GPU of its class (and every other configuration the LP already uses
whole, ``x_c >= 1``, that is disjoint from it), removes those items and GPUs, and solves the
residual LP again, until every item is placed, no GPU is left, or the residual LP no longer
covers the items at ``T``.  Every configuration fits its GPU at ``T``, so a dive that places
everything reaches max KVPR ``<= T``.

The LP does not see every rule; the dive keeps them as it fixes:

* **tensor-parallel groups inside one node**: a shard whose replica already has a shard placed
  may only use the free GPUs of that node (the residual problem's allowed GPUs say so, so the
  residual LP's classes split by node); a configuration that starts a replica goes to the node
  with the fewest free GPUs that still has the GPUs and the memory at ``T`` for the other shards
  of every replica begun there (best fit keeps whole nodes for the widest replicas), and the
  replica is finished there at once (:func:`_finish_replicas`);
* **co-location**: a configuration holding an adapter without a shard of its base is not fixed;
* **pins, forbidden GPUs, GPUs out of service**: the problem's allowed GPUs, which the LP sees.

What the dive leaves (the residual LP proves it cannot cover it at ``T``, or no configuration
can be fixed) is placed greedily where each item raises the KVPR least, whole replicas inside
the node where their worst shard is least (:func:`complete`); the engine's search
(:func:`kvgpu.kernels.search.improve_instance`) then runs on the whole problem from there,
nothing pinned, and again after whole tp replicas are moved to other nodes (alone or swapped
with the single-GPU models they displace) and swapped between nodes (:func:`polish`,
:mod:`kvgpu.node_moves`: moves no single search step makes).  :func:`improve` first polishes
the search's own placement that way, then dives.  Every result is checked against every rule
in Python (:func:`kvgpu.rule_check.rule_breach`) and kept only when its max KVPR is below the
search's.  Re-placements are not dived (the LP does
not see the migration budget).  The dive is deterministic: ties go to the first column, node
and GPU.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from kvgpu.kernels.deltas import fits, safe_div_array
from kvgpu.lp_bound import FIT_SLACK, column_generation, gpu_classes
from kvgpu.node_moves import move_replicas, swap_replicas
from kvgpu.problem import Instance, Problem
from kvgpu.rule_check import kvpr_of, rule_breach

#: Targets of the dives, as shares of the way from the LP bound to the search's answer.
DIVE_SHARES = (0.35, 0.5)
#: Column-generation rounds of one residual LP of the dive.
DIVE_ROUNDS = 15
#: Most rounds of node-level moves and search in :func:`polish`.
POLISH_ROUNDS = 3
#: Times a dive raises its target where the residual LP refutes it.
RAISES = 3
#: A configuration used at least this much (of one GPU) counts as whole.
WHOLE = 1.0 - 1e-6


def _residual(problem: Problem, assign: np.ndarray, free: np.ndarray) -> tuple[Problem, np.ndarray, np.ndarray]:
    """The problem of the items not placed (``assign < 0``) on the ``free`` (G,) bool GPUs:
    ``(sub-problem, item ids, GPU ids)``.  A shard whose replica has a shard placed may use only
    the free GPUs of that node."""
    left, gpus = np.nonzero(assign < 0)[0], np.nonzero(free)[0]
    inst = problem.items
    n, G = inst.n_models, problem.n_gpus
    allowed = problem.allowed.astype(bool) if problem.allowed.shape[0] else np.ones((n, G), bool)
    if problem.node_group.shape[0]:
        for i in left.tolist():
            ng = problem.node_group[i]
            mates = (problem.node_group == ng) & (assign >= 0) if ng >= 0 else None
            if mates is not None and mates.any():
                allowed[i] &= problem.node_of == problem.node_of[assign[np.argmax(mates)]]
    sub_items = Instance(inst.sizes[left], inst.demand[left], inst.gpu_mem[gpus])
    group = problem.group[left] if problem.group.shape[0] else problem.group
    sub = replace(problem, items=sub_items, allowed=allowed[left][:, gpus].astype(np.uint8), group=group,
                  node_group=problem.node_group[:0], coloc=problem.coloc[:0], cur=problem.cur[:0], running=())
    return sub, left, gpus


def _pick_gpu(problem: Problem, assign: np.ndarray, free: np.ndarray, items: np.ndarray,
              candidates: np.ndarray, load: np.ndarray) -> int:
    """A free GPU of ``candidates`` for the configuration ``items`` (global ids), or -1: the
    rules the LP does not see (an adapter needs its base's shard in the configuration; a
    replica started here needs room in the node for its other shards, best fit by node)."""
    if problem.coloc.shape[0]:
        for i in items.tolist():
            b = problem.coloc[i]
            if b >= 0 and not (problem.group[items] == b).any():
                return -1
    cand = candidates[free[candidates]]
    if not problem.node_group.shape[0] or cand.size == 0:
        return int(cand[0]) if cand.size else -1
    best, best_key = -1, None
    for g in cand.tolist():
        if _node_room(problem, assign, free, items, g, load):
            key = (int((free & (problem.node_of == problem.node_of[g])).sum()), int(problem.node_of[g]), g)
            if best_key is None or key < best_key:
                best, best_key = g, key
    return best


def _node_room(problem: Problem, assign: np.ndarray, free: np.ndarray, items: np.ndarray, g: int,
               load: np.ndarray) -> bool:
    """With ``items`` on GPU ``g``, does each of their replicas stay in one node, and does every
    replica with shards in ``g``'s node and shards left still find enough free GPUs there
    (distinct ones, allowed to every shard left, with memory for their ``load`` (n,) GB at the
    dive's target in all)?"""
    nd = problem.node_of[g]
    for i in items.tolist():  # a replica with shards placed elsewhere: not here
        mates = (problem.node_group == problem.node_group[i]) & (assign >= 0)
        if problem.node_group[i] >= 0 and (problem.node_of[assign[mates]] != nd).any():
            return False
    room = free & (problem.node_of == nd)
    room[g] = False
    trial = assign.copy()
    trial[items] = g
    placed = trial >= 0
    here = placed & (problem.node_group >= 0)
    here[here] = problem.node_of[trial[here]] == nd
    owed = np.zeros(trial.shape[0], bool)  # the shards left of the replicas begun here
    for ng in np.unique(problem.node_group[here]).tolist():
        rest = np.nonzero((problem.node_group == ng) & ~placed)[0]
        owed[rest] = True
        if rest.size:
            usable = room & problem.allowed[rest].astype(bool).all(axis=0) if problem.allowed.shape[0] else room
            if int(usable.sum()) < rest.size:
                return False
    return bool(load[owed].sum() <= problem.items.gpu_mem[room].sum() * (1 + FIT_SLACK))


def _carried(columns: list, cls, left: np.ndarray) -> list:
    """The configurations of the last residual LP (``columns``: (GB of its class, global item
    ids)) whose items are all still left, as columns of the new residual's classes ``cls``
    (same memory, every item allowed): its warm start."""
    pos = np.full(int(left.max()) + 1 if left.size else 0, -1, np.int64)
    pos[left] = np.arange(left.size)
    out, seen = [], set()
    for mem, items in columns:
        if items.max() >= pos.size or (pos[items] < 0).any():
            continue
        local = pos[items]
        for k in range(cls.mem.shape[0]):
            key = (k, tuple(local.tolist()))
            if cls.mem[k] == mem and cls.allowed[k][local].all() and key not in seen:
                seen.add(key)
                out.append((k, local))
    return out


def _finish_replicas(problem: Problem, assign: np.ndarray, free: np.ndarray, ranked: list,
                     load: np.ndarray) -> None:
    """Place the shards left of every replica begun (in place): each by the LP's configuration
    of largest value that holds it and fits a free GPU of the replica's node, else alone on the
    first free GPU there that may hold it, topped up first fit (by load at the target, ``load``
    (n,) GB) with single-GPU items.  Stops where a shard finds no free GPU in its node (what is
    left goes to the repair).  ``ranked``: (item ids, candidate GPUs, value) by value."""
    ng = problem.node_group
    if not ng.shape[0]:
        return
    while True:
        begun = np.unique(ng[(assign >= 0) & (ng >= 0)])
        owed = np.nonzero((assign < 0) & np.isin(ng, begun) & (ng >= 0))[0]
        if not owed.size:
            return
        i = int(owed[0])
        for items, cand, _ in ranked:
            if i in items and not (assign[items] >= 0).any():
                g = _pick_gpu(problem, assign, free, items, cand, load)
                if g >= 0:
                    assign[items], free[g] = g, False
                    break
        else:
            if not _alone_in_node(problem, assign, free, i, load):
                return


def _alone_in_node(problem: Problem, assign: np.ndarray, free: np.ndarray, i: int, load: np.ndarray) -> bool:
    """Item ``i`` on the first free GPU of its replica's node that may hold it, topped up first
    fit with the shards other replicas begun in that node still need, then single-GPU items,
    each by decreasing ``load``; False when there is no such GPU."""
    mate = np.nonzero((problem.node_group == problem.node_group[i]) & (assign >= 0))[0][0]
    ok = free & (problem.node_of == problem.node_of[assign[mate]])
    if problem.allowed.shape[0]:
        ok &= problem.allowed[i].astype(bool)
    ok &= load[i] <= problem.items.gpu_mem * (1 + FIT_SLACK)
    if not ok.any():
        return False
    g = int(np.argmax(ok))
    assign[i], free[g] = g, False
    room = problem.items.gpu_mem[g] * (1 + FIT_SLACK) - load[i]
    groups = {int(problem.group[i])} if problem.group.shape[0] else set()
    ng = problem.node_group
    here = (assign >= 0) & (ng >= 0)
    here[here] = problem.node_of[assign[here]] == problem.node_of[g]
    owed = (assign < 0) & np.isin(ng, ng[here]) & (ng >= 0)  # shards other replicas here still need
    for j in np.lexsort((-load, ~owed)).tolist():
        fit = assign[j] < 0 and (owed[j] or ng[j] < 0) and load[j] <= room
        grp = int(problem.group[j]) if problem.group.shape[0] else -1
        if fit and (grp < 0 or grp not in groups) and (not problem.allowed.shape[0] or problem.allowed[j, g]) \
                and not (problem.coloc.shape[0] and problem.coloc[j] >= 0):
            assign[j] = g
            room -= load[j]
            if grp >= 0:
                groups.add(grp)
    return True


def dive(problem: Problem, T: float, *, ceiling: float | None = None, rounds: int = DIVE_ROUNDS) -> np.ndarray:
    """The dive at target ``T`` (module doc): ``assign`` (n,) int64, -1 for the items it left.
    Where the residual LP proves it cannot cover the items left at ``T`` (or no configuration
    can be fixed), the target rises half way to ``ceiling`` (at most :data:`RAISES` times; the
    configurations fixed so far fit the higher target too); without ``ceiling`` the dive stops
    there.  The residual LPs need not reach their optimum (``rounds`` rounds of pricing each,
    warm started from the last one's configurations): their solution is only a guide."""
    n, G = problem.items.n_models, problem.n_gpus
    assign = np.full(n, -1, np.int64)
    free = np.ones(G, bool)
    columns: list = []  # (GB, global item ids) of the last residual LP
    raises = 0
    while (assign < 0).any() and free.any():
        load = problem.items.sizes + problem.items.demand / T
        if _dive_step(problem, T, assign, free, columns, load, rounds):
            continue
        if ceiling is None or raises >= RAISES or not T < ceiling:
            break
        T, raises = T + 0.5 * (ceiling - T), raises + 1
    return assign


def _dive_step(problem: Problem, T: float, assign: np.ndarray, free: np.ndarray, columns: list, load: np.ndarray,
               rounds: int) -> bool:
    """One step of :func:`dive` (``assign``, ``free`` and ``columns`` updated in place): the
    residual LP at ``T``, then its configuration of largest value and every whole one
    disjoint from it fixed, each replica they begin finished in its node.  False when nothing
    was fixed (the residual LP refutes ``T``, or no configuration fits a free GPU)."""
    sub, left, gpus = _residual(problem, assign, free)
    cls = gpu_classes(sub)
    st = column_generation(sub, T, _carried(columns, cls, left), rounds=rounds, to_optimum=True)
    if st.proven or st.x.size != len(st.columns):
        return False
    columns[:] = [(float(cls.mem[k]), left[c]) for k, c in st.columns]
    ranked = [(left[st.columns[j][1]], gpus[cls.gpus[st.columns[j][0]]], float(st.x[j]))
              for j in np.argsort(-st.x, kind="stable").tolist() if st.x[j] > 1e-9]
    fixed_any = False
    for items, cand, x in ranked:
        if fixed_any and x < WHOLE:
            break
        if (assign[items] >= 0).any():
            continue
        g = _pick_gpu(problem, assign, free, items, cand, load)
        if g < 0:
            continue
        assign[items], free[g] = g, False
        fixed_any = True
        _finish_replicas(problem, assign, free, ranked, load)
    return fixed_any


def _best_gpu(problem: Problem, assign: np.ndarray, i: int, gpus: np.ndarray) -> tuple[int, float]:
    """The GPU of ``gpus`` where item ``i`` raises the KVPR least, keeping memory, its allowed
    GPUs, its model's other items apart and an adapter beside its base: ``(gpu, its KVPR
    then)``, ``(-1, inf)`` for none."""
    inst = problem.items
    on = assign >= 0
    S = np.bincount(assign[on], weights=inst.sizes[on], minlength=problem.n_gpus)
    W = np.bincount(assign[on], weights=inst.demand[on], minlength=problem.n_gpus)
    ok = np.zeros(problem.n_gpus, bool)
    ok[gpus] = True
    ok &= fits(S + inst.sizes[i], inst.gpu_mem)
    if problem.allowed.shape[0]:
        ok &= problem.allowed[i].astype(bool)
    if problem.group.shape[0] and problem.group[i] >= 0:
        ok[assign[on & (problem.group == problem.group[i])]] = False
    if problem.coloc.shape[0] and problem.coloc[i] >= 0:
        beside = np.zeros(problem.n_gpus, bool)
        beside[assign[on & (problem.group == problem.coloc[i])]] = True
        ok &= beside
    if not ok.any():
        return -1, math.inf
    kv = np.where(ok, safe_div_array(W + inst.demand[i], inst.gpu_mem - S - inst.sizes[i], np), math.inf)
    g = int(np.argmin(kv))
    return g, float(kv[g])


def _greedy_finish(problem: Problem, assign: np.ndarray) -> np.ndarray | None:
    """The items the dive left, placed greedily where each raises the KVPR least (whole
    replicas by the node where their worst shard is least; adapters after their bases): a
    complete placement keeping the rules (not the target), or None when some item finds no
    GPU."""
    a = assign.copy()
    ng = problem.node_group if problem.node_group.shape[0] else np.full(a.shape[0], -1, np.int64)
    coloc = problem.coloc if problem.coloc.shape[0] else np.full(a.shape[0], -1, np.int64)
    units: dict = {}  # replica (or lone item) -> its items left
    for i in np.nonzero(a < 0)[0].tolist():
        units.setdefault(("r", int(ng[i])) if ng[i] >= 0 else ("i", i), []).append(i)
    order = sorted(units.values(), key=lambda u: (coloc[u[0]] >= 0, -problem.items.sizes[u].sum(), u[0]))
    every = np.arange(problem.n_gpus)
    for items in order:
        if ng[items[0]] < 0:
            g, _ = _best_gpu(problem, a, items[0], every)
            if g < 0:
                return None
            a[items[0]] = g
            continue
        mates = (ng == ng[items[0]]) & (a >= 0)
        nodes = np.unique(problem.node_of[a[mates]]) if mates.any() else np.unique(problem.node_of)
        best, best_kv = None, math.inf
        for nd in nodes.tolist():
            trial, worst, gpus = a.copy(), 0.0, np.nonzero(problem.node_of == nd)[0]
            for i in items:
                g, k = _best_gpu(problem, trial, i, gpus)
                if g < 0:
                    worst = math.inf
                    break
                trial[i], worst = g, max(worst, k)
            if worst < best_kv:
                best, best_kv = trial, worst
        if best is None:
            return None
        a = best
    return a


def complete(problem: Problem, assign: np.ndarray, lb: float, effort: int, seed: int) -> np.ndarray | None:
    """The dive's partial placement completed (:func:`_greedy_finish`) and polished on the whole
    problem, nothing pinned (:func:`polish`: the engine's search, node-level moves).  None when
    the greedy finish finds no GPU for some item, or its placement breaks a rule."""
    a = _greedy_finish(problem, assign)
    if a is None or rule_breach(problem, a) is not None:
        return None
    return polish(problem, a, lb, effort, seed)


def _search(problem: Problem, a: np.ndarray, lb: float, effort: int, seed: int) -> None:
    """``effort`` rounds of the engine's search from ``a`` (n,) int64, in place."""
    from kvgpu.kernels import search
    from kvgpu.warmup import ensure

    if effort:
        ensure(["search"])
        inst = problem.items
        p = np.arange(inst.n_models, dtype=np.int64)
        search.improve_instance(inst.sizes, inst.demand, inst.gpu_mem, lb, a, p, effort,
                                search.default_patience(effort), seed, problem.kernel_rules())


def polish(problem: Problem, assign: np.ndarray, lb: float, effort: int, seed: int, *,
           searched: bool = False) -> np.ndarray:
    """The engine's search from ``assign`` (n,) int64 (a placement keeping the rules; skipped
    when ``searched``: it comes from the search already), then rounds of node-level moves
    (:func:`kvgpu.node_moves.move_replicas`, then :func:`kvgpu.node_moves.swap_replicas`) and
    the search again, while a round lowers the max KVPR (:data:`POLISH_ROUNDS` at most): a new
    array."""
    a = assign.copy()
    if not searched:
        _search(problem, a, lb, effort, seed)
    for _ in range(POLISH_ROUNDS):
        b = swap_replicas(problem, move_replicas(problem, a))
        if (b == a).all():
            break
        _search(problem, b, lb, effort, seed)
        if rule_breach(problem, b) is not None or not kvpr_of(problem, b).max() < kvpr_of(problem, a).max():
            break
        a = b
    return a


def improve(problem: Problem, assign: np.ndarray, lb: float, *, effort: int, seed: int = 0,
            shares=DIVE_SHARES) -> np.ndarray | None:
    """Node-level moves from ``assign`` (n,) int64 (the search's placement, keeping the rules;
    :func:`polish`), then dives at the targets ``shares`` of the way from the bound ``lb`` to the
    best max KVPR so far, each completed and searched (:func:`complete`), every candidate
    checked against every rule: the best placement whose max KVPR is below that of ``assign``,
    or None (none found, or a re-placement, whose budget the dive does not see)."""
    if problem.is_replan or problem.items.n_models == 0:
        return None
    best = float(kvpr_of(problem, assign).max())
    if not (math.isfinite(best) and math.isfinite(lb)) or best <= lb:
        return None
    out = None
    if problem.node_group.shape[0]:  # node-level moves from the search's own placement first
        a = polish(problem, assign, lb, effort, seed, searched=True)
        if rule_breach(problem, a) is None and kvpr_of(problem, a).max() < best:
            best, out = float(kvpr_of(problem, a).max()), a
    for share in shares:
        T = lb + share * (best - lb)
        a = complete(problem, dive(problem, T, ceiling=best), lb, effort, seed)
        if a is None or rule_breach(problem, a) is not None:
            continue
        mx = float(kvpr_of(problem, a).max())
        if mx < best:
            best, out = mx, a
    return out
