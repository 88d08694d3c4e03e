"""What users give as models and options, turned into validated records in one place.

:func:`model_specs` reads models from any iterable of dicts, of objects with attributes (the
ADRS evaluator's ``Model``), of ``(size, req_rate, slo)`` triples, from a pandas DataFrame or a
NumPy ``(N, 3)`` array, and returns :class:`ModelSpec` records: every number finite and in
range, every integer integral, every key known.  The scalar validators :func:`integer`,
:func:`number`, :func:`per_gpu`, :func:`gpu_memory`, :func:`current_placement` and
:func:`choice` do the same for the API's and the CLI's options.  Each refusal is a
:class:`kvgpu.errors.InvalidInstance` (a ``ValueError``) whose message names where the value
came from (the model, or the file and line), the field and the rule, e.g.::

    models.csv, line 3 ('b'): field 'size' must be >= 0, got -26.0
    model 0 ('a'): unknown key 'replica' (did you mean 'replicas'?)
    gpus must be an integer from 1 to 1000000, got 1000000000000

What counts as a value, everywhere:

* numbers are ``int``, ``float``, NumPy scalars, ``Decimal``/``Fraction``, or numeric strings
  (``"16"``, ``" 2.0 "``: CSV cells are strings); booleans are *not* numbers;
* an integer field takes ``2`` or ``2.0`` (pandas writes integer columns with gaps as floats)
  but not ``1.5``; every integer has a documented range, so a huge value is refused here and
  never reaches NumPy or numba as an ``OverflowError``;
* ``None``, NaN, pandas' ``NA`` and an empty string mean "not given" for an optional field
  (a DataFrame has NaN where a row leaves a column out).
"""

from __future__ import annotations

import decimal
import difflib
import fractions
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kvgpu import model_files
from kvgpu.errors import InvalidInstance, KvgpuWarning

#: Most GPUs one instance may have.
MAX_GPUS = 1_000_000
#: Largest tensor-parallel degree and replica count of one model.
MAX_COUNT = 65_536
#: GPU ids are ``0 .. MAX_GPU_ID`` (they travel as int32/int64 through the kernels).
MAX_GPU_ID = 2**31 - 1
#: ``(lo, hi)`` of the integer options shared by the API and the CLI, so both refuse the same
#: values: search rounds, random seed (an unsigned 64-bit state in the kernels, kept below
#: 2**63 so it is also a valid int64), proof work, migration budget.
OPTION_RANGES = {
    "gpus": (1, MAX_GPUS),
    "effort": (0, 1_000_000),
    "seed": (0, 2**63 - 1),
    "exact_work": (0, 2**62),
    "max_moves": (0, 2**62),
    "patience": (1, 1_000_000),
    "gpus_per_node": (1, MAX_GPUS),
    "jobs": (1, 1024),
    "max_gpus": (1, 100_000),  # sizing (kvgpu.capacity) tries at most this many GPUs
    "dask_local": (1, 256),
    "base_port": (1, 65535),  # kvgpu export: the first port of the engines on a node
}

#: field of :class:`ModelSpec` -> the keys that give it (first: kvgpu's own name; then the
#: aliases of the ADRS evaluator and the serving stacks: vLLM/MuxServe ``tensor_parallel_size``,
#: Prism ``tp_size``)
KEYS: dict[str, tuple[str, ...]] = {
    "name": ("name", "model_name"),
    "size": ("size", "model_size"),
    "req_rate": ("req_rate",),
    "slo": ("slo",),
    "tp": ("tp", "tp_size", "tensor_parallel_size"),
    "replicas": ("replicas", "num_replicas"),
    "pin": ("pin",),
    "forbid": ("forbid",),
    "cur_gpu": ("cur_gpu_id",),
    "overhead_gb": ("overhead_gb",),
    "same_node": ("same_node",),
    "node": ("node",),
    "colocate_with": ("colocate_with",),
    "hf": ("hf",),
    "kv_cache_dtype": ("kv_cache_dtype",),
    "kv_bytes_per_token": ("kv_bytes_per_token",),
    "serve": ("serve",),
}
_FIELD_OF_KEY = {k: f for f, keys in KEYS.items() for k in keys}
# fields whose value names another model: an empty name given explicitly is a mistake (a rule
# that would silently not apply), not "not given" (a CSV's blank cell reaches here as None)
_NAMES_A_MODEL = ("colocate_with",)
_REQUIRED = ("size", "req_rate", "slo")
# keys that are no typo of a known key but mean one: a hint instead of difflib's guess
_HINTS = {"gpu_count": "tp", "tensor_parallel": "tp", "tp_degree": "tp", "num_gpus": "tp",
          "cur_gpu": "cur_gpu_id", "gpu": "pin", "gpu_id": "pin", "base_model": "colocate_with",
          "colocate": "colocate_with", "node_id": "node", "model_path": "hf", "repo_id": "hf",
          "kv_dtype": "kv_cache_dtype"}


