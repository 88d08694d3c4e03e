"""Capacity planning: the fewest GPUs (or the cheapest mix of GPU types) that keep the worst KVPR
at or below a target, and the uniform growth of demand a cluster sustains under it.

The target turns sizing into bin packing.  Every GPU of memory ``M`` must satisfy
``W / (M - S) <= X``, i.e. ``S + W / X <= M``: item ``i`` (a model, or one shard / replica of a
model with ``tp`` / ``replicas``) occupies ``a_i = s_i + w_i / X`` GB of a GPU.  So, at target
``X``:

* an item with ``a_i`` above the largest memory fits on no GPU: no number of GPUs meets ``X``;
* GPUs of one memory need at least as many bins as a bin packing of the ``a_i`` needs: the
  Martello-Toth bound L2 (it contains the volume bound ``ceil(sum a / M)``); at least
  ``n / q`` GPUs when no GPU holds more than ``q`` items (the ``q + 1`` smallest overflow it);
  and at least ``tp * replicas`` GPUs for a model whose shards need distinct GPUs;
* with several GPU types, the items that fit on no type below type ``t`` must go to types
  ``>= t``: their volume, their L2 count (in bins of the largest memory present), how many of
  them each type can hold, and their shards bound the GPUs of those types.

Adding a GPU, or replacing one with a larger, never hurts (an empty GPU has KVPR 0), so "no
placement meets ``X`` on mix ``c``" carries over to every mix with no more GPUs of each type.

The search for the answer (:func:`size`) walks *rows*: a row fixes the counts of every type
but the largest and looks for the fewest GPUs of the largest type that :func:`kvgpu.solve`
places under ``X`` (galloping up from the bound, then bisecting).  The first row (largest type
only) gives a first cost; later rows only look below the best cost so far.  The answer is the
cheapest mix found; each row's most expensive mix still cheaper than the answer (it covers
every cheaper mix of that row) is then settled: *proven impossible* (by the bounds above,
kvgpu's lower bound on max KVPR for that cluster, or ``exact=True``), or *not found* (the solver
got no placement under ``X`` there and no proof was reached).  With one GPU type the rows are
a single row and that mix is "one GPU fewer".
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvgpu.api import solve
from kvgpu.bounds import L2_DELTA, l2_exceeds
from kvgpu.engine import DEFAULT_EFFORT, DEFAULT_EXACT_WORK, options
from kvgpu.errors import InvalidInstance, NoPlacementFound
from kvgpu.problem import DEFAULT_GPU_MEM, build_problem
from kvgpu.results import Placement, json_float
from kvgpu.schema import OPTION_RANGES, integer, model_specs, number

#: Relative margin of the bounds' comparisons: a mix is excluded only when it misses by more,
#: so rounding never turns into a false proof.
_MARGIN = L2_DELTA
#: Most GPUs sizing considers (one GPU per shard / replica always suffices, see :func:`size`).
MAX_GPUS = OPTION_RANGES["max_gpus"][1]
#: Most rows (combinations of the counts of all types but the largest) :func:`size` walks.
MAX_ROWS = 20_000
#: Most :func:`kvgpu.solve` calls of one :func:`size`; rows beyond it are reported as not searched.
MAX_SOLVES = 400
#: Cheaper mixes a summary lists (the ones not proven first).
_SHOWN = 12


@dataclass(frozen=True)
class GpuType:
    """A kind of GPU one can buy: ``memory`` in GB, ``price`` per GPU (any unit, > 0)."""

    name: str
    memory: float
    price: float


@dataclass
class MixStatus:
    """What is known about one mix cheaper than the answer.

    Attributes
    ----------
    counts : tuple[int, ...] -- GPUs per type, in :attr:`SizeResult.types` order.
    cost : float -- ``sum(counts * price)``.
    proven : bool -- True: no placement of this mix (nor of any mix with no more GPUs of each
        type) meets the target; False: none was found, but that is not proven.
    reason : str -- the proof, or what the solver reached at this mix.
    """

    counts: tuple
    cost: float
    proven: bool
    reason: str


@dataclass
class SizeResult:
    """The answer of :func:`size`.

    Attributes
    ----------
    max_kvpr : float -- the target (demand per GB of KV cache).
    types : tuple[GpuType, ...] -- the GPU types, by memory (smallest first).
    counts : tuple[int, ...] -- GPUs of each type in the answer.
    placement : Placement -- a placement on the answer's GPUs (type by type, in ``types``
        order) with ``placement.max_kvpr <= max_kvpr``.
    cheaper : list[MixStatus] -- every row's most expensive mix cheaper than the answer (with
        one type: the mix of one GPU fewer, when that is at least one GPU); together they cover
        every cheaper mix of at most ``max_gpus`` GPUs (by default one per shard / replica: more
        GPUs than that only add empty ones, so a cheaper mix of fewer GPUs would work too).
    count_lower_bound : int -- a proven lower bound on the number of GPUs of any mix meeting the
        target (the answer's own count when the single-type answer is proven).
    priced : bool -- types were given with prices (``gpu_types``), not as one ``gpu_mem``.
    """

    max_kvpr: float
    types: tuple
    counts: tuple
    placement: Placement
    cheaper: list
    count_lower_bound: int
    priced: bool
    solves: int = 0
    #: GB kept off every GPU, and GPUs per node (None: no nodes), as sized.
    reserve_gb: float = 0.0
    gpus_per_node: int | None = None

    @property
    def gpus(self) -> int:
        """Total GPUs of the answer."""
        return int(sum(self.counts))

    @property
    def cost(self) -> float:
        return _cost(self.counts, self.types)

    @property
    def achieved(self) -> float:
        """The answer's placement's max KVPR (at most the target)."""
        return self.placement.max_kvpr

    @property
    def proven(self) -> bool:
        """Every cheaper mix (with one type: one GPU fewer) is proven unable to meet the target."""
        return all(m.proven for m in self.cheaper)

    def gpu_type_of(self) -> list[str]:
        """The type name of each GPU of :attr:`placement`, by GPU id."""
        return [t.name for t, c in zip(self.types, self.counts) for _ in range(c)]

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"max_kvpr_target": self.max_kvpr, "gpus": self.gpus,
                "counts": {t.name: c for t, c in zip(self.types, self.counts)},
                "gpu_types": [{"name": t.name, "memory": t.memory, **({"price": t.price} if self.priced else {})}
                              for t in self.types],
                **({"cost": self.cost} if self.priced else {}),
                "reserve_gb": self.reserve_gb, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes(),
                "achieved_max_kvpr": json_float(self.achieved), "proven": self.proven,
                "count_lower_bound": self.count_lower_bound,
                "cheaper": [{"counts": {t.name: c for t, c in zip(self.types, m.counts)}, "gpus": int(sum(m.counts)),
                             **({"cost": m.cost} if self.priced else {}), "proven_impossible": m.proven,
                             "reason": m.reason} for m in self.cheaper],
                "solver_calls": self.solves, "gpu_type_of": self.gpu_type_of(), "placement": self.placement.to_dict()}

    def summary(self) -> str:
        """The answer in an operator's words (one line with one type; a short list with several)."""
        X = f"{self.max_kvpr:.6g}"
        if not self.priced:
            G, mem = self.gpus, self.types[0].memory
            head = (f"{_gpus(G)} of {mem:g} GB{self._cluster_words()} {'meets' if G == 1 else 'meet'} max KVPR {X} "
                    f"(achieved {self.achieved:.4g})")
            if not self.cheaper:
                return head
            m = self.cheaper[0]
            if m.proven:
                return f"{head}; {G - 1} cannot (proven: {m.reason})"
            return (f"{head}; {G - 1} might too, not proven ({m.reason}; at least {_gpus(self.count_lower_bound)} "
                    f"are needed)")
        lines = [f"cheapest mix found for max KVPR {X}{self._cluster_words()}: {self._mix(self.counts)} = "
                 f"{_gpus(self.gpus)}, cost {self.cost:.6g} (achieved {self.achieved:.4g})"]
        if not self.cheaper:
            lines.append("no cheaper mix exists (no fewer GPUs of any type leave one)")
            return "\n".join(lines)
        lines.append("cheaper mixes (each stands for every mix with no more GPUs of each type):")
        # the ones not proven matter most, then those nearest the answer's cost
        shown = sorted(self.cheaper, key=lambda m: (m.proven, -m.cost))[:_SHOWN]
        for m in sorted(shown, key=lambda m: m.cost):
            lines.append(f"  {self._mix(m.counts):<40} cost {m.cost:<9.6g} "
                         f"{'impossible (proven: ' if m.proven else 'not found ('}{m.reason})")
        unproven = sum(not m.proven for m in self.cheaper)
        if len(shown) < len(self.cheaper):
            rest = [m for m in self.cheaper if all(m is not x for x in shown)]
            lines.append(f"  ... and {len(rest)} cheaper mixes more, "
                         f"{sum(m.proven for m in rest)} of them proven impossible (to_dict / --json lists all)")
        lines.append("every cheaper mix is proven impossible: this is the cheapest" if not unproven else
                     f"{unproven} of {len(self.cheaper)} cheaper mixes not proven impossible: a cheaper mix may exist")
        return "\n".join(lines)

    def _cluster_words(self) -> str:
        """`` (8 GB reserved each, nodes of 4)``: the cluster rules sized with, if any."""
        parts = ([f"{self.reserve_gb:g} GB reserved each"] if self.reserve_gb else []) + \
            ([self._node_words()] if self.gpus_per_node is not None else [])
        return f" ({', '.join(parts)})" if parts else ""

    def nodes(self) -> list[list[int]] | None:
        """GPU ids per node of the answer (:func:`node_lists`): nodes of ``gpus_per_node`` per
        GPU type, the last of each type partial where the count is not a multiple."""
        return node_lists(self.counts, self.gpus_per_node)

    def _node_words(self) -> str:
        """``nodes of 4`` -- and where a node is partial, the sizes (``4+2 GPUs``): a partial
        node is what solve takes with the same gpus_per_node (its last node is smaller)."""
        sizes = [len(n) for n in self.nodes()]
        if all(n == self.gpus_per_node for n in sizes):
            return f"nodes of {self.gpus_per_node}"
        return f"nodes of {self.gpus_per_node}: {'+'.join(map(str, sizes))} GPUs, a partial node"

    def _mix(self, counts) -> str:
        parts = [f"{c} x {t.name}" for t, c in zip(self.types, counts) if c]
        return " + ".join(parts) if parts else "no GPUs"

    def __str__(self) -> str:
        return f"{self.summary()}\n\n# the placement found\n{self.placement}"


@dataclass
class HeadroomResult:
    """The answer of :func:`headroom`.

    Attributes
    ----------
    max_kvpr : float -- the target.
    factor : float -- every request rate times ``factor`` still meets the target on the
        placement found (``max_kvpr / placement.max_kvpr``; ``inf`` without demand).
    upper_limit : float -- no placement on this cluster meets the target beyond this factor
        (``max_kvpr / lower_bound``, proven).
    placement : Placement -- the placement of today's demand.
    """

    max_kvpr: float
    factor: float
    upper_limit: float
    placement: Placement

    @property
    def proven(self) -> bool:
        """``factor`` is the largest growth (the placement is proven optimal)."""
        return self.placement.proven_optimal

    def to_dict(self) -> dict:
        p = self.placement
        return {"max_kvpr_target": self.max_kvpr, "factor": json_float(self.factor),
                "upper_limit": json_float(self.upper_limit), "proven": self.proven,
                "max_kvpr_today": json_float(p.max_kvpr), "lower_bound_today": json_float(p.lower_bound),
                "gpus": p.instance.n_gpus, "placement": p.to_dict()}

    def summary(self) -> str:
        p, X = self.placement, f"{self.max_kvpr:.6g}"
        n = p.instance.n_gpus
        G, s = _gpus(n), "s" if n == 1 else ""
        if not math.isfinite(self.factor):
            head = f"{G} sustain{s} any request rate under max KVPR {X} (the models have no demand)"
        elif self.factor >= 1:
            head = f"{G} sustain{s} every request rate x{self.factor:.4g} under max KVPR {X}"
        else:
            head = f"{G} meet{s} max KVPR {X} only if every request rate shrinks to x{self.factor:.4g}"
        head += f" (placement found: max KVPR {p.max_kvpr:.4g} at today's rates)"
        if self.proven:
            return head + "; that is the most (proven: the placement is optimal)"
        return (head + f"; no placement sustains more than x{self.upper_limit:.4g} (proven by the lower bound "
                f"{p.lower_bound:.4g} on max KVPR); in between is not proven")

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.placement}"


