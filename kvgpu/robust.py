"""One placement for demand that changes: the robust objective over W demand windows.

Demand is given per model and window, ``D`` (n_models, W) request rates (req/s); memory is
the same in every window.  Item ``i`` of model ``m`` (a shard or replica of ``k``) has demand
``w[i, t] = (D[m, t] / slo[m]) / k`` in window ``t`` (:func:`item_demand`), and a placement's
KVPR in window ``t`` on GPU ``g`` is ``L[g, t] / (M[g] - S[g])`` with ``L[g, t]`` the demand of
its items in that window.  The robust objective is the largest of these over every GPU and
every window::

    minimise over placements   max_g max_t  L[g, t] / (M[g] - S[g])

``W = 1`` is today's objective, and :func:`solve_windows` hands it to today's engine
(:func:`kvgpu.engine.solve_problem`), so its answer is today's answer bit for bit.

For ``W > 1`` this module is the engine: the **CPU NumPy engine of the robust objective**.
The numba and CUDA engines (:mod:`kvgpu.kernels`) take one demand per item; they refuse
``W > 1`` by name (``backend="numba"`` / ``"cuda"``), as do the batch entry points.  The search:

* **starts** -- today's engine on scalar summaries of the demand (each item's mean, its peak,
  each of the :data:`BUSY_WINDOWS` busiest windows, and a mix weighting windows by their total
  demand to the power :data:`MIX_POWER`); a greedy that places items (largest vector load
  first) on the GPU where its worst window is lowest; and a bisection on the target ``T`` whose
  feasibility test is a vector packing (first-fit decreasing of the loads ``s + w[:, t] / T`` into
  GPUs of capacity ``M`` in every window, items ordered by their worst window);
* **local search** on the true objective (:func:`_descend`): from the GPU and window attaining
  the max, the best move of one of the worst GPU's items to any other GPU and the best swap with
  any item elsewhere, all evaluated over every window at once ((k, G, W) and (k, n, W) arrays);
  a step is taken only where both GPUs end strictly below the worst GPU's peak (the sorted
  vector of GPU peaks decreases, so it ends); when the worst GPU has none, the same for the next
  :data:`LEX_DEPTH` worst GPUs.  Ties go to the lowest (item, GPU) / (item, item) index, moves
  before swaps.  Then from every start ``ILS_SCALE * effort`` rounds of iterated local search
  (random kicks of the worst GPUs' items, seeded by ``seed``), stopping after
  ``ILS_SCALE * patience`` rounds without gain;
* **proof** -- tiny problems (at most :data:`AUTO_EXACT_ASSIGNMENTS` assignments, or
  ``exact_work`` with ``exact=True``) are enumerated whole (:func:`_enumerate`): the answer is
  then optimal, proven, and the bound is the optimum;
* **lower bound** (:func:`window_bound`) -- the largest of (a) today's bound of each window's
  demand alone (:func:`kvgpu.bounds.lower_bound`, or :func:`kvgpu.bounds.problem_bound` with
  pins/forbid), valid since the robust objective is at least any one window's KVPR; and (b) the
  *pigeonhole pair bound*, which sees the windows together: for a set ``X`` of ``G + 1`` items,
  two of them share a GPU, and a GPU holding items ``i`` and ``j`` has peak at least
  ``v(i, j) = min over GPUs g both may use of max_t (w[i, t] + w[j, t]) / (M[g] - s[i] - s[j])``
  (``inf`` where they cannot share: anti-affinity, no common GPU or no room), so the optimum is
  at least ``min over pairs of X of v(i, j)``.  ``X`` is found greedily (any ``X`` is valid).
  The result's ``bound_source`` says which one the gap measures.

Rules: pins, forbid, ``node: K`` and ``out_of_service`` (the problem's ``allowed`` GPUs),
``tp`` / ``replicas`` (shards on distinct GPUs: ``group``) and tp shards kept inside one node
(``nodes`` / ``gpus_per_node``: ``node_group``; a shard moves alone only inside its node) are
kept by every start, move and swap and by the enumeration; heterogeneous GPUs and ``reserve_gb``
are in ``M``.  Refused by name with ``W > 1``: re-placement (a current placement, ``max_moves``,
``max_migrated_gb``, ``min_gain``) and ``colocate_with``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from kvgpu import backends, bounds, engine
from kvgpu.batch.state import batch_from_instances
from kvgpu.errors import InvalidInstance, NoPlacementFound
from kvgpu.kernels.deltas import fits, safe_div_array
from kvgpu.kernels.params import OPTIMAL_RTOL
from kvgpu.problem import Instance, Problem, with_rates
from kvgpu.results import Placement, json_float

#: Prove problems with at most this many assignments (product over items of their allowed GPUs)
#: by enumerating them, when ``exact=None`` (the default).
AUTO_EXACT_ASSIGNMENTS = 200_000
#: ``exact=True`` enumerates at most ``min(exact_work, EXACT_MAX_ASSIGNMENTS)`` assignments.
EXACT_MAX_ASSIGNMENTS = 5_000_000
#: Scalar starts on each of this many busiest windows (by total demand).
BUSY_WINDOWS = 3
#: The mixed scalar start weights window ``t`` by ``(total demand of t) ** MIX_POWER``.
MIX_POWER = 4.0
#: A step must lower the worst GPU's peak by this relative amount (rounding never loops).
STEP_RTOL = 1e-12
#: The scalar starts search ``effort // START_SHARE`` rounds each (summaries that coincide are
#: solved once, with their rounds together: identical windows get today's ``effort``).
START_SHARE = 6
#: Each start gets ``ILS_SCALE * effort`` rounds of iterated local search, stopping after
#: ``ILS_SCALE * patience`` without gain (measured on a 64-GPU bursty day of 96 windows: 1-3 s a
#: start, against 1.5 s for each scalar start; 150 rounds and patience 40 instead of 30 and 6
#: lowered the best found from some starts by up to 5%).
ILS_SCALE = 4
#: Bisection steps of the vector-packing start.
PACK_STEPS = 24
#: How the result names the engine and the objective.
ENGINE = "numpy (robust over windows)"
OBJECTIVE = "robust: max KVPR over every GPU and every demand window"


# ----------------------------------------------------------------------------- input


def demand_rates(demand, n_models: int) -> np.ndarray:
    """Validate the request rates per window: ``demand`` (n_models, W) (or (n_models,), one
    window), req/s, finite and >= 0.  Returns a float64 (n_models, W) array; raises
    :class:`kvgpu.InvalidInstance` naming the model and window."""
    if hasattr(demand, "columns"):
        raise InvalidInstance("demand: a DataFrame (the long table model, window, req_rate) is read by the demand "
                              "reader; pass its (n_models, W) array of request rates per window here")
    try:
        D = np.asarray(demand, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInstance(f"demand: expected an (n_models, W) array of request rates, got {type(demand).__name__}"
                              f" ({exc})") from None
    if D.ndim == 1:
        D = D[:, None]
    if D.ndim != 2 or D.shape[0] != n_models or D.shape[1] < 1:
        raise InvalidInstance(f"demand: expected shape ({n_models}, W) (one row per model, one column per window, "
                              f"W >= 1), got {D.shape}")
    for bad, rule in ((~np.isfinite(D), "must be finite"), (D < 0, "must be >= 0")):
        if bad.any():
            m, t = (int(v) for v in np.argwhere(bad)[0])
            raise InvalidInstance(f"demand: model {m}, window {t}: the request rate {rule}, got {D[m, t]!r}")
    return D


def one_window_specs(specs: list, demand, what: str) -> list:
    """The specs (:class:`kvgpu.ModelSpec`) with ``req_rate`` from a one-window ``demand``
    (n_models, 1), for the entry points that take one demand per model; W > 1 refused by name."""
    D = demand_rates(demand, len(specs))
    if D.shape[1] > 1:
        raise InvalidInstance(f"{what}: demand over W = {D.shape[1]} windows is not supported yet (one window only); "
                              f"the robust objective over windows runs in kvgpu.solve(models, gpus, demand=D)")
    return [dataclasses.replace(s, req_rate=float(r)) for s, r in zip(specs, D[:, 0].tolist())]


def item_demand(problem: Problem, rates: np.ndarray) -> np.ndarray:
    """(n_items, W) float64: each item's demand per window, ``(rate / slo) / k`` -- the float
    operations of :func:`kvgpu.problem.build_problem` for one rate, window by window."""
    slo = np.array([m.slo for m in problem.specs])
    k = np.array([m.tp * m.replicas for m in problem.specs], float)
    mo = problem.model_of
    return (rates[mo] / slo[mo, None]) / k[mo, None]


def window_kvpr(sizes: np.ndarray, wd: np.ndarray, gpu_mem: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """KVPR per GPU and window, (G, W): ``L[g, t] / (M[g] - S[g])`` (``inf`` where a GPU with
    demand has no memory left, 0 where it has no demand), loads summed in item order."""
    G = gpu_mem.shape[0]
    S = np.bincount(assign, weights=sizes, minlength=G)
    L = np.zeros((G, wd.shape[1]))
    np.add.at(L, assign, wd)
    return safe_div_array(L, (gpu_mem - S)[:, None], np)


def _refuse_rules(problem: Problem) -> None:
    """Rules the robust engine does not keep yet: refused by name, never ignored."""
    why = None
    if problem.is_replan:
        why = "re-placement (a current placement: cur_gpu_id / current=, max_moves, max_migrated_gb, min_gain)"
    elif problem.coloc.shape[0]:
        why = "colocate_with"
    if why:
        raise InvalidInstance(f"demand over W > 1 windows: {why} is not supported by the robust engine yet; solve "
                              f"one window at a time (demand[:, [t]]) or drop the rule")


def _refuse_options(opts: engine.Options, backend: str, objective) -> None:
    """Options that name another engine or order: refused by name with ``W > 1``."""
    if backend in ("numba", "cuda"):
        raise InvalidInstance(f"backend={backend!r}: the {backend} engines take one demand per model; the "
                              f"robust objective over W > 1 windows runs in the CPU NumPy engine (backend='auto' or "
                              f"'numpy')")
    if opts.mode != "search":
        raise InvalidInstance(f"mode={opts.mode!r}: the seed pipeline takes one demand per model; demand over W > 1 "
                              f"windows is solved in mode='search'")
    if opts.decompose:
        raise InvalidInstance("decompose=True: the robust engine over W > 1 windows solves the cluster whole")
    if opts.executor is not None:
        raise InvalidInstance("dask: the robust engine over W > 1 windows runs here, not on a dask cluster")
    if objective is not None:
        raise InvalidInstance(f"objective={objective!r}: over W > 1 windows the objective is the max KVPR over every "
                              f"GPU and window (leave objective unset)")


# ----------------------------------------------------------------------------- result


@dataclasses.dataclass
class WindowPlacement(Placement):
    """A placement robust over demand windows (``W > 1``): :class:`kvgpu.Placement` whose
    figures are worst-window figures.

    Attributes (besides :class:`kvgpu.Placement`'s)
    ----------
    window_demand : (n, W) float64 -- each item's demand (req_rate / slo) per window.
    window_labels : tuple of str -- the windows' names where the demand gave them, else ();
        ``worst_window`` and ``busiest_window`` are positions (0..W-1) in either case.
    kvpr_by_window : (W, G) float64 -- KVPR of every GPU in every window.
    bound_source : str -- which bound ``lower_bound`` is (module doc).

    ``kvpr`` (G,) is each GPU's worst window, so ``max_kvpr`` is the robust objective;
    ``demand`` (G,) is each GPU's demand in that window (``kvpr = demand / kv_free``);
    ``problem.items.demand`` and the specs' ``req_rate`` hold the mean over windows.
    """

    window_demand: np.ndarray = dataclasses.field(default=None, repr=False)
    bound_source: str = ""
    #: The windows' labels where the demand named them (a table's window indexes or start
    #: times, a log's window starts); () where it was a bare array (windows are positions).
    window_labels: tuple = ()

    def __post_init__(self):
        inst = self.problem.items
        self.kvpr_by_window = window_kvpr(inst.sizes, self.window_demand, inst.gpu_mem, self.assignment).T
        super().__post_init__()
        busy = self.busiest_window
        L = np.zeros((inst.n_gpus, self.window_demand.shape[1]))
        np.add.at(L, self.assignment, self.window_demand)
        self.demand = L[np.arange(inst.n_gpus), busy]

    @property
    def n_windows(self) -> int:
        return int(self.kvpr_by_window.shape[0])

    @property
    def busiest_window(self) -> np.ndarray:
        """(G,) int64: each GPU's window of largest KVPR (the first of equal ones)."""
        return np.argmax(self.kvpr_by_window, axis=0)

    @property
    def worst_window(self) -> int:
        """The window of the max KVPR (the first of equal ones)."""
        return int(np.argmax(self.kvpr_by_window.max(axis=1)))

    def kv_split(self) -> np.ndarray:
        """GB of KV cache per item with separate pools per engine, split in proportion to each
        item's demand in its GPU's busiest window (the window that sets the GPU's KVPR)."""
        g = self.assignment
        free = np.maximum(self.kv_free, 0.0)[g]
        on_gpu = np.bincount(g, minlength=self.problem.n_gpus)[g]
        mine = self.window_demand[np.arange(g.shape[0]), self.busiest_window[g]]
        total = self.demand[g]
        return free * np.divide(mine, total, out=1.0 / on_gpu, where=total > 0)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(windows=self.n_windows, worst_window=self.worst_window, window_labels=list(self.window_labels),
                   bound_source=self.bound_source,
                   busiest_window=self.busiest_window.tolist(),
                   kvpr_by_window=[[json_float(x) for x in row] for row in self.kvpr_by_window.tolist()])
        return out

    def __str__(self) -> str:
        return (super().__str__() + f"\nrobust over {self.n_windows} demand windows: KVPR and demand per GPU are its "
                f"busiest window's; worst window {self._window_name(self.worst_window)}; bound: {self.bound_source}")

    def _window_name(self, w: int) -> str:
        """Window ``w`` as the demand named it (position ``w`` and its label where it has one)."""
        return f"{w} ({self.window_labels[w]})" if self.window_labels and self.window_labels[w] != str(w) else str(w)


# ----------------------------------------------------------------------------- search state


class _State:
    """A placement under search: assignment (n,), GB per GPU ``S`` (G,), demand per GPU and
    window ``L`` (G, W), items of each anti-affinity group per GPU ``C`` (n_groups + 1, G; the
    last row, for items without a group, stays 0)."""

    def __init__(self, ctx: "_Ctx", assign: np.ndarray):
        self.ctx = ctx
        self.A = assign.astype(np.int64).copy()
        G = ctx.M.shape[0]
        self.S = np.bincount(self.A, weights=ctx.s, minlength=G)
        self.L = np.zeros((G, ctx.w.shape[1]))
        np.add.at(self.L, self.A, ctx.w)
        self.C = np.zeros((ctx.n_groups + 1, G), np.int64)
        np.add.at(self.C, (ctx.gid, self.A), 1)
        self.C[-1] = 0

    def peaks(self) -> np.ndarray:
        """(G,) each GPU's largest KVPR over the windows."""
        return _peak(self.L, self.ctx.M - self.S)

    def value(self) -> float:
        return float(self.peaks().max())

    def move(self, i: int, h: int) -> None:
        c, g = self.ctx, int(self.A[i])
        self.S[g] -= c.s[i]
        self.S[h] += c.s[i]
        self.L[g] -= c.w[i]
        self.L[h] += c.w[i]
        if c.gid[i] < c.n_groups:
            self.C[c.gid[i], g] -= 1
            self.C[c.gid[i], h] += 1
        self.A[i] = h

    def swap(self, i: int, j: int) -> None:
        gi, gj = int(self.A[i]), int(self.A[j])
        self.move(i, gj)
        self.move(j, gi)


def _peak(L: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Largest KVPR over the last axis of loads ``L`` (..., W) with free GB ``free`` (...)."""
    return safe_div_array(L, free[..., None], np).max(axis=-1)


@dataclasses.dataclass
class _Ctx:
    """The problem as the search sees it: sizes ``s`` (n,), demand ``w`` (n, W), memory ``M``
    (G,), ``allowed`` (n, G) bool, group id ``gid`` (n,) (``n_groups`` for none); node group
    ``ngroup`` (n,) (-1 for none: the tp shards that share a node) and each GPU's node
    ``node_of`` (G,) (all 0 without nodes)."""

    s: np.ndarray
    w: np.ndarray
    M: np.ndarray
    allowed: np.ndarray
    gid: np.ndarray
    n_groups: int
    ngroup: np.ndarray
    node_of: np.ndarray

    @classmethod
    def of(cls, problem: Problem, wd: np.ndarray) -> "_Ctx":
        n, G = problem.items.n_models, problem.n_gpus
        allowed = problem.allowed.astype(bool) if problem.allowed.shape[0] else np.ones((n, G), bool)
        grp = problem.group if problem.group.shape[0] else np.full(n, -1, np.int64)
        groups = np.unique(grp[grp >= 0])
        gid = np.where(grp >= 0, np.searchsorted(groups, grp), groups.size)  # no group: the last id
        ngroup = problem.node_group if problem.node_group.shape[0] else np.full(n, -1, np.int64)
        node_of = problem.node_of if problem.node_of.shape[0] else np.zeros(G, np.int64)
        return cls(problem.items.sizes, wd, problem.items.gpu_mem, allowed, gid.astype(np.int64), int(groups.size),
                   ngroup, node_of)

    def node_ok(self, items: np.ndarray, A: np.ndarray) -> np.ndarray:
        """(k, G) bool: GPUs ``items`` may reach alone under placement ``A`` -- an item whose node
        group has other items stays in their node (one moving alone keeps its group's node)."""
        need = self.ngroup[items] >= 0
        return ~need[:, None] | (self.node_of[None, :] == self.node_of[A[items]][:, None])


def _can_move(st: _State, items: np.ndarray) -> np.ndarray:
    """(k, G) bool: GPUs each of ``items`` may move to (rules, anti-affinity, memory; not its own)."""
    c = st.ctx
    ok = c.allowed[items] & fits(st.S[None, :] + c.s[items, None], c.M[None, :])
    ok &= (st.C[c.gid[items]] == 0) & c.node_ok(items, st.A)
    ok[np.arange(items.shape[0]), st.A[items]] = False
    return ok


#: Most elements of one (rows, columns, W) array the step and bound evaluations build at once
#: (larger ones are taken in column blocks: a few hundred windows and models stay in ~16 MB).
CHUNK = 2_000_000


def _blocks(n_cols: int, rows: int, W: int):
    """Slices of ``range(n_cols)`` small enough that (rows, block, W) has at most CHUNK elements."""
    step = max(1, CHUNK // max(1, rows * W))
    return [slice(lo, min(n_cols, lo + step)) for lo in range(0, n_cols, step)]


def _first_min(best, val: np.ndarray, offset: int):
    """``best`` ``(value, row, col)`` or the least entry of ``val`` (rows, cols) with its column
    shifted by ``offset``, whichever is smaller -- ties to the lowest (row, col), so blocks give
    the same answer as one array."""
    r, c = np.unravel_index(int(np.argmin(val)), val.shape)
    cand = (float(val[r, c]), int(r), int(c) + offset)
    return cand if best is None or cand < best else best


def _best_step(st: _State, g: int, peak_g: float):
    """The best improving step for GPU ``g`` (peak ``peak_g``): ``(value, kind, i, x)`` -- a
    move of item ``i`` to GPU ``x`` or a swap with item ``x`` -- whose two GPUs both end below
    ``peak_g``; None when there is none."""
    c = st.ctx
    mine = np.nonzero(st.A == g)[0]
    if mine.size == 0:
        return None
    limit = peak_g * (1 - STEP_RTOL)
    src = _peak(st.L[g][None, :] - c.w[mine], c.M[g] - st.S[g] + c.s[mine])  # (k,)
    can = _can_move(st, mine)
    best = None
    for blk in _blocks(c.M.shape[0], mine.size, c.w.shape[1]):  # moves: every item of g to every GPU
        dst = _peak(st.L[None, blk, :] + c.w[mine][:, None, :], (c.M - st.S)[None, blk] - c.s[mine][:, None])
        best = _first_min(best, np.where(can[:, blk], np.maximum(src[:, None], dst), np.inf), blk.start)
    step = (best[0], "move", int(mine[best[1]]), best[2])
    other = np.nonzero(st.A != g)[0]
    swap = None
    for blk in _blocks(other.size, mine.size, c.w.shape[1]):  # swaps: every item of g with every other
        swap = _first_min(swap, _swap_values(st, g, mine, other[blk]), blk.start)
    if swap is not None and swap[0] < step[0]:
        step = (swap[0], "swap", int(mine[swap[1]]), int(other[swap[2]]))
    return step if step[0] < limit else None


def _swap_values(st: _State, g: int, mine: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(k, m): the larger of the two GPUs' new peaks when item ``mine[a]`` (on ``g``) and item
    ``other[b]`` (elsewhere) trade places; ``inf`` where a rule or memory forbids it."""
    c = st.ctx
    hj = st.A[other]
    ds = c.s[other][None, :] - c.s[mine][:, None]  # (k, m): GB g gains
    new_Sg = st.S[g] + ds
    new_Sh = st.S[hj][None, :] - ds
    dw = c.w[other][None, :, :] - c.w[mine][:, None, :]  # (k, m, W)
    pg = _peak(st.L[g][None, None, :] + dw, c.M[g] - new_Sg)
    ph = _peak(st.L[hj][None, :, :] - dw, c.M[hj][None, :] - new_Sh)
    gi, gj = c.gid[mine][:, None], c.gid[other][None, :]
    same = (gi == gj) & (gi < c.n_groups)
    ok = fits(new_Sg, c.M[g]) & fits(new_Sh, c.M[hj][None, :])
    ok &= c.allowed[other][:, g][None, :] & c.allowed[mine][:, hj]
    ok &= (st.C[gi, hj[None, :]] - same == 0) & (st.C[gj, g] - same == 0)
    tied = (c.ngroup[mine] >= 0)[:, None] | (c.ngroup[other] >= 0)[None, :]  # shards that keep their node
    ok &= ~tied | (c.node_of[hj] == c.node_of[g])[None, :]
    return np.where(ok, np.maximum(pg, ph), np.inf)


#: When no step lowers the worst GPU, the descent tries this many next-worst GPUs (a step that
#: lowers one of them without raising any GPU above it lowers the sorted vector of peaks, and
#: frees room where the worst GPU's items may go next).
LEX_DEPTH = 4


def _descend(st: _State, max_steps: int) -> _State:
    """Steepest descent on the sorted vector of GPU peaks (module doc): the best step of the
    worst GPU, else of the next :data:`LEX_DEPTH` worst, until none of them has one."""
    for _ in range(max_steps):
        peaks = st.peaks()
        step = None
        for g in np.argsort(-peaks, kind="stable")[:1 + LEX_DEPTH].tolist():
            step = _best_step(st, g, float(peaks[g]))
            if step is not None:
                break
        if step is None:
            break
        _, kind, i, x = step
        st.move(i, x) if kind == "move" else st.swap(i, x)
    return st


def _kick(st: _State, rng: np.random.Generator, n_kicks: int) -> None:
    """Move ``n_kicks`` random items of the worst GPUs to random GPUs they may use."""
    peaks = st.peaks()
    order = np.argsort(-peaks, kind="stable")
    top = order[:max(2, len(order) // 4)]
    for _ in range(n_kicks):
        cand = np.nonzero(np.isin(st.A, top))[0]
        if cand.size == 0:
            return
        i = int(rng.choice(cand))
        ok = np.nonzero(_can_move(st, np.array([i]))[0])[0]
        if ok.size:
            st.move(i, int(rng.choice(ok)))


def _ils(ctx: _Ctx, start: np.ndarray, effort: int, patience: int, seed: int, stop_at: float) -> np.ndarray:
    """Iterated local search from ``start``: descend, then ``effort`` rounds of kick + descend,
    stopping after ``patience`` rounds without a better placement or at ``stop_at`` (a bound)."""
    n = ctx.s.shape[0]
    steps = 20 * n + 100
    best = _descend(_State(ctx, start), steps)
    best_v = best.value()
    rng = np.random.default_rng(seed)
    idle = 0
    for r in range(effort):
        if idle >= patience or best_v <= stop_at:
            break
        st = _State(ctx, best.A)
        _kick(st, rng, 1 + r % 3)
        _descend(st, steps)
        v = st.value()
        if v < best_v * (1 - STEP_RTOL):
            best, best_v, idle = st, v, 0
        else:
            idle += 1
    return best.A


# ----------------------------------------------------------------------------- starts


def _open_gpus(ctx: _Ctx, i: int, S: np.ndarray, C: np.ndarray, A: np.ndarray) -> np.ndarray:
    """(G,) bool: where a partial placement (``A``: -1 for items not placed yet; ``S`` GB and
    ``C`` group counts per GPU) may take item ``i``: allowed, in memory, no shard of its group
    there, and in the node of its node group's shards placed so far."""
    ok = ctx.allowed[i] & fits(S + ctx.s[i], ctx.M) & ((C[ctx.gid[i]] == 0) | (ctx.gid[i] == ctx.n_groups))
    if ctx.ngroup[i] >= 0:
        placed = A[(ctx.ngroup == ctx.ngroup[i]) & (A >= 0)]
        if placed.size:
            ok &= ctx.node_of == ctx.node_of[placed[0]]
    return ok


def _greedy(ctx: _Ctx, order: np.ndarray) -> np.ndarray | None:
    """Each item in ``order`` on the GPU it may use where its worst window ends lowest (ties:
    the lowest id); None when an item fits nowhere."""
    G, W = ctx.M.shape[0], ctx.w.shape[1]
    A = np.full(ctx.s.shape[0], -1, np.int64)
    S, L = np.zeros(G), np.zeros((G, W))
    C = np.zeros((ctx.n_groups + 1, G), np.int64)
    for i in order.tolist():
        ok = _open_gpus(ctx, i, S, C, A)
        if not ok.any():
            return None
        cand = np.nonzero(ok)[0]  # (an infinite peak is still a place: argmin over the allowed ones only)
        h = int(cand[np.argmin(_peak(L[cand] + ctx.w[i], ctx.M[cand] - S[cand] - ctx.s[i]))])
        A[i], S[h], L[h] = h, S[h] + ctx.s[i], L[h] + ctx.w[i]
        C[ctx.gid[i], h] += 1
    return A


def _pack(ctx: _Ctx, T: float) -> np.ndarray | None:
    """First-fit decreasing vector packing at target ``T``: loads ``s + w[:, t] / T`` into GPUs
    of capacity ``M`` in every window (so every GPU's KVPR is at most ``T`` in every window);
    items with fewest allowed GPUs first, then by their worst window's load.  None on failure."""
    G, W = ctx.M.shape[0], ctx.w.shape[1]
    worst = ctx.s + ctx.w.max(axis=1) / T
    order = np.lexsort((-worst, ctx.allowed.sum(axis=1)))
    S, L = np.zeros(G), np.zeros((G, W))
    C = np.zeros((ctx.n_groups + 1, G), np.int64)
    A = np.full(ctx.s.shape[0], -1, np.int64)
    for i in order.tolist():
        S2, L2 = S + ctx.s[i], L + ctx.w[i]
        ok = _open_gpus(ctx, i, S, C, A)
        ok &= (L2 <= T * (ctx.M - S2)[:, None] * (1 + 1e-12)).all(axis=1)
        hits = np.nonzero(ok)[0]
        if hits.size == 0:
            return None
        h = int(hits[0])
        A[i], S[h], L[h] = h, S2[h], L2[h]
        C[ctx.gid[i], h] += 1
    return A


def _pack_start(ctx: _Ctx, hi: float) -> np.ndarray | None:
    """The packing at the least target (bisection in ``(0, hi]``) where it succeeds."""
    if not (np.isfinite(hi) and hi > 0):
        return None
    got = _pack(ctx, hi)
    if got is None:
        return None
    lo = 0.0
    for _ in range(PACK_STEPS):
        mid = (lo + hi) / 2
        a = _pack(ctx, mid) if mid > 0 else None
        if a is None:
            lo = mid
        else:
            hi, got = mid, a
    return got


def _scalar_starts(problem: Problem, rates: np.ndarray, opts: engine.Options, backend: str) -> list[np.ndarray]:
    """Today's engine on scalar summaries of the rates (module doc), on the ``backend`` asked;
    a summary without a placement is skipped."""
    tot = (rates / np.array([m.slo for m in problem.specs])[:, None]).sum(axis=0)  # demand per window
    busy = np.argsort(-tot, kind="stable")[:BUSY_WINDOWS]
    lam = tot ** MIX_POWER
    lam = lam / lam.sum() if lam.sum() > 0 else np.full(tot.shape, 1.0 / tot.shape[0])
    summaries = [rates.mean(axis=1), rates.max(axis=1)] + [rates[:, t] for t in busy.tolist()] + [rates @ lam]
    unique: list = []
    for r in summaries:  # windows alike give summaries alike: each is solved once, with their effort
        if not any(np.allclose(r, u, rtol=1e-12, atol=0.0) for u in unique):
            unique.append(r)
    # starts need not be balanced nor searched long: the robust search takes over (measured on a
    # 64-GPU bursty day: the balancing passes were half of the starts' time)
    each = max(1, opts.effort * len(summaries) // (START_SHARE * len(unique)))
    # exact=None keeps today's small proofs (problems of at most AUTO_EXACT_ITEMS items, a fraction
    # of a second): their placement is a start too (measured: windows all alike then give today's
    # answer); exact=True's long proofs are not run on summaries
    sub = dataclasses.replace(opts, exact=False if opts.exact else opts.exact, effort=each,
                              patience=max(1, min(opts.patience, each)), objective="seed")
    out = []
    for r in unique:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                one = with_rates(problem, r)
                out.append(engine.solve_problem(one, backends.for_problem(one, sub, backend)).assignment)
        except NoPlacementFound:
            continue
    return out


# ----------------------------------------------------------------------------- exact


def _n_assignments(ctx: _Ctx) -> float:
    """How many assignments of items to their allowed GPUs there are (``inf`` beyond 1e300)."""
    logs = np.log10(ctx.allowed.sum(axis=1).astype(float)).sum()
    return 10.0 ** logs if logs < 300 else math.inf


def _enumerate(ctx: _Ctx) -> tuple[float, np.ndarray | None]:
    """The optimum by trying every assignment of items to their allowed GPUs (anti-affinity
    and memory kept): ``(value, assignment)``, ``(inf, None)`` when none keeps the rules."""
    n, G = ctx.s.shape[0], ctx.M.shape[0]
    chunk = max(1, CHUNK // (G * ctx.w.shape[1]))  # assignments at once: (chunk, G, W) loads
    choices = [np.nonzero(ctx.allowed[i])[0] for i in range(n)]
    radix = np.array([c.size for c in choices], np.int64)
    total = int(np.prod(radix))
    best_v, best_a = math.inf, None
    for lo in range(0, total, chunk):
        code = np.arange(lo, min(total, lo + chunk), dtype=np.int64)
        A = np.empty((code.size, n), np.int64)
        for i in range(n):  # mixed radix: item 0 varies slowest
            code, digit = np.divmod(code, radix[i])
            A[:, i] = choices[i][digit]
        v, ok = _batch_values(ctx, A)
        if not ok.any():
            continue
        k = int(np.argmin(np.where(ok, v, np.inf)))
        k = k if ok[k] else int(np.nonzero(ok)[0][0])  # every kept one infinite (a full GPU with demand)
        if best_a is None or v[k] < best_v:
            best_v, best_a = float(v[k]), A[k].copy()
    return best_v, best_a


def _batch_values(ctx: _Ctx, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust objective of each row of ``A`` (C, n), and (C,) bool: which rows keep memory and
    anti-affinity; loads summed in item order (as :func:`window_kvpr`)."""
    C, n = A.shape
    G, W = ctx.M.shape[0], ctx.w.shape[1]
    rows = np.arange(C)
    S, L = np.zeros((C, G)), np.zeros((C, G, W))
    for i in range(n):
        S[rows, A[:, i]] += ctx.s[i]
        L[rows, A[:, i]] += ctx.w[i]
    ok = fits(S, ctx.M[None, :]).all(axis=1)
    for grp in range(ctx.n_groups):
        members = np.nonzero(ctx.gid == grp)[0]
        sub = np.sort(A[:, members], axis=1)
        ok &= (np.diff(sub, axis=1) != 0).all(axis=1)
    for grp in np.unique(ctx.ngroup[ctx.ngroup >= 0]).tolist():  # tp shards inside one node
        nodes = ctx.node_of[A[:, ctx.ngroup == grp]]
        ok &= (nodes == nodes[:, :1]).all(axis=1)
    return _peak(L, ctx.M[None, :] - S).max(axis=1), ok


# ----------------------------------------------------------------------------- bounds


def window_bound(problem: Problem, wd: np.ndarray, hi_by_window: np.ndarray,
                 pair: float | None = None) -> tuple[float, str]:
    """The lower bound of the robust objective and its source in words (module doc).
    ``hi_by_window`` (W,): an achieved max KVPR in each window (the bisections' upper ends);
    ``pair``: :func:`pair_bound`, when already known (it does not depend on them)."""
    W = wd.shape[1]
    items = problem.items
    if problem.allowed.shape[0]:
        per = np.array([bounds.problem_bound(dataclasses.replace(problem, items=Instance(
            items.sizes, wd[:, t], items.gpu_mem)), float(hi_by_window[t])) for t in range(W)])
    else:
        insts = [Instance(items.sizes, wd[:, t], items.gpu_mem) for t in range(W)]
        per = np.asarray(bounds.lower_bound(batch_from_instances(insts), np.asarray(hi_by_window, float)))
    t = int(np.argmax(per))
    pair = pair_bound(_Ctx.of(problem, wd)) if pair is None else pair
    if pair > per[t]:
        return pair, "pigeonhole pair bound over the windows together"
    return float(per[t]), f"bound of window {t} alone (the largest of the per-window bounds)"


#: The pair bound looks at most this many items (the largest by peak demand; any subset is valid).
PAIR_ITEMS = 300


def pair_bound(ctx: _Ctx) -> float:
    """The pigeonhole pair bound (module doc): 0 when there are at most ``G`` items."""
    n, G = ctx.s.shape[0], ctx.M.shape[0]
    if n <= G:
        return 0.0
    keep = np.argsort(-(ctx.w.max(axis=1)), kind="stable")[:PAIR_ITEMS]
    s, w, allowed, gid = ctx.s[keep], ctx.w[keep], ctx.allowed[keep], ctx.gid[keep]
    m = keep.size
    if m <= G:
        return 0.0
    V = np.full((m, m), np.inf)
    # v(i, j): the best GPU both may use; GPUs of equal memory and allowed items give the same
    _, first = np.unique(np.concatenate([ctx.M[None, :], allowed.astype(float)]).T, axis=0, return_index=True)
    for blk in _blocks(m, m, w.shape[1]):  # rows of V a block at a time
        pair_w = w[blk, None, :] + w[None, :, :]
        for g in np.sort(first).tolist():
            peak = _peak(pair_w, ctx.M[g] - s[blk, None] - s[None, :])
            room = fits(s[blk, None] + s[None, :], ctx.M[g])
            both = allowed[blk, g][:, None] & allowed[:, g][None, :] & room
            V[blk] = np.minimum(V[blk], np.where(both, peak, np.inf))
    V[(gid[:, None] == gid[None, :]) & (gid[:, None] < ctx.n_groups)] = np.inf  # shards never share
    np.fill_diagonal(V, np.inf)
    vals = np.unique(V[np.triu_indices(m, 1)])
    lo, hi, best = 0, vals.size - 1, 0.0
    while lo <= hi:  # the largest threshold with a G + 1 clique found greedily
        mid = (lo + hi) // 2
        if _clique(V >= vals[mid], G + 1):
            best, lo = float(vals[mid]), mid + 1
        else:
            hi = mid - 1
    return best


def _clique(adj: np.ndarray, k: int) -> bool:
    """Does a greedy search (highest degree first, from each of the 8 best seeds) find ``k``
    vertices pairwise adjacent in ``adj`` (m, m) bool?"""
    adj = adj & ~np.eye(adj.shape[0], dtype=bool)  # a vertex is no neighbour of itself
    deg = adj.sum(axis=1)
    for seed in np.argsort(-deg, kind="stable")[:8].tolist():
        cand = adj[seed].copy()
        size = 1
        while size < k and cand.any():
            idx = np.nonzero(cand)[0]
            v = int(idx[np.argmax(adj[np.ix_(idx, idx)].sum(axis=1))])
            cand &= adj[v]
            size += 1
        if size >= k:
            return True
    return False


# ----------------------------------------------------------------------------- solve


def solve_windows(problem: Problem, rates, opts: engine.Options, *, backend: str = "auto",
                  objective=None) -> Placement:
    """Solve ``problem`` for request rates per window ``rates`` (n_models, W) (module doc).

    ``W = 1``: today's engine on those rates (:func:`kvgpu.engine.solve_problem`), the result
    with ``kvpr_by_window`` (1, G) added.  ``W > 1``: the robust engine; a
    :class:`WindowPlacement`.  ``backend``, ``objective``: the options as the caller gave them
    (``opts`` holds them checked and resolved).
    """
    D = demand_rates(rates, len(problem.specs))
    if D.shape[1] == 1:
        return _solve_one_window(problem, D[:, 0], opts, backend)
    _refuse_options(opts, backend, objective)
    _refuse_rules(problem)
    wd = item_demand(problem, D)
    base = with_rates(problem, D.mean(axis=1))
    # the busiest window's total demand keeps KVPR finite (build_problem's check; the others are smaller)
    with_rates(problem, D[:, int(np.argmax((D / np.array([m.slo for m in problem.specs])[:, None]).sum(axis=0)))])
    ctx = _Ctx.of(base, wd)
    n_assign = _n_assignments(ctx)
    limit = {None: AUTO_EXACT_ASSIGNMENTS, False: 0}.get(opts.exact, min(opts.exact_work, EXACT_MAX_ASSIGNMENTS))
    note = None
    if n_assign <= limit:
        v, a = _enumerate(ctx)
        if a is None:
            raise NoPlacementFound("no placement keeps memory and the rules (proven: every assignment was tried)",
                                   [0], proven=True)
        return _result(base, wd, a, opts, proven=True, lb=v, source="exact search (every assignment tried)")
    if opts.exact:
        note = (f"exact=True: the robust engine proves by trying every assignment; this problem has {n_assign:.3g}, "
                f"above {limit}: not proven")
    starts = _starts(base, ctx, D, opts, backend)
    if not starts:
        raise NoPlacementFound("no placement found that keeps memory and the rules (the scalar starts, the greedy "
                               "and the vector packing all failed; not proven infeasible)", [0])
    # the bound first (its bisections ending at the best start's figures): the search stops
    # where it meets the bound (measured: 3 of the 4 bench days are closed by the bound)
    pair = pair_bound(ctx)
    lb, source = window_bound(base, wd, window_kvpr(ctx.s, wd, ctx.M, starts[0]).max(axis=0), pair)
    stop = lb * (1 + OPTIMAL_RTOL)
    best_a, best_v = None, math.inf
    for k, a in enumerate(starts):  # the kicks are cheap beside the starts: every start gets them all
        a = _ils(ctx, a, ILS_SCALE * opts.effort, ILS_SCALE * opts.patience, opts.seed + k, stop)
        v = _State(ctx, a).value()
        if best_a is None or v < best_v:  # (every placement may be infinite: a full GPU with demand)
            best_a, best_v = a, v
        if best_v <= stop:
            break
    if best_v > stop:  # not closed: the bisections again, up to the answer's own figures
        lb, source = window_bound(base, wd, window_kvpr(ctx.s, wd, ctx.M, best_a).max(axis=0), pair)
    return _result(base, wd, best_a, opts, proven=False, lb=min(lb, best_v), source=source, note=note)


def _starts(problem: Problem, ctx: _Ctx, D: np.ndarray, opts: engine.Options, backend: str) -> list[np.ndarray]:
    """The distinct starting placements, best first (module doc)."""
    cands = _scalar_starts(problem, D, opts, backend)
    n = ctx.s.shape[0]
    vec = ctx.s / ctx.M.max() + ctx.w.max(axis=1) / max(ctx.w.max(axis=1).sum(), 1e-300)
    greedy = _greedy(ctx, np.lexsort((-vec, ctx.allowed.sum(axis=1))))
    if greedy is not None:
        cands.append(greedy)
    vals = [_State(ctx, a).value() for a in cands]
    packed = _pack_start(ctx, min(vals) if vals else math.inf)
    if packed is not None:
        cands.append(packed)
        vals.append(_State(ctx, packed).value())
    out, seen = [], set()
    for k in np.argsort(vals, kind="stable").tolist():
        key = cands[k].tobytes()
        if key not in seen and cands[k].shape == (n,):
            seen.add(key)
            out.append(cands[k])
    return out


def _check_rules(problem: Problem, wd: np.ndarray, assign: np.ndarray) -> None:
    """The answer, recomputed from scratch, keeps memory, allowed GPUs and anti-affinity (the
    search updates its sums step by step; this is the guard that no rounding let a rule slip)."""
    ctx = _Ctx.of(problem, wd)
    _, ok = _batch_values(ctx, assign[None, :])
    if not (ok[0] and ctx.allowed[np.arange(assign.shape[0]), assign].all()):
        raise RuntimeError("kvgpu.robust: the search produced a placement that breaks a rule; please report it")


def _result(problem: Problem, wd, assign, opts, *, proven, lb, source, note=None) -> WindowPlacement:
    _check_rules(problem, wd, assign)
    kv = window_kvpr(problem.items.sizes, wd, problem.items.gpu_mem, assign).max(axis=1)
    return WindowPlacement(problem, np.asarray(assign, np.int64), kv, float(lb), proven=proven, mode=opts.mode,
                           backend=ENGINE, objective=OBJECTIVE, note=note, window_demand=wd,
                           bound_source=source,
                           bound_scope="every placement" if proven or not problem.allowed.shape[0]
                           else "every placement (the rules' bound per window)")


def _solve_one_window(problem: Problem, rates: np.ndarray, opts: engine.Options, backend: str) -> Placement:
    """``W = 1``: today's engine, exactly (the backend chosen as :func:`kvgpu.solve` does)."""
    one = with_rates(problem, rates)
    p = engine.solve_problem(one, backends.for_problem(one, opts, backend))
    p.kvpr_by_window = p.kvpr[None, :].copy()
    return p