@dataclass(frozen=True)
class ModelSpec:
    """One validated model.

    Attributes
    ----------
    index : int
        Position in the input (0-based).
    where : str
        How messages name it: ``"model 3 ('chat')"`` from the API, ``"models.csv, line 5
        ('chat')"`` or ``"x.json, line 7, model 3 ('chat')"`` from files.
    name : str or None
        The model's name, if given.
    size : float
        Weights in GB, finite, >= 0 (keys ``size`` / ``model_size``).
    req_rate : float
        Requests per second, finite, >= 0.
    slo : float
        Latency SLO in seconds, finite, > 0.
    tp : int
        Tensor-parallel degree, 1..``MAX_COUNT`` (keys ``tp``, ``tp_size``,
        ``tensor_parallel_size``).
    replicas : int
        Copies sharing the demand, 1..``MAX_COUNT`` (keys ``replicas``, ``num_replicas``).
    pin : tuple of int or None
        GPU ids the model must use: one, or one per shard and replica.
    forbid : tuple of int
        GPU ids the model must not use (may be empty).
    cur_gpu : tuple of int or None
        The GPU(s) the model runs on now, for re-placement; None for a new model (key
        ``cur_gpu_id``; -1, None, NaN and "" mean new).
    overhead_gb : float
        Engine overhead per shard (activations, CUDA context) in GB, finite, >= 0.
    same_node : bool or None
        Whether the tp shards must share a node; None leaves it to the default rule.
    node : int or None
        The node (0-based index into the cluster's ``nodes`` / ``gpus_per_node``) that every
        shard and replica must sit in; None: any node.
    colocate_with : str or None
        The name of another model (e.g. the base of a LoRA adapter): this model must sit on a
        GPU that holds a shard or replica of it; None: no such rule.
    hf : str or None
        The model's files: a local folder or a Hugging Face repo id in the local cache
        (:mod:`kvgpu.model_files`); ``size`` and ``kv_bytes_per_token`` were read from them.
    kv_cache_dtype : str or None
        The KV cache's dtype for ``hf`` (``auto``: the model's torch_dtype; ``fp8``, ``bf16``, ...).
    kv_bytes_per_token : float or None
        The model's own KV bytes per token, unsharded (``2 x layers x KV heads x head_dim x
        bytes``), > 0; None: not known (no token counts in the output).  How it spreads over
        the tp shards is kvgpu's computation (:attr:`kv_shard_bytes`).
    kv_shard_bytes : float or None
        KV bytes per token on one tp shard, computed from the model's files (``hf``): KV heads
        fewer than ``tp`` are replicated, a latent (DeepSeek) is whole on every shard.  None:
        ``kv_bytes_per_token / tp`` (the heads split evenly).  Not a key of model files.
    serve : str or None
        What a serving engine loads for this model (``kvgpu export``): a Hugging Face repo id
        or a folder (made absolute against the model file's folder when it exists here), never
        read by kvgpu -- for a model without ``hf`` (its files not here, or a LoRA adapter,
        which has no config.json: the adapter's folder or repo id).  None: ``hf``; without
        either the export names the model by its ``name`` and says so.
    obj : Any
        The caller's own object or row (what ``Placement.by_gpu`` returns); not compared.

    GPU ids are only checked for type and sign here (0..``MAX_GPU_ID``); whether they exist
    depends on the cluster.  Constructing a ModelSpec directly validates it the same way.
    """

    index: int
    where: str
    name: str | None
    size: float
    req_rate: float
    slo: float
    tp: int = 1
    replicas: int = 1
    pin: tuple[int, ...] | None = None
    forbid: tuple[int, ...] = ()
    cur_gpu: tuple[int, ...] | None = None
    overhead_gb: float = 0.0
    same_node: bool | None = None
    node: int | None = None
    colocate_with: str | None = None
    hf: str | None = None
    kv_cache_dtype: str | None = None
    kv_bytes_per_token: float | None = None
    kv_shard_bytes: float | None = field(default=None, compare=False, repr=False)
    serve: str | None = None
    obj: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # the same parsers as model_specs, so a hand-made ModelSpec obeys the same rules
        label = self.where or f"model {self.index}"
        for name, value in (("index", integer(self.index, f"{label}: index", 0, None)),
                            ("name", _name(self.name, label, "name")),
                            *((f, _PARSERS[f](getattr(self, f), label, f)) for f in _PARSERS if f != "name")):
            object.__setattr__(self, name, value)
        _check_demand(self.req_rate, self.slo, label)

    @property
    def demand(self) -> float:
        """``req_rate / slo`` (finite: checked at construction)."""
        return self.req_rate / self.slo

    @property
    def kv_bytes_per_shard(self) -> float | None:
        """KV bytes per token on one tp shard (:attr:`kv_shard_bytes`, else the model's figure
        split evenly over ``tp``); None where not known."""
        if self.kv_shard_bytes is not None:
            return self.kv_shard_bytes
        return None if self.kv_bytes_per_token is None else self.kv_bytes_per_token / self.tp

    def to_dict(self) -> dict:
        """The canonical plain form (kvgpu's own key names; defaults left out), JSON-ready:
        ``model_specs([s.to_dict()])`` gives the same spec back."""
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        out.update(size=self.size, req_rate=self.req_rate, slo=self.slo)
        for f, default in (("tp", 1), ("replicas", 1), ("overhead_gb", 0.0)):
            if getattr(self, f) != default:
                out[f] = getattr(self, f)
        for f in ("pin", "forbid", "same_node", "node", "colocate_with", "hf", "kv_cache_dtype", "kv_bytes_per_token",
                  "serve"):
            v = getattr(self, f)
            if v is not None and v != ():
                out[f] = list(v) if isinstance(v, tuple) else v
        if self.cur_gpu is not None:
            out["cur_gpu_id"] = self.cur_gpu[0] if len(self.cur_gpu) == 1 else list(self.cur_gpu)
        return out