def _gpus(n: int) -> str:
    return f"{n} GPU" + ("" if n == 1 else "s")


def _cost(counts, types) -> float:
    return float(sum(c * t.price for c, t in zip(counts, types)))


def _positive(value, what: str) -> float:
    """A positive finite number (not a bool, not a string); else InvalidInstance naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInstance(f"{what}: must be a positive number, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise InvalidInstance(f"{what}: must be a positive finite number, got {value!r}")
    return x


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_GPUS:
        raise InvalidInstance(f"{what}: must be an integer from 1 to {MAX_GPUS}, got {value!r}")
    return int(value)


def check_gpu_types(types: Any) -> tuple[GpuType, ...]:
    """Validate GPU types -- :class:`GpuType` objects or dicts ``{"name", "memory", "price"}`` --
    and return them by memory, smallest first (stable).  Raises :class:`InvalidInstance`
    naming the type and field."""
    if isinstance(types, (str, bytes, dict)) or not hasattr(types, "__iter__"):
        raise InvalidInstance(f"gpu_types: must be a list of GPU types {{name, memory, price}}, got {types!r}")
    out = []
    for k, t in enumerate(types):
        if isinstance(t, GpuType):
            t = {"name": t.name, "memory": t.memory, "price": t.price}
        if not isinstance(t, dict):
            raise InvalidInstance(f"gpu_types[{k}]: must be {{name, memory, price}}, got {t!r}")
        unknown = sorted(set(t) - {"name", "memory", "price"}, key=str)
        if unknown:
            raise InvalidInstance(f"gpu_types[{k}]: unknown key {unknown[0]!r} (the keys are name, memory, price)")
        for key in ("name", "memory", "price"):
            if key not in t:
                raise InvalidInstance(f"gpu_types[{k}]: missing field {key!r}")
        name = t["name"]
        if not isinstance(name, str) or not name.strip():
            raise InvalidInstance(f"gpu_types[{k}]: name must be a non-empty string, got {name!r}")
        out.append(GpuType(name.strip(), _positive(t["memory"], f"gpu_types[{k}] ({name!r}): memory"),
                           _positive(t["price"], f"gpu_types[{k}] ({name!r}): price")))
    if not out:
        raise InvalidInstance("gpu_types: no GPU types given")
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidInstance(f"gpu_types: the name {dup!r} is given twice")
    return tuple(sorted(out, key=lambda t: t.memory))


def parse_gpu_types(text: str) -> tuple[GpuType, ...]:
    """GPU types from ``"H100:80:2.0,H200:141:3.5"`` (name:memory GB:price, comma-separated)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        bits = part.split(":")
        if len(bits) != 3:
            raise InvalidInstance(f"--gpu-types: {part!r} is not NAME:MEMORY_GB:PRICE (e.g. H100:80:2.0)")
        try:
            mem, price = float(bits[1]), float(bits[2])
        except ValueError:
            raise InvalidInstance(f"--gpu-types: {part!r}: memory and price must be numbers") from None
        out.append({"name": bits[0], "memory": mem, "price": price})
    return check_gpu_types(out)


