"""What a solve returns: :class:`Placement` (one problem), :class:`BatchResult` (a batch) and
:class:`Move` (one step of a re-placement), in an operator's terms.

KVPR -- KV cache pressure -- of a GPU is its demand divided by the GB it has left for the KV
cache: ``sum(req_rate / slo) / (memory - reserve - model weights)``, in requests/s per second of
SLO per GB.  The lower bound proves that no placement does better, so the gap
``max_kvpr / lower_bound - 1`` is an *upper limit* on how far the answer is from the optimum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvgpu._namespace import get_namespace
from kvgpu.errors import KvgpuWarning
from kvgpu.kernels.deltas import EPS, mem_unit
from kvgpu.kernels.params import OPTIMAL_RTOL
from kvgpu.model_files import GB as KV_BYTES_PER_GB
from kvgpu.problem import Problem

#: Tables list every GPU up to this many; beyond, the GPUs without models are summed up in a line.
TABLE_ALL_GPUS = 64
#: How the unit of KVPR reads in tables and JSON.
KVPR_UNIT = "req/s per s of SLO per GB of KV cache"
#: What ``kv_tokens`` in JSON means.
KV_TOKENS_UNIT = ("tokens of KV cache per model on the GPU: its engine's share of the GPU's free memory "
                  "(in proportion to demand, Placement.kv_split) x 1e9 / its KV bytes per token per shard")
#: How a result names the order its placements were searched in (``objective``).
ORDER_WORDS = {"lex": "lex: sorted GPU KVPRs, largest first", "seed": "seed: (max, second, mean)"}


class Move(NamedTuple):
    """One step of a re-placement: ``model`` (its name, or ``#index``) copies a shard of
    ``size_gb`` GB from GPU ``src`` to ``dst``; ``src = -1`` loads a new copy (a new model, or
    one scaling out), ``dst = -1`` stops the copy on ``src`` (a model scaling in).  ``index`` is
    the model's position in the input (names need not be unique)."""

    model: str
    src: int
    dst: int
    size_gb: float = 0.0
    index: int = -1


def json_float(x) -> float | str:
    """A float for JSON, which has no infinity or NaN: those as the strings "Infinity", "NaN"."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    return x if math.isfinite(x) else ("Infinity" if x > 0 else "-Infinity")


#: Words for which bound a batch's ``lower_bound`` is (:attr:`BatchResult.bound_source`).
BOUND_EXACT, BOUND_CLOSED_FORM, BOUND_LP = "exact search", "closed-form bound", "configuration LP"


def printable(name: str) -> str:
    """A name as text output (tables, plans, warnings) shows it: unchanged when every character
    is printable, else with the others escaped as in a Python string literal (``\\n``,
    ``\\r``, ``\\u2028``), so that no name can end a line and forge the next one.  JSON and
    CSV keep names as they are (their quoting is exact)."""
    if name.isprintable():
        return name
    return repr(name)[1:-1]


def token_words(n: float) -> str:
    """A token count in three significant digits (``"412k"``, ``"1.23M"``; below 10,000 in
    full), as context lengths are quoted."""
    if n >= 999_500:
        return f"{n / 1e6:.3g}M"
    if n >= 10_000:
        return f"{n / 1e3:.3g}k"
    return f"{n:,.0f}"


def plural(n: int, word: str) -> str:
    """``"1 GPU"``, ``"2 GPUs"``: a count with its noun (English plural by ``s``)."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def percent(gap: float) -> str:
    """A gap (a fraction) in percent, never rounded to "0.00%" unless it is 0: a gap that is
    not proven closed keeps digits enough to show it (``"0.0031%"``)."""
    pct = 100 * float(gap)
    if not math.isfinite(pct):
        return "unbounded (lower bound 0)" if pct > 0 else "unknown"
    if 0 < pct < 0.005:
        return f"{pct:.2g}%"
    return f"{pct:.2f}%"


def interval(lo: float, hi: float) -> str:
    """``[lo, hi]`` with as many significant digits (6 to 17) as it takes for two different
    ends to read differently."""
    for digits in range(6, 18):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b or lo == hi:
            break
    return f"[{a}, {b}]"


def gap_of(max_kvpr, lower_bound):
    """``max_kvpr / lower_bound - 1`` (0 where they are equal, inf where the bound is 0); NumPy or
    CuPy arrays (the result is of their kind) or floats."""
    xp = get_namespace(max_kvpr, lower_bound)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.where(max_kvpr == lower_bound, 0.0, xp.asarray(max_kvpr) / lower_bound - 1)


@dataclass
class Placement:
    """A placement of one problem.

    Attributes
    ----------
    problem : kvgpu.problem.Problem -- what was solved (models, GPUs, rules).
    assignment : ndarray (n,) int64 -- GPU of each item (a model, or a shard of a model with
        ``tp``/``replicas``; ``problem.model_of`` maps items to models), in input order.
    kvpr : ndarray (G,) float64 -- KV cache pressure of each GPU (``inf`` where a GPU with
        demand has no memory left for the KV cache), :data:`KVPR_UNIT`.
    lower_bound : float -- proven: no placement has a lower max KVPR.
    proven : bool -- the exact search proved the answer optimal (see :attr:`proven_optimal`).
    bound_scope : str -- which placements ``lower_bound`` is proven for, in words.
    bound_source : str -- which bound ``lower_bound`` is: ``"exact search"`` (the proof ran and
        raised it), ``"configuration LP"`` (:mod:`kvgpu.lp_bound`, with ``exact=True`` where the
        proof did not close the gap) or ``"closed-form bound"`` (:mod:`kvgpu.bounds`).
    plan : list[Move] -- re-placement: the steps in an order that keeps every GPU within its
        memory at every step (migrations and loads of new models); ``plan_note`` says when no
        such order exists and what spare room one needs.
    start_kvpr : float | None -- re-placement: the max KVPR of the cluster as it runs now (new
        models not yet placed); ``baseline_kvpr``: with the new models placed and nothing that
        runs moved (None when that is impossible); ``note``: e.g. why nothing moved (min_gain).
    objective : str -- the order the placement was searched in: "lex: ..." (the sorted vector
        of GPU KVPRs, largest first: balanced) or "seed: (max, second, mean)" (mode "seed",
        ``objective="seed"``, or a decomposed cluster).  Proofs and bounds are of the max.
    """

    problem: Problem
    assignment: np.ndarray
    kvpr: np.ndarray
    lower_bound: float
    proven: bool = False
    mode: str = "search"
    backend: str = "numba"
    bound_scope: str = "every placement"
    bound_source: str = BOUND_CLOSED_FORM
    plan: list = field(default_factory=list)
    plan_note: str | None = None
    start_kvpr: float | None = None
    baseline_kvpr: float | None = None
    note: str | None = None
    warnings: list = field(default_factory=list)
    #: Solved by decomposition into groups (:mod:`kvgpu.decompose`).
    decomposed: bool = False
    objective: str = ORDER_WORDS["seed"]
    #: (W, G) float64: KVPR of each GPU in each demand window, for a solve given ``demand=``
    #: (:mod:`kvgpu.robust`); None otherwise.
    kvpr_by_window: np.ndarray | None = field(default=None, repr=False)
    #: (G,) float64: GB of model weights (and overheads) on each GPU.
    used: np.ndarray = field(init=False, repr=False)
    #: (G,) float64: demand (``sum req_rate / slo``) on each GPU.
    demand: np.ndarray = field(init=False, repr=False)
    #: (G,) float64: GB each GPU has left for the KV cache (memory - reserve - models).
    kv_free: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        inst = self.problem.items
        G = inst.n_gpus
        self.used = np.bincount(self.assignment, weights=inst.sizes, minlength=G)
        self.demand = np.bincount(self.assignment, weights=inst.demand, minlength=G)
        self.kv_free = inst.gpu_mem - self.used
        self.warnings = list(self.warnings) + self._zero_kv_warnings()
        for msg in self.warnings:
            warnings.warn(msg, KvgpuWarning, stacklevel=3)

    def _zero_kv_warnings(self) -> list[str]:
        out = []
        mem = self.problem.items.gpu_mem
        for g in np.nonzero(self.kv_free <= EPS * mem_unit(mem))[0].tolist():
            idx = np.nonzero(self.assignment == g)[0].tolist()
            if idx:
                out.append(f"GPU {g} is left with {max(self.kv_free[g], 0.0):.3g} GB for the KV cache "
                           f"(models: {self._names_of(idx)}): a serving engine would not start there")
        return out

    # -- figures ----------------------------------------------------------------------------
    @property
    def instance(self):
        """The plain items (sizes, demand, usable memory) -- ``problem.items``."""
        return self.problem.items

    @property
    def model_of(self) -> np.ndarray:
        return self.problem.model_of

    @property
    def max_kvpr(self) -> float:
        return float(self.kvpr.max())

    @property
    def gap(self) -> float:
        """``max_kvpr / lower_bound - 1``: an upper limit on the distance from the optimum."""
        return float(gap_of(self.max_kvpr, self.lower_bound))

    @property
    def proven_optimal(self) -> bool:
        """Proven optimal: by the exact search, or the lower bound meets the objective (to a
        relative ``OPTIMAL_RTOL``)."""
        return self.proven or self.max_kvpr <= self.lower_bound * (1 + OPTIMAL_RTOL)

    @property
    def gap_words(self) -> str:
        """The gap in percent as every output prints it: 0.00% when proven optimal (the exact
        search closed it; what is left is rounding), else never rounded down to 0.00%."""
        return "0.00%" if self.proven_optimal else percent(self.gap)

    @property
    def status(self) -> str:
        """``"optimal (proven)"`` or how far from the optimum the answer can be, in words."""
        if self.proven_optimal:
            return "optimal (proven)"
        return (f"at most {percent(self.gap)} above the optimum (the optimum is in "
                f"{interval(self.lower_bound, self.max_kvpr)}; not proven optimal)")

    @property
    def moves(self) -> list:
        """The migrations of running models (the plan without the loads of new copies and the
        stops of copies a model scales in by)."""
        return [m for m in self.plan if m.src >= 0 and m.dst >= 0]

    @property
    def moved_models(self) -> int:
        """How many models a re-placement moves (the budget ``max_moves`` counts these)."""
        return len({m.index for m in self.moves})

    @property
    def gain(self) -> float | None:
        """Relative improvement of the max KVPR over the baseline (new models placed, nothing
        that runs moved); None without a baseline (the new models need room made first)."""
        ref = self.baseline_kvpr
        if ref is None or not math.isfinite(ref) or ref <= 0:
            return None
        return 1.0 - self.max_kvpr / ref

    def gpus_of_models(self) -> list[list[int]]:
        """The GPU(s) of every input model: one for a plain model, ``tp * replicas`` for one
        split into shards and replicas."""
        out: list[list[int]] = [[] for _ in self.problem.specs]
        for m, g in zip(self.model_of.tolist(), self.assignment.tolist()):
            out[m].append(g)
        return out

    def by_gpu(self) -> dict[int, list]:
        """``{gpu_id: [model, ...]}`` for every GPU (empty ones too), the caller's own objects
        (a sharded model is listed on each of its GPUs)."""
        out: dict[int, list] = {g: [] for g in range(self.problem.n_gpus)}
        for i, g in enumerate(self.assignment.tolist()):
            out[g].append(self.problem.items.objects[i])
        return out

    def kv_split(self) -> np.ndarray:
        """GB of KV cache each item gets where the engines on a GPU each keep their own KV pool
        (no shared pool, as separate vLLM / SGLang processes): the GPU's free memory split in
        proportion to demand, so every engine on the GPU sees the GPU's own KV pressure
        (``demand_i / kv_i == kvpr[g]``).  On a GPU with no demand at all the free memory is
        split evenly (no pressure to equalise).

        Returns
        -------
        kv_gb : (n,) float64, GB -- per item (shard or replica), input order; 0 where the GPU
            has no memory left for the KV cache.
        """
        g = self.assignment
        free = np.maximum(self.kv_free, 0.0)[g]
        on_gpu = np.bincount(g, minlength=self.problem.n_gpus)[g]
        total = self.demand[g]
        share = np.divide(self.instance.demand, total, out=1.0 / on_gpu, where=total > 0)
        return free * share

    def kv_tokens(self) -> np.ndarray:
        """Tokens of KV cache each item's engine holds: its GB of :meth:`kv_split` over its KV
        bytes per token on one shard (``ModelSpec.kv_bytes_per_shard``: replicated KV heads
        counted on each shard), rounded down.

        Returns
        -------
        tokens : (n,) float64 -- per item, input order; NaN where the model's KV bytes per
            token are not known (no ``hf`` nor ``kv_bytes_per_token``).
        """
        specs = self.problem.specs
        per_shard = np.array([np.nan if specs[m].kv_bytes_per_shard is None else specs[m].kv_bytes_per_shard
                              for m in self.model_of.tolist()], dtype=np.float64)
        return np.floor(self.kv_split() * KV_BYTES_PER_GB / per_shard)

    def _members(self) -> list[list[int]]:
        """The items of every GPU, in input order (one pass, not one per GPU)."""
        out: list[list[int]] = [[] for _ in range(self.problem.n_gpus)]
        for i, g in enumerate(self.assignment.tolist()):
            out[g].append(i)
        return out

    def _name(self, i: int) -> str:
        n = self.problem.items.names[i]
        return n if n is not None else f"#{i}"

    def count(self) -> str:
        """``"N models"`` (and the shard count when models are split), for titles."""
        n_models, n_items = len(self.problem.specs), self.problem.items.n_models
        return plural(n_models, "model") + (f" as {n_items} shards/replicas" if n_items != n_models else "")

    # -- output -----------------------------------------------------------------------------
    def gpu_rows(self) -> list[dict]:
        """Per GPU: ``memory_gb`` (all of it), ``reserved_gb`` (kept off for the engine),
        ``models_gb`` (weights and overheads), ``kv_free_gb`` (left for the KV cache: memory -
        reserve - models), ``demand`` and ``kvpr``, as floats: what JSON and CSV both print
        under these names."""
        p = self.problem
        return [{"memory_gb": float(p.memory[g]), "reserved_gb": float(p.reserve[g]), "models_gb": float(self.used[g]),
                 "kv_free_gb": float(self.kv_free[g]), "demand": float(self.demand[g]), "kvpr": float(self.kvpr[g])}
                for g in range(p.n_gpus)]

    def to_dict(self) -> dict:
        """Plain-JSON form: per-GPU rows and the summary figures, with units."""
        p = self.problem
        gpus = []
        tokens = self._known_tokens()
        for g, (row, idx) in enumerate(zip(self.gpu_rows(), self._members())):
            gpus.append({"gpu": g, **row, "kvpr": json_float(row["kvpr"]), "models": [self._name(i) for i in idx]})
            if tokens is not None:  # aligned with "models"; null where a model's KV bytes are not known
                gpus[-1]["kv_tokens"] = [None if np.isnan(tokens[i]) else int(tokens[i]) for i in idx]
        out = {"max_kvpr": json_float(self.max_kvpr), "lower_bound": json_float(self.lower_bound),
               "gap": json_float(self.gap), "proven_optimal": self.proven_optimal, "status": self.status,
               "bound_scope": self.bound_scope, "bound_source": self.bound_source,
               "units": {"kvpr": KVPR_UNIT, "demand": "req_rate / slo (req/s per s of SLO)", "memory": "GB",
                         "gap": "max_kvpr / lower_bound - 1: an upper limit on the distance from the optimum",
                         **({"kv_tokens": KV_TOKENS_UNIT} if tokens is not None else {})},
               "mode": self.mode, "backend": self.backend, "warnings": list(self.warnings),
               "assignment": self.assignment.tolist(), "model_gpus": self.gpus_of_models(), "gpus": gpus,
               "decomposed": self.decomposed, "objective": self.objective,
               # the input, so that the file alone can be exported or read back as the current placement
               "models": [s.to_dict() for s in p.specs], "cluster": p.cluster_fields()}
        if p.out_of_service:
            out["out_of_service"] = list(p.out_of_service)
        if not p.is_replan and self.note:
            out["note"] = self.note
        if p.is_replan:
            out["replan"] = {"moved_models": self.moved_models, "start_kvpr": json_float(self.start_kvpr),
                             "baseline_kvpr": None if self.baseline_kvpr is None else json_float(self.baseline_kvpr),
                             "gain": self.gain, "note": self.note, "plan_note": self.plan_note,
                             "plan": [{"model": m.model, "index": m.index, "from": m.src, "to": m.dst,
                                       "size_gb": m.size_gb} for m in self.plan]}
        return out

    def __str__(self) -> str:
        p = self.problem
        reserve = bool(p.reserve.any())
        head = f"{'GPU':>4} {'mem GB':>7} " + (f"{'resv GB':>7} " if reserve else "") + \
            f"{'models GB':>9} {'KV free GB':>10} {'demand':>9} {'KVPR':>10}  models"
        rows = [f"KVPR = demand / GB left for the KV cache ({KVPR_UNIT}); demand = req_rate / slo", head]
        worst = int(np.argmax(self.kvpr)) if self.kvpr.size else -1
        members = self._members()
        tokens = self._known_tokens()
        idle = [g for g, idx in enumerate(members) if not idx] if p.n_gpus > TABLE_ALL_GPUS else []
        for g, idx in enumerate(members):
            if idle and not idx:
                continue
            rows.append(f"{g:>4} {p.memory[g]:>7.1f} " + (f"{p.reserve[g]:>7.1f} " if reserve else "")
                        + f"{self.used[g]:>9.1f} {max(self.kv_free[g], 0.0):>10.1f} {self.demand[g]:>9.4f} "
                        f"{self.kvpr[g]:>10.6f}{'*' if g == worst else ' '} {self._names_of(idx, tokens)}"
                        + (" (out of service)" if g in p.out_of_service else ""))
        if idle:
            rows.append(f"     (not listed: {plural(len(idle), 'GPU')} without models, KVPR 0, all their memory free)")
        if p.is_replan:
            rows.append(self._replan_lines())
        elif self.note:
            rows.append(f"note: {self.note}")
        proven = "optimal (proven)" if self.proven_optimal else "not proven optimal"
        rows.append(f"max KVPR {self.max_kvpr:.6f} (GPU {worst}, *)   lower bound {self.lower_bound:.6f} "
                    f"({self.bound_source})   "
                    f"gap {self.gap_words} (an upper limit on the distance from the optimum)   {proven}")
        rows.append(f"({self.count()}, {plural(p.n_gpus, 'GPU')}, mode={self.mode}, backend={self.backend}"
                    + ("" if self.bound_scope == "every placement" else f"; bound: {self.bound_scope}") + ")")
        return "\n".join(rows)

    def _names_of(self, idx, tokens=None) -> str:
        """The names of items ``idx`` as a table shows them (escaped: one line, see
        :func:`printable`), each followed by its KV cache in tokens where ``tokens`` (per item,
        NaN: not known) knows it."""
        return ", ".join(printable(self._name(i)) + ("" if tokens is None or np.isnan(tokens[i]) else
                                                      f" ({token_words(tokens[i])} KV tokens)") for i in idx)

    def _known_tokens(self) -> np.ndarray | None:
        """:meth:`kv_tokens`, or None when no model's KV bytes per token are known."""
        if all(s.kv_bytes_per_token is None for s in self.problem.specs):
            return None
        return self.kv_tokens()

    def _replan_lines(self) -> str:
        lines = []
        if self.plan:
            steps = ", ".join(f"{printable(m.model)} {'new' if m.src < 0 else m.src}->{'stop' if m.dst < 0 else m.dst}"
                              for m in self.plan)
            lines.append(f"plan ({self.moved_models} model(s) moved, in this order): {steps}")
        else:
            lines.append("plan: nothing to move")
        if self.plan_note:
            lines.append(f"note: {self.plan_note}")
        if self.note:
            lines.append(f"note: {self.note}")
        fig = f"peak KVPR now {self.start_kvpr:.6f}"
        if self.baseline_kvpr is not None:
            fig += f", with the new models and nothing moved {self.baseline_kvpr:.6f}"
        else:
            fig += ", no placement keeps everything that runs where it is (new models, rules or memory)"
        fig += f", after the plan {self.max_kvpr:.6f}"
        if self.gain is not None:
            fig += f" (gain {100 * self.gain:.2f}%)"
        lines.append(fig)
        return "\n".join(lines)


@dataclass
class BatchResult:
    """Placements of a batch.

    Attributes
    ----------
    assignment : ndarray (B, N) int64 -- GPU id per model slot, -1 for padding (and for an
        instance without a placement).
    kvpr : ndarray (B, G) float64 -- per-GPU KVPR (``nan`` for padded GPUs).
    max_kvpr : ndarray (B,) float64; lower_bound : ndarray (B,) float64 (``nan`` where no
        placement was found).
    status : ndarray (B,) object -- ``"ok"``, ``"infeasible (proven)"`` or ``"no placement
        found"`` (only with ``infeasible="mark"``; otherwise those raise).
    proven : ndarray (B,) bool -- optimality proven by the exact search.
    certified : ndarray (B,) bool -- the exact search ran on the instance, so ``lower_bound`` is
        its proven bound and ``gap`` measures the interval it left open (``exact=True``, or
        ``exact=None`` on instances of at most ``kvgpu.engine.AUTO_EXACT_ITEMS`` items);
        elsewhere ``lower_bound`` is the closed-form bound of :func:`kvgpu.bounds.lower_bound`
        and ``gap`` may measure the bound's weakness more than the answer's (:attr:`bound_source`).
    backend : str -- every engine that ran (e.g. ``"numba"``, ``"numpy+numba"``).
    decomposed : ndarray (B,) bool -- solved by decomposition into groups (:mod:`kvgpu.decompose`).
    note : ndarray (B,) object -- why an instance was not solved the way its options ask (e.g. a
        decomposition that left GPUs full, replaced by the whole-cluster search), "" where not.
    objective : str -- the order the batch's placements were searched in: always the seed's
        ``(max, second, mean)`` (the batch and device kernels); :func:`kvgpu.solve` balances
        further (``objective="lex"``).

    When :func:`kvgpu.solve_batch` was given CuPy arrays, ``assignment``, ``kvpr``, ``max_kvpr``
    and ``lower_bound`` are CuPy arrays (same shapes and dtypes); ``status`` and ``proven`` stay
    NumPy, and :attr:`gap` / :attr:`proven_optimal` are CuPy arrays too.
    """

    assignment: np.ndarray
    kvpr: np.ndarray
    max_kvpr: np.ndarray
    lower_bound: np.ndarray
    backend: str = "numba"
    status: np.ndarray | None = None
    proven: np.ndarray | None = None
    decomposed: np.ndarray | None = None
    certified: np.ndarray | None = None
    note: np.ndarray | None = None
    objective: str = ORDER_WORDS["seed"]

    def __post_init__(self):
        B = self.max_kvpr.shape[0]
        if self.status is None:
            self.status = np.full(B, "ok", dtype=object)
        if self.proven is None:
            self.proven = np.zeros(B, bool)
        if self.decomposed is None:
            self.decomposed = np.zeros(B, bool)
        if self.note is None:
            self.note = np.full(B, "", dtype=object)
        if self.certified is None:
            self.certified = self.proven.copy()

    @property
    def bound_source(self) -> np.ndarray:
        """(B,) str: which bound ``lower_bound`` is -- ``"exact search"`` where the proof ran,
        else ``"closed-form bound"`` (:func:`kvgpu.bounds.lower_bound`)."""
        return np.where(self.certified, BOUND_EXACT, BOUND_CLOSED_FORM).astype(object)

    @property
    def gap(self) -> np.ndarray:
        """(B,) ``max_kvpr / lower_bound - 1``: upper limits on the distance from the optimum."""
        return gap_of(self.max_kvpr, self.lower_bound)

    @property
    def proven_optimal(self) -> np.ndarray:
        """(B,) bool: proven by the exact search, or the lower bound meets the objective."""
        xp = get_namespace(self.max_kvpr)
        with np.errstate(invalid="ignore"):
            return xp.asarray(self.proven) | (self.max_kvpr <= self.lower_bound * (1 + OPTIMAL_RTOL))

    def to_device(self, cp) -> "BatchResult":
        """This result with ``assignment``, ``kvpr``, ``max_kvpr`` and ``lower_bound`` copied to the
        GPU by ``cp`` (the CuPy module), once each."""
        return BatchResult(cp.asarray(self.assignment), cp.asarray(self.kvpr), cp.asarray(self.max_kvpr),
                           cp.asarray(self.lower_bound), backend=self.backend, status=self.status, proven=self.proven,
                           decomposed=self.decomposed, certified=self.certified, note=self.note)