# ---------------------------------------------------------------- scalar values

def _show(value: Any) -> str:
    """``repr`` of a value for a message, at most ~40 characters (a 10**5000 stays readable)."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr fails beyond 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, str) and len(value) > 4000 and value.strip().lstrip("+-").isdecimal():
        return f"a number of {len(value.strip())} digits"
    r = repr(value)
    return r if len(r) <= 40 else r[:30] + "..." + r[-6:]


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA/NaT or a blank string: a value that was not given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return type(value).__name__ in ("NAType", "NaTType")


def _label(where: str | None, fld: str | None) -> str:
    """``"model 0 ('a'): field 'tp'"``; just ``where`` for a value that is no model's field."""
    if fld is None:
        return str(where)
    return f"{where}: field {fld!r}" if where else fld


def _real(value: Any, label: str, kind: str = "a number") -> float:
    """A float from a number or a numeric string; booleans, other text and overflow refused."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInstance(f"{label} must be {kind}, got {value!r} (a boolean)")
    if isinstance(value, str):
        text = value.strip()
        try:
            x = float(text)
        except ValueError:
            hint = " (a decimal comma? write 16.5, not 16,5)" if text.replace(",", "", 1).isdigit() else ""
            raise InvalidInstance(f"{label} must be {kind}, got {_show(value)}{hint}") from None
    elif isinstance(value, (numbers.Real, decimal.Decimal)):
        try:
            x = float(value)
        except OverflowError:
            raise InvalidInstance(f"{label} is too large, got {_show(value)}") from None
        except (ValueError, decimal.InvalidOperation):  # Decimal('sNaN')
            raise InvalidInstance(f"{label} must be {kind}, got {_show(value)}") from None
    else:
        raise InvalidInstance(f"{label} must be {kind}, got {_show(value)}")
    if not math.isfinite(x):
        raise InvalidInstance(f"{label} must be finite, got {_show(value)}")
    return x


def _range_text(lo, hi, lo_open: bool = False) -> str:
    lo, hi = (f"{b:g}" if isinstance(b, float) else b for b in (lo, hi))
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"from {lo} to {hi}" if not lo_open else f"> {lo} and <= {hi}"


def _within(x, label: str, lo, hi, lo_open: bool, what: str, value: Any):
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi):
        raise InvalidInstance(f"{label} must be {what}{_range_text(lo, hi, lo_open)}, got {_show(value)}")
    return x


def number(value: Any, field: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

    Parameters
    ----------
    value : int, float, NumPy scalar, Decimal, Fraction or numeric str
        Booleans, None, other text, NaN, infinities and ints too large for a float are refused.
    field : str
        How the message names the value (``"gpu_mem"``, ``"x.json, line 2: gpu_mem"``).
    lo, hi : float or None
        Bounds (None: unbounded).

    Returns
    -------
    float

    Raises
    ------
    InvalidInstance
        Naming ``field``, the rule and the value.
    """
    return _within(_real(value, field), field, lo, hi, lo_open, "", value)