# -- the items of a model list ---------------------------------------------------------------

@dataclass
class _Items:
    """The items to place: ``a`` (n,) float64 GB each takes at the target (``s + w / X``),
    ``model_of`` (n,) int64 the model of each item, ``k`` (N,) items per model, ``labels`` (n,)
    item names, ``model_labels`` (N,) model names."""

    a: np.ndarray
    model_of: np.ndarray
    k: np.ndarray
    labels: list
    model_labels: list


#: Model fields the sizing sees (its bounds and every solver call); any other rule a model sets
#: is refused by name (:func:`_unsized_rule`), never dropped.
SIZED_FIELDS = ("size", "req_rate", "slo", "tp", "replicas", "overhead_gb", "same_node")
#: Model fields that are not rules (who the model is; where its size came from -- already in
#: ``size`` -- and its KV bytes per token, which only the outputs' token counts use).
_IDENTITY = ("index", "where", "name", "obj", "hf", "kv_cache_dtype", "kv_bytes_per_token", "kv_shard_bytes")
#: Rules that name GPU ids, with their key in a model file.
_GPU_ID_RULES = {"pin": "pin", "forbid": "forbid", "cur_gpu": "cur_gpu_id"}


def _unsized_rule(spec) -> str | None:
    """The file key of the first rule of ``spec`` that sizing does not see (set to other than
    its default), or None."""
    for f in dataclasses.fields(spec):
        if f.name in SIZED_FIELDS or f.name in _IDENTITY:
            continue
        if getattr(spec, f.name) != f.default:
            return _GPU_ID_RULES.get(f.name, f.name)
    return None


