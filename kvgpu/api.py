"""Public API: :func:`solve`, :func:`solve_batch`, :func:`compute_model_placement`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kvgpu import backends
from kvgpu.batch import bounds as batch_bounds
from kvgpu.batch.state import Batch, batch_from_instances, gpu_loads, kvpr, make_batch
from kvgpu.kernels.deltas import EPS
from kvgpu.kernels.params import OPTIMAL_RTOL
from kvgpu.problem import DEFAULT_GPU_MEM, Instance, InvalidInstance, NoPlacementFound, make_instance

MODES = ("search", "seed")
#: Search rounds per instance in ``mode="search"`` unless ``effort=`` says otherwise.
DEFAULT_EFFORT = 30
#: Work (search nodes / DP states) per instance for ``exact=True`` unless ``exact_work=`` says.
DEFAULT_EXACT_WORK = 20_000_000


def _nonneg_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _check(backend: str, mode: str, effort: int, exact: bool, exact_work: int) -> tuple[str, int, int]:
    """Validate the options; return the concrete backend, the search rounds and the proof work."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not available; choose one of {MODES}")
    rounds = _nonneg_int(effort, "effort") if mode == "search" else 0
    work = _nonneg_int(exact_work, "exact_work") if exact else 0
    used = backends.resolve(backend)
    if (rounds or work) and not backends.probe()["numba"][0]:
        what = "mode 'search'" if rounds else "exact=True"
        raise backends.BackendUnavailable(f"{what} runs in numba kernels: {backends.probe()['numba'][1]} "
                                          f"(or use mode='seed')")
    return used, rounds, work


@dataclass
class Placement:
    """A placement of one instance.

    Attributes
    ----------
    assignment : ndarray (N,) int64 -- GPU id of each model, in input order.
    kvpr : ndarray (G,) float64 -- KV cache pressure of each GPU (``inf`` if a GPU's memory is
        exactly full while it has demand).
    max_kvpr : float -- the objective, ``kvpr.max()``.
    lower_bound : float -- a proven lower bound on the optimal ``max_kvpr``.
    """

    instance: Instance
    assignment: np.ndarray
    kvpr: np.ndarray
    lower_bound: float
    mode: str = "search"
    backend: str = "numba"
    #: migrations ``(model, from, to)`` when the placement is a re-placement (:func:`kvgpu.replan`)
    moves: list = field(default_factory=list)
    #: (n,) the model of each entry of ``assignment`` when models were expanded into shards and
    #: replicas (:mod:`kvgpu.cluster`); None when entries are the models themselves
    model_of: np.ndarray | None = None
    used: np.ndarray = field(init=False, repr=False)
    demand: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        G = self.instance.n_gpus
        self.used = np.bincount(self.assignment, weights=self.instance.sizes, minlength=G)
        self.demand = np.bincount(self.assignment, weights=self.instance.demand, minlength=G)

    @property
    def max_kvpr(self) -> float:
        return float(self.kvpr.max())

    @property
    def gap(self) -> float:
        """``max_kvpr / lower_bound - 1`` (0 when both are 0)."""
        if self.max_kvpr == self.lower_bound:
            return 0.0
        return self.max_kvpr / self.lower_bound - 1 if self.lower_bound > 0 else math.inf

    @property
    def proven_optimal(self) -> bool:
        """The lower bound meets the objective (to a relative ``OPTIMAL_RTOL``)."""
        return self.max_kvpr <= self.lower_bound * (1 + OPTIMAL_RTOL)

    @property
    def status(self) -> str:
        """``"optimal (proven)"`` or the proven interval of the optimum, in words."""
        if self.proven_optimal:
            return "optimal (proven)"
        return (f"optimum in [{self.lower_bound:.6g}, {self.max_kvpr:.6g}] "
                f"(at most {100 * self.gap:.2f}% above it)")

    def _count(self) -> str:
        if self.model_of is None:
            return f"{self.instance.n_models} models"
        return f"{len(self.gpus_of_models())} models as {self.instance.n_models} shards/replicas"

    def gpus_of_models(self) -> list[list[int]]:
        """The GPU(s) of every input model: one for a plain model, ``tp * replicas`` for one
        split into shards and replicas."""
        if self.model_of is None:
            return [[g] for g in self.assignment.tolist()]
        out: list[list[int]] = [[] for _ in range(int(self.model_of.max()) + 1 if self.model_of.size else 0)]
        for m, g in zip(self.model_of.tolist(), self.assignment.tolist()):
            out[m].append(g)
        return out

    def by_gpu(self) -> dict[int, list]:
        """``{gpu_id: [model, ...]}`` for every GPU (empty ones too), the caller's own objects."""
        out: dict[int, list] = {g: [] for g in range(self.instance.n_gpus)}
        for i, g in enumerate(self.assignment.tolist()):
            out[g].append(self.instance.objects[i])
        return out

    def _name(self, i: int) -> str:
        n = self.instance.names[i]
        return n if n is not None else f"#{i}"

    def to_dict(self) -> dict:
        """Plain-JSON form: per-GPU rows and the summary figures."""
        gpus = []
        for g in range(self.instance.n_gpus):
            idx = np.nonzero(self.assignment == g)[0].tolist()
            gpus.append({"gpu": g, "memory": float(self.instance.gpu_mem[g]), "used": float(self.used[g]),
                         "demand": float(self.demand[g]), "kvpr": _json_float(self.kvpr[g]),
                         "models": [self._name(i) for i in idx]})
        return {"max_kvpr": _json_float(self.max_kvpr), "lower_bound": _json_float(self.lower_bound),
                "gap": _json_float(self.gap),
                "proven_optimal": self.proven_optimal, "mode": self.mode,
                "moves": [list(m) for m in self.moves],
                **({"model_gpus": self.gpus_of_models()} if self.model_of is not None else {}), "backend": self.backend,
                "assignment": self.assignment.tolist(), "gpus": gpus}

    def __str__(self) -> str:
        rows = [f"{'GPU':>4} {'mem GB':>7} {'used GB':>8} {'free GB':>8} {'demand':>9} {'KVPR':>10}  models"]
        for g in range(self.instance.n_gpus):
            idx = np.nonzero(self.assignment == g)[0].tolist()
            mem = self.instance.gpu_mem[g]
            rows.append(f"{g:>4} {mem:>7.1f} {self.used[g]:>8.1f} {mem - self.used[g]:>8.1f} "
                        f"{self.demand[g]:>9.4f} {self.kvpr[g]:>10.6f}  {', '.join(self._name(i) for i in idx)}")
        if self.moves:
            rows.append(f"moves ({len(self.moves)}): " + ", ".join(f"{m} {a}->{b}" for m, a, b in self.moves))
        rows.append(f"max KVPR {self.max_kvpr:.6f}   lower bound {self.lower_bound:.6f}   "
                    f"gap {100 * self.gap:.2f}%   {'optimal (proven)   ' if self.proven_optimal else ''}"
                    f"({self._count()}, {self.instance.n_gpus} GPUs, mode={self.mode}, "
                    f"backend={self.backend})")
        return "\n".join(rows)


