"""Big clusters by decomposition: groups solved as one batch, then a repair between them.

A search over a whole cluster costs about ``G^2`` (every step scans all models and GPUs, and
the steps needed grow with the cluster); a cluster of ``G`` GPUs split into groups of
:data:`GROUP_GPUS` is a batch of small instances, which the batch engines solve side by side.
:func:`solve` runs three stages:

1. **Partition** (:func:`partition`).  GPUs are dealt to the groups largest memory first, round
   robin, so every group holds the same mix of memories.  At a target ``T`` (the lower bound) a
   GPU's KVPR is at most ``T`` iff its *load* ``S + W / T`` fits its memory, so the models are
   dealt largest load ``s + w / T`` first, each to the group with the most memory left above its
   load (longest processing time first): every group's load is then within one small model of
   its share, and each group's fluid bound ``W_g / (M_g - S_g)`` is close to the global one.
2. **Groups as one batch**: the seed pipeline of the chosen backend on all groups at once (the
   numba backend runs one group per CPU thread; with an executor on Dask, groups are tasks).  A
   group that the seed's packings cannot fill makes the partition coarser (a new partition into
   half as many groups) until every group packs.
3. **Repair between groups**: a bisection on a target ``T`` between the lower bound and the
   max KVPR.  A round *draws lanes* of about :data:`LANE_GPUS` GPUs -- the GPUs above ``T``
   spread over the lanes at random, each lane filled with GPUs that have the most room at ``T``,
   from any group -- and runs the repair search of :mod:`kvgpu.kernels.search` at ``T`` on all
   lanes as one batch (:func:`kvgpu.kernels.fleet.repair_batch`).  A lane that reaches ``T``
   keeps its placement, one that does not is left as it was, so no round makes the cluster
   worse.  New draws follow while the GPUs above ``T`` get fewer; a target that stays stuck for
   :data:`REDRAWS` draws becomes the bisection's lower end, one reached its upper end.
   No bisection starts from an infinite max: where the groups' seeds left a GPU with no KV
   memory (nearly full clusters), the targets are first the largest finite KVPR, :data:`GROW`
   times higher after each miss, until every GPU has room (:func:`_feasible_target`).  A GPU
   still full after the repair is counted in the :class:`Report`; the caller then solves the
   cluster whole (:mod:`kvgpu.engine`), so a decomposition is never less feasible.

The work is counted in targets (``effort`` of them, at most), never in seconds, so the same
``seed`` gives the same placement on every machine and with or without Dask.  Memory is
``O(N + G)``: lanes and groups are padded to their own sizes, never ``N x G``.

The constants were chosen on the fleet benchmark (``bench/bench_scale.py``: uniform 10-30 GB
models 92% full, the LLM-size mix, and mixed 40/80/141 GB GPUs), 2 CPU cores: groups of 32 GPUs
keep a group's seed pipeline near 20 ms; lanes of 8-16 GPUs stalled 0.35-1% above the bound on
1,024 GPUs, lanes of 128 reach 0.15-0.25%; 300 tabu steps a lane, doubled at each draw without
progress, cost a fifth of a fixed 1,000 (5.6 against 44 CPU-seconds on 1,024 uniform GPUs) at
the same gap on uniform clusters, 0.20% against 0.14% on mixed memories.  Below :data:`AUTO_GPUS`
GPUs the whole-cluster search is kept: there it is fast enough and a little closer to the bound
on uniform clusters (256 GPUs: 0.17% whole, 0.22% decomposed).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from kvgpu.batch.state import Batch
from kvgpu.kernels.deltas import safe_div_array
from kvgpu.errors import InvalidInstance, NoPlacementFound

#: GPUs per group of the partition.
GROUP_GPUS = 32
#: GPUs per lane of the repair between groups; tabu steps of a lane's repair at a target's first
#: draw, doubled after each draw that leaves as many GPUs above the target (cheap where a target
#: is easy, more search where it is hard).
LANE_GPUS, LANE_STEPS = 128, 300
#: ``decompose=None`` decomposes plain clusters of at least this many GPUs (and 2 groups).
AUTO_GPUS = 512
#: Draws at one target without fewer GPUs above it before the target counts as unreachable.
REDRAWS = 3
#: Most draws at one target (each with fewer GPUs above it than the last).
MAX_DRAWS = 12
#: While a GPU is full, a target not reached is followed by one this many times higher.
GROW = 2.0
#: Each target is this share of the way from the max KVPR down to the bisection's lower end.
STEP = 0.5
#: The bisection stops once the max KVPR is within this relative distance of its lower end.
STOP_GAP = 5e-4


def chosen(n_gpus: int, decompose: bool | None) -> bool:
    """Is a plain cluster of ``n_gpus`` GPUs decomposed (``decompose``: True, False or None for
    automatic, :data:`AUTO_GPUS` GPUs and up)?"""
    if decompose is None:
        return n_gpus >= AUTO_GPUS
    return bool(decompose) and n_gpus >= 2


def check(decompose, *, mode: str, dask: bool = False) -> None:
    """Refuse ``decompose=True`` -- or a Dask executor, which only runs decompositions -- where no
    decomposition can run: mode 'seed' (raises :class:`kvgpu.InvalidInstance`).  Clusters with
    rules are decomposed by :mod:`kvgpu.decompose_rules`, which checks what it refuses."""
    if decompose is not None and not isinstance(decompose, (bool, np.bool_)):
        raise InvalidInstance(f"decompose: must be True, False or None (automatic), got {decompose!r}")
    if dask and (decompose is False or mode == "seed"):
        why = "decompose=False (--decompose off)" if decompose is False else "mode 'seed'"
        raise InvalidInstance(f"dask (--dask, --dask-local) runs the group solves of a decomposed cluster; with {why} "
                              f"nothing is decomposed (drop dask)")
    if decompose and mode == "seed":
        raise InvalidInstance("decompose (--decompose on) splits the search of a big cluster; mode 'seed' runs the "
                              "seed pipeline on the whole cluster (drop one of them)")


# ----------------------------------------------------------------------------- executors

class LocalExecutor:
    """Runs the batches of a decomposition in this process (numba threads over the lanes)."""

    name = "local"

    def map(self, fn, chunks: list) -> list:
        return [fn(*c) for c in chunks]

    def chunks(self, B: int) -> int:
        return 1


class DaskExecutor:
    """Runs the batches of a decomposition as tasks on a ``dask.distributed.Client``: each batch
    is cut into about two chunks a worker, in order, so results are the local run's."""

    name = "dask"

    def __init__(self, client):
        self.client = client

    def map(self, fn, chunks: list) -> list:
        futures = [self.client.submit(fn, *c, pure=False) for c in chunks]
        return self.client.gather(futures)

    def chunks(self, B: int) -> int:
        workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        return max(1, min(B, 2 * workers))