def node_lists(counts, per_node: int | None) -> list[list[int]] | None:
    """GPU ids per node of a mix (GPUs type by type, as :meth:`_Sizer._gpu_mem`): each type's
    GPUs in nodes of ``per_node`` consecutive ids, the last one smaller (a node holds one type
    of GPU).  Fewer GPUs of a type keep the nodes of the others, so a placement on a mix still
    works on every mix with more GPUs of each type.  None without nodes."""
    if per_node is None:
        return None
    out, start = [], 0
    for c in counts:
        out += [list(range(g, min(g + per_node, start + c))) for g in range(start, start + c, per_node)]
        start += c
    return out


def _items(models, mem_max: float, X: float, reserve: float = 0.0, per_node: int | None = None) -> _Items:
    """Validate the models (as :func:`kvgpu.solve` does: :func:`kvgpu.problem.build_problem`,
    on GPUs of ``mem_max`` GB keeping ``reserve`` GB, in nodes of ``per_node``) and expand them
    into items at target ``X``.  A rule sizing does not see is refused by name: ``pin`` /
    ``forbid`` / ``cur_gpu_id`` name GPUs of a cluster whose size is the answer; tp shards that
    must share a node larger than ``per_node`` GPUs fit in no cluster."""
    specs = model_specs(models)
    if not specs:
        raise InvalidInstance("models: no models to size")
    for m in specs:
        key = _unsized_rule(m)
        if key in _GPU_ID_RULES.values():
            raise InvalidInstance(f"{m.where}: {key} names GPU ids, which do not exist before the cluster is "
                                  f"sized (its GPU count is the answer); size without {key!r}, then place "
                                  f"with kvgpu.solve / kvgpu solve")
        if key is not None:
            raise InvalidInstance(f"{m.where}: the rule {key!r} is not one sizing can honour (it sees "
                                  f"{', '.join(SIZED_FIELDS)}); size without it, then place with kvgpu.solve")
        if per_node is not None and m.tp > per_node and m.same_node is not False:
            raise InvalidInstance(f"{m.where}: its tp={m.tp} shards must share a node, but nodes hold "
                                  f"{per_node} GPU(s) (gpus_per_node), whatever the number of GPUs (set "
                                  f"same_node: false to let them span nodes)")
    shards = sum(m.tp * m.replicas for m in specs)
    if shards > MAX_GPUS:
        raise InvalidInstance(f"models: tp x replicas add up to {shards} shards; sizing handles at most "
                              f"{MAX_GPUS} GPUs")
    G = max(shards, 1)
    prob = build_problem(specs, G, mem_max, reserve_gb=reserve or None, nodes=node_lists([G], per_node))
    inst, model_of = prob.items, prob.model_of
    labels = [n if n is not None else f"#{i}" for i, n in enumerate(inst.names)]
    k = np.bincount(model_of)
    first = np.searchsorted(model_of, np.arange(k.size))  # items of a model are consecutive
    model_labels = [labels[j].rsplit("/", 1)[0] if k[m] > 1 else labels[j] for m, j in enumerate(first)]
    return _Items(inst.sizes + inst.demand / X, model_of, k, labels, model_labels)


def _bins_needed(r: np.ndarray) -> int:
    """Fewest unit bins L2 allows for relative sizes ``r`` (n,), each at most 1 (+ margin)."""
    if r.size == 0:
        return 0
    valid = np.ones((1, r.size), bool)
    lo, hi = 1, r.size  # one bin per item always passes
    while lo < hi:
        mid = (lo + hi) // 2
        if l2_exceeds(np, r[None, :], valid, np.array([mid]))[0]:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass
class _Class:
    """Items that fit on no type below some type ``t``: how many (``n``), their total size at the
    target (``volume``, GB), their L2 count in bins of each type's memory (``bins`` (T,) int;
    above ``MAX_GPUS`` where an item does not fit), how many of them one GPU of each type can hold
    at most (``fit`` (T,) int), and the most shards one model has among them (``shards``, of model
    ``model``)."""

    n: int
    volume: float
    bins: np.ndarray
    fit: np.ndarray
    shards: int
    model: int