def integer(value: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int in ``[lo, hi]``.

    ``2``, ``2.0``, ``np.int64(2)`` and ``"2"``/``"2.0"``/``"1e3"`` are read; ``True``, ``1.5``,
    NaN, infinities, None and other text are refused, and so is anything outside the range
    (however large: Python ints are compared exactly, never converted to a C integer).

    Parameters
    ----------
    value : Any
    field : str
        How the message names the value (``"effort"``, ``"--gpus"``, ``"model 0 ('a'): field 'tp'"``).
    lo, hi : int or None
        Inclusive bounds (None: unbounded).

    Returns
    -------
    int

    Raises
    ------
    InvalidInstance
        Naming ``field``, the rule (with the range) and the value.
    """
    what = "an integer "
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        try:
            n = int(value.strip())  # exact (no detour through a float)
        except ValueError:  # more than 4300 digits: Python refuses to convert it
            raise InvalidInstance(f"{field} must be {what}{_range_text(lo, hi)}, got {_show(value)}") from None
    else:
        x = _real(value, field, "an integer")  # "2.0", "1e3", 2.0, Decimal("2")
        if x != math.floor(x):
            raise InvalidInstance(f"{field} must be an integer, got {_show(value)}")
        n = int(value) if isinstance(value, (fractions.Fraction, decimal.Decimal)) else int(x)
    return _within(n, field, lo, hi, False, what, value)


def choice(value: Any, field: str, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options`` (strings), else InvalidInstance listing them."""
    if not isinstance(value, str) or value not in options:
        raise InvalidInstance(f"{field} must be one of {', '.join(map(repr, options))}, got {_show(value)}")
    return value


def per_gpu(value: Any, field: str, lo: float = 0.0, lo_open: bool = False) -> float | tuple[float, ...]:
    """One number, or a flat list of numbers (one per GPU), each finite and ``>= lo`` (``> lo``
    with ``lo_open``): what ``gpu_mem`` and ``reserve_gb`` take.  Nested lists, None, text and
    booleans are refused; the length is checked against the GPU count by the caller
    (:func:`gpu_memory`).  Returns a float or a tuple of floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        nested = value.ndim != 1 if isinstance(value, np.ndarray) else any(
            isinstance(v, (list, tuple, np.ndarray, Mapping)) for v in value)
        if nested:
            raise InvalidInstance(f"{field} must be one number or a flat list of numbers (one per GPU), "
                                  f"got a nested list {_show(value)}")
        if len(value) == 0:
            raise InvalidInstance(f"{field} must be one number or a list of numbers (one per GPU), got an empty list")
        return tuple(number(v, f"{field}[{k}]", lo, None, lo_open) for k, v in enumerate(value))
    if value is None:
        raise InvalidInstance(f"{field} must be a number of GB or a list of them (one per GPU), got None "
                              f"(leave it out for the default)")
    return number(value, field, lo, None, lo_open)


def gpu_memory(gpus: Any, gpu_mem: Any) -> np.ndarray:
    """Per-GPU memory of a cluster.

    Parameters
    ----------
    gpus : int
        Number of GPUs, 1..``MAX_GPUS``.
    gpu_mem : float or sequence of float
        GB per GPU: one number for all, or a flat list of ``gpus`` numbers; each finite and > 0.

    Returns
    -------
    ndarray, shape (G,), float64

    Raises
    ------
    InvalidInstance
        Naming ``gpus`` or ``gpu_mem`` (with the GPU index) and the rule.
    """
    g = integer(gpus, "gpus", *OPTION_RANGES["gpus"])
    mem = per_gpu(gpu_mem, "gpu_mem", 0.0, lo_open=True)
    if isinstance(mem, tuple):
        if len(mem) != g:
            raise InvalidInstance(f"gpu_mem gives {len(mem)} values for {g} GPUs (give one number, or one per GPU)")
        out = np.asarray(mem, dtype=np.float64)
    else:
        out = np.full(g, mem, dtype=np.float64)
    if not math.isfinite(sum(out.tolist())):  # Python's sum: inf, no RuntimeWarning
        raise InvalidInstance("gpu_mem: the total memory of the GPUs overflows (values too large)")
    return out


# ---------------------------------------------------------------- model fields

def _name(value: Any, where: str, key: str) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise InvalidInstance(f"{_label(where, key)} must be text, got {_show(value)}")
    return str(int(value)) if isinstance(value, numbers.Integral) else str(value)


def _required(rule_lo: float, lo_open: bool):
    def parse(value: Any, where: str, key: str) -> float:
        if _missing(value):
            raise InvalidInstance(f"{_label(where, key)} has no value (got {_show(value)})")
        return number(value, _label(where, key), rule_lo, None, lo_open)
    return parse


def _count(value: Any, where: str, key: str) -> int:
    return 1 if _missing(value) else integer(value, _label(where, key), 1, MAX_COUNT)


def _overhead(value: Any, where: str, key: str) -> float:
    return 0.0 if _missing(value) else number(value, _label(where, key), 0.0)


def _gpu_list(value: Any, label: str) -> tuple[int, ...]:
    """GPU ids from an int, a list of ints, or text ``"0;2"`` / ``"0,2"`` / ``"[0, 2]"``."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[(" and text[-1:] in "])":  # a list cell as pandas exports it
            text = text[1:-1]
        items: Any = [t for t in text.replace(";", ",").split(",") if t.strip()]
        if not items and text.strip(" ,;"):
            raise InvalidInstance(f"{label} must hold GPU ids, got {_show(value)}")
    elif isinstance(value, (list, tuple, range)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        items = list(value)
    elif isinstance(value, np.ndarray) or isinstance(value, (Mapping, set, frozenset)):
        raise InvalidInstance(f"{label} must be a GPU id or a flat list of them, got {_show(value)}")
    else:
        items = [value]
    out = []
    for x in items:
        if isinstance(x, (list, tuple, np.ndarray, Mapping)):
            raise InvalidInstance(f"{label} must be a GPU id or a flat list of them, got {_show(value)}")
        out.append(integer(x, label, 0, MAX_GPU_ID))
    return tuple(out)


def gpu_ids(value: Any, label: str) -> tuple[int, ...]:
    """GPU ids (each 0..``MAX_GPU_ID``) from an int, a flat list of ints, or text ``"2,3"`` /
    ``"2;3"`` / ``"[2, 3]"``; None and blanks give ``()``.  ``label`` names the value in the
    message (``"out_of_service"``, ``"--drain"``).  Whether the ids exist is the cluster's check."""
    return () if _missing(value) else _gpu_list(value, label)


def _pin(value: Any, where: str, key: str) -> tuple[int, ...] | None:
    if _missing(value):
        return None
    ids = _gpu_list(value, _label(where, key))
    if not ids:
        raise InvalidInstance(f"{_label(where, key)} needs at least one GPU id (leave it out for no pin)")
    return ids


def _forbid(value: Any, where: str, key: str) -> tuple[int, ...]:
    return () if _missing(value) else _gpu_list(value, _label(where, key))


def _cur_gpu(value: Any, where: str, key: str) -> tuple[int, ...] | None:
    if _missing(value):
        return None
    label = _label(where, key)
    if not isinstance(value, (list, tuple, np.ndarray, str)) or (
            isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdecimal()):
        g = integer(value, label, -1, MAX_GPU_ID)
        return None if g == -1 else (g,)
    ids = _gpu_list(value, f"{label} (-1 alone means new; a list holds GPU ids >= 0)")
    if not ids:
        raise InvalidInstance(f"{label} is an empty list (give -1 or leave it out for a new model)")
    return ids


def _same_node(value: Any, where: str, key: str) -> bool | None:
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidInstance(f"{_label(where, key)} must be true or false, got {_show(value)}")


def _node(value: Any, where: str, key: str) -> int | None:
    return None if _missing(value) else integer(value, _label(where, key), 0, MAX_GPUS - 1)


def _colocate(value: Any, where: str, key: str) -> str | None:
    if _missing(value):
        return None
    if not isinstance(value, str):
        raise InvalidInstance(f"{_label(where, key)} must be the name of another model, got {_show(value)}")
    return value.strip()


def _hf(value: Any, where: str, key: str) -> str | None:
    if _missing(value):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidInstance(f"{_label(where, key)} must be a folder or a Hugging Face repo id, got {_show(value)}")
    return os.fspath(value).strip()


def _serve(value: Any, where: str, key: str) -> str | None:
    if _missing(value):
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise InvalidInstance(f"{_label(where, key)} must be what the engine loads (a Hugging Face repo id or a "
                              f"folder), got {_show(value)}")
    return os.fspath(value).strip()


def _kv_dtype(value: Any, where: str, key: str) -> str | None:
    if _missing(value):
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in model_files.KV_DTYPES:
        raise InvalidInstance(f"{_label(where, key)} must be one of {', '.join(model_files.KV_DTYPES)}, "
                              f"got {_show(value)}")
    return text


def _kv_bytes(value: Any, where: str, key: str) -> float | None:
    return None if _missing(value) else number(value, _label(where, key), 0.0, None, lo_open=True)


_PARSERS = {
    "name": _name,
    "size": _required(0.0, False),
    "req_rate": _required(0.0, False),
    "slo": _required(0.0, True),
    "tp": _count,
    "replicas": _count,
    "pin": _pin,
    "forbid": _forbid,
    "cur_gpu": _cur_gpu,
    "overhead_gb": _overhead,
    "same_node": _same_node,
    "node": _node,
    "colocate_with": _colocate,
    "hf": _hf,
    "kv_cache_dtype": _kv_dtype,
    "kv_bytes_per_token": _kv_bytes,
    "serve": _serve,
}


def _check_demand(req_rate: float, slo: float, where: str) -> None:
    if not math.isfinite(req_rate / slo):
        raise InvalidInstance(f"{where}: demand req_rate/slo = {req_rate!r}/{slo!r} overflows "
                              f"(the result is not a finite number)")


def current_placement(values: Any, n_models: int, field: str = "current") -> list[tuple[int, ...] | None]:
    """Each model's GPU(s) now, for re-placement: an iterable of ``n_models`` entries, each a
    GPU id, a list of GPU ids (one per shard and replica), or -1 / None / NaN for a new model.
    Returns a list of tuples of ints (None for new).  GPU ids are checked for type and sign;
    whether they exist is the cluster's check."""
    if values is None or isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Iterable, np.ndarray)):
        raise InvalidInstance(f"{field} must be a list with one GPU id (or -1 for new) per model, got {_show(values)}")
    vals = list(values)
    if len(vals) != n_models:
        raise InvalidInstance(f"{field} gives {len(vals)} entries for {n_models} models")
    return [_cur_gpu(v, f"{field}[{i}]", None) for i, v in enumerate(vals)]