def _json_float(x) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else ("Infinity" if x > 0 else "-Infinity")


@dataclass
class BatchResult:
    """Placements of a batch.

    Attributes
    ----------
    assignment : ndarray (B, N) int64 -- GPU id per model slot, -1 for padding.
    kvpr : ndarray (B, G) float64 -- per-GPU KVPR (``nan`` for padded GPUs).
    max_kvpr : ndarray (B,) float64; lower_bound : ndarray (B,) float64.
    backend : str -- the engine that computed it.
    """

    assignment: np.ndarray
    kvpr: np.ndarray
    max_kvpr: np.ndarray
    lower_bound: np.ndarray
    backend: str = "numba"

    @property
    def gap(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.max_kvpr == self.lower_bound, 0.0, self.max_kvpr / self.lower_bound - 1)

    @property
    def proven_optimal(self) -> np.ndarray:
        """(B,) bool: the lower bound meets the objective (to a relative ``OPTIMAL_RTOL``)."""
        return self.max_kvpr <= self.lower_bound * (1 + OPTIMAL_RTOL)


def validate_batch(batch: Batch) -> None:
    """Apply the rules of :func:`kvgpu.problem.make_instance` to every instance of a batch;
    raises :class:`InvalidInstance` naming the instance, the model slot and the rule."""
    xp = batch.xp
    s, w, mm = batch.sizes, batch.demand, batch.model_mask
    for arr, name in ((s, "model_size"), (w, "demand (req_rate/slo)")):
        for bad, rule in ((mm & ~xp.isfinite(arr), "must be finite"), (mm & (arr < 0), "must be >= 0")):
            if bool(bad.any()):
                b, n = (int(v) for v in xp.argwhere(bad)[0])
                raise InvalidInstance(f"instance {b}, model {n}: {name} {rule}, got {float(arr[b, n])}")
    gm = batch.gpu_mem
    badg = batch.gpu_mask & ~(xp.isfinite(gm) & (gm > 0))
    if bool(badg.any()):
        b, g = (int(v) for v in xp.argwhere(badg)[0])
        raise InvalidInstance(f"instance {b}, gpu {g}: GPU memory must be a positive finite number, got {float(gm[b, g])}")
    nog = batch.n_gpus == 0
    if bool(nog.any()):
        raise InvalidInstance(f"instance {int(xp.argwhere(nog)[0, 0])}: no GPUs (gpu_mask is all False)")
    big = mm & (s > gm.max(axis=1)[:, None] + EPS)
    if bool(big.any()):
        b, n = (int(v) for v in xp.argwhere(big)[0])
        raise InvalidInstance(f"instance {b}, model {n}: model_size {float(s[b, n])} GB is larger than every GPU "
                              f"(largest has {float(gm[b].max())} GB)")
    over = s.sum(axis=1) > gm.sum(axis=1) + EPS
    if bool(over.any()):
        b = int(xp.argwhere(over)[0, 0])
        raise InvalidInstance(f"instance {b}: total size {float(s[b].sum())} GB is above the total GPU memory "
                              f"{float(gm[b].sum())} GB")