class _Sizer:
    """The search of :func:`size` for one instance: bounds per mix, solver calls (cached)."""

    def __init__(self, models, items: _Items, types, X, max_gpus, effort, seed, exact_work, reserve=0.0,
                 per_node=None):
        self.models, self.items, self.types, self.X = models, items, types, X
        self.full = np.array([t.memory for t in types])  # GB of each type, for messages
        self.reserve, self.per_node = reserve, per_node
        self.mem = self.full - reserve  # what models and KV cache have: the bounds' bins
        self.price = np.array([t.price for t in types])
        self.max_gpus = max_gpus
        self.effort, self.seed, self.exact_work = effort, seed, exact_work
        self.found: dict[tuple, Placement] = {}    # mixes where a placement meets X
        self.failed: dict[tuple, str] = {}         # mixes tried without one: what was reached
        self.proofs: dict[tuple, str] = {}         # mixes proven impossible (beyond the bounds): why
        self.exact_done: set[tuple] = set()
        # kvgpu.solve's default proof runs in every attempt of a small problem
        self.auto_proof = exact_work > 0 and options(exact=None, exact_work=exact_work).proof_work(items.a.size) > 0
        self.solves = 0
        self._classes = self._bound_classes()

    # bounds ---------------------------------------------------------------------------------
    def _bound_classes(self) -> list[_Class]:
        """Per type ``t``, the items that fit on no smaller type (they must use types >= t)."""
        it, m = self.items, self.mem
        out = []
        for t in range(len(m)):
            # an item at the edge counts as fitting below (weaker bound, never a false proof)
            J = it.a > m[t - 1] * (1 + _MARGIN) + _MARGIN if t else np.ones(it.a.size, bool)
            a = np.sort(it.a[J])
            per_model = np.bincount(it.model_of[J], minlength=it.k.size)
            # the most of them one GPU of each type can hold: the smallest ones first
            fit = np.searchsorted(np.cumsum(a), m * (1 + _MARGIN) + _MARGIN, side="right")
            # L2 in bins of each memory from type t up (an item too big for it: no such bins count)
            bins = np.array([_bins_needed(a / mu) if not a.size or a[-1] <= mu * (1 + _MARGIN) + _MARGIN
                             else MAX_GPUS + 1 for mu in m])
            out.append(_Class(int(a.size), float(a.sum()), bins, fit, int(per_model.max()), int(per_model.argmax())))
        return out

    def excluded(self, counts) -> str | None:
        """Why no placement of mix ``counts`` meets the target, by the bounds; None if they allow it."""
        c = np.asarray(counts)
        single = len(self.types) == 1
        for t in reversed(range(len(self._classes))):  # the largest items first: the plainest reason
            k = self._classes[t]
            if not k.n:
                continue
            avail = int(c[t:].sum())
            cap = float((c[t:] * self.mem[t:]).sum())
            what = ("the models" if t == 0 else
                    f"the {k.n} shards/models that fit only on GPUs of >= {self.full[t]:g} GB")
            if not avail:
                return (f"at that target {k.n} shards/models fit only on GPUs of >= {self.full[t]:g} GB, and there "
                        f"are none")
            if k.shards > avail:
                return (f"{self._model_name(k.model)} needs {k.shards} distinct GPUs (tp x replicas)" +
                        (f" of >= {self.full[t]:g} GB" if t else ""))
            # bins no larger than the largest GPU present from type t up (if that GPU is too small
            # for one of the items, the class of those items has no GPU and was reported above)
            top = t + int(np.nonzero(c[t:])[0].max())
            if k.bins[top] > avail:
                if single:
                    return f"the bin-packing bound needs {_gpus(int(k.bins[top]))} at that target"
                return (f"the bin-packing bound needs {int(k.bins[top])} GPUs of <= {self.full[top]:g} GB for "
                        f"{what}")
            held = int((c[t:] * k.fit[t:]).sum())
            if held < k.n:
                if single:
                    q = int(k.fit[0])
                    return (f"at that target at most {q} of the {k.n} shards/models fit on one GPU, so they need "
                            f"{_gpus(-(-k.n // q))}")
                most = " or ".join(f"{int(q)} ({ty.name})" for ty, q in zip(self.types[t:], k.fit[t:]))
                return f"at that target one GPU holds at most {most} of {what}; these GPUs hold {held} of {k.n}"
            if k.volume > cap * (1 + _MARGIN) + _MARGIN:
                return (f"at that target {what} need {k.volume:.6g} GB (weights plus KV cache room), "
                        f"more than the {cap:.6g} GB of {'these' if t == 0 else 'those'} GPUs" +
                        (" after reserve_gb" if self.reserve else ""))
        return None

    def _model_name(self, model: int) -> str:
        return f"model {self.items.model_labels[model]!r}"

    def proof(self, counts) -> str | None:
        """A proof that ``counts`` cannot meet the target: bounds, or one cached for a mix with at
        least as many GPUs of each type."""
        why = self.excluded(counts)
        if why is not None:
            return why
        for other, why in self.proofs.items():
            if all(o >= c for o, c in zip(other, counts)):
                if tuple(other) == tuple(counts):
                    return why
                return f"shown for {self._short(other)}, no fewer GPUs of any type: {why}"
        return None

    def _short(self, counts) -> str:
        if len(self.types) == 1:
            return f"{_gpus(counts[0])} of {self.types[0].memory:g} GB"
        return " + ".join(f"{c} x {t.name}" for t, c in zip(self.types, counts) if c) or "no GPUs"

    # solver ---------------------------------------------------------------------------------
    def _gpu_mem(self, counts) -> list[float]:
        return [t.memory for t, c in zip(self.types, counts) for _ in range(c)]

    def attempt(self, counts, exact: bool = False) -> bool:
        """Does :func:`kvgpu.solve` place the models under the target on mix ``counts``?  Records
        the placement, or what it reached and any proof it gave."""
        counts = tuple(int(c) for c in counts)
        exact = exact and self.exact_work > 0
        if counts in self.found:
            return True
        if counts in self.failed and (not exact or counts in self.exact_done):
            return False
        if not sum(counts):
            self.failed[counts] = "no GPUs"
            return False
        self.solves += 1
        if exact:
            self.exact_done.add(counts)
        G = sum(counts)
        try:
            # not exact: the proof kvgpu.solve runs by default (small problems), so a placement
            # reads "optimal (proven)" here exactly where `kvgpu solve` says so
            p = solve(self.models, G, gpu_mem=self._gpu_mem(counts), reserve_gb=self.reserve or None,
                      nodes=node_lists(counts, self.per_node), effort=self.effort, seed=self.seed,
                      exact=True if exact else (None if self.exact_work else False),
                      exact_work=self.exact_work if self.exact_work else DEFAULT_EXACT_WORK)
        except InvalidInstance as e:  # models validated already: the cluster is what breaks a rule
            self.proofs[counts] = str(e)
            self.failed[counts] = str(e)
            return False
        except NoPlacementFound as e:
            if e.proven:
                self.proofs[counts] = str(e)
            self.failed[counts] = "the solver found no placement that fits in memory"
            return False
        if p.max_kvpr <= self.X:
            self.found[counts] = p
            return True
        self.failed[counts] = f"best max KVPR found {p.max_kvpr:.6g}"
        if p.lower_bound > self.X:
            how = "exact search" if exact or self.auto_proof else "kvgpu's lower bound"
            self.proofs[counts] = (f"{how}: max KVPR on {self._short(counts)} is at least {p.lower_bound:.6g} "
                                   f"> {self.X:.6g}")
        return False

    # rows -----------------------------------------------------------------------------------
    def cheaper_cap(self, prefix, budget: float) -> int:
        """Most GPUs of the largest type that keep row ``prefix`` strictly cheaper than
        ``budget`` and within ``max_gpus`` (-1: none)."""
        hi = self.max_gpus - sum(prefix)
        if math.isfinite(budget):
            left = budget * (1 - 1e-12) - float(np.dot(prefix, self.price[:-1]))
            c = math.floor(left / self.price[-1]) if left > 0 else -1
            while c >= 0 and _cost(prefix + (c,), self.types) >= budget * (1 - 1e-12):
                c -= 1
            hi = min(hi, c)
        return hi

    def least_allowed(self, prefix, hi: int) -> int | None:
        """Fewest GPUs of the largest type the bounds allow in row ``prefix`` (None: not up to ``hi``)."""
        if hi < 0 or self.excluded(prefix + (hi,)) is not None:
            return None
        lo = 0
        while lo < hi:  # the bounds only relax as GPUs are added
            mid = (lo + hi) // 2
            if self.excluded(prefix + (mid,)) is None:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fewest(self, prefix, lo: int, hi: int) -> int | None:
        """Fewest GPUs of the largest type in ``[lo, hi]`` where the solver meets the target,
        galloping up from ``lo`` then bisecting (more GPUs never hurt, so the solver's success is
        taken as monotone); None if not even at ``hi``."""
        if prefix + (hi,) in self.failed:  # known from an earlier, larger budget
            return None
        fail, probe, step = lo - 1, lo, 1
        while True:
            probe = min(probe, hi)
            if self.solves >= MAX_SOLVES:
                return None
            if self.attempt(prefix + (probe,)):
                ok = probe
                break
            fail = probe
            if probe == hi:
                return None
            probe, step = probe + step, step * 2
        while ok - fail > 1 and self.solves < MAX_SOLVES:
            mid = (fail + ok) // 2
            if self.attempt(prefix + (mid,)):
                ok = mid
            else:
                fail = mid
        return ok