def executor(dask=None):
    """The executor for ``dask``: None (here) or a ``dask.distributed.Client`` (the caller's, who
    closes it; ``kvgpu.sweep.dask_client`` makes one for an address or a LocalCluster)."""
    if dask is None:
        return LocalExecutor()
    if not hasattr(dask, "submit") or not hasattr(dask, "gather") or not hasattr(dask, "scheduler_info"):
        raise InvalidInstance(f"dask: give a dask.distributed.Client (e.g. Client('tcp://HOST:PORT')), got "
                              f"{type(dask).__name__}")
    return DaskExecutor(dask)


def _split(B: int, parts: int) -> list[slice]:
    edges = np.linspace(0, B, parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


# ----------------------------------------------------------------------------- stage 1

def partition(sizes, demand, gpu_mem, T: float, n_groups: int):
    """Groups of GPUs and of models (module doc, stage 1).

    Parameters
    ----------
    sizes, demand : (n,) float64 -- GB and ``req_rate / slo``.
    gpu_mem : (G,) float64, GB.
    T : float -- the target the loads are balanced at (a lower bound on the max KVPR), > 0.
    n_groups : int -- number of groups, 1..G.

    Returns
    -------
    gpu_group : (G,) int64 and model_group : (n,) int64 -- the group of each GPU and model.
    """
    G = gpu_mem.shape[0]
    gpu_group = np.empty(G, np.int64)
    gpu_group[np.argsort(-gpu_mem, kind="stable")] = np.arange(G) % n_groups
    room = np.bincount(gpu_group, weights=gpu_mem, minlength=n_groups)
    load = sizes + demand / T
    model_group = np.empty(sizes.shape[0], np.int64)
    heap = [(-room[k], k) for k in range(n_groups)]  # most room first; ties: lower group id
    heapq.heapify(heap)
    for i in np.argsort(-load, kind="stable"):
        r, k = heapq.heappop(heap)
        model_group[i] = k
        heapq.heappush(heap, (r + load[i], k))
    return gpu_group, model_group


def _members(group: np.ndarray, K: int):
    """``(order, start)``: the ids of each group ``k`` are ``order[start[k]:start[k + 1]]``,
    ascending."""
    order = np.argsort(group, kind="stable")
    start = np.zeros(K + 1, np.int64)
    np.cumsum(np.bincount(group, minlength=K), out=start[1:])
    return order, start


def _lanes(model_lane, gpu_lane, D, s, w, M, assign, pos):
    """Padded batch arrays of ``D`` lanes: ``(sizes, demand, gpu_mem, n_models, n_gpus, a, p,
    model ids (order, start), GPU ids (order, start))`` with lane-local GPU ids in ``a``.
    Models with ``model_lane < 0`` are in no lane."""
    g_lane = np.where(gpu_lane >= 0, gpu_lane, D)  # lane D: in no lane
    gorder, gstart = _members(g_lane, D + 1)
    morder, mstart = _members(np.where(model_lane >= 0, model_lane, D), D + 1)
    n_gpus, n_models = np.diff(gstart)[:D], np.diff(mstart)[:D]
    N, Gl = max(1, int(n_models.max())), max(1, int(n_gpus.max()))
    local = np.empty(M.shape[0], np.int64)
    local[gorder] = np.arange(gorder.shape[0]) - gstart[g_lane[gorder]]
    sz, dm = np.zeros((D, N)), np.zeros((D, N))
    a, p = np.full((D, N), -1, np.int64), np.full((D, N), -1, np.int64)
    mem = np.zeros((D, Gl))
    m = morder[:mstart[D]]
    lane, slot = model_lane[m], np.arange(m.shape[0]) - mstart[model_lane[m]]
    sz[lane, slot], dm[lane, slot] = s[m], w[m]
    a[lane, slot], p[lane, slot] = local[assign[m]], pos[m]
    g = gorder[:gstart[D]]
    mem[gpu_lane[g], np.arange(g.shape[0]) - gstart[gpu_lane[g]]] = M[g]
    return sz, dm, mem, n_models.astype(np.int64), n_gpus.astype(np.int64), a, p, (morder, mstart), (gorder, gstart)


def _scatter(lanes, a, p, models, gpus, assign, pos) -> None:
    """Write the placements of ``lanes`` (their rows of ``a``/``p``, lane-local GPU ids) into the
    cluster's ``assign``/``pos`` (n,); ``models``/``gpus``: the ``(order, start)`` of :func:`_lanes`."""
    (morder, mstart), (gorder, gstart) = models, gpus
    for d in lanes:
        m = morder[mstart[d]:mstart[d + 1]]
        assign[m] = gorder[gstart[d] + a[d, :m.shape[0]]]
        pos[m] = p[d, :m.shape[0]]


def seed_groups(sizes, demand, gpu_mem, n_models, n_gpus, backend: str):
    """The seed pipeline on a chunk of groups (compacted lanes): ``(assign, pos, ok)``, each
    lane's GPU ids local; ``ok`` False where the seed's packings fit nothing.  A task function
    (module level, so Dask can ship it)."""
    from kvgpu import backends

    B, N = sizes.shape
    G = gpu_mem.shape[1]
    mmask = np.arange(N)[None, :] < n_models[:, None]
    gmask = np.arange(G)[None, :] < n_gpus[:, None]
    batch = Batch(sizes, demand, mmask, gpu_mem, gmask)
    ok = np.ones(B, bool)
    try:
        a, p = backends.solve_seed(batch, backend)
    except NoPlacementFound as e:
        ok[np.asarray(e.instances, dtype=np.int64)] = False
        a = np.full((B, N), -1, np.int64)
        p = np.full((B, N), -1, np.int64)
        good = np.nonzero(ok)[0]
        if good.size:
            a[good], p[good] = backends.solve_seed(batch.take(good), backend)
    return a, p, ok


def repair_lanes(sizes, demand, gpu_mem, n_models, n_gpus, T, seeds, assign, pos, steps):
    """:func:`kvgpu.kernels.fleet.repair_batch` with ``steps`` tabu steps on a chunk of lanes:
    ``(assign, pos, ok)``.  A task function (module level, so Dask can ship it)."""
    from kvgpu.kernels.fleet import repair_batch

    a, p = assign.copy(), pos.copy()
    ok = np.zeros(sizes.shape[0], np.bool_)
    repair_batch(sizes, demand, gpu_mem, n_models, n_gpus, T, int(steps), seeds, a, p, ok)
    return a, p, ok


def _run(ex, fn, arrays: tuple, extra: tuple = ()):
    """``fn`` over the lanes of ``arrays`` (leading axis B) in the executor's chunks, results
    concatenated in lane order."""
    B = arrays[0].shape[0]
    parts = [tuple(x[sl] for x in arrays) + extra for sl in _split(B, ex.chunks(B))]
    outs = ex.map(fn, parts)
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(len(outs[0])))


