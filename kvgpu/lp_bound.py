"""A lower bound from the configuration LP: column generation inside a bisection on the target.

At a target ``T`` every GPU's KVPR is at most ``T`` iff each GPU's items fit its memory as
*loads* ``a_i = s_i + w_i / T`` -- a bin packing.  The closed-form and bin-packing bounds of
:mod:`kvgpu.bounds` relax that packing item by item (volume, Martello-Toth L2); on clusters
whose items pack lumpily (tensor-parallel shards, a few big models per GPU) they stay far below
the optimum, and the gap measures the bound rather than the answer.  The **configuration LP**
(Gilmore-Gomory) sees whole GPUs: a *configuration* of a GPU class is a set of items that fit one
of its GPUs together (loads within memory, at most one shard or replica of each model: the
anti-affinity rule, and only items the class's GPUs are allowed to hold: pins, forbidden GPUs,
GPUs out of service), and the LP

    min t   subject to   sum_c [i in c] x_c >= 1       for every item i        (duals pi_i)
                         sum_{c of class k} x_c <= t G_k   for every class k  (duals rho_k)
                         x >= 0

has ``t <= 1`` whenever a placement at ``T`` exists.  Column generation adds the configuration of
largest dual value ``V_k = max_c sum_{i in c} pi_i`` of each class (a 0-1 knapsack with one item
per group, :func:`knapsack`, solved exactly by branch and bound).  Whatever the LP's progress,
``(pi, V) / sum_k G_k V_k`` is a feasible dual solution (Farley's bound), so
``sum pi / sum_k G_k V_k > 1`` *proves* that no placement reaches ``T``: the optimum is above
``T``.  Only a proof moves the bisection's lower end, so the bound is valid whether or not the
column generation converged; a knapsack stopped by its node limit contributes its upper bound
(larger ``V``, a weaker but still valid bound).

What the LP does not see -- tensor-parallel groups inside one node, co-location, the migration
budget of a re-placement -- only removes placements, so ignoring it keeps the bound valid (a
bound for re-placements is one on every placement, budget or not).  Solved with HiGHS (highspy),
one model per target whose columns grow, each solve warm-started from the last basis.

Source: P. C. Gilmore and R. E. Gomory, "A linear programming approach to the cutting-stock
problem", Operations Research 9 (1961); A. A. Farley, "A note on bounding a class of linear
programming problems, including cutting stock problems", Operations Research 38 (1990).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numba
import numpy as np

from kvgpu.problem import Problem

#: Capacity units of a GPU in the pricing knapsack (loads rounded down to them).
UNITS = 16384
#: Where the columns stall short of a proof, pricing goes on with this many times more units.
FINER = 8
#: Columns generated at one target before it counts as not proven.
MAX_ROUNDS = 300
#: Targets tried by the bisection (the probe included).
BISECTION_STEPS = 10
#: The probe where the midpoint is not proven: this share of the way from the bound to the answer.
PROBE = 1 / 16
#: Farley's ratio must exceed 1 by this much for a proof (the LP solver's own tolerances are
#: about 1e-9 on duals of order 1; the margin keeps their rounding from proving anything).
PROOF_MARGIN = 1e-6
#: Loads within this share of a GPU's memory above it still fit a configuration (a relaxation:
#: never misses a configuration that the engines' own memory check accepts).
FIT_SLACK = 1e-9


@numba.njit(cache=True)
def knapsack(profit, units, starts, cap, choice, dp):
    """Best set of items within ``cap`` capacity units, at most one item of each group: a
    multiple-choice 0-1 knapsack by dynamic programming over the capacity.

    Parameters
    ----------
    profit : (m,) float64 -- value of each item (the LP's duals).
    units : (m,) int64 -- each item's load in capacity units, rounded *down* by the caller, so
        that every set that fits in GB fits in units: the optimum here is an upper bound on the
        optimum in GB (and equal to it when the loads are whole units).
    starts : (q+1,) int64 -- items are ordered by group, group ``j`` being items
        ``starts[j]:starts[j+1]`` (an item with no group is a group of its own).
    cap : int -- the capacity in units.
    choice : (q, cap+1) int32 -- working memory: the item chosen per group and capacity, -1 none.
    dp : (2, cap+1) float64 -- working memory.

    Returns
    -------
    (value, take) : float, (m,) bool -- the optimum (over unit loads) and one set attaining it.
    """
    q = starts.shape[0] - 1
    cur, nxt = 0, 1
    for c in range(cap + 1):
        dp[cur, c] = 0.0
    for j in range(q):
        for c in range(cap + 1):
            best = dp[cur, c]
            pick = -1
            for i in range(starts[j], starts[j + 1]):
                u = units[i]
                if u <= c:
                    v = dp[cur, c - u] + profit[i]
                    if v > best:
                        best = v
                        pick = i
            dp[nxt, c] = best
            choice[j, c] = pick
        cur, nxt = nxt, cur
    take = np.zeros(profit.shape[0], np.bool_)
    c = cap
    for j in range(q - 1, -1, -1):
        i = choice[j, c]
        if i >= 0:
            take[i] = True
            c -= units[i]
    return dp[cur, cap], take


@dataclass
class GPUClasses:
    """The GPU classes the LP sees: GPUs with the same memory and the same allowed items.

    Attributes
    ----------
    mem : (K,) float64 -- each class's usable memory, GB.
    count : (K,) float64 -- GPUs in each class.
    allowed : list of (n,) bool -- the items each class's GPUs may hold.
    gpus : list of (count,) int64 -- each class's GPU ids.
    """

    mem: np.ndarray
    count: np.ndarray
    allowed: list = field(default_factory=list)
    gpus: list = field(default_factory=list)


def gpu_classes(problem: Problem) -> GPUClasses:
    """The problem's GPU classes (:class:`GPUClasses`), in the order of their first GPU."""
    mem = problem.items.gpu_mem
    n, G = problem.items.n_models, problem.n_gpus
    allowed = problem.allowed
    keys: dict = {}
    for g in range(G):
        col = allowed[:, g].tobytes() if allowed.shape[0] else b""
        keys.setdefault((float(mem[g]), col), []).append(g)
    out = GPUClasses(np.array([k[0] for k in keys]), np.array([len(v) for v in keys.values()], float))
    for (m, col), gs in keys.items():
        out.allowed.append(allowed[:, gs[0]].astype(bool) if allowed.shape[0] else np.ones(n, bool))
        out.gpus.append(np.array(gs, np.int64))
    return out


def _groups(problem: Problem) -> np.ndarray:
    n = problem.items.n_models
    g = problem.group if problem.group.shape[0] else np.full(n, -1, np.int64)
    ids = {v: i for i, v in enumerate(sorted(set(g.tolist()) - {-1}))}
    return np.array([ids.get(v, -1) for v in g.tolist()], np.int64)


def _price(pi, load, groups, cls: GPUClasses, k: int, units: int = 0):
    """The best configuration of class ``k`` at duals ``pi``: ``(items, upper)`` -- a set that
    fits (possibly empty) and an upper bound on the best value of any configuration.  Loads are
    counted in :data:`UNITS` units of the GPU's memory: rounded down for the bound (every set
    that fits in GB fits in those units), rounded up for the set (which then fits in GB)."""
    cap_gb = cls.mem[k] * (1 + FIT_SLACK)
    ok = cls.allowed[k] & (pi > 1e-12) & (load <= cap_gb)
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        return idx, 0.0
    order = idx[np.argsort(groups[idx], kind="stable")]
    g = groups[order]
    # one group per model with several items, one per item otherwise
    new = np.ones(order.size, bool)
    new[1:] = (g[1:] != g[:-1]) | (g[1:] < 0)
    starts = np.append(np.nonzero(new)[0], order.size).astype(np.int64)
    units = units or UNITS
    scaled = load[order] / cap_gb * units
    choice = np.empty((starts.size - 1, units + 1), np.int32)
    dp = np.empty((2, units + 1))
    upper, _ = knapsack(pi[order], np.floor(scaled).astype(np.int64), starts, units, choice, dp)
    # loads rounded up: a set that surely fits in GB (the column; close to the bound's set)
    _, take = knapsack(pi[order], np.ceil(scaled).astype(np.int64), starts, units, choice, dp)
    return np.sort(order[take]), float(upper)


def _greedy_cover(order, load, groups, cls: GPUClasses, k: int) -> list:
    """Configurations of class ``k`` that together hold every item of ``order`` allowed there:
    first fit in the given order (a packing's GPUs, each one a configuration)."""
    cap = cls.mem[k] * (1 + FIT_SLACK)
    bins: list = []  # [room, set of groups, items]
    for i in order.tolist():
        if not cls.allowed[k][i] or load[i] > cap:
            continue
        for b in bins:
            if load[i] <= b[0] and (groups[i] < 0 or groups[i] not in b[1]):
                b[0] -= load[i]
                b[1].add(groups[i])
                b[2].append(i)
                break
        else:
            bins.append([cap - load[i], {groups[i]}, [i]])
    return [np.array(sorted(b[2]), np.int64) for b in bins]


@dataclass
class LPState:
    """The configuration LP at one target after column generation (:func:`column_generation`).

    Attributes
    ----------
    proven : bool -- Farley's bound (or an item that fits no GPU) proves the target unreachable.
    t : float -- the restricted master's value (``inf`` when not solved); ``t <= 1``: the
        configurations cover every item fractionally within the GPUs of each class.
    classes : the GPU classes (``mem`` (K,) GB, ``count`` (K,), ``allowed`` per class (n,) bool).
    columns : list of (class, (c,) int64 item ids) -- every configuration of the master.
    x : (len(columns),) float64 -- each configuration's value in the master's solution (how
        many GPUs of its class it would fill, fractionally); empty when not solved.
    """

    proven: bool
    t: float
    classes: GPUClasses
    columns: list
    x: np.ndarray


def _seed_columns(load, groups, cls: GPUClasses, cols: list) -> bool:
    """Filter ``cols`` in place to the configurations that still fit at these loads, add every
    item alone wherever it may go (the LP stays feasible) and a first-fit-decreasing cover of
    each class.  False when some item fits no GPU (no placement exists)."""
    n, K = load.shape[0], cls.mem.shape[0]
    fits = [(k, c) for k, c in cols if load[c].sum() <= cls.mem[k] * (1 + FIT_SLACK)]
    have = {(k, tuple(c.tolist())) for k, c in fits}
    for i in range(n):
        homes = [k for k in range(K) if cls.allowed[k][i] and load[i] <= cls.mem[k] * (1 + FIT_SLACK)]
        if not homes:
            return False
        for k in homes:
            if (k, (i,)) not in have:
                have.add((k, (i,)))
                fits.append((k, np.array([i], np.int64)))
    cols[:] = fits
    for k in range(K):  # first fit decreasing by load: a cover of the items at this target
        for c in _greedy_cover(np.argsort(-load, kind="stable"), load, groups, cls, k):
            if (k, tuple(c.tolist())) not in have:
                have.add((k, tuple(c.tolist())))
                cols.append((k, c))
    return True


def column_generation(problem: Problem, T: float, columns: list | None = None, *, rounds: int = MAX_ROUNDS,
                      to_optimum: bool = False) -> LPState:
    """Column generation for the configuration LP at target ``T`` (module doc).

    ``columns``: a list of ``(class, item indices)`` kept between calls (configurations found at
    a lower target still fit at a higher one; the list is filtered and extended in place).
    Stops at a proof, or -- unless ``to_optimum`` -- as soon as the master's value is at most 1
    (the target is not refuted), or when no column improves, or after ``rounds`` rounds.
    ``to_optimum=True`` goes on pricing to the LP's optimum: the solution then guides a dive
    (:mod:`kvgpu.lp_dive`)."""
    inst = problem.items
    load = inst.sizes + inst.demand / T
    cls = gpu_classes(problem)
    groups = _groups(problem)
    n, K = inst.n_models, cls.mem.shape[0]
    cols = [] if columns is None else columns
    if not _seed_columns(load, groups, cls, cols):
        return LPState(True, math.inf, cls, cols, np.empty(0))
    have = {(k, tuple(c.tolist())) for k, c in cols}
    lp = Master(n, cls.count)
    for k, c in cols:
        lp.add(k, c)
    t = math.inf
    units = UNITS
    for _ in range(rounds):
        t, pi, rho = lp.solve()
        if t is None:
            return LPState(False, math.inf, cls, cols, np.empty(0))
        if t <= 1.0 + PROOF_MARGIN and not to_optimum:  # the LP's optimum is at most t, and Farley's
            break                                       # bound at most that: no proof can come
        V = np.empty(K)
        added = False
        dense = np.argsort(-pi / np.maximum(load, 1e-300), kind="stable")
        for k in range(K):
            items, upper = _price(pi, load, groups, cls, k, units)
            V[k] = upper
            # the best configuration, and a first-fit cover in the order of dual value per GB
            # (many columns a round: one a round converges far too slowly)
            for c in [items] + _greedy_cover(dense, load, groups, cls, k):
                if c.size and pi[c].sum() > rho[k] * (1 + 1e-9) + 1e-12:
                    key = (k, tuple(c.tolist()))
                    if key not in have:
                        have.add(key)
                        cols.append((k, c))
                        lp.add(k, c)
                        added = True
        denom = float(cls.count @ V)
        if denom > 0 and pi.sum() / denom > 1 + PROOF_MARGIN:
            return LPState(True, t, cls, cols, np.empty(0))
        if not added:
            if to_optimum or units >= UNITS * FINER:
                break
            # no new column, yet the bound stays below the LP's value: the knapsack's rounding
            # (loads floored to units) overstates V; price again on a finer grid
            units = UNITS * FINER
    else:
        t, _, _ = lp.solve()
        t = math.inf if t is None else t
    return LPState(False, t, cls, cols, lp.values())


def impossible_at(problem: Problem, T: float, columns: list | None = None, *, rounds: int = MAX_ROUNDS) -> bool:
    """Does the configuration LP prove that no placement has max KVPR <= ``T``?

    ``columns``: a list of ``(class, item indices)`` kept between calls (configurations found at
    a lower target still fit at a higher one; the list is filtered and extended in place).
    Returns True only on a proof (Farley's bound above 1, or an item that fits no GPU)."""
    return column_generation(problem, T, columns, rounds=rounds).proven


_BANNER_SHOWN = False


def _new_highs(highspy):
    """A HiGHS model.  The first one of a process prints HiGHS's banner on the C-level standard
    output, before any option can be set: that line would land in ``--json`` output and in
    users' programs, so file descriptor 1 points at the null device while it is made."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _BANNER_SHOWN = True
    return h


class Master:
    """The restricted master LP (module doc), kept in one HiGHS model: columns are added and
    each solve starts from the last basis (warm start), which is what makes column generation
    affordable."""

    def __init__(self, n: int, count: np.ndarray):
        import highspy

        self.n, self.K = n, count.shape[0]
        h = _new_highs(highspy)
        h.setOptionValue("output_flag", False)
        inf = highspy.kHighsInf
        for _ in range(n):  # item i covered: sum x_c >= 1
            h.addRow(1.0, inf, 0, np.empty(0, np.int32), np.empty(0))
        for _ in range(self.K):  # class k: sum x_c - G_k t <= 0
            h.addRow(-inf, 0.0, 0, np.empty(0, np.int32), np.empty(0))
        h.addCol(1.0, 0.0, inf, self.K, (n + np.arange(self.K)).astype(np.int32), -count.astype(float))
        self.h, self.inf = h, inf

    def add(self, k: int, items: np.ndarray) -> None:
        idx = np.append(items, self.n + k).astype(np.int32)
        self.h.addCol(0.0, 0.0, self.inf, idx.size, idx, np.ones(idx.size))

    def values(self) -> np.ndarray:
        """(columns,) float64: each configuration's value in the last solution, in the order
        they were added (the column of ``t`` left out)."""
        return np.asarray(self.h.getSolution().col_value)[1:].copy()

    def solve(self):
        """``(t, pi, rho)``: the LP's value and duals (``pi`` >= 0 of the items, ``rho`` >= 0 of
        the classes); ``(None, None, None)`` when HiGHS does not end optimal."""
        import highspy

        self.h.run()
        if self.h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None, None, None
        dual = np.asarray(self.h.getSolution().row_dual)
        t = self.h.getInfo().objective_function_value
        return t, np.maximum(dual[:self.n], 0.0), np.maximum(-dual[self.n:], 0.0)


def node_conflict_at(problem: Problem, T: float) -> bool:
    """A node-level proof that no placement reaches ``T``, which the GPU configurations do not
    see: two tp replicas kept inside one node (widths ``k1``, ``k2``) whose widths add up to more
    than any node's GPUs must share a GPU if they share a node, so where their shards' loads at
    ``T`` (``s + w / T``) also add up to more than any GPU's memory, they sit in different
    nodes.  A set of replicas that pairwise conflict so (found greedily, heaviest first) needs
    one node each, of at least the smallest width's GPUs: more of them than such nodes proves
    ``T`` unreachable.  Ignoring pins and forbidden GPUs only adds placements, so a proof holds."""
    ng = problem.node_group
    if not ng.shape[0] or not (ng >= 0).any():
        return False
    inst = problem.items
    load = inst.sizes + inst.demand / T
    ids, first, width = np.unique(ng[ng >= 0], return_index=True, return_counts=True)
    first = np.nonzero(ng >= 0)[0][first]
    node_size = np.bincount(problem.node_of)
    n_max, m_max = int(node_size.max()), float(inst.gpu_mem.max()) * (1 + FIT_SLACK)
    clique: list = []
    for r in np.argsort(-load[first], kind="stable").tolist():
        if all(width[r] + width[c] > n_max and load[first[r]] + load[first[c]] > m_max for c in clique):
            clique.append(r)
    if len(clique) < 2:
        return False
    return len(clique) > int((node_size >= width[clique].min()).sum())


def configuration_bracket(problem: Problem, lo: float, hi: float, *, steps: int = BISECTION_STEPS,
                          rounds: int = MAX_ROUNDS, columns: list | None = None) -> tuple[float, float]:
    """The bisection of :func:`configuration_bound`: ``(proven, top)`` -- the largest target
    the configuration LP (or the node-level test :func:`node_conflict_at`) proves unreachable
    (at least ``lo``) and the smallest one tried that it does not refute (``hi`` when none).
    ``columns``: as in :func:`column_generation` (filled with every configuration found)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or lo <= 0:
        return lo, hi
    cols: list = [] if columns is None else columns

    def refuted(T):
        return node_conflict_at(problem, T) or impossible_at(problem, T, cols, rounds=rounds)

    proven, top = lo, hi
    for step in range(steps):
        T = 0.5 * (proven + top)
        if refuted(T):
            proven = T
        else:
            top = T
            if step == 0:  # where the midpoint stands, a probe just above lo decides whether to go on
                T = lo + PROBE * (hi - lo)
                if not refuted(T):
                    return lo, top
                proven = T
        if top - proven <= 1e-4 * top:
            break
    return proven, top


def configuration_bound(problem: Problem, lo: float, hi: float, *, steps: int = BISECTION_STEPS,
                        rounds: int = MAX_ROUNDS) -> float:
    """The largest target the configuration LP proves unreachable, by bisection in
    ``[lo, hi]`` (``lo`` a bound already proven, ``hi`` a max KVPR achieved): a lower bound on
    the max KVPR, at least ``lo``.  Where the midpoint is not proven, a probe just above ``lo``
    (:data:`PROBE` of the way) decides whether to go on: where the LP sees no more than the
    closed-form bounds (plain clusters of continuous sizes, mostly) the search ends after two
    targets.  Configurations found at one target are kept for the next (those that still fit)."""
    return configuration_bracket(problem, lo, hi, steps=steps, rounds=rounds)[0]