def _objective(batch: Batch, assign, pos):
    S, W = gpu_loads(batch, assign, pos)
    kv = kvpr(batch.xp, S, W, batch.gpu_mem, batch.gpu_mask, pad=np.nan)
    return kv, np.nanmax(kv, axis=1)


def _seed_or_pack(batch: Batch, backend: str, failed: list[int]):
    """The seed's placements where it found one; an exact memory-only packing (numba) where not,
    so that search and proof can start from there."""
    from kvgpu.numba_engine import pack_memory

    B = batch.shape[0]
    bad = np.asarray(failed, dtype=np.int64)
    good = np.setdiff1d(np.arange(B), bad)
    assign = np.full(batch.sizes.shape, -1, np.int64)
    pos = np.full(batch.sizes.shape, -1, np.int64)
    if good.size:
        assign[good], pos[good] = backends.solve_seed(batch.take(good), backend)
    assign[bad], pos[bad] = pack_memory(batch.take(bad), DEFAULT_EXACT_WORK, ids=bad)
    return assign, pos


def _run(batch: Batch, backend: str, rounds: int, seed: int, work: int):
    """Seed pipeline on ``backend``, bounds, then search / proof (numba) from there."""
    try:
        assign, pos = backends.solve_seed(batch, backend)
    except NoPlacementFound as e:
        if not (rounds or work):
            raise
        assign, pos = _seed_or_pack(batch, backend, e.instances)
    kv, max_kvpr = _objective(batch, assign, pos)
    lb = batch_bounds.binpacking_bound(batch, batch_bounds.lower_bound(batch), max_kvpr)
    if rounds or work:
        from kvgpu.numba_engine import improve
        assign, pos, lb = improve(batch, assign, pos, lb, rounds, seed, work)
        kv, max_kvpr = _objective(batch, assign, pos)
    return assign, kv, max_kvpr, np.minimum(lb, max_kvpr)


_OPTIONS_DOC = """
    ``mode="search"`` (default): the seed pipeline, then ``effort`` rounds of search per
    instance (repair at a target KVPR, iterated local search; :mod:`kvgpu.kernels.search`),
    never worse than ``mode="seed"`` and the same for a given ``seed`` on every machine.
    ``mode="seed"`` runs the seed pipeline exactly.  ``exact=True`` then proves optimality
    (:mod:`kvgpu.kernels.exact`) with at most ``exact_work`` search nodes / DP states per
    instance: the lower bound becomes the proven one, equal to ``max_kvpr`` when optimal.
    ``backend``: "numpy", "numba", "cuda" or "auto" (see :mod:`kvgpu.backends`) runs the seed
    pipeline; search and proof always run in numba CPU kernels after it."""


def solve_batch(sizes, demand, gpu_mem, *, model_mask=None, gpu_mask=None, backend: str = "auto",
                mode: str = "search", effort: int = DEFAULT_EFFORT, seed: int = 0, exact: bool = False,
                exact_work: int = DEFAULT_EXACT_WORK) -> BatchResult:
    """Solve ``B`` padded instances at once.

    ``sizes``, ``demand``: (B, N) float (GB, and ``req_rate / slo``); ``gpu_mem``: (B, G) float GB;
    ``model_mask`` (B, N) / ``gpu_mask`` (B, G) bool mark real entries (default: all real).
    """
    used, rounds, work = _check(backend, mode, effort, exact, exact_work)
    batch = make_batch(sizes, demand, gpu_mem, model_mask, gpu_mask)
    validate_batch(batch)
    assign, kv, max_kvpr, lb = _run(batch, used, rounds, seed, work)
    return BatchResult(assign, kv, max_kvpr, lb, backend=used)


