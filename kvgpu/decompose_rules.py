"""Big clusters with rules by decomposition: groups of whole nodes solved apart, then a repair
between pairs of groups.  (Plain clusters: :mod:`kvgpu.decompose`.)

A cluster with tensor-parallel models, replicas, pins, forbidden GPUs, ``node: K``, adapters
or GPUs out of service is solved whole by the rule kernels (:mod:`kvgpu.kernels.start`,
:mod:`kvgpu.kernels.search`), whose steps scan every item and GPU: minutes for 1,024 GPUs.
:func:`solve` splits it, keeping every rule:

1. **Units.**  The items that must land in one group: one replica of a model (its ``tp``
   shards together, so a node group never straddles groups); a base model with every replica
   and all its adapters (``colocate_with``: an adapter may sit beside any replica).  A model's
   replicas are separate units: they need distinct GPUs anyway, and in one group they get them
   there (each group's sub-problem keeps the anti-affinity of the items it holds).
2. **Partition** (:func:`partition`).  Blocks are the cluster's nodes (single GPUs without
   nodes).  A unit whose allowed GPUs are few -- pins, ``node: K``, at most half a group --
   joins the blocks holding them (union-find), so those GPUs end in one group; the components
   are packed, in GPU order, into groups of at least :data:`GROUP_GPUS` GPUs.  The other units
   are dealt largest load ``s + w / T`` first (``T``: the whole problem's lower bound; a GPU
   at KVPR <= ``T`` holds a load <= its memory) to the group with the most memory left among
   those where the unit fits its rules: enough GPUs it may use (forbid, out_of_service) beside
   the items of its model already there, and a node with ``tp`` of them.
3. **Groups** (stage 2): each group's sub-problem (:meth:`kvgpu.problem.Problem.restrict`,
   local GPU ids) is solved by the caller's whole-problem solver with ``effort //``
   :data:`GROUP_SHARE` rounds, as tasks of the executor (:mod:`kvgpu.decompose`: here, or
   Dask); the numba kernels hold the GIL, so here they run one after the other.  A group
   that finds no placement makes the partition coarser (groups twice as big) until every group
   solves; None when even two groups do not.
4. **Repair between groups** (:func:`_repair`): a round takes the group holding the worst GPU
   and the group with the most room (the lowest max KVPR) not yet tried with it, and searches
   their union as one sub-problem (:func:`kvgpu.kernels.search.improve_instance`, whole tp
   groups move between the nodes of both) from the current placement, so no round makes the
   cluster worse; a round that lowers the worst group's max clears its tried partners.
   :data:`REPAIR_ROUNDS` ``x effort`` rounds at most, stopping at the bound or when the worst
   group has been tried with :data:`PARTNERS` partners in a row without a gain.

The constants were chosen on ``tp_cluster`` (nodes of 8, 80% full), 2 shared cores: groups of
16 GPUs with ``2 x effort`` repair rounds reach about the max of groups of 32 with ``effort``
rounds in half the time (1,024 GPUs: 39 s, 0.2173 against 77 s, 0.2156; whole 147 s, 0.2232).

Work is counted in rounds, never seconds, and every random stream comes from ``seed``: the
same seed gives the same placement here and on Dask.  Memory is that of the groups and of the
whole problem's arrays (``O(N + G)``; ``O(N G)`` only where the problem itself holds allowed
rows, i.e. with pins, forbid, ``node`` or out_of_service).

A re-placement (a current placement with its migration budget) is refused with
``decompose=True``: the budget is the whole cluster's, and sharing it between groups is not
done yet; ``decompose=None`` solves it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kvgpu import bounds
from kvgpu.decompose import LocalExecutor
from kvgpu.errors import InvalidInstance, NoPlacementFound
from kvgpu.kernels.deltas import safe_div_array

#: GPUs per group of the partition (at least; a component of pinned nodes may make one bigger).
GROUP_GPUS = 16
#: ``decompose=None`` decomposes rule clusters of at least this many GPUs.
AUTO_GPUS = 256
#: A group's search gets ``effort // GROUP_SHARE`` rounds (at least one); a repair round's
#: search of two groups as many.
GROUP_SHARE = 3
#: Repair rounds: this many times ``effort`` at most.
REPAIR_ROUNDS = 2
#: Partners tried in a row with the worst group without lowering its max before the repair stops.
PARTNERS = 3
#: A repair round's result is kept when it lowers the union's max by this much (relative).
MIN_GAIN = 1e-9
#: The repair stops once the max KVPR is within this relative distance of the bound.
STOP_GAP = 5e-4


def chosen(problem, decompose) -> bool:
    """Is the rule cluster ``problem`` decomposed (``decompose``: True, False or None for
    automatic, :data:`AUTO_GPUS` GPUs and up, never a re-placement)?"""
    if decompose is None:
        return problem.n_gpus >= AUTO_GPUS and not problem.is_replan
    return bool(decompose) and problem.n_gpus >= 2


def check(problem, decompose, dask: bool) -> bool:
    """Whether ``problem`` (with rules) is decomposed; refuses by name what cannot run: a
    re-placement with ``decompose=True``, and a Dask executor with nothing decomposed."""
    if decompose and problem.is_replan:
        raise InvalidInstance("decompose (--decompose on): a re-placement (cur_gpu_id, current=, max_moves, "
                              "max_migrated_gb) is solved whole -- its migration budget is the whole cluster's and "
                              "is not shared between groups yet (drop --decompose)")
    use = chosen(problem, decompose)
    if dask and not use:
        why = ("a re-placement, which is solved whole" if problem.is_replan else
               f"decompose=False (--decompose off)" if decompose is False else
               f"fewer than {AUTO_GPUS} GPUs (pass decompose=True, --decompose on)")
        raise InvalidInstance(f"dask (--dask, --dask-local) runs the group solves of a decomposed cluster; with {why} "
                              f"nothing is decomposed (drop dask)")
    return use


@dataclass
class Report:
    """What a decomposition did: ``groups`` of the partition, repair ``rounds`` run and ``kept``."""

    groups: int
    rounds: int = 0
    kept: int = 0


# ----------------------------------------------------------------------------- units

def units(problem) -> tuple[np.ndarray, np.ndarray]:
    """``(unit_of (n,) int64, model (U,) int64)``: the unit of each item (module doc, 1),
    numbered in order of (model, replica), and each unit's model (an adapter bundle: its base)."""
    mo = problem.model_of
    n = mo.shape[0]
    tp = np.array([s.tp for s in problem.specs], np.int64)
    first = np.searchsorted(mo, mo)
    replica = (np.arange(n) - first) // tp[mo]
    root = mo.copy()
    if problem.coloc.shape[0]:  # a base, its replicas and its adapters: one unit
        adapter = problem.coloc >= 0
        root[adapter] = problem.coloc[adapter]  # the base's group id is its model index
        bundled = np.zeros(len(problem.specs), bool)
        bundled[root[adapter]] = True
        replica = np.where(bundled[root], 0, replica)
    key = root * (int(replica.max(initial=0)) + 1) + replica
    uniq, unit_of = np.unique(key, return_inverse=True)
    return unit_of.astype(np.int64), uniq // (int(replica.max(initial=0)) + 1)


