"""The one path of every solve: a problem -> a start -> search -> proof -> a placement.

* **Start.** A plain instance (no shards, pins, nodes or current placement) starts from the
  seed pipeline, run by the chosen backend (:mod:`kvgpu.backends`); where the seed's heuristics
  pack nothing, an exact search fits the models in memory.  A constrained instance starts from
  a placement that keeps its rules (:mod:`kvgpu.kernels.start`: greedy, then an overflow repair),
  and when that fails from the exact search (:mod:`kvgpu.kernels.exact`), which also proves
  infeasibility.
* **Search** (``mode="search"``): :mod:`kvgpu.kernels.search`, the same kernels with or without
  rules; never worse than the start.
* **Proof** (``exact``): :func:`kvgpu.kernels.exact.certify_instance` raises the lower bound
  (:mod:`kvgpu.bounds`) until the answer is proven optimal or the work runs out.
* **Balance** (``objective="lex"``, one problem in search mode): :func:`_balance` lowers the
  sorted vector of GPU KVPRs after the max, level by level; batches keep the seed's order
  ``(max, second, mean)``.

:func:`solve_batch_plain` runs a batch of plain instances (what :func:`kvgpu.solve_batch` and
sweeps call); :func:`solve_problem` runs one :class:`kvgpu.problem.Problem` (what
:func:`kvgpu.solve`, :func:`kvgpu.replan` and ``kvgpu certify`` call) -- a plain one as a batch
of one, so both take the same path.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

from kvgpu import backends, bounds, migration
from kvgpu import decompose as decomposition
from kvgpu import decompose_rules
from kvgpu.batch.state import Batch, batch_from_instances, gpu_loads, kvpr
from kvgpu.errors import BackendUnavailable, InvalidInstance, KvgpuWarning, NoPlacementFound
from kvgpu.kernels.deltas import safe_div_array
from kvgpu.kernels.params import OPTIMAL_RTOL
from kvgpu.problem import Instance, Problem, group_replicas
from kvgpu.results import BOUND_CLOSED_FORM, BOUND_EXACT, BOUND_LP, ORDER_WORDS, BatchResult, Placement
from kvgpu.schema import OPTION_RANGES, integer

MODES = ("search", "seed")
#: The order of placements: "lex", the sorted vector of GPU KVPRs compared term by term (balanced
#: placements, :func:`_balance`); "seed", the seed's ``(max, second, mean)``.
OBJECTIVES = ("lex", "seed")
#: The balancing passes (:func:`_balance`): a level searches ``effort // LEX_SHARE`` rounds (at
#: least one) on the GPUs not yet fixed, and the levels together at most ``effort // 2`` rounds
#: (measured: 1 round a level cannot lower tied replicas that 3 rounds can; a budget of
#: ``effort`` rounds doubled the time of tight 64-GPU clusters for no better vector) ...
LEX_SHARE = 10
#: ... and they stop after this many searched levels in a row that lowered the max of their
#: GPUs by less than ``LEX_MIN_GAIN`` (relative; a smaller gain is kept, but counts as none:
#: on tight clusters every level gains a few 1e-4 and the levels cost twice the search).
LEX_PATIENCE, LEX_MIN_GAIN = 3, 1e-3
#: Search rounds per instance unless ``effort=`` says otherwise.
DEFAULT_EFFORT = 30
#: Work (search nodes / DP states) per instance of a proof unless ``exact_work=`` says.
DEFAULT_EXACT_WORK = 20_000_000
#: ``exact=None`` (the default of :func:`kvgpu.solve`) proves problems of at most this many
#: items, with at most ``AUTO_EXACT_WORK`` of work -- a fraction of a second -- so small
#: answers come with their proof.
AUTO_EXACT_ITEMS, AUTO_EXACT_WORK = 24, 2_000_000
#: ``exact=True`` tries the configuration LP bound on problems of at most this many items (each
#: LP round prices a knapsack per GPU class; 190 tp shards on 64 GPUs take 7-18 s on 2 cores).
LP_MAX_ITEMS = 1024


@dataclass(frozen=True)
class Options:
    """Validated solver options (see :func:`options`)."""

    backend: str
    mode: str
    effort: int
    patience: int
    seed: int
    exact: bool | None
    exact_work: int
    #: Decompose big plain clusters: True, False, or None (automatic, :mod:`kvgpu.decompose`).
    decompose: bool | None = None
    #: Where a decomposition's batches run: a :mod:`kvgpu.decompose` executor (None: here).
    executor: object = None
    #: The order of placements, one of :data:`OBJECTIVES`.
    objective: str = "lex"

    def proof_work(self, n_items: int) -> int:
        """Work of the proof for a problem of ``n_items`` items (0: no proof).  ``exact=None``
        proves small problems in search mode only: mode 'seed' returns the seed pipeline's
        placement exactly, which a proof could replace by a better one (``exact=True`` asks
        for that)."""
        if self.exact is None:
            small = n_items <= AUTO_EXACT_ITEMS and self.mode == "search"
            return min(self.exact_work, AUTO_EXACT_WORK) if small else 0
        return self.exact_work if self.exact else 0

    def proof_works(self, n_items: np.ndarray) -> np.ndarray:
        """(B,) int64: :meth:`proof_work` of each instance of a batch (``n_items`` (B,) int), so
        that ``exact=None`` proves a batch's small instances whatever the size of the others."""
        return np.array([self.proof_work(int(n)) for n in np.atleast_1d(n_items)], np.int64)


def options(backend: str = "auto", mode: str = "search", effort=DEFAULT_EFFORT, patience=None, seed=0,
            exact: bool | None = False, exact_work=DEFAULT_EXACT_WORK, decompose: bool | None = None,
            dask=None, objective: str | None = None) -> Options:
    """Check every option once, whatever the entry point; raises :class:`kvgpu.InvalidInstance`
    naming the option (or :class:`kvgpu.BackendUnavailable`).  ``dask``: a
    ``dask.distributed.Client`` where the batches of a decomposition run.  ``objective``: one of
    :data:`OBJECTIVES`; None is "lex" in search mode and "seed" in seed mode (which reproduces
    the seed pipeline, whose order is ``(max, second, mean)``)."""
    from kvgpu.kernels.search import default_patience

    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidInstance(f"mode: {mode!r} is not available; choose one of {MODES}")
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise InvalidInstance(f"backend: {backend!r} is unknown; choose one of {backends.BACKENDS}")
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise InvalidInstance(f"exact: must be True, False or None (auto), got {exact!r}")
    effort = integer(effort, "effort", *OPTION_RANGES["effort"])
    patience_given = patience is not None
    patience = default_patience(effort) if patience is None else integer(patience, "patience",
                                                                         *OPTION_RANGES["patience"])
    seed = integer(seed, "seed", *OPTION_RANGES["seed"])
    exact_work = integer(exact_work, "exact_work", *OPTION_RANGES["exact_work"])
    if mode == "seed":
        if effort not in (0, DEFAULT_EFFORT) or patience_given or seed:
            raise InvalidInstance("effort, patience and seed (--effort, --patience, --seed) steer search mode; mode "
                                  "'seed' runs the seed pipeline alone (drop them, or use mode 'search')")
        effort = 0
    if objective == "lex" and decompose:
        raise InvalidInstance("objective 'lex' (--objective lex) balances one cluster searched whole; decompose=True "
                              "(--decompose on) searches groups in the seed's order (max, second, mean): drop one "
                              "of them")
    objective = _objective_of(objective, mode, effort)
    decomposition.check(decompose, mode=mode, dask=dask is not None)
    used = backends.resolve(backend)
    ex = None if dask is None else decomposition.executor(dask)
    return Options(used, mode, effort, patience, seed, None if exact is None else bool(exact), exact_work,
                   None if decompose is None else bool(decompose), ex, objective)