# ---------------------------------------------------------------- models

def check_keys(keys: Iterable, where: str) -> None:
    """Refuse keys that name no field of :class:`ModelSpec`: each is named with the closest
    known key suggested (``'replica'`` -> ``'replicas'``); keys that are not text (YAML reads
    ``5:`` as an int) are named as such.  ``where`` prefixes the message (``"x.csv, line 1"``)."""
    parts = []
    known = sorted(_FIELD_OF_KEY)
    for k in keys:
        if not isinstance(k, str):
            parts.append(f"key {_show(k)} is not a field name (keys are text: "
                         f"{', '.join(keys[0] for keys in KEYS.values())})")
        elif k.strip() not in _FIELD_OF_KEY:
            guess = _HINTS.get(k.strip().lower()) or next(
                iter(difflib.get_close_matches(k.strip().lower(), known, 1, 0.6)), None)
            parts.append(f"unknown key {k!r}" + (f" (did you mean {guess!r}?)" if guess else
                                                 f" (known keys: {', '.join(known)})"))
    if parts:
        raise InvalidInstance(f"{where}: " + "; ".join(parts))


def _from_mapping(m: Mapping, where: str) -> dict[str, Any]:
    """Canonical field -> parsed value from a dict (missing values left out); unknown keys and
    two keys giving one field different values refused."""
    check_keys(m, where)  # before any value: a typo in a key is the likelier cause of what follows
    return _collect(((k.strip(), _FIELD_OF_KEY[k.strip()], v) for k, v in m.items()), where, "keys")