class _Blocks:
    """Union-find over blocks (nodes, or single GPUs)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, xs) -> None:
        r = self.find(int(xs[0]))
        for x in xs[1:]:
            y = self.find(int(x))
            if y != r:
                self.parent[max(y, r)] = min(y, r)
                r = min(y, r)


def _allowed_rows(problem, unit_of, U):
    """``(every, some)`` (U, G) bool: the GPUs every item of a unit may use, and those some item
    may use (its pins); None without allowed rows."""
    if not problem.allowed.shape[0]:
        return None, None
    order = np.argsort(unit_of, kind="stable")  # a unit's items side by side (adapters join their base)
    rows = problem.allowed[order].astype(bool)
    start = np.searchsorted(unit_of[order], np.arange(U))
    return np.logical_and.reduceat(rows, start, axis=0), np.logical_or.reduceat(rows, start, axis=0)


def partition(problem, T: float, group_gpus: int):
    """Groups of GPUs and of units (module doc, 2).

    Parameters
    ----------
    problem : Problem -- with rules, not a re-placement.
    T : float -- the target the loads are balanced at (a lower bound on the max KVPR), > 0.
    group_gpus : int -- GPUs a group holds at least.

    Returns
    -------
    ``(gpu_group (G,) int64, item_group (n,) int64, K)``, or None where a unit fits no group.
    """
    G = problem.n_gpus
    M = problem.items.gpu_mem
    unit_of, unit_model = units(problem)
    U = unit_model.shape[0]
    block = problem.node_of if problem.node_of.shape[0] else np.arange(G, dtype=np.int64)
    rows, some = _allowed_rows(problem, unit_of, U)
    need = np.bincount(unit_of, minlength=U)
    sets = _Blocks(int(block.max()) + 1)
    fixed = np.zeros(U, bool)
    if rows is not None:
        few = some.sum(axis=1) <= group_gpus // 2
        for u in np.nonzero(few)[0].tolist():
            sets.union(np.unique(block[some[u]]))
        fixed = few
    gpu_group = _pack(np.array([sets.find(int(b)) for b in block.tolist()], np.int64), group_gpus)
    K = int(gpu_group.max()) + 1
    load = np.bincount(unit_of, weights=problem.items.sizes + problem.items.demand / T, minlength=U)
    room = np.bincount(gpu_group, weights=M, minlength=K)
    unit_group = np.full(U, -1, np.int64)
    for u in np.nonzero(fixed)[0].tolist():  # their GPUs are in one group
        unit_group[u] = gpu_group[np.argmax(some[u])]
        room[unit_group[u]] -= load[u]
    fit = _Fit(problem, unit_of, unit_model, gpu_group, K)
    for u in np.argsort(-load, kind="stable").tolist():
        if fixed[u]:
            continue
        ok = fit.groups(u, None if rows is None else rows[u], need[u])
        if not ok.any():
            return None
        k = int(np.argmax(np.where(ok, room, -np.inf)))
        unit_group[u] = k
        room[k] -= load[u]
        fit.add(u, k)
    return gpu_group, unit_group[unit_of], K


def _pack(component: np.ndarray, group_gpus: int) -> np.ndarray:
    """Each GPU's group: the components ``component`` (G,) (ids of the union-find roots), in
    order of their first GPU, packed into groups of at least ``group_gpus`` GPUs (a short last
    group joins the one before)."""
    roots, first, count = np.unique(component, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    of_root = np.empty(roots.shape[0], np.int64)
    k, held = 0, 0
    for r in order.tolist():
        of_root[r] = k
        held += int(count[r])
        if held >= group_gpus:
            k, held = k + 1, 0
    if held and k > 0 and held < group_gpus // 2:  # the short last group joins the one before
        of_root[of_root == k] = k - 1
    return of_root[np.searchsorted(roots, component)]


class _Fit:
    """Which groups a unit may go to: GPUs it may use beside its model's items already there,
    and (tp shards in one node) a node with ``tp`` of them."""

    def __init__(self, problem, unit_of, unit_model, gpu_group, K):
        U = unit_model.shape[0]
        self.K, self.gpu_group, self.model = K, gpu_group, unit_model
        self.node_of = problem.node_of if problem.node_of.shape[0] else None
        in_node = np.zeros(U, bool)
        if problem.node_group.shape[0]:  # tp shards that must share a node
            in_node[unit_of[problem.node_group >= 0]] = True
        tp = np.array([s.tp for s in problem.specs], np.int64)
        self.tp = np.where(in_node, tp[unit_model], 1)
        self.landed: dict[int, np.ndarray] = {}  # model -> (K,) items of it already in each group
        self._cache: dict[bytes, tuple] = {}
        self.need = np.bincount(unit_of, minlength=U)
        self.all = self._counts(np.ones(gpu_group.shape[0], bool))

    def _counts(self, row):
        """``(GPUs of row per group, largest node's GPUs of row per group)`` (K,) each."""
        count = np.bincount(self.gpu_group[row], minlength=self.K)
        if self.node_of is None:
            return count, count
        per_node = np.bincount(self.node_of[row], minlength=int(self.node_of.max()) + 1)
        node_group = np.zeros(per_node.shape[0], np.int64)
        node_group[self.node_of] = self.gpu_group
        big = np.zeros(self.K, np.int64)
        np.maximum.at(big, node_group, per_node)
        return count, big

    def groups(self, u: int, row, need: int) -> np.ndarray:
        """(K,) bool: the groups unit ``u`` (``need`` items, GPUs ``row`` (G,) or None: all) fits."""
        if row is None or row.all():
            count, big = self.all
        else:
            key = np.packbits(row).tobytes()
            if key not in self._cache:
                self._cache[key] = self._counts(row)
            count, big = self._cache[key]
        there = self.landed.get(int(self.model[u]), 0)
        return (count >= there + need) & (big >= self.tp[u])

    def add(self, u: int, k: int) -> None:
        m = int(self.model[u])
        self.landed.setdefault(m, np.zeros(self.K, np.int64))[k] += self.need[u]


# ----------------------------------------------------------------------------- stages 2 and 3

def _members(group: np.ndarray, K: int) -> list[np.ndarray]:
    """The ids of each group 0..K-1, ascending."""
    order = np.argsort(group, kind="stable")
    return np.split(order, np.cumsum(np.bincount(group, minlength=K))[:-1])


def _kvpr(problem, assign) -> np.ndarray:
    """(G,) KVPR of a placement."""
    inst = problem.items
    G = problem.n_gpus
    S = np.bincount(assign, weights=inst.sizes, minlength=G)
    W = np.bincount(assign, weights=inst.demand, minlength=G)
    return safe_div_array(W, inst.gpu_mem - S, np)


def _groups(problem, gpu_group, item_group, K, opts, solve_group, ex):
    """Stage 2: every group's sub-problem solved (``solve_group(sub, opts) -> (assign, pos)``
    in local ids, a task of the executor ``ex``); ``(assign, pos)`` (n,) of the whole problem,
    or None when some group finds no placement."""
    gpus, items = _members(gpu_group, K), _members(item_group, K)
    seeds = np.random.default_rng(opts.seed).integers(0, 2 ** 31, K)
    effort = max(1, opts.effort // GROUP_SHARE) if opts.effort else 0
    here = replace(opts, effort=effort, decompose=False, executor=None)  # a task ships no executor
    busy = [k for k in range(K) if items[k].size]  # a group dealt no unit has nothing to solve
    tasks = [(solve_group, problem.restrict(items[k], gpus[k]), replace(here, seed=int(seeds[k]))) for k in busy]
    try:
        outs = ex.map(_group_task, tasks)
    except NoPlacementFound:
        return None
    if any(o is None for o in outs):
        return None
    n = problem.items.n_models
    assign, pos = np.empty(n, np.int64), np.empty(n, np.int64)
    for k, (a, p) in zip(busy, outs):
        assign[items[k]], pos[items[k]] = gpus[k][a], p
    return assign, pos


def _group_task(solve_group, sub, opts):
    """One group's solve (a task: module level, so Dask can ship it); None where it finds none."""
    try:
        return solve_group(sub, opts)
    except NoPlacementFound:
        return None


def _repair(problem, gpu_group, K, assign, pos, lb: float, opts, report: Report) -> None:
    """Stage 3 (module doc), in place on ``assign``/``pos``."""
    from kvgpu.kernels import search

    rng = np.random.default_rng([opts.seed, 1])
    gpus_of = _members(gpu_group, K)
    effort = max(1, opts.effort // GROUP_SHARE)
    patience = min(opts.patience, search.default_patience(effort))
    tried: set = set()
    worst_before = -1
    for _ in range(REPAIR_ROUNDS * opts.effort):
        kv = _kvpr(problem, assign)
        gmax = np.full(K, -np.inf)
        np.maximum.at(gmax, gpu_group, kv)
        worst = int(np.argmax(gmax))
        if gmax[worst] <= lb * (1 + STOP_GAP):
            return
        if worst != worst_before:
            tried, worst_before = set(), worst
        order = [int(k) for k in np.argsort(gmax, kind="stable") if k != worst and int(k) not in tried]
        if not order or len(tried) >= PARTNERS:
            return
        partner = order[0]
        report.rounds += 1
        gpus = np.sort(np.concatenate([gpus_of[worst], gpus_of[partner]]))
        items = np.nonzero(np.isin(gpu_group[assign], (worst, partner)))[0]
        sub = problem.restrict(items, gpus)
        a = np.searchsorted(gpus, assign[items])
        p = np.argsort(np.argsort(pos[items], kind="stable"), kind="stable").astype(np.int64)
        before = float(gmax[worst])
        search.improve_instance(sub.items.sizes, sub.items.demand, sub.items.gpu_mem, lb, a, p, effort, patience,
                                int(rng.integers(0, 2 ** 31)), sub.kernel_rules())
        after = float(_kvpr(sub, a).max())
        if after < before * (1 - MIN_GAIN):
            assign[items], pos[items] = gpus[a], p + int(pos.max()) + 1
            report.kept += 1
            tried = set()
        else:
            tried.add(partner)


def solve(problem, opts, solve_group, ex=None):
    """Place one rule cluster by decomposition (module doc).

    Parameters
    ----------
    problem : Problem -- with rules, not a re-placement.
    opts : kvgpu.engine.Options -- ``effort``, ``patience``, ``seed`` (the groups get
        ``effort // GROUP_SHARE`` rounds and seeds drawn from ``seed``).
    solve_group : callable ``(Problem, Options) -> (assign, pos)`` -- the whole-problem solver a
        group's sub-problem runs (raises :class:`kvgpu.NoPlacementFound` when it finds none);
        module level, for Dask.
    ex : LocalExecutor | DaskExecutor -- where the group solves run (default here).

    Returns
    -------
    ``(assign (n,) int64, pos (n,) int64, Report)``, or None where no partition into two or
    more groups solves (the caller solves the cluster whole).
    """
    if problem.is_replan:
        raise InvalidInstance("a re-placement is not decomposed (its migration budget is the whole cluster's)")
    ex = ex or LocalExecutor()
    T0 = bounds.problem_bound(problem, np.inf)
    T = bounds.problem_bound(problem, 2.0 * T0 + 1e-9) if T0 > 0 else 1.0
    T = T if T > 0 and np.isfinite(T) else 1.0
    size = max(1, min(GROUP_GPUS, problem.n_gpus // 2))  # decompose=True on a small cluster: two groups at least
    while True:
        parts = partition(problem, T, size)
        if parts is None or parts[2] < 2:
            return None
        gpu_group, item_group, K = parts
        placed = _groups(problem, gpu_group, item_group, K, opts, solve_group, ex)
        if placed is not None:
            break
        size *= 2
    assign, pos = placed
    report = Report(groups=K)
    if opts.effort:
        _repair(problem, gpu_group, K, assign, pos, T, opts, report)
    return assign, pos, report