def _start(s, w, M, T: float, backend: str, ex):
    """Stage 1 and 2: ``(assign, pos, groups)`` of the first partition whose groups all pack,
    coarser after each failure; None when even two groups do not."""
    G = M.shape[0]
    K = max(2, G // GROUP_GPUS)
    while K >= 2:
        gpu_group, model_group = partition(s, w, M, T, K)
        zeros = np.zeros(s.shape[0], np.int64)
        sz, dm, mem, nm, ng, _, _, (morder, mstart), (gorder, gstart) = _lanes(
            model_group, gpu_group, K, s, w, M, zeros, zeros)
        a, p, ok = _run(ex, seed_groups, (sz, dm, mem, nm, ng), (backend,))
        if ok.all():
            assign = np.empty(s.shape[0], np.int64)
            pos = np.empty(s.shape[0], np.int64)
            _scatter(range(K), a, p, (morder, mstart), (gorder, gstart), assign, pos)
            return assign, pos, K
        K //= 2
    return None


# ----------------------------------------------------------------------------- stage 3

def _kvpr(s, w, M, assign):
    """``(S, W, KVPR)`` (G,) of a placement (sizes and demands summed by GPU)."""
    G = M.shape[0]
    S = np.bincount(assign, weights=s, minlength=G)
    W = np.bincount(assign, weights=w, minlength=G)
    return S, W, safe_div_array(W, M - S, np)


def _dense(pos) -> None:
    """Renumber the list stamps ``pos`` (n,) 0..n-1 in place, keeping their order."""
    pos[np.argsort(pos, kind="stable")] = np.arange(pos.shape[0])


def _draw(kv, room, T, rng):
    """Lanes of a round: ``(gpu_lane (G,), D)``; -1 for GPUs in no lane (module doc)."""
    G = kv.shape[0]
    hot = np.nonzero(kv > T)[0]
    cold = np.nonzero(kv <= T)[0]
    cold = cold[np.argsort(-room[cold], kind="stable")]
    D = max(1, min(hot.shape[0], G // LANE_GPUS))
    per = -(-hot.shape[0] // D)
    take = cold[:max(0, D * (LANE_GPUS - per))]
    gpu_lane = np.full(G, -1, np.int64)
    gpu_lane[rng.permutation(hot)] = np.arange(hot.shape[0]) % D
    gpu_lane[rng.permutation(take)] = np.arange(take.shape[0]) % D
    return gpu_lane, D


@dataclass
class Report:
    """What a decomposition did: ``groups`` of the partition, draws and targets of the repair."""

    groups: int
    draws: int = 0
    targets: int = 0
    #: GPUs left with no KV memory (KVPR inf) after the repair: the caller falls back (module doc).
    full_gpus: int = 0


def _reach(s, w, M, assign, pos, T: float, rng, ex, report: Report) -> bool:
    """Draws of lanes at the target ``T`` (module doc, stage 3), in place on ``assign``/``pos``:
    True once every GPU is at KVPR <= ``T``; False after :data:`REDRAWS` draws without fewer
    GPUs above it, or :data:`MAX_DRAWS` in all.  No draw makes a GPU worse than ``T`` or its
    own KVPR before."""
    stuck, steps = 0, LANE_STEPS
    for _ in range(MAX_DRAWS):
        S, W, kv = _kvpr(s, w, M, assign)
        hot = int((kv > T).sum())
        if hot == 0:
            return True
        gpu_lane, D = _draw(kv, M - S - W / T, T, rng)
        model_lane = gpu_lane[assign]
        sz, dm, mem, nm, ng, a, p, (morder, mstart), (gorder, gstart) = _lanes(
            model_lane, gpu_lane, D, s, w, M, assign, pos)
        seeds = rng.integers(0, 2 ** 62, D, dtype=np.int64)
        a, p, ok = _run(ex, repair_lanes, (sz, dm, mem, nm, ng, np.full(D, T), seeds, a, p), (steps,))
        report.draws += 1
        _scatter(np.nonzero(ok)[0], a, p, (morder, mstart), (gorder, gstart), assign, pos)
        _dense(pos)  # a GPU's models are in one lane: their order is the lane's
        after = int((_kvpr(s, w, M, assign)[2] > T).sum())
        if after == 0:
            return True
        if after < hot:
            stuck = 0
        else:
            stuck, steps = stuck + 1, 2 * steps
            if stuck >= REDRAWS:
                return False
    return False


def _feasible_target(kv, lb: float, failed: float) -> float:
    """The next target while some GPU is full (KVPR inf): the largest finite KVPR (every other
    GPU already meets it, so the lanes only have to give the full GPUs room), at least the
    bound, and :data:`GROW` times the last target that was not reached.  ``kv`` (G,)."""
    finite = kv[np.isfinite(kv)]
    top = float(finite.max()) if finite.size else 0.0
    return max(top, lb, GROW * failed, np.finfo(float).tiny)


def _repair(s, w, M, assign, pos, lb: float, effort: int, patience: int, seed: int, ex, report: Report):
    """Stage 3, in place on ``assign``/``pos`` (module doc).  While a GPU is full (the groups'
    seeds can leave some with no KV memory at all), the targets are :func:`_feasible_target`'s
    (a bisection from an infinite max has no midpoint); they count against ``effort``, not
    ``patience``."""
    rng = np.random.default_rng(seed)
    U = float(_kvpr(s, w, M, assign)[2].max())
    lo = lb
    since_gain = 0
    cycle_gain = False  # a lower max since the bisection last started from the bound
    failed = 0.0  # the last target not reached while a GPU was full
    for _ in range(effort):
        if math.isinf(U):
            T = _feasible_target(_kvpr(s, w, M, assign)[2], lb, failed)
            report.targets += 1
            if not _reach(s, w, M, assign, pos, T, rng, ex, report):
                failed = T
            U = float(_kvpr(s, w, M, assign)[2].max())
            continue
        if U <= lb * (1 + STOP_GAP) or since_gain >= patience:
            break
        if U - lo <= STOP_GAP * U:  # converged: start again from the bound with new draws, if it paid
            if not cycle_gain:
                break
            lo, cycle_gain = lb, False
        T = max(lb, U - STEP * (U - lo))
        report.targets += 1
        reached = _reach(s, w, M, assign, pos, T, rng, ex, report)
        new_U = float(_kvpr(s, w, M, assign)[2].max())
        since_gain = 0 if new_U < U else since_gain + 1
        cycle_gain = cycle_gain or new_U < U
        U = new_U
        if not reached:
            lo = T


def solve(sizes, demand, gpu_mem, lb: float, *, backend: str, effort: int, patience: int, seed: int, ex=None):
    """Place one plain cluster by decomposition (module doc).

    Parameters
    ----------
    sizes, demand : (n,) float64 -- GB and ``req_rate / slo`` per model.
    gpu_mem : (G,) float64 -- GB per GPU.
    lb : float -- a proven lower bound on the max KVPR (> 0 for a useful partition).
    backend : str -- concrete backend of the groups' seed pipeline (``numpy``, ``numba``, ``cuda``).
    effort, patience, seed : int -- targets of the repair at most; targets without a lower max
        KVPR before it stops; its random stream.
    ex : LocalExecutor | DaskExecutor -- where the batches run (:func:`executor`; default local).

    Returns
    -------
    ``(assign (n,) int64, pos (n,) int64, Report)``, or None when no partition into two or more
    groups packs with the seed's packings (the caller then solves the cluster whole, as it does
    when ``Report.full_gpus`` GPUs are left with no KV memory).
    """
    ex = ex or LocalExecutor()
    s = np.ascontiguousarray(sizes, dtype=np.float64)
    w = np.ascontiguousarray(demand, dtype=np.float64)
    M = np.ascontiguousarray(gpu_mem, dtype=np.float64)
    T = lb if lb > 0 and np.isfinite(lb) else 1.0
    started = _start(s, w, M, T, backend, ex)
    if started is None:
        return None
    assign, pos, K = started
    report = Report(groups=K)
    if effort > 0:
        _repair(s, w, M, assign, pos, lb, effort, patience, seed, ex, report)
    report.full_gpus = int(np.isinf(_kvpr(s, w, M, assign)[2]).sum())
    return assign, pos, report
