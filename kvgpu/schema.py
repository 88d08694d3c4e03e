"""TEMPORARY minimal version (the inputs helper replaces this file): model records and option validators."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvgpu.errors import InvalidInstance


@dataclass(frozen=True)
class ModelSpec:
    index: int
    where: str
    name: str | None
    size: float
    req_rate: float
    slo: float
    tp: int = 1
    replicas: int = 1
    pin: tuple | None = None
    forbid: tuple = ()
    cur_gpu: tuple | None = None
    overhead_gb: float = 0.0
    same_node: bool | None = None
    obj: Any = None

    @property
    def demand(self) -> float:
        return self.req_rate / self.slo


_KEYS = {"size": "size", "model_size": "size", "name": "name", "model_name": "name", "req_rate": "req_rate",
         "slo": "slo", "tp": "tp", "replicas": "replicas", "pin": "pin", "forbid": "forbid", "cur_gpu_id": "cur_gpu",
         "overhead_gb": "overhead_gb", "same_node": "same_node"}


def _missing(v):
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _ids(v, where, key):
    if isinstance(v, str):
        v = [x for x in v.replace(";", ",").split(",") if x.strip()]
    if not isinstance(v, (list, tuple, np.ndarray)):
        v = [v]
    return tuple(integer(x, f"{where}: {key}", -1 if key == "cur_gpu_id" else 0, 2**31 - 1) for x in v)


def model_specs(models: Any, where: Sequence[str] | None = None) -> list[ModelSpec]:
    if models is None or isinstance(models, (str, dict)):
        raise InvalidInstance(f"models: expected a list of models, got {type(models).__name__}")
    if hasattr(models, "columns") and hasattr(models, "to_dict"):
        models = models.to_dict("records")
    if isinstance(models, np.ndarray):
        models = models.tolist()
    models = list(models)
    out = []
    for i, m in enumerate(models):
        if isinstance(m, ModelSpec):
            out.append(m)
            continue
        if isinstance(m, (list, tuple)):
            d = {"size": m[0], "req_rate": m[1], "slo": m[2]}
        elif isinstance(m, dict):
            d = {}
            for k, v in m.items():
                if k not in _KEYS:
                    raise InvalidInstance(f"model {i}: unknown key {k!r}")
                if not _missing(v):
                    d[_KEYS[k]] = v
        else:
            d = {_KEYS[k]: getattr(m, k) for k in _KEYS if hasattr(m, k) and not _missing(getattr(m, k))}
        name = d.get("name")
        label = (where[i] if where else f"model {i}") + (f" ({str(name)!r})" if name is not None else "")
        for f in ("size", "req_rate", "slo"):
            if f not in d:
                raise InvalidInstance(f"{label}: missing field {'model_size' if f == 'size' else f!r}")
        size = number(d["size"], f"{label}: model_size", 0.0, math.inf)
        rate = number(d["req_rate"], f"{label}: req_rate", 0.0, math.inf)
        slo = number(d["slo"], f"{label}: slo", 0.0, math.inf, lo_open=True)
        if not math.isfinite(rate / slo):
            raise InvalidInstance(f"{label}: demand req_rate/slo overflows")
        kw = {}
        for k in ("tp", "replicas"):
            if k in d:
                kw[k] = integer(d[k], f"{label}: {k}", 1, 65536)
        for k, key in (("pin", "pin"), ("forbid", "forbid")):
            if k in d:
                kw[k] = _ids(d[k], label, key)
        if "cur_gpu" in d:
            ids = tuple(g for g in _ids(d["cur_gpu"], label, "cur_gpu_id") if g >= 0)
            kw["cur_gpu"] = ids or None
        if "overhead_gb" in d:
            kw["overhead_gb"] = number(d["overhead_gb"], f"{label}: overhead_gb", 0.0, math.inf)
        if "same_node" in d:
            kw["same_node"] = bool(d["same_node"])
        out.append(ModelSpec(i, label, None if name is None else str(name), size, rate, slo, obj=m, **kw))
    return out


def integer(value, field, lo, hi) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInstance(f"{field}: must be an integer, got {value!r}")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInstance(f"{field}: must be an integer, got {value!r}") from None
    if not math.isfinite(x) or x != int(x) or not lo <= int(x) <= hi:
        raise InvalidInstance(f"{field}: must be an integer in {lo}..{hi}, got {value!r}")
    return int(x)


def number(value, field, lo, hi, lo_open=False) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInstance(f"{field}: must be a number, got {value!r}")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInstance(f"{field}: must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < lo or (lo_open and x <= lo) or x > hi:
        raise InvalidInstance(f"{field}: must be a finite number {'>' if lo_open else '>='} {lo}, got {value!r}")
    return x


def gpu_memory(gpus, gpu_mem) -> np.ndarray:
    g = integer(gpus, "gpus", 1, 1_000_000)
    if gpu_mem is None or isinstance(gpu_mem, str):
        raise InvalidInstance(f"gpu_mem: must be a number or one number per GPU, got {gpu_mem!r}")
    if np.ndim(gpu_mem) == 0:
        return np.full(g, number(gpu_mem, "gpu_mem", 0.0, math.inf, lo_open=True))
    vals = list(gpu_mem)
    if len(vals) != g:
        raise InvalidInstance(f"gpu_mem: {len(vals)} values given for {g} GPUs")
    return np.array([number(v, f"gpu_mem[{k}]", 0.0, math.inf, lo_open=True) for k, v in enumerate(vals)])