def _prefixes(sizer: _Sizer, budget: float):
    """Every row: counts of all types but the largest, cheaper than ``budget`` and within
    ``max_gpus`` in all (the empty prefix first)."""
    types = sizer.types[:-1]
    out = []

    def rec(pre, cost):
        if len(out) > MAX_ROWS:
            raise InvalidInstance(f"gpu_types: more than {MAX_ROWS} combinations of counts are cheaper than the "
                                  f"first answer; give fewer types or a smaller max_gpus")
        if len(pre) == len(types):
            out.append(tuple(pre))
            return
        t = types[len(pre)]
        c = 0
        while cost + c * t.price < budget * (1 - 1e-12) and sum(pre) + c <= sizer.max_gpus:
            rec(pre + [c], cost + c * t.price)
            c += 1

    rec([], 0.0)
    return out


def size(models: Any, max_kvpr: float, *, gpu_mem: float | None = None, gpu_types: Any = None,
         reserve_gb: float | None = None, gpus_per_node: int | None = None, nodes=None,
         max_gpus: int | None = None, effort: int = DEFAULT_EFFORT, seed: int = 0,
         exact_work: int = DEFAULT_EXACT_WORK, demand=None) -> SizeResult:
    """The fewest GPUs of ``gpu_mem`` GB (default 80), or the cheapest mix of ``gpu_types``, on
    which a placement of ``models`` has max KVPR at most ``max_kvpr``.

    Parameters
    ----------
    models : as for :func:`kvgpu.solve`; ``tp`` and ``replicas`` are supported (their shards
        need distinct GPUs); ``pin`` / ``forbid`` are refused: they name GPU ids of a cluster
        whose size is the question.
    max_kvpr : float -- the target, demand (requests/s per s of SLO) per GB of KV cache, > 0.
    gpu_mem : float -- memory in GB of the one GPU type (not with ``gpu_types``).
    gpu_types : list of ``{"name", "memory", "price"}`` dicts or :class:`GpuType` -- several
        types; the answer is the cheapest mix (ties: the first found).
    reserve_gb : float -- GB kept off every GPU for the serving engine (one number: the GPUs
        are not there yet to give one each); the bounds and every solve see ``memory - reserve_gb``.
    gpus_per_node : int -- GPUs per node: each type's GPUs form nodes of that many consecutive
        ids, and a model's tp shards stay inside one node (unless it says ``same_node: false``);
        a model whose tp is above it is refused.  ``nodes`` (lists of GPU ids) is refused: it
        names GPUs of a cluster whose size is the answer.
    max_gpus : int -- most GPUs in all (default: one per model shard / replica, and with
        ``gpus_per_node`` a whole node per tp replica, which always suffices when each fits
        alone).  Too small to meet the target (by the bounds): :class:`kvgpu.InvalidInstance`.
    effort, seed : the search of each :func:`kvgpu.solve` call.
    exact_work : proof work per mix (``exact=True`` of :func:`kvgpu.solve`) for cheaper mixes
        the bounds do not settle; 0 turns these proofs off.
    demand : request rates per model and window, (n_models, W): one window (W = 1) replaces the
        models' ``req_rate`` (the same answer as models with those rates); W > 1 is refused
        (sizing for the robust objective is not there yet; :func:`kvgpu.solve` takes it).

    Returns
    -------
    SizeResult -- the answer's counts and placement, and for cheaper mixes whether they are
    proven impossible (:attr:`SizeResult.proven`: the answer is the fewest / the cheapest).

    Raises
    ------
    InvalidInstance -- bad models or options (naming the field), ``max_gpus`` too small.
    NoPlacementFound -- no number of GPUs meets the target (``proven``: a model alone on the
        largest GPU is above it), or the solver found none within ``max_gpus``.
    """
    X = _positive(max_kvpr, "max_kvpr")
    opts = options(effort=effort, seed=seed, exact_work=exact_work)  # a bad option is said as such, before any solve
    if gpu_types is not None and gpu_mem is not None:
        raise InvalidInstance("give gpu_mem (one GPU type) or gpu_types (several, with prices), not both")
    if gpu_types is not None:
        types, priced = check_gpu_types(gpu_types), True
    else:
        mem = DEFAULT_GPU_MEM if gpu_mem is None else gpu_mem
        if np.ndim(mem) != 0:
            raise InvalidInstance("gpu_mem: sizing takes one memory (GB) for the GPUs to add; for several kinds of "
                                  "GPU give gpu_types with prices")
        types, priced = (GpuType(f"{_positive(mem, 'gpu_mem'):g} GB", float(mem), 1.0),), False
    reserve, per_node = _sizing_cluster(reserve_gb, nodes, gpus_per_node, types)
    recs = model_specs(models)  # read once: a generator is consumed here
    if demand is not None:
        from kvgpu.robust import one_window_specs

        recs = one_window_specs(recs, demand, "size")
    items = _items(recs, types[-1].memory, X, reserve, per_node)
    worst = int(np.argmax(items.a))
    room = types[-1].memory - reserve
    if items.a[worst] > room * (1 + _MARGIN) + _MARGIN:
        raise NoPlacementFound(
            f"no number of GPUs meets max KVPR {X:.6g}: {items.labels[worst]!r} alone on a {types[-1].memory:g} GB "
            f"GPU" + (f" ({room:g} GB after reserve_gb)" if reserve else "") + f" needs {items.a[worst]:.6g} GB "
            f"at that target (weights plus KV cache room); more replicas or tp split its demand", [0], proven=True)
    n_items = items.a.size
    cap = _enough_gpus(recs, n_items, per_node) if max_gpus is None else _count(max_gpus, "max_gpus")
    sizer = _Sizer(recs, items, types, X, cap, opts.effort, opts.seed, opts.exact_work, reserve, per_node)
    zeros = (0,) * (len(types) - 1)
    least = sizer.least_allowed(zeros, cap)
    if least is None:
        why = sizer.excluded(zeros + (cap,))
        raise InvalidInstance(f"max_gpus: {cap} GPUs cannot meet max KVPR {X:.6g} ({why})")
    best = sizer.fewest(zeros, least, cap)
    if best is None:
        raise NoPlacementFound(f"no placement meeting max KVPR {X:.6g} found with up to {_gpus(cap)} of "
                               f"{types[-1].memory:g} GB ({sizer.failed.get(zeros + (cap,), 'search limit reached')}; "
                               f"at least {least} are needed by the bounds); not proven impossible", [0])
    answer = zeros + (best,)
    while True:
        budget = _cost(answer, types)
        for pre in _prefixes(sizer, budget):
            hi = sizer.cheaper_cap(pre, budget)
            lo = sizer.least_allowed(pre, hi)
            if lo is None:
                continue
            c = sizer.fewest(pre, lo, hi)
            if c is not None:  # cheaper than the best so far (hi keeps it so)
                answer, budget = pre + (c,), _cost(pre + (c,), types)
        cheaper = _settle(sizer, budget)
        found = [m for m in cheaper if m.counts in sizer.found]  # an exact proof found a placement
        if not found:
            break
        answer = min(found, key=lambda m: m.cost).counts
    bound = least
    if not priced and cheaper and cheaper[0].proven:
        bound = sum(answer)
    return SizeResult(X, types, answer, sizer.found[answer], cheaper, bound, priced, sizer.solves, reserve, per_node)