def solve(models: Any, gpus: int, *, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM,
          backend: str = "auto", mode: str = "search", effort: int = DEFAULT_EFFORT, seed: int = 0,
          exact: bool = False, exact_work: int = DEFAULT_EXACT_WORK, current: Sequence[int] | None = None,
          max_moves: int | None = None) -> Placement:
    """Place ``models`` on ``gpus`` GPUs (memory ``gpu_mem`` GB each, or one value per GPU).

    ``models``: objects or dicts with ``model_size``, ``req_rate``, ``slo`` (and optionally a
    name), a pandas DataFrame with those columns, or an (N, 3) array.  Raises
    :class:`kvgpu.InvalidInstance` for bad input.

    ``max_moves=K`` re-places instead: from ``current`` (each model's GPU now, -1 if new; default
    the models' ``cur_gpu_id``), moving at most ``K`` models; see :func:`kvgpu.replan.replan`.
    """
    if max_moves is not None or current is not None:
        from kvgpu.replan import replan
        if max_moves is None:
            raise ValueError("current= needs max_moves= (how many models may move)")
        return replan(models, gpus, current=current, max_moves=max_moves, gpu_mem=gpu_mem, effort=effort, seed=seed)
    from kvgpu import cluster
    if cluster.has_rules(models):
        return _solve_with_rules(models, gpus, gpu_mem, mode, effort, seed, exact)
    used, rounds, work = _check(backend, mode, effort, exact, exact_work)
    inst = make_instance(models, gpus, gpu_mem)
    assign, kv, _, lb = _run(batch_from_instances([inst]), used, rounds, seed, work)
    a = assign[0, :inst.n_models].astype(np.int64)
    return Placement(inst, a, kv[0, :inst.n_gpus], float(lb[0]), mode=mode, backend=used)


def finish_single(inst: Instance, b: Batch, assign, pos, simple_lb, mode: str) -> Placement:
    """The :class:`Placement` of ``inst`` (``b`` its one-instance batch) placed by a numba kernel:
    the objective, and the bin-packing bound raised from ``simple_lb`` (1,)."""
    kv, max_kvpr = _objective(b, assign[None, :], pos[None, :])
    lb = batch_bounds.binpacking_bound(b, simple_lb, max_kvpr)
    return Placement(inst, assign, kv[0], float(min(lb[0], max_kvpr[0])), mode=mode, backend="numba")


def _solve_with_rules(models, gpus, gpu_mem, mode, effort, seed, exact) -> Placement:
    """Models with ``tp`` / ``replicas`` / ``pin`` / ``forbid`` (:mod:`kvgpu.cluster`)."""
    from kvgpu import cluster
    from kvgpu.kernels.rules import solve_with_rules

    if mode != "search" or exact:
        raise InvalidInstance("models with tp, replicas, pin or forbid are placed by mode='search' "
                              "(the seed pipeline and exact=True know no such rules)")
    rounds = _nonneg_int(effort, "effort")
    ex = cluster.expand(models, gpus, gpu_mem)
    inst = ex.items
    b = batch_from_instances([inst])
    lb = batch_bounds.lower_bound(b)
    n = inst.n_models
    assign, pos = np.empty(n, np.int64), np.empty(n, np.int64)
    failed = solve_with_rules(inst.sizes, inst.demand, inst.gpu_mem, float(lb[0]), ex.allowed, ex.group, rounds,
                              int(seed), assign, pos)
    if failed >= 0:
        raise NoPlacementFound(f"{inst.names[failed]}: no allowed GPU has room for it next to the models placed "
                               f"before it (pins, forbidden GPUs and shards on distinct GPUs)", [0])
    p = finish_single(inst, b, assign, pos, lb, mode="search")
    p.model_of = ex.model_of
    return p


solve_batch.__doc__ += _OPTIONS_DOC
solve.__doc__ += _OPTIONS_DOC


def compute_model_placement(gpu_num: int, models: Sequence[Any]) -> dict[int, list]:
    """Drop-in for the ADRS evaluator: ``{gpu_id: [model, ...]}`` for every GPU id (80 GB GPUs),
    holding the caller's own model objects; :func:`solve` with its defaults (search mode)."""
    return solve(models, gpu_num).by_gpu()
