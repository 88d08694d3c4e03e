"""The KVPR placement problem: one instance, its validation and its objective.

A cluster has ``G`` GPUs with memory ``M[g]`` (GB).  Model ``i`` has size
``s[i]`` (GB) and demand ``w[i] = req_rate[i] / slo[i]``.  A GPU holding models of
total size ``S`` and demand ``W`` has KV cache pressure ``W / (M - S)``; the
objective is the largest pressure over all GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np

from kvgpu.errors import InvalidInstance, NoPlacementFound  # noqa: F401 -- re-exported for now
from kvgpu.kernels.deltas import EPS

DEFAULT_GPU_MEM = 80.0

_SIZE_KEYS = ("model_size", "size")
_NAME_KEYS = ("model_name", "name")


def _field(model: Any, keys: Sequence[str]):
    for k in keys:
        if isinstance(model, dict):
            if k in model:
                return model[k]
        elif hasattr(model, k):
            return getattr(model, k)
    raise KeyError(keys[0])


def _label(i: int, name: str | None) -> str:
    return f"model {i}" + (f" ({name!r})" if name is not None else "")


def _number(value: Any, i: int, name: str | None, fld: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInstance(f"{_label(i, name)}: field {fld!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InvalidInstance(f"{_label(i, name)}: field {fld!r} must be finite, got {x}")
    return x


@dataclass(frozen=True)
class Instance:
    """A validated instance.

    Attributes
    ----------
    sizes : ndarray, shape (N,), float64 -- model sizes in GB.
    demand : ndarray, shape (N,), float64 -- ``req_rate / slo`` per model.
    gpu_mem : ndarray, shape (G,), float64 -- memory per GPU in GB.
    names : list[str | None] -- model names where given.
    objects : list -- the caller's model objects (or rows), in input order.
    """

    sizes: np.ndarray
    demand: np.ndarray
    gpu_mem: np.ndarray
    names: list = field(default_factory=list)
    objects: list = field(default_factory=list)

    @cached_property
    def py(self) -> tuple[list[float], list[float], list[float]]:
        """``(sizes, demand, gpu_mem)`` as Python float lists, for the scalar reference."""
        return self.sizes.tolist(), self.demand.tolist(), self.gpu_mem.tolist()

    @property
    def n_models(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def n_gpus(self) -> int:
        return int(self.gpu_mem.shape[0])


def gpu_memory(gpus: int, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM) -> np.ndarray:
    """Per-GPU memory as a float64 array of shape ``(gpus,)``; validates count and values."""
    try:
        g = int(gpus)
    except (TypeError, ValueError):
        raise InvalidInstance(f"gpus: must be an integer count, got {gpus!r}") from None
    if g != gpus or g < 1:
        raise InvalidInstance(f"gpus: need at least one GPU (a positive integer), got {gpus!r}")
    if np.ndim(gpu_mem) == 0:
        mem = np.full(g, float(gpu_mem))
    else:
        mem = np.asarray(gpu_mem, dtype=float).reshape(-1)
        if mem.shape[0] != g:
            raise InvalidInstance(f"gpu_mem: {mem.shape[0]} values given for {g} GPUs")
    for k, m in enumerate(mem):
        if not math.isfinite(m) or m <= 0:
            raise InvalidInstance(f"gpu_mem[{k}]: GPU memory must be a positive finite number, got {m}")
    return mem


def records(models: Any) -> Any:
    """A pandas DataFrame as a list of row dicts (detected without importing pandas); anything
    else unchanged."""
    if hasattr(models, "columns") and hasattr(models, "to_dict"):
        return models.to_dict("records")
    return models


def _rows(models: Any) -> Iterable[tuple[Any, Any, Any, Any, Any]]:
    """Yield ``(obj, name, size, req_rate, slo)`` from objects, dicts, a pandas DataFrame (one
    row per model, columns as the dict keys) or an (N, 3) array."""
    models = records(models)
    if isinstance(models, np.ndarray) or (
        isinstance(models, (list, tuple)) and models and isinstance(models[0], (list, tuple, np.ndarray))
    ):
        arr = np.asarray(models, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise InvalidInstance("models: an array of models must have shape (N, 3): size, req_rate, slo")
        for row in models:
            yield row, None, row[0], row[1], row[2]
        return
    for i, m in enumerate(models):
        name = None
        try:
            name = _field(m, _NAME_KEYS)
        except KeyError:
            pass
        vals = []
        for keys in (_SIZE_KEYS, ("req_rate",), ("slo",)):
            try:
                vals.append(_field(m, keys))
            except KeyError:
                raise InvalidInstance(f"{_label(i, name)}: missing field {keys[0]!r}") from None
        yield (m, name, *vals)


def make_instance(models: Any, gpus: int, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM) -> Instance:
    """Validate ``models`` on ``gpus`` GPUs and return an :class:`Instance`.

    ``models``: objects with attributes ``model_size``, ``req_rate``, ``slo`` (and
    optionally ``model_name``), dicts with those keys (``size`` and ``name`` are
    accepted too), a pandas DataFrame with those columns, or an array of shape ``(N, 3)``.  Raises
    :class:`InvalidInstance` naming the model and the rule it breaks.
    """
    mem = gpu_memory(gpus, gpu_mem)
    objs, names, sizes, demand = [], [], [], []
    for i, (obj, name, size, rate, slo) in enumerate(_rows(models)):
        s = _number(size, i, name, "model_size")
        r = _number(rate, i, name, "req_rate")
        o = _number(slo, i, name, "slo")
        if s < 0:
            raise InvalidInstance(f"{_label(i, name)}: model_size must be >= 0, got {s}")
        if r < 0:
            raise InvalidInstance(f"{_label(i, name)}: req_rate must be >= 0, got {r}")
        if o <= 0:
            raise InvalidInstance(f"{_label(i, name)}: slo must be > 0, got {o}")
        if s > mem.max() + EPS:
            raise InvalidInstance(
                f"{_label(i, name)}: model_size {s} GB is larger than every GPU (largest has {mem.max()} GB)")
        objs.append(obj)
        names.append(None if name is None else str(name))
        sizes.append(s)
        demand.append(r / o)
    sizes_a = np.asarray(sizes, dtype=float)
    if sizes_a.sum() > mem.sum() + EPS:
        raise InvalidInstance(
            f"models: total size {sizes_a.sum()} GB is above the total GPU memory {mem.sum()} GB")
    return Instance(sizes_a, np.asarray(demand, dtype=float), mem, names, objs)


def score_tuple(kvprs: Sequence[float]) -> tuple[float, float, float]:
    """The seed's score ``(max, second largest, mean)`` of per-GPU KVPRs (compared lexicographically)."""
    kv = list(kvprs)
    vals = sorted(kv, reverse=True)
    second = vals[1] if len(vals) > 1 else 0.0
    return (vals[0], second, sum(kv) / len(kv))