def _enough_gpus(specs, n_items: int, per_node: int | None) -> int:
    """GPUs that always hold a placement of models that each fit alone: one per item, and with
    nodes a whole node for each tp replica that must stay inside one (capped at ``MAX_GPUS``)."""
    if per_node is None:
        return n_items
    grouped = [m for m in specs if m.tp > 1 and m.same_node is not False]
    in_groups = sum(m.tp * m.replicas for m in grouped)
    return min(MAX_GPUS, n_items - in_groups + per_node * sum(m.replicas for m in grouped))


def _sizing_cluster(reserve_gb, nodes, gpus_per_node, types) -> tuple[float, int | None]:
    """The cluster rules of a sizing: GB kept off every GPU, and GPUs per node (None: no
    nodes).  Raises :class:`InvalidInstance` naming the field it cannot take."""
    if nodes is not None:
        raise InvalidInstance("nodes: lists GPU ids, which do not exist before the cluster is sized (its GPU count "
                              "is the answer); give gpus_per_node to size, or test this cluster with headroom")
    per_node = None if gpus_per_node is None else integer(gpus_per_node, "gpus_per_node", 1, MAX_GPUS)
    if reserve_gb is None:
        return 0.0, per_node
    if np.ndim(reserve_gb) != 0:
        raise InvalidInstance("reserve_gb: sizing takes one number (GB kept off every GPU); a list names GPUs of "
                              "a cluster whose size is the answer")
    reserve = number(reserve_gb, "reserve_gb", 0.0, None)
    small = next((t for t in types if t.memory <= reserve), None)
    if small is not None:
        raise InvalidInstance(f"reserve_gb: keeps {reserve:g} GB of the {small.memory:g} GB of a {small.name} GPU, "
                              f"nothing left for models")
    return reserve, per_node