def _objective_of(objective, mode: str, effort: int) -> str:
    """The checked ``objective`` option (None: "lex" where search rounds run, else "seed")."""
    if objective is None:
        return "seed" if mode == "seed" or not effort else "lex"
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise InvalidInstance(f"objective: {objective!r} is not available; choose one of {OBJECTIVES}")
    if objective == "lex" and (mode == "seed" or not effort):
        raise InvalidInstance("objective 'lex' (--objective lex) balances the GPUs by search rounds; mode 'seed' and "
                              "effort 0 run none, and keep the seed's order (max, second, mean): drop objective, or "
                              "use mode 'search' with effort >= 1")
    return objective


def _need_numba(what: str) -> None:
    ok, why = backends.probe()["numba"]
    if not ok:
        raise BackendUnavailable(f"{what} runs in numba kernels: {why} (or use mode='seed', exact=False)")


# ----------------------------------------------------------------------------- plain batches

INFEASIBLE, NOT_FOUND = "infeasible (proven)", "no placement found"


def _objective(batch: Batch, assign, pos):
    S, W = gpu_loads(batch, assign, pos)
    kv = kvpr(batch.xp, S, W, batch.gpu_mem, batch.gpu_mask, pad=np.nan)
    with np.errstate(invalid="ignore"):
        return kv, np.max(np.where(np.isnan(kv), -np.inf, kv), axis=1)


def _start(batch: Batch, opts: Options, status: np.ndarray):
    """Seed placements; where the seed packs nothing, an exact memory-only packing (with
    search or proof) or a status (``status`` (B,) object, filled in).  Returns ``(assign,
    pos, packed)``: ``packed`` when that packing ran (in numba kernels)."""
    B = batch.shape[0]
    try:
        assign, pos = backends.solve_seed(batch, opts.backend)
        return assign, pos, False
    except NoPlacementFound as e:
        bad = np.asarray(e.instances, dtype=np.int64)
    good = np.setdiff1d(np.arange(B), bad)
    assign = np.full(batch.sizes.shape, -1, np.int64)
    pos = np.full(batch.sizes.shape, -1, np.int64)
    if good.size:
        assign[good], pos[good] = backends.solve_seed(batch.take(good), opts.backend)
    assign[bad], pos[bad] = _pack_unseeded(batch, bad, opts, status)
    return assign, pos, _packs_unseeded(opts)


def _packs_unseeded(opts: Options) -> bool:
    """Are instances the seed packed nothing for packed exactly (numba kernels)?  Not in mode
    'seed' without a proof, which reports the seed's heuristics only."""
    return not (opts.mode == "seed" and not opts.exact)


def _pack_unseeded(batch: Batch, bad: np.ndarray, opts: Options, status: np.ndarray):
    """Placements of the instances ``bad`` (k,) int64 that the seed packed nothing for: an
    exact memory-only packing (unless mode 'seed' without a proof, which reports the seed's
    heuristics only).  Returns ``(assign, pos)`` (k, N) int64 in the batch's slots, -1 where
    nothing was found; ``status`` (B,) object gets those instances' status."""
    if not _packs_unseeded(opts):
        status[bad] = NOT_FOUND  # the seed's heuristics only: not a proof
        empty = np.full((bad.size, batch.shape[1]), -1, np.int64)
        return empty, empty.copy()
    _need_numba("packing what the seed could not")
    from kvgpu.kernels import exact
    from kvgpu.numba_engine import pack_memory

    a, p, st = pack_memory(batch.take(bad), max(opts.exact_work, DEFAULT_EXACT_WORK))
    status[bad[st == exact.INFEASIBLE]] = INFEASIBLE
    status[bad[st == exact.UNKNOWN]] = NOT_FOUND
    return a, p


def _compile_first(opts: Options, B: int, n_items) -> None:
    """Every numba kernel group the run will use, compiled side by side up front on a first run
    (:func:`kvgpu.warmup.ensure`), not one after the other as the run reaches them.  The cuda
    backend uses CPU kernels only for a proof (and, rarely, to pack what its seed did not: those
    compile when needed).  ``n_items``: the items of each instance ((B,) int, or one int)."""
    on_cpu = opts.backend != "cuda"
    groups = (["seed"] if opts.backend == "numba" else []) + (["search"] if opts.effort and on_cpu else [])
    groups += ["exact"] if opts.proof_works(n_items).any() else []
    if not groups or not backends.probe()["numba"][0]:
        return
    from kvgpu.warmup import batch_of, ensure

    if B > 1:  # and the batch kernels they run: the reported bound's too, compiled for the numba backend
        groups += batch_of(groups + (["bound"] if opts.backend == "numba" else []))
    ensure(groups)


def solve_batch_plain(batch: Batch, opts: Options, infeasible: str = "raise",
                      proven_infeasible: np.ndarray | None = None) -> BatchResult:
    """Solve ``B`` plain instances (padded arrays): seed, search, proof (module doc).

    ``infeasible="raise"`` raises :class:`kvgpu.NoPlacementFound` naming the instances without a
    placement (``.proven`` when the exact search proved every one of them infeasible);
    ``"mark"`` returns them with ``status`` set and NaN figures; ``proven_infeasible`` (B,) bool
    marks instances already known to have none (their sizes alone do not fit)."""
    if infeasible not in ("raise", "mark"):
        raise InvalidInstance(f"infeasible: choose 'raise' or 'mark', got {infeasible!r}")
    if proven_infeasible is not None and proven_infeasible.any():
        return _without(batch, opts, proven_infeasible)
    B = batch.shape[0]
    if batch.shape[1] == 0:  # no model slots at all: every GPU idle, KVPR 0, trivially optimal
        kv = np.where(batch.gpu_mask, 0.0, np.nan)
        zero = np.zeros(B)
        return BatchResult(np.zeros((B, 0), np.int64), kv, zero, zero.copy(), backend=opts.backend,
                           proven=np.ones(B, bool))
    big = _decomposed(batch, opts)
    if big.any():
        return _solve_decomposed(batch, opts, big, infeasible)
    if opts.executor is not None:
        raise InvalidInstance(f"dask (--dask, --dask-local) runs the group solves of a decomposed cluster, and no "
                              f"cluster here is decomposed (automatic from {decomposition.AUTO_GPUS} GPUs, counting "
                              f"at most one GPU per model of each memory size, the ones worth solving on): pass "
                              f"decompose=True (--decompose on), or drop dask")
    _compile_first(opts, B, batch.n_models)
    if opts.backend == "cuda":
        return _solve_on_device(batch, opts, infeasible)
    status = np.full(B, "ok", dtype=object)
    certified = np.zeros(B, bool)
    assign, pos, packed = _start(batch, opts, status)
    failed = np.nonzero(status != "ok")[0]
    if failed.size and infeasible == "raise":
        raise _not_placed(status, failed, opts.mode)
    ok = np.nonzero(status == "ok")[0]
    kv = np.full(batch.gpu_mem.shape, np.nan)
    max_kvpr = np.full(B, np.nan)
    lb = np.full(B, np.nan)
    engines = _engines(opts.backend, searched=False, proved=False, packed=packed)
    if ok.size:
        sub = batch.take(ok)
        a, p = assign[ok], pos[ok]
        k, m = _objective(sub, a, p)
        lo = backends.lower_bound(sub, m, opts.backend)
        work = opts.proof_works(sub.n_models)
        if opts.effort or work.any():
            _need_numba("mode 'search'" if opts.effort else "exact=True")
            from kvgpu.numba_engine import improve

            a, p, lo = improve(sub, a, p, lo, opts.effort, opts.patience, opts.seed, work)
            k, m = _objective(sub, a, p)
            engines = _engines(opts.backend, searched=bool(opts.effort), proved=bool(work.any()), packed=packed)
        assign[ok], pos[ok], kv[ok], max_kvpr[ok], lb[ok] = a, p, k, m, np.minimum(lo, m)
        certified[ok] = work > 0
    assign[failed] = -1
    return BatchResult(assign, kv, max_kvpr, lb, backend=engines, status=status, certified=certified,
                       proven=_proven(certified, max_kvpr, lb))


