"""Real clusters: tensor-parallel models, replicas, pins and forbidden GPUs.

A model may carry, besides ``model_size`` / ``req_rate`` / ``slo``:

* ``tp`` (int, default 1): tensor-parallel degree -- ``tp`` shards of ``size / tp`` GB and
  ``demand / tp`` each, on ``tp`` distinct GPUs;
* ``replicas`` (int, default 1): copies of the whole model that share its demand -- each of the
  ``replicas`` copies (each with its ``tp`` shards) has ``demand / replicas``;
* ``pin``: a GPU id (or one per shard and replica, ``tp * replicas`` ids) the model must use;
* ``forbid``: GPU ids the model must not use.

All shards and replicas of one model go to distinct GPUs (anti-affinity).  The model is expanded
into *items* (one per shard and replica): an ordinary instance for the bounds and the objective,
plus the rules the search respects -- ``allowed`` (items x GPUs) and ``group`` (the model index
of items that must not share a GPU).  The lower bound of the items without the rules is still a
lower bound: rules only remove placements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvgpu.problem import (_NAME_KEYS, _SIZE_KEYS, DEFAULT_GPU_MEM, Instance, InvalidInstance, _field, _label,
                           _number, gpu_memory, make_instance, records)

RULE_FIELDS = ("tp", "replicas", "pin", "forbid")


@dataclass
class Expanded:
    """Items of a cluster with rules.  ``items``: the instance of items (their objects are the
    callers' model objects); ``model_of`` (n,) the model of each item; ``allowed`` (n, G) uint8;
    ``group`` (n,) int64 (model index where a model has several items, else -1)."""

    items: Instance
    model_of: np.ndarray
    allowed: np.ndarray
    group: np.ndarray


def _opt(m: Any, key: str):
    try:
        v = _field(m, (key,))
    except KeyError:
        return None
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def has_rules(models: Any) -> bool:
    """Does any model carry ``tp``, ``replicas``, ``pin`` or ``forbid``?"""
    if isinstance(models, np.ndarray):
        return False
    try:
        recs = list(records(models))
    except TypeError:
        return False
    return any(not isinstance(m, (list, tuple, np.ndarray)) and any(_opt(m, k) is not None for k in RULE_FIELDS)
               for m in recs)


def _count(v, label: str, key: str, G: int) -> int:
    try:
        k = int(v.strip()) if isinstance(v, str) else int(v)  # CSV cells are strings
    except (TypeError, ValueError):
        raise InvalidInstance(f"{label}: {key} must be a positive integer, got {v!r}") from None
    if (not isinstance(v, str) and k != v) or k < 1:
        raise InvalidInstance(f"{label}: {key} must be a positive integer, got {v!r}")
    return k


def _gpu_ids(v, label: str, key: str, G: int) -> list[int]:
    vals = v if isinstance(v, (list, tuple, np.ndarray)) else (
        [x for x in str(v).replace(";", ",").split(",") if x.strip()] if isinstance(v, str) else [v])
    out = []
    for x in vals:
        try:
            g = int(str(x).strip()) if isinstance(x, str) else int(x)
        except (TypeError, ValueError):
            raise InvalidInstance(f"{label}: {key} must hold GPU ids, got {x!r}") from None
        if not 0 <= g < G or (not isinstance(x, str) and g != x):
            raise InvalidInstance(f"{label}: {key} GPU id {x!r} is not one of 0..{G - 1}")
        out.append(g)
    return out


def expand(models: Any, gpus: int, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM) -> Expanded:
    """Validate the models and their rules and expand them into items (see the module doc)."""
    mem = gpu_memory(gpus, gpu_mem)
    G = mem.shape[0]
    rows, model_of, allow_rows, group = [], [], [], []
    recs = list(records(models))
    for i, m in enumerate(recs):
        name = next((_opt(m, key) for key in _NAME_KEYS if _opt(m, key) is not None), None)
        label = _label(i, name)
        size = next((_opt(m, k) for k in _SIZE_KEYS if _opt(m, k) is not None), None)
        if size is None:
            raise InvalidInstance(f"{label}: missing field 'model_size'")
        for key in ("req_rate", "slo"):
            if _opt(m, key) is None:
                raise InvalidInstance(f"{label}: missing field {key!r}")
        s = _number(size, i, name, "model_size")
        r = _number(_opt(m, "req_rate"), i, name, "req_rate")
        o = _number(_opt(m, "slo"), i, name, "slo")
        tp, rep = (_opt(m, key) for key in ("tp", "replicas"))
        tp = 1 if tp is None else _count(tp, label, "tp", G)
        rep = 1 if rep is None else _count(rep, label, "replicas", G)
        k = tp * rep
        if k > G:
            raise InvalidInstance(f"{label}: tp x replicas = {k} shards need {k} distinct GPUs; the cluster has {G}")
        allowed = np.ones(G, bool)
        forbid, pin = _opt(m, "forbid"), _opt(m, "pin")
        if forbid is not None:
            allowed[_gpu_ids(forbid, label, "forbid", G)] = False
        pins = None
        if pin is not None:
            pins = _gpu_ids(pin, label, "pin", G)
            if len(pins) not in (1, k) or (len(pins) == 1 and k > 1):
                raise InvalidInstance(f"{label}: pin gives {len(pins)} GPU(s) for {k} shard(s); give one GPU id "
                                      f"per shard and replica")
            if len(set(pins)) != len(pins):
                raise InvalidInstance(f"{label}: pin repeats a GPU, but shards and replicas need distinct GPUs")
            bad = [g for g in pins if not allowed[g]]
            if bad:
                raise InvalidInstance(f"{label}: pinned to GPU {bad[0]}, which it also forbids")
        if allowed.sum() < k:
            raise InvalidInstance(f"{label}: {k} shard(s) need distinct GPUs, but only {int(allowed.sum())} "
                                  f"GPU(s) are allowed")
        for c in range(k):
            item = {"model_size": s / tp, "req_rate": r / k, "slo": o,
                    "name": (f"{name}" if name is not None else f"#{i}") + (f"/{c}" if k > 1 else "")}
            rows.append(item)
            model_of.append(i)
            row = allowed.copy()
            if pins is not None:
                row[:] = False
                row[pins[c]] = True
            allow_rows.append(row)
            group.append(i if k > 1 else -1)
    items = make_instance(rows, G, mem)
    objects = [recs[j] for j in model_of]
    items = Instance(items.sizes, items.demand, items.gpu_mem, items.names, objects)
    return Expanded(items, np.asarray(model_of, np.int64), np.asarray(allow_rows, np.uint8).reshape(len(rows), G),
                    np.asarray(group, np.int64))
