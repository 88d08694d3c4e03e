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
from kvgpu.problem import DEFAULT_GPU_MEM, Instance, InvalidInstance, make_instance

MODES = ("seed", "search")
#: Search rounds per instance in ``mode="search"`` unless ``effort=`` says otherwise.
DEFAULT_EFFORT = 50


def _check(backend: str, mode: str, effort: int) -> tuple[str, int]:
    """Validate ``mode``/``effort``; return the concrete backend and the search rounds to run."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not available; choose one of {MODES}")
    if mode == "seed":
        return backends.resolve(backend), 0
    if int(effort) != effort or effort < 0:
        raise ValueError(f"effort must be a non-negative integer (search rounds), got {effort!r}")
    used = backends.resolve("numba" if backend == "auto" else backend)
    if used != "numba":
        raise backends.BackendUnavailable(f"mode 'search' runs on the numba backend, not {used!r}")
    return used, int(effort)


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
    mode: str = "seed"
    backend: str = "numpy"
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
                "gap": _json_float(self.gap), "mode": self.mode, "backend": self.backend,
                "assignment": self.assignment.tolist(), "gpus": gpus}

    def __str__(self) -> str:
        rows = [f"{'GPU':>4} {'mem GB':>7} {'used GB':>8} {'free GB':>8} {'demand':>9} {'KVPR':>10}  models"]
        for g in range(self.instance.n_gpus):
            idx = np.nonzero(self.assignment == g)[0].tolist()
            mem = self.instance.gpu_mem[g]
            rows.append(f"{g:>4} {mem:>7.1f} {self.used[g]:>8.1f} {mem - self.used[g]:>8.1f} "
                        f"{self.demand[g]:>9.4f} {self.kvpr[g]:>10.6f}  {', '.join(self._name(i) for i in idx)}")
        rows.append(f"max KVPR {self.max_kvpr:.6f}   lower bound {self.lower_bound:.6f}   "
                    f"gap {100 * self.gap:.2f}%   ({self.instance.n_models} models, "
                    f"{self.instance.n_gpus} GPUs, mode={self.mode}, backend={self.backend})")
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
    backend: str = "numpy"

    @property
    def gap(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.max_kvpr == self.lower_bound, 0.0, self.max_kvpr / self.lower_bound - 1)


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


def _run(batch: Batch, backend: str, effort: int, seed: int):
    assign, pos = backends.solve_seed(batch, backend, effort, seed)
    S, W = gpu_loads(batch, assign, pos)
    kv = kvpr(batch.xp, S, W, batch.gpu_mem, batch.gpu_mask, pad=np.nan)
    max_kvpr = np.nanmax(kv, axis=1)
    lb = batch_bounds.binpacking_bound(batch, batch_bounds.lower_bound(batch), max_kvpr)
    return assign, kv, max_kvpr, lb


def solve_batch(sizes, demand, gpu_mem, *, model_mask=None, gpu_mask=None, backend: str = "auto",
                mode: str = "seed", effort: int = DEFAULT_EFFORT, seed: int = 0) -> BatchResult:
    """Solve ``B`` padded instances at once.

    ``backend``: "numpy", "numba", "cuda" or "auto" (see :mod:`kvgpu.backends`); every backend
    returns the same placements.  ``mode``, ``effort``, ``seed``: as for :func:`solve`.

    ``sizes``, ``demand``: (B, N) float (GB, and ``req_rate / slo``); ``gpu_mem``: (B, G) float GB;
    ``model_mask`` (B, N) / ``gpu_mask`` (B, G) bool mark real entries (default: all real).
    """
    used, rounds = _check(backend, mode, effort)
    batch = make_batch(sizes, demand, gpu_mem, model_mask, gpu_mask)
    validate_batch(batch)
    assign, kv, max_kvpr, lb = _run(batch, used, rounds, seed)
    return BatchResult(assign, kv, max_kvpr, lb, backend=used)


def solve(models: Any, gpus: int, *, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM,
          backend: str = "auto", mode: str = "seed", effort: int = DEFAULT_EFFORT, seed: int = 0) -> Placement:
    """Place ``models`` on ``gpus`` GPUs (memory ``gpu_mem`` GB each, or one value per GPU).

    ``models``: objects or dicts with ``model_size``, ``req_rate``, ``slo`` (and optionally a
    name), or an (N, 3) array.  Raises :class:`kvgpu.InvalidInstance` for bad input.

    ``mode="seed"`` runs the seed pipeline exactly; ``mode="search"`` adds ``effort`` rounds of
    iterated local search (numba backend), never worse than the seed and the same for a given
    ``seed`` on every machine.
    """
    used, rounds = _check(backend, mode, effort)
    inst = make_instance(models, gpus, gpu_mem)
    assign, kv, _, lb = _run(batch_from_instances([inst]), used, rounds, seed)
    a = assign[0, :inst.n_models].astype(np.int64)
    return Placement(inst, a, kv[0, :inst.n_gpus], float(lb[0]), mode=mode, backend=used)


def compute_model_placement(gpu_num: int, models: Sequence[Any]) -> dict[int, list]:
    """Drop-in for the ADRS evaluator: ``{gpu_id: [model, ...]}`` for every GPU id (80 GB GPUs),
    holding the caller's own model objects; computed by the batch engine."""
    return solve(models, gpu_num).by_gpu()