def _settle(sizer: _Sizer, budget: float) -> list[MixStatus]:
    """Each row's most expensive mix cheaper than ``budget`` (dominated ones dropped), tried by
    the solver if not yet, then by ``exact=True`` where no proof is known."""
    top = {pre: sizer.cheaper_cap(pre, budget) for pre in _prefixes(sizer, budget)}
    # a row's top falls as its prefix grows, so a top is dominated exactly when one more GPU of
    # some smaller type keeps the same top
    tops = [pre + (c,) for pre, c in top.items() if c >= 0 and sum(pre) + c > 0 and not any(
        top.get(pre[:i] + (pre[i] + 1,) + pre[i + 1:]) == c for i in range(len(pre)))]
    out = []
    for m in sorted(tops, key=lambda m: (_cost(m, sizer.types), m)):
        why = sizer.proof(m)
        if why is None and sizer.solves < MAX_SOLVES:
            if sizer.attempt(m) or sizer.attempt(m, exact=True):
                out.append(MixStatus(m, _cost(m, sizer.types), False, "found"))
                continue
            why = sizer.proof(m)
        if why is not None:
            out.append(MixStatus(m, _cost(m, sizer.types), True, why))
        else:
            out.append(MixStatus(m, _cost(m, sizer.types), False,
                                 sizer.failed.get(m, f"not searched: limit of {MAX_SOLVES} solver calls")))
    return out


def headroom(models: Any, gpus: int, *, max_kvpr: float, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM,
             reserve_gb=None, nodes=None, gpus_per_node=None, effort: int = DEFAULT_EFFORT, seed: int = 0,
             exact_work: int = DEFAULT_EXACT_WORK) -> HeadroomResult:
    """The largest factor by which every request rate can grow while a placement of ``models``
    on this cluster (``gpus`` GPUs of ``gpu_mem`` GB, or one value per GPU; ``reserve_gb``,
    ``nodes`` / ``gpus_per_node`` as for :func:`kvgpu.solve`, which honours them) keeps max KVPR
    at or below ``max_kvpr``.

    KVPR is linear in demand, so the placement ``P`` kvgpu finds for today's rates sustains
    ``factor = max_kvpr / max_kvpr(P)`` (achieved), and no placement sustains more than
    ``max_kvpr / lower_bound`` (proven upper limit).  Both meet when ``P`` is proven optimal
    (``exact_work`` > 0 runs the proof).  A factor below 1 is how far demand must shrink.
    """
    X = _positive(max_kvpr, "max_kvpr")
    exact = options(effort=effort, seed=seed, exact_work=exact_work).exact_work > 0
    p = solve(models, gpus, gpu_mem=gpu_mem, reserve_gb=reserve_gb, nodes=nodes, gpus_per_node=gpus_per_node,
              effort=effort, seed=seed, exact=exact,
              exact_work=exact_work if exact else DEFAULT_EXACT_WORK)
    factor = X / p.max_kvpr if p.max_kvpr > 0 else math.inf
    limit = X / p.lower_bound if p.lower_bound > 0 else math.inf
    return HeadroomResult(X, factor, limit, p)