def _from_object(o: Any, where: str) -> dict[str, Any]:
    """Known attribute names only: objects carry many other attributes (methods, caches)."""
    found = ((k, f, getattr(o, k, None)) for k, f in _FIELD_OF_KEY.items())
    return _collect(((k, f, v) for k, f, v in found if not callable(v)), where, "attributes")


def _collect(triples, where: str, what: str) -> dict[str, Any]:
    got: dict[str, tuple[str, Any, Any]] = {}
    empty: dict[str, tuple[str, Any]] = {}
    for k, f, raw in triples:
        if f in _NAMES_A_MODEL and isinstance(raw, str) and not raw.strip():
            raise InvalidInstance(f"{_label(where, k)} is empty: give the name of the base model, or leave the key out")
        if _missing(raw):
            empty.setdefault(f, (k, raw))
            continue
        value = _PARSERS[f](raw, where, k)
        if f in got and got[f][2] != value:
            k0, raw0, _ = got[f]
            raise InvalidInstance(f"{where}: {what} {k0!r} ({_show(raw0)}) and {k!r} ({_show(raw)}) both give "
                                  f"{f!r}, with different values; keep one")
        got[f] = (k, raw, value)
    for f in _REQUIRED:
        if f == "size" and "hf" in got:
            continue  # read from the model's files (_with_files)
        if f not in got:
            if f in empty:
                k, raw = empty[f]
                raise InvalidInstance(f"{_label(where, k)} has no value (got {_show(raw)})")
            raise InvalidInstance(f"{where}: missing field " + " or ".join(repr(k) for k in KEYS[f]))
    return {f: v for f, (_, _, v) in got.items()}