def _proven(certified: np.ndarray, max_kvpr: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """(B,) bool: the exact search ran (``certified``) and its bound meets the answer
    (:func:`is_optimal`, element by element; NaN figures of unplaced instances are not)."""
    with np.errstate(invalid="ignore"):
        return certified & is_optimal(max_kvpr, lb)


def _solve_on_device(batch: Batch, opts: Options, infeasible: str) -> BatchResult:
    """:func:`solve_batch_plain` with the cuda backend: the same steps and the same figures, on
    the device (:class:`kvgpu.cuda_engine.DeviceBatch`) -- the batch copied there once; seed,
    figures (max KVPR, lower bound), search and figures again one launch each; the results back
    once.  The host looks at the device once more, for the seed's ``ok`` flags: instances it
    did not pack are packed on the CPU (:func:`_pack_unseeded`) and placed on the device.  A
    proof (``exact_work``) runs on the CPU after, as for the other backends."""
    from kvgpu.cuda_engine import DeviceBatch

    B = batch.shape[0]
    status = np.full(B, "ok", dtype=object)
    dev = DeviceBatch(batch)
    bad = np.nonzero(~dev.seed())[0]
    if bad.size:
        a, p = _pack_unseeded(batch, bad, opts, status)
        placed = status[bad] == "ok"
        dev.place(bad[placed], a[placed], p[placed])
    failed = np.nonzero(status != "ok")[0]
    if failed.size and infeasible == "raise":
        raise _not_placed(status, failed, opts.mode)
    active = status == "ok"
    dev.set_active(active)
    dev.finish(with_bound=True)  # max KVPR and the bound below it (the search stops at the bound)
    if opts.effort:
        dev.improve(opts.effort, opts.patience, opts.seed)
        dev.finish(with_bound=False)  # the bound stays the one before the search: min(lo, m)
    assign, pos, kv, max_kvpr, lo, lb = dev.results()
    ok = np.nonzero(active)[0]
    work = opts.proof_works(batch.n_models[ok])
    certified = np.zeros(B, bool)
    if work.any():
        from kvgpu.numba_engine import improve

        sub = batch.take(ok)
        a, p, lo_ok = improve(sub, assign[ok], pos[ok], lo[ok], 0, opts.patience, opts.seed, work)
        k, m = _objective(sub, a, p)
        assign[ok], kv[ok], max_kvpr[ok], lb[ok] = a, k, m, np.minimum(lo_ok, m)
        certified[ok] = work > 0
    packed = bool(bad.size) and _packs_unseeded(opts)
    engines = _engines(opts.backend, searched=bool(opts.effort) and bool(ok.size), proved=bool(work.any()),
                       packed=packed)
    assign[failed] = -1
    return BatchResult(assign, kv, max_kvpr, lb, backend=engines, status=status, certified=certified,
                       proven=_proven(certified, max_kvpr, lb))


def _not_placed(status: np.ndarray, failed: np.ndarray, mode: str) -> NoPlacementFound:
    """The error naming the instances ``failed`` of a batch (``status`` (B,) object), proven when
    the exact search proved every one of them infeasible."""
    proven = bool((status[failed] == INFEASIBLE).all())
    why = ("the models do not fit in GPU memory (proven by exact search)" if proven else
           "no placement fitting the models in memory was found" +
           (" by the seed's packings (mode='seed')" if mode == "seed" else " within the search's work"))
    return NoPlacementFound(f"instance(s) {failed[:10].tolist()}: {why}", failed.tolist(), proven=proven)


def _engines(backend: str, searched: bool, proved: bool, packed: bool = False, on_cpu: bool = False) -> str:
    """Every engine that ran: the seed's ``backend``; search in numba kernels, or on the device
    for ``cuda`` (unless ``on_cpu``: a decomposed cluster's repair between groups); a proof,
    and the exact packing of what the seed did not pack (``packed``), always in numba kernels."""
    used = [backend]
    if (searched and (backend != "cuda" or on_cpu)) or proved or packed:
        used.append("numba")
    return "+".join(dict.fromkeys(used))


def _decomposed(batch: Batch, opts: Options) -> np.ndarray:
    """(B,) bool: the instances solved by decomposition (:mod:`kvgpu.decompose`)."""
    if opts.mode == "seed" or opts.decompose is False:
        return np.zeros(batch.shape[0], bool)
    return np.array([decomposition.chosen(int(g), opts.decompose) for g in batch.n_gpus], bool)


def _solve_decomposed(batch: Batch, opts: Options, big: np.ndarray, infeasible: str) -> BatchResult:
    """The instances ``big`` (B,) by decomposition, one after the other (each is a batch of
    groups), the others as one batch; figures and proofs as :func:`solve_batch_plain`'s."""
    _need_numba("decomposition (the repair between groups)")
    B, N, G = batch.shape
    out = BatchResult(np.full((B, N), -1, np.int64), np.full((B, G), np.nan), np.full(B, np.nan),
                      np.full(B, np.nan), backend=opts.backend, decomposed=big.copy())
    whole = replace(opts, decompose=False, executor=None)
    rest = np.nonzero(~big)[0]
    if rest.size:  # "mark", so that a failure is said below with this batch's instance ids
        r = solve_batch_plain(batch.take(rest), whole, "mark")
        out.assignment[rest], out.kvpr[rest], out.max_kvpr[rest], out.lower_bound[rest] = (
            r.assignment, r.kvpr, r.max_kvpr, r.lower_bound)
        out.status[rest], out.proven[rest], out.certified[rest], out.note[rest] = r.status, r.proven, r.certified, r.note
    engines = {r.backend} if rest.size else set()
    if opts.effort:
        from kvgpu.warmup import ensure

        ensure(["fleet"])  # the groups' seed pipeline and a proof say so themselves (numba_engine)
    for b in np.nonzero(big)[0]:
        mi, gi = np.nonzero(batch.model_mask[b])[0], np.nonzero(batch.gpu_mask[b])[0]
        one = batch.take(np.array([b]))
        one = Batch(one.sizes[:, mi], one.demand[:, mi], one.model_mask[:, mi], one.gpu_mem[:, gi],
                    one.gpu_mask[:, gi])
        s, w, M = one.sizes[0], one.demand[0], one.gpu_mem[0]
        lb0 = float(bounds.lower_bound(one, 2.0 * bounds.simple_bound(one) + 1e-9)[0])
        res = decomposition.solve(s, w, M, lb0, backend=opts.backend, effort=opts.effort, patience=opts.patience,
                                  seed=opts.seed, ex=opts.executor)
        if res is None:  # the seed packs no partition into groups: the cluster whole
            r = solve_batch_plain(one, whole, "mark")
            a, k, m, lo, st = r.assignment, r.kvpr, r.max_kvpr, r.lower_bound, r.status
            out.proven[b], out.certified[b] = r.proven[0], r.certified[0]
            engines.add(r.backend)
            out.decomposed[b] = False
            out.note[b] = ("the seed's packings fit no split of these models into groups, so the cluster was solved "
                           "whole")
        else:
            a, p, rep = res
            a, p = a[None], p[None]
            lo = np.array([lb0])
            work = opts.proof_work(s.shape[0])
            if work:
                from kvgpu.numba_engine import improve

                a, p, lo = improve(one, a, p, lo, 0, opts.patience, opts.seed, work)
            k, m = _objective(one, a, p)
            lo = np.minimum(np.maximum(lo, backends.lower_bound(one, m, opts.backend)), m)
            out.certified[b] = work > 0
            out.proven[b] = _proven(out.certified[b:b + 1], m, lo)[0]
            st = np.array(["ok"], dtype=object)
            engines.add(_engines(opts.backend, searched=opts.effort > 0, proved=bool(work), on_cpu=True))
            if rep.full_gpus:
                a, k, m, lo, st = _never_worse_than_whole(one, whole, (a, k, m, lo, st), rep.full_gpus, out, b,
                                                          engines)
        out.assignment[b, mi] = np.where(a[0, :mi.shape[0]] >= 0, gi[np.maximum(a[0, :mi.shape[0]], 0)], -1)
        out.kvpr[b, gi], out.max_kvpr[b], out.lower_bound[b] = k[0, :gi.shape[0]], m[0], lo[0]
        out.status[b] = st[0]
    out.backend = _merge_engines(*engines)
    failed = np.nonzero(out.status != "ok")[0]
    if failed.size and infeasible == "raise":
        raise _not_placed(out.status, failed, opts.mode)
    return out


def _never_worse_than_whole(one: Batch, whole: Options, dec: tuple, full: int, out: BatchResult, b: int,
                            engines: set) -> tuple:
    """A decomposition left ``full`` GPUs with no KV memory (KVPR inf): solve the cluster whole
    and keep whichever leaves fewer GPUs full (ties: the decomposition), saying so in
    ``out.note[b]`` (and ``out.decomposed[b]`` False when the whole one is kept).
    ``dec``: the decomposition's ``(assign, kvpr, max_kvpr, lower_bound, status)``, each (1, ...)."""
    r = solve_batch_plain(one, whole, "mark")
    engines.add(r.backend)
    whole_full = int(np.isinf(r.kvpr[0]).sum()) if r.status[0] == "ok" else one.gpu_mem.shape[1] + 1
    if whole_full < full:
        out.decomposed[b] = False
        out.proven[b], out.certified[b] = r.proven[0], r.certified[0]
        out.note[b] = (f"the decomposition left {full} GPU(s) with no memory for the KV cache (KVPR inf); solved "
                       f"whole instead, " + (f"{whole_full} such GPU(s) left" if whole_full else "none left"))
        return r.assignment, r.kvpr, r.max_kvpr, r.lower_bound, r.status
    out.note[b] = (f"the decomposition left {full} GPU(s) with no memory for the KV cache (KVPR inf); solving the "
                   f"cluster whole did no better")
    return dec


def _without(batch: Batch, opts: Options, skip: np.ndarray) -> BatchResult:
    """Solve the instances not in ``skip`` (B,) bool; those get status INFEASIBLE, NaN figures."""
    B = batch.shape[0]
    nan = np.full(B, np.nan)
    out = BatchResult(np.full(batch.sizes.shape, -1, np.int64), np.full(batch.gpu_mem.shape, np.nan), nan, nan.copy(),
                      backend=opts.backend, status=np.where(skip, INFEASIBLE, "ok").astype(object))
    rest = np.nonzero(~skip)[0]
    if rest.size:
        r = solve_batch_plain(batch.take(rest), opts, "mark")
        out.assignment[rest], out.kvpr[rest], out.max_kvpr[rest], out.lower_bound[rest] = (
            r.assignment, r.kvpr, r.max_kvpr, r.lower_bound)
        out.status[rest], out.proven[rest], out.certified[rest], out.backend = r.status, r.proven, r.certified, r.backend
        out.decomposed[rest], out.note[rest] = r.decomposed, r.note
    return out


# ----------------------------------------------------------------------------- one problem

def _useful_gpus(problem: Problem, opts: Options) -> np.ndarray | None:
    """With more GPUs than models, GPUs of equal memory beyond one per model stay empty in some
    optimal placement (any placement uses at most one GPU per model, and equal GPUs are
    interchangeable): the ids of the GPUs worth solving on, or None to keep them all.  Not in
    seed mode, which reproduces the seed on the whole cluster."""
    n, G = problem.items.n_models, problem.n_gpus
    if opts.mode == "seed" or G <= max(n, 1):
        return None
    mem = problem.items.gpu_mem
    keep = np.concatenate([np.nonzero(mem == m)[0][:max(n, 1)] for m in np.unique(mem)])
    return np.sort(keep) if keep.size < G else None


def _kvpr_of(problem: Problem, assign, pos) -> np.ndarray:
    b = batch_from_instances([problem.items])
    N = b.sizes.shape[1]
    a = np.full((1, N), -1, np.int64)
    p = np.full((1, N), -1, np.int64)
    n = problem.items.n_models
    a[0, :n], p[0, :n] = assign, pos
    kv, _ = _objective(b, a, p)
    return kv[0, :problem.n_gpus]


def _scope(problem: Problem, certified: bool) -> str:
    if not (problem.max_moves >= 0 or math.isfinite(problem.max_migrated_gb)):
        return "every placement"
    if certified:
        return "every placement within the migration budget (exact search)"
    return "every placement, without the migration budget (so also those within it)"


def _no_placement(problem: Problem, status: int, work: int, start_status: int) -> NoPlacementFound:
    from kvgpu.kernels import exact, start

    what = "memory, the rules (pins, forbidden GPUs, shards on distinct GPUs, nodes"
    what += ", adapters beside their base" if problem.coloc.shape[0] else ""
    what += ", GPUs out of service)" if problem.out_of_service else ")"
    if problem.is_replan and (problem.max_moves >= 0 or math.isfinite(problem.max_migrated_gb)):
        what += " and the migration budget"
    if status == exact.INFEASIBLE:
        msg = f"no placement keeps the {what} (proven by exact search)"
    else:
        msg = (f"no placement keeping the {what} was found; the exact search gave up after {work} nodes, so "
               f"this is not a proof (raise exact_work to decide)")
    if start_status == start.OVER_BUDGET:
        msg += "; the models whose current GPUs break their rules must move, beyond the budget"
    return NoPlacementFound(msg, [0], proven=status == exact.INFEASIBLE)


def _forced_moves(problem: Problem) -> dict[int, int]:
    """Models that must move in any placement, with the fewest shards each must copy: of the
    ``min(k, running)`` running copies a model of ``k`` shards keeps (the rest may stop), those
    beyond its running GPUs that some shard may still use (a new pin, forbid or node, or the GPU
    is out of service) are copied."""
    if not (problem.is_replan and problem.allowed.shape[0]):
        return {}
    out = {}
    for m, gpus in enumerate(problem.running):
        items = problem.items_of(m)
        ok = problem.allowed[items].any(axis=0)  # GPUs some shard of the model may use
        short = min(len(items), len(gpus)) - int(ok[list(gpus)].sum()) if gpus else 0
        if short > 0:
            out[m] = short
    return out


def _check_forced(problem: Problem) -> None:
    """Refuse at once, with a proof, when the forced moves alone break the budget."""
    forced = _forced_moves(problem)
    if not forced:
        return
    gb = sum(k * problem.specs[m].size / problem.specs[m].tp for m, k in forced.items())
    names = ", ".join(problem.specs[m].where for m in forced)
    if 0 <= problem.max_moves < len(forced):
        raise NoPlacementFound(f"{len(forced)} model(s) run on GPUs their rules now forbid (pin, forbid, node, "
                               f"out_of_service) and must move ({names}), "
                               f"more than max_moves={problem.max_moves} (proven)", [0], proven=True)
    if gb > problem.max_migrated_gb * (1 + 1e-9) + 1e-12:
        raise NoPlacementFound(f"models that run on GPUs their rules now forbid (pin, forbid, node, out_of_service) "
                               f"must move ({names}): at least "
                               f"{gb:g} GB, more than max_migrated_gb={problem.max_migrated_gb:g} (proven)", [0],
                               proven=True)


def _solve_ruled(problem: Problem, opts: Options) -> tuple[np.ndarray, np.ndarray, float, bool, str]:
    """Start, search and proof under the rules: ``(assign, pos, lower bound, certified, which
    bound)``."""
    from kvgpu.kernels import exact, search, start

    if opts.mode == "seed":
        raise InvalidInstance("mode='seed' runs the seed pipeline, which knows no shards, pins, forbidden GPUs, "
                              "nodes, co-location, GPUs out of service or current placements; these models need "
                              "mode='search'")
    if opts.backend in ("numpy", "cuda"):
        raise InvalidInstance(f"backend={opts.backend!r} runs the seed pipeline, which models with tp, replicas, "
                              f"pin, forbid, node, colocate_with, out_of_service, nodes or a current placement do not "
                              f"use: they run in numba kernels "
                              f"(backend='auto' or 'numba')")
    _need_numba("models with rules")
    _check_forced(problem)
    from kvgpu.warmup import ensure

    inst = problem.items
    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    rules, gclass = problem.kernel_rules(), np.ascontiguousarray(problem.gpu_class)
    n = inst.n_models
    assign = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    work = opts.proof_work(n)
    ensure(["start"] + (["search"] if opts.effort else []) + (["exact"] if work else []))
    st = start.solve_start(s, w, M, rules, opts.seed, assign, pos)
    if st != start.STARTED:  # decide exactly: find a placement, or prove there is none
        ensure(["exact"])
        budget = work or AUTO_EXACT_WORK
        found, used = exact.feasible(s, w, M, np.inf, budget, assign, rules, gclass)
        if found != exact.FEASIBLE:
            raise _no_placement(problem, found, used, st)
        pos[:] = np.arange(n)
    mx = float(np.max(_kvpr_of(problem, assign, pos)))
    lb = bounds.problem_bound(problem, mx)
    if opts.effort:
        search.improve_instance(s, w, M, lb, assign, pos, opts.effort, opts.patience, opts.seed, rules)
        assign = _node_moves(problem, opts, assign, pos, lb)
        mx = float(np.max(_kvpr_of(problem, assign, pos)))
        lb = max(lb, bounds.problem_bound(problem, mx))
    lb, certified, source = _prove_ruled(problem, opts, assign, pos, lb, mx)
    dived = _lp_dive(problem, opts, assign, lb)
    if dived is not None:
        assign, pos = dived, np.arange(problem.items.n_models, dtype=np.int64)
    if _balances(opts, False):
        assign, pos = _balance(problem, assign, pos, opts)
    _check_colocation(problem, assign)
    return assign, pos, lb, certified, source


def _prove_ruled(problem: Problem, opts: Options, assign, pos, lb: float, mx: float) -> tuple[float, bool, str]:
    """The proof of a placement under the rules (``exact``: :func:`kvgpu.kernels.exact.certify_instance`
    with ``proof_work`` nodes, then the configuration LP where it left a gap): ``(lower bound,
    certified, which bound)``; ``lb`` the bound so far, ``mx`` the placement's max KVPR."""
    work = opts.proof_work(problem.items.n_models)
    certified = False
    if work:
        from kvgpu.kernels import exact
        from kvgpu.warmup import ensure

        ensure(["exact"])
        inst = problem.items
        lo, _ = exact.certify_instance(inst.sizes, inst.demand, inst.gpu_mem, lb, assign, pos, work,
                                       problem.kernel_rules(), np.ascontiguousarray(problem.gpu_class))
        certified = lo > lb
        lb = lo
    source = BOUND_EXACT if certified else BOUND_CLOSED_FORM
    lb, source = _lp_bound(problem, opts, lb, mx, source)
    return lb, certified, source


def _solve_group(problem: Problem, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    """A group of a decomposed rule cluster (:mod:`kvgpu.decompose_rules`): start and search
    under its rules, no proof, no balancing; ``(assign, pos)`` in its local ids.  A task
    function (module level, so Dask can ship it)."""
    group_opts = replace(opts, exact=False, objective="seed", decompose=False, executor=None)
    assign, pos, _, _, _ = _solve_ruled(problem, group_opts)
    return assign, pos


def _solve_ruled_decomposed(problem: Problem, opts: Options) -> Placement:
    """A rule cluster by decomposition (:mod:`kvgpu.decompose_rules`): groups, repair between
    them, the whole problem's bound (and proof, with ``exact``); solved whole, said in the note,
    where no split solves or the split leaves more GPUs with no KV memory than the whole."""
    _need_numba("decomposition of a cluster with rules")
    from kvgpu.warmup import ensure

    ensure(["start"] + (["search"] if opts.effort else []))
    whole = replace(opts, decompose=False, executor=None)
    res = decompose_rules.solve(problem, opts, _solve_group, opts.executor)
    if res is None:
        out = solve_problem(problem, whole)
        out.note = "no split of this cluster into groups of whole nodes solves, so it was solved whole"
        return out
    assign, pos, rep = res
    kv = _kvpr_of(problem, assign, pos)
    full = int(np.isinf(kv).sum())
    if full:
        alone = solve_problem(problem, whole)
        if int(np.isinf(alone.kvpr).sum()) < full:
            alone.note = (f"the decomposition left {full} GPU(s) with no memory for the KV cache (KVPR inf); solved "
                          f"whole instead")
            return alone
    mx = float(kv.max())
    lb = bounds.problem_bound(problem, mx)
    lb, certified, source = _prove_ruled(problem, opts, assign, pos, lb, mx)
    kv = _kvpr_of(problem, assign, pos)  # the proof may have found a better placement
    mx = float(kv.max())
    _check_colocation(problem, assign)
    note = (f"solved by decomposition: {rep.groups} groups of whole nodes, then {rep.rounds} repair round(s) "
            f"between pairs of groups ({rep.kept} kept); decompose=False solves the cluster whole")
    if opts.objective == "lex":
        note += "; in the seed's order (max, second, mean): the balancing passes do not run on a decomposition"
    return Placement(problem, assign, kv, float(min(lb, mx)), mode=opts.mode, backend="numba", note=note,
                     decomposed=True, bound_scope=_scope(problem, certified), bound_source=source,
                     objective=_order_used(opts, True))


#: Rule clusters from this many GPUs (below the automatic decomposition) are searched whole AND
#: by decomposition, the better kept: the whole search under rules can stall far above what
#: groups reach (a 64-GPU tp cluster with 2 GPUs out of service: 0.5 whole at any effort, 0.354
#: decomposed), and the groups sometimes above the whole (256 GPUs: 3% higher).
SPLIT_TOO_GPUS = 2 * decompose_rules.GROUP_GPUS


def _also_split(problem: Problem, opts: Options) -> bool:
    return (opts.decompose is None and opts.mode == "search" and opts.effort > 0 and not problem.is_replan
            and opts.executor is None and problem.n_gpus >= SPLIT_TOO_GPUS)


def _whole_or_split(problem: Problem, opts: Options) -> Placement:
    """:data:`SPLIT_TOO_GPUS` and up: the whole search and the decomposition, the decomposition
    kept only where its max KVPR is lower (beyond ``OPTIMAL_RTOL``) -- then balanced where the
    objective asks for it -- with the larger of their bounds (both proven for every placement).
    A search that finds nothing (not a proof) leaves the other's answer; the note says which."""
    found, failed = {}, None
    with warnings.catch_warnings(record=True) as caught:  # a GPU without KV memory in the placement not
        warnings.simplefilter("always")                  # kept would be named for nothing: the kept one's
        for how, o in (("whole", replace(opts, decompose=False)), ("split", replace(opts, decompose=True))):
            try:                                         # are issued when it is made below
                found[how] = solve_problem(problem, o) if how == "whole" else _solve_ruled_decomposed(problem, o)
            except NoPlacementFound as e:
                if e.proven:
                    raise
                failed = failed or e
    for w in caught:
        if not (issubclass(w.category, KvgpuWarning) and str(w.message).startswith("GPU ")):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not found:
        raise failed
    whole, split = found.get("whole"), found.get("split")
    use_split = whole is None or (split is not None and split.decomposed
                                  and split.max_kvpr < whole.max_kvpr * (1 - OPTIMAL_RTOL))
    best = split if use_split else whole
    lb, source = best.lower_bound, best.bound_source
    for p in found.values():
        if p.lower_bound > lb:
            lb, source = p.lower_bound, p.bound_source
    tried = (f"max KVPR {whole.max_kvpr:.6g} whole, {split.max_kvpr:.6g} decomposed" if len(found) == 2 else
             f"the {'whole-cluster search' if whole is None else 'decomposition'} found no placement")
    note = (f"searched whole and by decomposition into groups of whole nodes ({tried}): kept the "
            f"{'decomposition' if use_split else 'whole-cluster search'}")
    a, objective = best.assignment, best.objective
    if use_split and _balances(opts, False):
        a, _ = _balance(problem, a, np.arange(a.shape[0], dtype=np.int64), opts)
        objective, note = _order_used(opts, False), note + ", balanced afterwards"
    kv = _kvpr_of(problem, a, np.arange(a.shape[0], dtype=np.int64))
    return Placement(problem, a, kv, float(min(lb, kv.max())), proven=best.proven, mode=best.mode,
                     backend=best.backend, bound_scope=best.bound_scope, bound_source=source, note=note,
                     decomposed=use_split, objective=objective)


def _lp_bound(problem: Problem, opts: Options, lb: float, mx: float, source: str) -> tuple[float, str]:
    """``exact=True`` asks for the best bound kvgpu has: where the exact search left a gap, the
    configuration LP (:mod:`kvgpu.lp_bound`) tries to raise ``lb`` towards the answer ``mx``.
    Returns the bound and which one it is."""
    if (opts.exact is not True or is_optimal(mx, lb) or not math.isfinite(mx)
            or problem.items.n_models > LP_MAX_ITEMS):
        return lb, source
    from kvgpu.lp_bound import configuration_bound

    lp = configuration_bound(problem, lb, mx)
    return (lp, BOUND_LP) if lp > lb else (lb, source)


def _node_moves(problem: Problem, opts: Options, assign: np.ndarray, pos: np.ndarray, lb: float) -> np.ndarray:
    """Where tp replicas must stay inside a node: rounds of whole-replica moves and swaps
    between nodes and the search again (:func:`kvgpu.lp_dive.polish`), steps no single search
    move makes; ``assign`` (n,) int64 as the search left it, returned when nothing gains (and
    for re-placements, whose budget these moves do not count).  ``pos`` is renumbered in place
    where the placement changes."""
    if not problem.node_group.shape[0] or problem.is_replan:
        return assign
    from kvgpu.lp_dive import polish

    out = polish(problem, assign, lb, opts.effort, opts.seed, searched=True)
    if (out != assign).any():
        pos[:] = np.arange(assign.shape[0])
    return out


def _lp_dive(problem: Problem, opts: Options, assign: np.ndarray, lb: float) -> np.ndarray | None:
    """``exact=True``, where the bound still leaves a gap: dives on the configuration LP's
    solution (:func:`kvgpu.lp_dive.improve`) for a placement of lower max KVPR than ``assign``
    (n,) int64 -- checked against every rule there -- or None (none found, not tried: another
    mode or backend, a re-placement, too many items)."""
    mx = float(np.max(_kvpr_of(problem, assign, np.arange(assign.shape[0]))))
    if (opts.exact is not True or opts.mode != "search" or opts.backend not in ("auto", "numba")
            or is_optimal(mx, lb) or not math.isfinite(mx) or problem.items.n_models > LP_MAX_ITEMS):
        return None
    from kvgpu.lp_dive import improve

    return improve(problem, assign, lb, effort=opts.effort, seed=opts.seed)


def _balances(opts: Options, decomposed: bool) -> bool:
    """Do the balancing passes run?  Objective "lex" in search mode with search rounds; not on a
    decomposed cluster, whose groups and repair use the seed's order (:func:`_order_used` says so)."""
    return opts.objective == "lex" and opts.mode == "search" and opts.effort > 0 and not decomposed


def _order_used(opts: Options, decomposed: bool) -> str:
    """The words of :data:`ORDER_WORDS` for the order the placement was really searched in."""
    return ORDER_WORDS["lex" if _balances(opts, decomposed) else "seed"]


def _merge_engines(*engines: str) -> str:
    """Engine names such as "numpy+cuda" and "numba" as one, each once, in the order the
    backend field lists them (numpy, cuda, numba)."""
    names = {e for group in engines for e in group.split("+")}
    return "+".join(sorted(names, key=["numpy", "cuda", "numba"].index))


def _with_numba(engines: str) -> str:
    """``engines`` ("numpy+cuda", ...) with "numba" added: the balancing passes ran there."""
    return _merge_engines(engines, "numba")


def _alone_bound(s, w, M, allowed, free) -> float:
    """A lower bound on the max KVPR of the free items: each alone on the allowed GPU where its
    KVPR is least (the cheap test that skips most levels of :func:`_balance` before the full
    bound).  ``s``, ``w`` (n,), ``M`` (G,), ``allowed`` (n, G) bool, ``free`` (n,) bool."""
    if not free.any():
        return 0.0
    per = safe_div_array(w[free, None], M[None, :] - s[free, None], np)
    return float(np.where(allowed[free], per, np.inf).min(axis=1).max())


def _rest_bound(problem: Problem, free: np.ndarray, rest: np.ndarray, hi: float) -> float:
    """A lower bound on the max KVPR of the items ``free`` (n,) bool on the GPUs ``rest`` (G,)
    bool: :func:`kvgpu.bounds.problem_bound` of that smaller problem (its pins and forbidden
    GPUs kept; the other rules only restrict it further).  ``hi``: an achieved max there."""
    inst = problem.items
    items = Instance(inst.sizes[free], inst.demand[free], inst.gpu_mem[rest])
    allowed = problem.allowed[free][:, rest] if problem.allowed.shape[0] else problem.allowed
    return bounds.problem_bound(replace(problem, items=items, allowed=allowed), hi)


def _balance(problem: Problem, assign: np.ndarray, pos: np.ndarray, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    """The balancing passes of ``objective="lex"``: lower the sorted vector of GPU KVPRs after
    its largest term.

    Level by level, the GPU with the largest KVPR among those not yet fixed is fixed with its
    items, and the search (:func:`kvgpu.kernels.search.improve_instance`, ``effort //
    LEX_SHARE`` rounds; ``effort // 2`` rounds for all levels, and no more after
    ``LEX_PATIENCE`` searched levels in a row without a gain of ``LEX_MIN_GAIN``) minimises the max KVPR of the other
    GPUs; then :func:`_fill_empty`.  The sub-problem is the whole
    problem with the fixed items pinned to their GPUs at demand 0 (so their GPUs weigh 0) and
    every other item barred from them: every rule -- allowed GPUs, shards on distinct GPUs,
    nodes (a fixed shard holds its replica's node), the migration budget counted on the whole
    placement -- holds as in the first search.  A level's result is kept only when its sorted
    vector is better (:func:`kvgpu.kernels.deltas.lex_better`) and not worse than the start's,
    so the max never rises; a level whose rest is at its lower bound
    (:func:`kvgpu.bounds.problem_bound` of the sub-problem) is skipped.  Work is in rounds, so
    the same seed gives the same answer everywhere.

    Parameters
    ----------
    problem : Problem -- what is solved (its rules and budget).
    assign, pos : ndarray (n,) int64 -- a placement keeping the rules (GPU of each item, order stamps).
    opts : Options -- ``effort``, ``patience``, ``seed``.

    Returns
    -------
    (assign, pos) : ndarray (n,) int64 -- a placement not worse in the sorted order.
    """
    from kvgpu.kernels import search
    from kvgpu.kernels.deltas import lex_better
    from kvgpu.warmup import ensure

    inst = problem.items
    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    n, G = inst.n_models, problem.n_gpus
    effort = max(1, opts.effort // LEX_SHARE)
    if n == 0 or G < 2 or not opts.effort:
        return assign, pos
    _need_numba("objective 'lex' (the balancing passes)")
    ensure(["search"])
    rules = problem.kernel_rules()
    allowed0 = problem.allowed.astype(bool) if problem.allowed.shape[0] else np.ones((n, G), bool)
    kv = start = _kvpr_of(problem, assign, pos)
    fixed = np.zeros(G, bool)
    patience = min(opts.patience, search.default_patience(effort))
    budget = opts.effort // 2  # rounds left to the levels: each is charged all of its rounds
    misses = 0  # searched levels in a row that found nothing better
    while budget >= effort and misses < LEX_PATIENCE:
        free = np.nonzero(~fixed)[0]
        fixed[free[np.argmax(kv[free])]] = True
        rest = ~fixed
        hi = float(kv[rest].max()) if rest.any() else 0.0
        if not hi > 0.0:  # nothing left to lower
            return assign, pos
        on = fixed[assign]
        allowed = allowed0 & rest[None, :]
        allowed[on] = False
        allowed[np.nonzero(on)[0], assign[on]] = True
        w_sub = np.where(on, 0.0, w)
        if hi <= _alone_bound(s, w, M, allowed, ~on) * (1.0 + search.STOP_GAP):
            continue  # a free item alone on its best GPU is already this high: nothing to gain here
        lb = _rest_bound(problem, ~on, rest, hi)
        if hi <= lb * (1.0 + search.STOP_GAP):
            continue
        a, p = assign.copy(), pos.copy()
        budget -= effort
        search.improve_instance(s, w_sub, M, lb, a, p, effort, patience, opts.seed,
                                (np.ascontiguousarray(allowed, np.uint8),) + rules[1:])
        k = _kvpr_of(problem, a, p)
        misses += 1
        if lex_better(k, kv) and not lex_better(start, k):
            if k[rest].max() < hi * (1.0 - LEX_MIN_GAIN):
                misses = 0
            assign, pos, kv = a, p, k
    return _fill_empty(problem, assign, pos)


def _fill_empty(problem: Problem, assign: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move one item at a time off a GPU holding several onto an empty GPU, while such a move
    keeps the rules (:func:`kvgpu.kernels.rules.transfer_check`: allowed GPUs, nodes, the
    budget) and lowers the sorted vector -- the pair (source, empty GPU) goes from
    ``(k_src, 0)`` to new values both below ``k_src`` (tolerance ``SCORE_RTOL``).  The most
    loaded source first, then the lowest new pair.  The last step of :func:`_balance`, which
    may stop at its work limit: no GPU is then left empty where a model gains by moving there.

    ``assign``, ``pos`` (n,) int64 in; returns new arrays."""
    from kvgpu.kernels import rules as kr
    from kvgpu.kernels.deltas import SCORE_RTOL, fits

    inst = problem.items
    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    G = problem.n_gpus
    assign, pos = assign.copy(), pos.copy()
    krules = problem.kernel_rules()
    state = None
    while True:
        count = np.bincount(assign, minlength=G)
        empty = np.nonzero(count == 0)[0]
        cand = np.nonzero(count[assign] > 1)[0]
        if not (empty.size and cand.size):
            return assign, pos
        S = np.bincount(assign, weights=s, minlength=G)
        W = np.bincount(assign, weights=w, minlength=G)
        src = assign[cand]
        k_old = safe_div_array(W[src], M[src] - S[src], np)
        k_src = safe_div_array(W[src] - w[cand], M[src] - S[src] + s[cand], np)
        k_dst = safe_div_array(w[cand, None], M[None, empty] - s[cand, None], np)  # (c, e)
        new = np.maximum(k_src[:, None], k_dst)
        gain = (new < k_old[:, None] * (1.0 - SCORE_RTOL)) & fits(s[cand, None], M[None, empty])
        ci, ei = np.nonzero(gain)
        if not ci.size:
            return assign, pos
        if state is None:
            state = kr.new_state(krules, assign, G)
        for j in np.lexsort((new[ci, ei], -k_old[ci])).tolist():
            i, g, e = int(cand[ci[j]]), int(src[ci[j]]), int(empty[ei[j]])
            if kr.transfer_check(krules, state, g, e, i, -1, -1, -1)[0]:
                kr.transfer_apply(krules, state, g, e, i, -1, -1, -1)
                assign[i], pos[i] = e, pos.max() + 1
                break
        else:
            return assign, pos


def _check_colocation(problem: Problem, assign: np.ndarray) -> None:
    """The kernels keep every adapter beside its base; checked once more here, so that a fault
    there is an error, never a placement that breaks the rule."""
    if not problem.coloc.shape[0]:
        return
    for i in np.nonzero(problem.coloc >= 0)[0].tolist():
        beside = assign[problem.model_of == problem.coloc[i]]
        if assign[i] not in beside:
            spec = problem.specs[problem.model_of[i]]
            raise RuntimeError(f"internal error: {spec.where} ended on GPU {assign[i]}, which holds no shard of its "
                               f"base {spec.colocate_with!r} (please report it)")


def solve_problem(problem: Problem, opts: Options) -> Placement:
    """Solve one problem (module doc); a re-placement also gets its baseline, its plan and the
    ``min_gain`` rule.  Raises :class:`kvgpu.NoPlacementFound` when nothing fits."""
    if not problem.has_rules:
        keep = _useful_gpus(problem, opts)
        items = problem.items
        sub = items if keep is None else Instance(items.sizes, items.demand, items.gpu_mem[keep], items.names,
                                                    items.objects)
        res = solve_batch_plain(batch_from_instances([sub]), opts)
        n = items.n_models
        a = res.assignment[0, :n].astype(np.int64)
        kv = res.kvpr[0, :sub.n_gpus]
        engine_names = res.backend
        if _balances(opts, bool(res.decomposed[0])):
            part = problem if keep is None else replace(problem, items=sub, memory=problem.memory[keep],
                                                        reserve=problem.reserve[keep])
            a, _ = _balance(part, a, np.arange(n, dtype=np.int64), opts)
            kv = _kvpr_of(part, a, np.arange(n, dtype=np.int64))
            engine_names = _with_numba(engine_names)
        if keep is not None:  # back to the cluster's GPU ids; the GPUs left out stay empty
            a = keep[a]
            full = np.zeros(problem.n_gpus)
            full[keep] = kv
            kv = full
        note = _decompose_note(res, opts, sub.n_gpus)
        if res.decomposed[0] and opts.objective == "lex":
            note += "; in the seed's order (max, second, mean): the balancing passes do not run on a decomposition"
        lb, source = _lp_bound(problem, opts, float(res.lower_bound[0]), float(kv.max()),
                               str(res.bound_source[0]))
        dived = None if res.decomposed[0] else _lp_dive(problem, opts, a, lb)
        if dived is not None:  # the dive ran the numba search; balanced again from its placement
            a = dived
            if _balances(opts, False):
                a, _ = _balance(problem, a, np.arange(n, dtype=np.int64), opts)
            kv, engine_names = _kvpr_of(problem, a, np.arange(n, dtype=np.int64)), _with_numba(engine_names)
        return Placement(problem, a, kv, float(min(lb, kv.max())), mode=opts.mode,
                         backend=engine_names, note=note, decomposed=bool(res.decomposed[0]),
                         objective=_order_used(opts, bool(res.decomposed[0])), bound_source=source)
    if decompose_rules.check(problem, opts.decompose, dask=opts.executor is not None):
        return _solve_ruled_decomposed(problem, opts)
    if _also_split(problem, opts):
        return _whole_or_split(problem, opts)
    assign, pos, lb, certified, source = _solve_ruled(problem, opts)
    kv = _kvpr_of(problem, assign, pos)
    out = dict(mode=opts.mode, backend="numba", bound_scope=_scope(problem, certified), bound_source=source,
               objective=_order_used(opts, False))
    if not problem.is_replan:
        return Placement(problem, assign, kv, float(min(lb, kv.max())), **out)
    return _replan_result(problem, opts, assign, kv, lb, out)


def _decompose_note(res: BatchResult, opts: Options, n_gpus: int) -> str | None:
    """What a plain problem's note says about decomposition (``res``: its one-instance result on
    ``n_gpus`` GPUs worth solving on): a fallback's reason first, else how it was solved."""
    if res.note[0]:
        return res.note[0]
    if res.decomposed[0]:
        return ("solved by decomposition: groups of GPUs as one batch, then a repair between them "
                "(decompose=False solves the cluster whole)")
    if opts.decompose:
        return f"decompose=True: {n_gpus} GPU(s) worth solving on, nothing to split; solved whole"
    return None


def _replan_result(problem: Problem, opts: Options, assign, kv, lb, out) -> Placement:
    """A re-placement's figures: the peak now, the baseline (new models placed, nothing that
    runs moved), ``min_gain``, and the plan in an executable order."""
    start_kvpr = _running_peak(problem)
    baseline = None
    if problem.max_moves != 0:
        try:
            b_assign, b_pos, _, _, _ = _solve_ruled(problem.with_budget(0), replace(opts, exact=False))
            baseline = (b_assign, _kvpr_of(problem, b_assign, b_pos))
        except NoPlacementFound:
            baseline = None
    else:
        baseline = (assign, kv)
    note = None
    base_kvpr = None if baseline is None else float(baseline[1].max())
    if base_kvpr is not None and problem.min_gain > 0 and math.isfinite(base_kvpr) and base_kvpr > 0:
        gain = 1.0 - float(kv.max()) / base_kvpr
        if gain < problem.min_gain and baseline[0] is not assign:
            note = (f"the best plan found gains {100 * gain:.3g}%, below min_gain {100 * problem.min_gain:.3g}%: "
                    f"nothing that runs is moved (min_gain=0 / --min-gain 0 moves for any gain)")
            assign, kv = baseline
            lb = min(lb, float(kv.max()))  # the bound, and which placements it covers, stay what was proven
    assign = group_replicas(problem, assign)  # running tp engines stay whole (the same GPUs, regrouped)
    steps, plan_note = migration.plan(problem, assign)
    return Placement(problem, assign, kv, float(min(lb, kv.max())), plan=steps, plan_note=plan_note,
                     start_kvpr=start_kvpr, baseline_kvpr=base_kvpr, note=note, **out)


def _running_peak(problem: Problem) -> float:
    """Max KVPR of the cluster as it runs now: its running shards on their current GPUs."""
    inst = problem.items
    S, W = np.zeros(problem.n_gpus), np.zeros(problem.n_gpus)
    for m, kept in enumerate(problem.running):
        items = problem.items_of(m)
        first, k = int(items[0]), len(items)
        gpus = kept + (problem.stopped[m] if problem.stopped else ())  # tp replicas that stop still run now
        for g in gpus:  # a model scaling in shares its demand among all the copies running now
            S[g] += inst.sizes[first]
            W[g] += inst.demand[first] * k / max(k, len(gpus))
    return float(safe_div_array(W, inst.gpu_mem - S, np).max())


def is_optimal(max_kvpr: float, lower_bound: float) -> bool:
    """The bound meets the objective (to ``OPTIMAL_RTOL``)."""
    return max_kvpr <= lower_bound * (1 + OPTIMAL_RTOL)