def _from_triple(row: Any, where: str) -> dict[str, Any]:
    vals = list(row)
    if len(vals) != 3:
        raise InvalidInstance(f"{where}: a model given as a row must have 3 values (size, req_rate, slo), "
                              f"got {len(vals)}")
    return {f: _PARSERS[f](v, where, f) for f, v in zip(_REQUIRED, vals)}


def _items(models: Any) -> list:
    """The models as a list (an iterator consumed exactly once)."""
    if models is None or isinstance(models, (str, bytes, bytearray)):
        raise InvalidInstance(f"models must be a list of models (dicts, objects, or (size, req_rate, slo) "
                              f"rows), a DataFrame or an (N, 3) array, got {_show(models)}"
                              + (" (to read a file, use kvgpu.io.read_models)" if isinstance(models, str) else ""))
    if isinstance(models, Mapping):
        hint = " (it has a 'models' key: pass data['models'])" if "models" in models else ""
        raise InvalidInstance(f"models must be a list of models, got one dict{hint}")
    if hasattr(models, "columns") and hasattr(models, "iloc") and hasattr(models, "to_dict"):  # pandas, not imported
        cols = list(models.columns)
        dup = next((c for c in cols if cols.count(c) > 1), None)
        if dup is not None:
            raise InvalidInstance(f"models: the DataFrame has two columns named {dup!r}")
        return models.to_dict("records")
    if isinstance(models, np.ndarray):
        if models.dtype != object and (models.ndim != 2 or models.shape[1] != 3):
            raise InvalidInstance(f"models: an array of models must have shape (N, 3) (size, req_rate, slo), "
                                  f"got shape {models.shape}")
        if models.ndim not in (1, 2):
            raise InvalidInstance(f"models: an array of models must have shape (N, 3), got shape {models.shape}")
        return list(models)
    if not isinstance(models, Iterable):
        raise InvalidInstance(f"models must be a list (or any iterable) of models, got {type(models).__name__}")
    return list(models)


def model_specs(models: Any, where: Sequence[str] | None = None,
                base_dir: str | os.PathLike | None = None, read_files: bool = True) -> list[ModelSpec]:
    """Validated records of ``models``.

    Parameters
    ----------
    models : iterable, DataFrame or ndarray
        Any iterable (a generator is consumed exactly once) of: dicts (keys of :data:`KEYS`,
        aliases included; an unknown key is refused with the closest known one suggested),
        objects with attributes (only the names of :data:`KEYS` are read), ``(size, req_rate,
        slo)`` rows, or ModelSpec (passed through); or a pandas DataFrame (a row per model,
        NaN = not given) or a NumPy ``(N, 3)`` array.
    where : sequence of str, optional
        How messages name each model (``"models.csv, line 5"``); default ``"model i"``.  The
        model's name is appended.
    base_dir : path, optional
        The folder a relative ``hf`` path starts from (the model file's); default the working
        folder.
    read_files : bool
        False: a model with ``hf`` and ``size`` keeps the figures given (what a placement file
        stored when kvgpu read the files) instead of reading the files again.

    Returns
    -------
    list of ModelSpec
        In input order.

    Raises
    ------
    InvalidInstance
        Naming the model (``where``), the field and the rule.
    """
    items = _items(models)
    if where is not None and len(where) != len(items):
        raise InvalidInstance(f"model_specs: {len(where)} labels for {len(items)} models")
    specs = []
    for i, m in enumerate(items):
        if isinstance(m, ModelSpec):
            specs.append(m)
            continue
        base = where[i] if where is not None else f"model {i}"
        row = m
        if not isinstance(m, Mapping) and hasattr(m, "keys") and hasattr(m, "__getitem__") and not isinstance(m, type):
            row = {k: m[k] for k in m.keys()}  # a pandas Series (df.iterrows()) and other mapping-likes
        label = base + _name_suffix(row)
        if isinstance(row, Mapping):
            vals = _from_mapping(row, label)
        elif isinstance(m, (list, tuple, np.ndarray)) and not hasattr(m, "_fields"):
            vals = _from_triple(m, label)
        elif m is None or isinstance(m, (str, bytes, numbers.Number, bool, np.generic)):
            raise InvalidInstance(f"{label}: expected a dict, an object with attributes or a (size, req_rate, slo) "
                                  f"row, got {_show(m)}")
        else:
            vals = _from_object(m, label)
        name = vals.pop("name", None)
        label = base + (f" ({name!r})" if name is not None else "")
        vals = _with_files(vals, label, base_dir, read_files)
        specs.append(ModelSpec(index=i, where=label, name=name, obj=m, **vals))
    _check_totals(specs)
    return specs


def _agree(vals: dict, key: str, found: float, unit: str, how: str, where: str) -> None:
    """Refuse an explicit ``key`` beside ``hf`` that differs from the files' figure by more
    than :data:`kvgpu.model_files.AGREE_RTOL` (within it, the files' exact figure is used)."""
    given = vals.get(key)
    if given is not None and abs(given - found) > model_files.AGREE_RTOL * found:
        raise InvalidInstance(f"{where}: {key} {given:g} {unit} and hf {vals['hf']!r} ({found:.6g} {unit}, from "
                              f"{how}) disagree by more than {100 * model_files.AGREE_RTOL:g}%; drop one "
                              f"(a different model or dtype?)")


def _absolute(ref: str, base_dir) -> str:
    """``ref`` as an absolute path when it names a folder here (relative to ``base_dir``, else
    the working folder), so a placement file that stores it means the same folder wherever it
    is read; else unchanged (a Hugging Face repo id, or a folder of the serving machine)."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path.resolve()) if path.is_dir() else ref


def _with_files(vals: dict, where: str, base_dir, read_files: bool = True) -> dict:
    """``vals`` with ``size`` and ``kv_bytes_per_token`` read from the model's files (``hf``):
    an explicit value beside a figure of the files must agree (:func:`_agree`); where the files
    give none (no formula, a field config.json lacks), the explicit value stands in, with a
    warning.  ``kv_cache_dtype`` without ``hf`` is refused (nothing to apply it to).  ``hf`` and
    ``serve`` naming a folder here are made absolute (:func:`_absolute`).  ``read_files=False``
    keeps the ``size`` and ``kv_bytes_per_token`` given (figures read before, stored in a
    placement file)."""
    vals = {**vals, **{k: _absolute(vals[k], base_dir) for k in ("hf", "serve") if k in vals}}
    if "hf" not in vals:
        if "kv_cache_dtype" in vals:
            raise InvalidInstance(f"{where}: kv_cache_dtype applies to a model read from its files (hf); "
                                  f"without hf give kv_bytes_per_token")
        return vals
    if not read_files and "size" in vals:
        return vals  # figures kvgpu read from the files before (a placement file carries them)
    files = model_files.read(vals["hf"], where, tp=vals.get("tp", 1), kv_cache_dtype=vals.get("kv_cache_dtype"),
                             base_dir=base_dir)
    out = {**vals, "size": _from_files(vals, "size", files.size_gb, "GB", files.weights_from, where)}
    kv = _from_files(vals, "kv_bytes_per_token", files.kv_bytes_model, "bytes", files.kv_note, where)
    if kv is not None:
        out["kv_bytes_per_token"] = kv
        if files.kv_split is not None:  # replicated heads or a latent: not kv / tp
            out["kv_shard_bytes"] = kv / files.kv_split
    return out


def _from_files(vals: dict, key: str, found: float | None, unit: str, how: str, where: str) -> float | None:
    """The files' figure for ``key`` (an explicit one must agree: :func:`_agree`); where they
    give none, the explicit one, with a warning -- or a refusal naming why (``how``) and
    asking for ``key`` (``size`` is required; ``kv_bytes_per_token`` too where the files say
    the attention is of a kind kvgpu does not compute)."""
    if found is not None:
        _agree(vals, key, found, unit, how, where)
        return found
    if key in vals:
        why = how[len(where) + 2:] if how.startswith(where + ": ") else how
        warnings.warn(f"{where}: {key} {vals[key]:g} {unit} as given, for the files give none ({why})",
                      KvgpuWarning, stacklevel=5)
        return vals[key]
    raise InvalidInstance(how + ("" if f"give {key}" in how else f"; give {key} (the files cannot give it)"))


def _name_suffix(m: Any) -> str:
    """`` ('chat')`` for messages about a model, read leniently (the name itself is checked
    later; a bad name must not hide the real error)."""
    for k in KEYS["name"]:
        v = m.get(k) if isinstance(m, Mapping) else getattr(m, k, None)
        if isinstance(v, str) and v.strip():
            return f" ({v!r})"
    return ""


def _check_totals(specs: list[ModelSpec]) -> None:
    """Sums the solvers take (total size, total demand) must stay finite."""
    for what, vals in (("size", [s.size for s in specs]), ("demand (req_rate/slo)", [s.demand for s in specs])):
        if vals and not math.isfinite(sum(vals)):
            raise InvalidInstance(f"models: the total {what} overflows (values too large to add up)")
