"""The one constrained problem every entry point solves.

A cluster has ``G`` GPUs with memory ``M[g]`` (GB, less what ``reserve_gb`` keeps for the
serving engine).  Model ``i`` has size ``s[i]`` (GB) and demand ``w[i] = req_rate[i] / slo[i]``.
A GPU holding models of total size ``S`` and demand ``W`` has KV cache pressure
``W / (M - S)``: demand per GB left for the KV cache; the objective is the largest pressure
over all GPUs (ties: the second largest, then the mean).

Real clusters add rules, and :func:`build_problem` turns every one of them into the same few
arrays (the layout of :mod:`kvgpu.kernels.rules`):

* a model with ``tp = k`` and ``replicas = r`` becomes ``k * r`` *items* (shards) of
  ``size / k + overhead_gb`` GB and ``demand / (k * r)`` each, on distinct GPUs (anti-affinity
  ``group``);
* ``pin``, ``forbid``, ``node: K`` (every item inside node ``K``) and the cluster's
  ``out_of_service`` GPUs (no model may use them) become the ``allowed`` GPUs of each item;
* ``nodes`` / ``gpus_per_node`` give each GPU a node; the ``tp`` shards of one replica then stay
  inside one node (``node_group``), unless the model says ``same_node: false``;
* ``colocate_with: BASE`` (a LoRA adapter: tp = 1, one replica) puts the model on a GPU that
  holds a shard or replica of the model named ``BASE`` (``coloc``); the adapter and its base
  each get an anti-affinity group, so the kernels know where both are.  Chains (a base that
  is itself an adapter) are refused;
* a current placement (``cur_gpu_id`` per model, or ``current=``) makes it a re-placement:
  moving a running model costs a migration, limited by ``max_moves`` (models) and
  ``max_migrated_gb`` (GB copied); ``min_gain`` is the relative improvement below which nothing
  running is moved (default :data:`DEFAULT_MIN_GAIN`, 1%; 0 moves for any gain).  A model's
  shards are interchangeable: what counts is the set of GPUs it ends on against the set it
  runs on (whatever the order of ``cur_gpu_id`` and ``pin``); more running copies than ``tp x
  replicas`` scale it in (the extra copies stop, which moves nothing), fewer scale it out (the
  new copies load like a new model).  A tp replica is one engine: a tp model scaling in keeps
  whole running replicas (``cur_gpu_id`` read ``tp`` GPUs at a time, the first kept, a warning
  names them), so a shard kept from a stopped engine is a move; and the answer's replicas keep
  the running ones whole (:func:`group_replicas`).  The GB budget counts the shards copied
  (a tp engine with one new GPU restarts, but copies one shard).

:class:`Instance` is the plain part (items, demand, memory), which the seed pipeline engines
(:mod:`kvgpu.reference`, :mod:`kvgpu.batch`, :mod:`kvgpu.kernels.cpu`) work on.
"""

from __future__ import annotations

import difflib
import math
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from kvgpu.errors import InvalidInstance, KvgpuWarning
from kvgpu.kernels.deltas import EPS, mem_unit
from kvgpu.schema import (MAX_GPUS, OPTION_RANGES, ModelSpec, current_placement, gpu_ids, gpu_memory, integer, model_specs,
                          number, per_gpu)

DEFAULT_GPU_MEM = 80.0
#: ``min_gain`` of a re-placement when none is given: nothing that runs moves unless the max
#: KVPR improves by at least 1% over the baseline (the new models placed, nothing moved), so a
#: plan never copies tens of GB for a rounding-size gain; ``min_gain=0`` moves for any gain.
DEFAULT_MIN_GAIN = 0.01


@dataclass(frozen=True)
class Instance:
    """A plain instance: items, their demand and the GPUs' memory.

    Attributes
    ----------
    sizes : ndarray, shape (N,), float64 -- item sizes in GB.
    demand : ndarray, shape (N,), float64 -- ``req_rate / slo`` per item.
    gpu_mem : ndarray, shape (G,), float64 -- memory per GPU in GB (usable by models and KV cache).
    names : list[str | None] -- item names where given.
    objects : list -- the caller's model objects (or rows), one per item.
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


_EMPTY_I = np.empty(0, np.int64)


@dataclass(frozen=True)
class Problem:
    """A validated constrained instance (see the module doc).

    Attributes
    ----------
    items : Instance -- the items (shards x replicas of each model); ``items.gpu_mem`` is the
        memory left to models and KV cache (``memory - reserve``).
    specs : list[ModelSpec] -- the input models, validated.
    model_of : (n,) int64 -- the model of each item.
    memory, reserve : (G,) float64 -- each GPU's memory and the GB kept off it, GB.
    allowed : (n, G) uint8, or (0, 0) when every item may use every GPU.
    group : (n,) int64 -- anti-affinity group (the model's index) of items that must sit on
        distinct GPUs, -1 for none; (0,) when no model has several items.
    node_group : (n,) int64 -- the items that must share a node, -1 for none; (0,) without nodes.
    node_of : (G,) int64 -- each GPU's node; (0,) without nodes.
    cur : (n,) int64 -- re-placement: the running copy each item starts from (matched to the
        item's allowed GPUs and node group), -1 for none; (0,) otherwise.
    running : tuple of tuples of int -- re-placement: each model's GPUs now, all its running
        copies (more than its items when a tp=1 model scales in; a tp model keeps whole
        replicas, :func:`_kept_replicas`); () for a new model; () otherwise.
    max_moves : int -- most models that may move, -1 for no limit.
    max_migrated_gb : float -- most GB that may be copied, ``inf`` for no limit.
    min_gain : float -- smallest relative gain of the max KVPR worth moving running models for.
    gpu_class : (G,) int64 -- GPUs that are interchangeable under the rules share a class (the
        exact search tries one of them); (0,) without rules.
    out_of_service : tuple of int -- GPU ids no model may use (already folded into ``allowed``;
        kept to report them).
    coloc : (n,) int64 -- co-location: the group (the base model's index) whose item each
        adapter item must sit beside, -1 for none; (0,) when no model has ``colocate_with``.
    gpu_node : (G,) int64 -- each GPU's node as the cluster gives it (``nodes`` /
        ``gpus_per_node``), whether or not a rule needs it (``node_of`` is kept only where
        tp shards must share a node); (0,) without nodes.  What an export groups GPUs by.
    stopped : tuple of tuples of int -- re-placement: per model, the GPUs of the running tp
        replicas that stop when it scales in (not in ``running``); () otherwise.
    """

    items: Instance
    specs: list
    model_of: np.ndarray
    memory: np.ndarray
    reserve: np.ndarray
    allowed: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.uint8))
    group: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    node_group: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    node_of: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    cur: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    max_moves: int = -1
    max_migrated_gb: float = math.inf
    min_gain: float = 0.0
    gpu_class: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    out_of_service: tuple = ()
    coloc: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    running: tuple = ()
    gpu_node: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    stopped: tuple = ()

    @property
    def n_gpus(self) -> int:
        return self.items.n_gpus

    def cluster_fields(self) -> dict:
        """The cluster as a model file's fields (``gpus``, ``gpu_mem`` and ``reserve_gb`` one
        per GPU, ``nodes`` and ``out_of_service`` where given), JSON-ready: with the models'
        ``to_dict`` it rebuilds this problem's cluster (what ``--out`` and exports carry)."""
        out = {"gpus": self.n_gpus, "gpu_mem": self.memory.tolist(), "reserve_gb": self.reserve.tolist()}
        if self.gpu_node.shape[0]:
            out["nodes"] = [np.nonzero(self.gpu_node == k)[0].tolist() for k in range(int(self.gpu_node.max()) + 1)]
        if self.out_of_service:
            out["out_of_service"] = list(self.out_of_service)
        return out

    @property
    def is_replan(self) -> bool:
        """Does the problem start from a current placement?"""
        return self.cur.shape[0] > 0

    @property
    def has_rules(self) -> bool:
        """Anything beyond a plain instance: shards, pins, nodes or a current placement."""
        return bool(self.allowed.shape[0] or self.group.shape[0] or self.node_group.shape[0] or self.is_replan)

    def kernel_rules(self) -> tuple:
        """The rules tuple of :mod:`kvgpu.kernels.rules` (arrays contiguous for numba)."""
        n = self.items.n_models
        if self.is_replan:
            first = np.searchsorted(self.model_of, self.model_of).astype(np.int64)
            count = np.bincount(self.model_of, minlength=len(self.specs))[self.model_of].astype(np.int64)
            tp = np.array([self.specs[m].tp for m in self.model_of.tolist()], float)
            mig = np.array([self.specs[m].size for m in self.model_of.tolist()], float) / np.maximum(tp, 1)
            cur = self._cur_rows()
        else:
            first = count = _EMPTY_I
            mig = np.empty(0)
            cur = np.empty((0, 0), np.int64)
        c = np.ascontiguousarray
        return (c(self.allowed, dtype=np.uint8), c(self.group, dtype=np.int64), c(self.node_group, dtype=np.int64),
                c(self.node_of, dtype=np.int64), c(cur, dtype=np.int64), c(first), c(count),
                c(mig.reshape(n if self.is_replan else 0)), np.int64(self.max_moves), float(self.max_migrated_gb),
                c(self.coloc, dtype=np.int64))

    def _cur_rows(self) -> np.ndarray:
        """(n, 1 + r) int64: the kernels' ``cur`` (:mod:`kvgpu.kernels.rules`): each item's start
        GPU, then its model's running GPUs, -1 padded (r: the most running copies of a model)."""
        r = max([1] + [len(g) for g in self.running])
        table = np.full((len(self.specs), r), -1, np.int64)  # each model's running GPUs
        for m, gpus in enumerate(self.running):
            table[m, :len(gpus)] = gpus
        return np.concatenate([self.cur[:, None], table[self.model_of]], axis=1)

    def items_of(self, m: int) -> np.ndarray:
        """The items of model ``m`` (a model's items are consecutive), as a range of ids."""
        lo, hi = np.searchsorted(self.model_of, [m, m + 1])
        return np.arange(lo, hi)

    def restrict(self, items: np.ndarray, gpus: np.ndarray) -> "Problem":
        """The sub-problem of the ``items`` (k,) on the ``gpus`` (h,) (both ascending int64 ids):
        every rule among them kept in local GPU ids -- allowed GPUs sliced, node groups and nodes
        renumbered 0.., out-of-service GPUs mapped -- so its memory is ``O(k + h)`` (``O(k h)``
        with allowed rows).  ``specs`` stay whole: ``model_of`` and the anti-affinity and
        co-location groups (model ids) keep the whole problem's ids.  Each item's group mates it must
        sit beside (co-location) must be among ``items``; a re-placement is not restricted
        (its budget is the whole cluster's: refused)."""
        from dataclasses import replace

        if self.is_replan:
            raise InvalidInstance("a re-placement (cur_gpu_id, current=) cannot be split into sub-problems: its "
                                  "migration budget is the whole cluster's")
        inst = self.items
        sub = Instance(inst.sizes[items], inst.demand[items], inst.gpu_mem[gpus],
                       [inst.names[i] for i in items.tolist()] if inst.names else [],
                       [inst.objects[i] for i in items.tolist()] if inst.objects else [])
        local = np.full(self.n_gpus, -1, np.int64)
        local[gpus] = np.arange(gpus.shape[0])
        off = tuple(int(local[g]) for g in self.out_of_service if local[g] >= 0)

        def taken(a):  # (0,) stays empty
            return a[items] if a.shape[0] else a

        node_group = taken(self.node_group)
        if node_group.shape[0]:  # ids 0.., -1 kept
            ids = np.unique(node_group[node_group >= 0])
            node_group = np.where(node_group >= 0, np.searchsorted(ids, node_group), -1).astype(np.int64)
        node_of = np.unique(self.node_of[gpus], return_inverse=True)[1].astype(np.int64) if self.node_of.shape[0] \
            else _EMPTY_I
        allowed = np.ascontiguousarray(self.allowed[items][:, gpus]) if self.allowed.shape[0] else self.allowed
        gpu_node = (np.unique(self.gpu_node[gpus], return_inverse=True)[1].astype(np.int64) if self.gpu_node.shape[0]
                    else _EMPTY_I)
        prob = Problem(sub, self.specs, self.model_of[items], self.memory[gpus], self.reserve[gpus], allowed,
                       taken(self.group), node_group, node_of, out_of_service=off, coloc=taken(self.coloc),
                       gpu_node=gpu_node)
        return replace(prob, gpu_class=_gpu_classes(prob)) if prob.has_rules else prob

    def with_budget(self, max_moves: int) -> "Problem":
        """The same problem with another move budget (re-placement baselines)."""
        from dataclasses import replace

        return replace(self, max_moves=int(max_moves))


def make_instance(models: Any, gpus: int, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM) -> Instance:
    """Validate plain ``models`` on ``gpus`` GPUs and return their :class:`Instance` (the items;
    see :func:`build_problem` for the accepted inputs and errors)."""
    return build_problem(models, gpus, gpu_mem).items


def _node_map(G: int, nodes, gpus_per_node) -> np.ndarray:
    """Each GPU's node from ``nodes`` (lists of GPU ids that partition the GPUs) or
    ``gpus_per_node`` (consecutive ids; the last node may be smaller); (0,) for neither."""
    if nodes is not None and gpus_per_node is not None:
        raise InvalidInstance("nodes and gpus_per_node: give one of them, not both")
    if gpus_per_node is not None:
        # a node larger than the cluster is one partial node (what size answers: 2 GPUs of nodes of 4)
        k = integer(gpus_per_node, "gpus_per_node", 1, MAX_GPUS)
        if G % k:
            warnings.warn(f"gpus_per_node={k} does not divide the {G} GPUs: the last node has {G % k} GPU(s)",
                          KvgpuWarning, stacklevel=4)
        return np.arange(G, dtype=np.int64) // k
    if nodes is None:
        return _EMPTY_I
    if isinstance(nodes, (str, bytes, dict)) or not hasattr(nodes, "__iter__"):
        raise InvalidInstance(f"nodes: expected a list of lists of GPU ids, got {nodes!r}")
    node_of = np.full(G, -1, np.int64)
    for k, node in enumerate(nodes):
        if isinstance(node, (str, bytes, dict)) or not hasattr(node, "__iter__"):
            raise InvalidInstance(f"nodes[{k}]: expected a list of GPU ids, got {node!r}")
        node = list(node)
        if not node:
            raise InvalidInstance(f"nodes[{k}]: an empty node (every node holds at least one GPU)")
        for x in node:
            g = integer(x, f"nodes[{k}]", 0, G - 1)
            if node_of[g] >= 0:
                raise InvalidInstance(f"nodes[{k}]: GPU {g} is already in nodes[{node_of[g]}]")
            node_of[g] = k
    missing = np.nonzero(node_of < 0)[0]
    if missing.size:
        raise InvalidInstance(f"nodes: GPU {int(missing[0])} is in no node (every GPU must be in exactly one)")
    return node_of


def _reserve(G: int, reserve_gb) -> np.ndarray:
    """GB kept off each GPU: one number for all, or one per GPU."""
    if reserve_gb is None:
        return np.zeros(G)
    vals = per_gpu(reserve_gb, "reserve_gb", 0.0)
    if isinstance(vals, tuple):
        if len(vals) != G:
            raise InvalidInstance(f"reserve_gb gives {len(vals)} values for {G} GPUs (give one number, or one per GPU)")
        return np.asarray(vals, dtype=np.float64)
    return np.full(G, float(vals))


def _out_of_service(G: int, value) -> np.ndarray | None:
    """(G,) bool: the GPUs no model may use (``out_of_service``: GPU ids of this cluster); None
    when there are none."""
    ids = gpu_ids(value, "out_of_service")
    if not ids:
        return None
    off = np.zeros(G, bool)
    for g in ids:
        if g >= G:
            raise InvalidInstance(f"out_of_service names GPU {g}, not one of 0..{G - 1}")
        off[g] = True
    if off.all():
        raise InvalidInstance(f"out_of_service takes all {G} GPU(s) out of service: no GPU is left for the models")
    return off


def _allowed_gpus(m: ModelSpec, G: int, off: np.ndarray | None, node_of: np.ndarray) -> np.ndarray | None:
    """(G,) bool: the GPUs model ``m`` may use -- not forbidden, not out of service (``off``,
    None: none), inside its ``node`` -- with its pins checked against them (each refusal names
    the rule); None when nothing restricts them (a plain model costs O(1) here)."""
    for g in m.pin or ():
        if g >= G:
            raise InvalidInstance(f"{m.where}: pin names GPU {g}, not one of 0..{G - 1}")
    if off is None and not m.forbid and m.node is None:
        return None
    allowed = np.ones(G, bool) if off is None else ~off
    for g in m.forbid:
        if g >= G:
            raise InvalidInstance(f"{m.where}: forbid names GPU {g}, not one of 0..{G - 1}")
        allowed[g] = False
    if m.node is not None:
        if node_of.size == 0:
            raise InvalidInstance(f"{m.where}: node {m.node} needs the cluster's nodes (nodes or gpus_per_node)")
        if m.node > node_of.max():
            raise InvalidInstance(f"{m.where}: node {m.node} is not one of the cluster's nodes 0..{node_of.max()}")
        allowed &= node_of == m.node
    for g in m.pin or ():
        if off is not None and off[g]:
            raise InvalidInstance(f"{m.where}: pinned to GPU {g}, which is out of service")
        if g in m.forbid:
            raise InvalidInstance(f"{m.where}: pinned to GPU {g}, which it also forbids")
        if not allowed[g]:
            raise InvalidInstance(f"{m.where}: pinned to GPU {g}, which is outside its node {m.node}")
    return allowed


def _bases(specs: list[ModelSpec], allowed_of) -> list[int]:
    """Each model's base (the index of the model its ``colocate_with`` names), -1 for none.
    ``allowed_of(m)`` (G,) bool: the GPUs model ``m`` may use.  Refuses an unknown or
    ambiguous name, a model beside itself, a chain (a base that is an adapter), an adapter of
    several shards or replicas, an adapter of a tp base, and an adapter that may use none of
    its base's GPUs."""
    names: dict[str, list[int]] = {}
    for k, m in enumerate(specs):
        if m.name is not None:
            names.setdefault(m.name, []).append(k)
    out = []
    for m in specs:
        if m.colocate_with is None:
            out.append(-1)
            continue
        found = names.get(m.colocate_with, [])
        if not found:
            close = difflib.get_close_matches(m.colocate_with, list(names), 1, 0.6)
            raise InvalidInstance(f"{m.where}: colocate_with names {m.colocate_with!r}, which is no model's name"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
        if len(found) > 1:
            raise InvalidInstance(f"{m.where}: colocate_with names {m.colocate_with!r}, which {len(found)} models "
                                  f"are called; give the base a name of its own")
        b = found[0]
        if b == m.index:
            raise InvalidInstance(f"{m.where}: colocate_with names the model itself")
        if specs[b].colocate_with is not None:
            raise InvalidInstance(f"{m.where}: colocate_with names {specs[b].where}, which is itself co-located "
                                  f"with {specs[b].colocate_with!r}; chains are not supported: name the base "
                                  f"model {specs[b].colocate_with!r} directly")
        if m.tp * m.replicas > 1:
            raise InvalidInstance(f"{m.where}: colocate_with is for an adapter of one shard (tp=1, one replica); "
                                  f"this one has tp={m.tp}, replicas={m.replicas} (give one adapter entry per copy)")
        if specs[b].tp > 1:  # a tp engine serves an adapter on all its GPUs, kvgpu would place it on one
            raise InvalidInstance(f"{m.where}: colocate_with names {specs[b].where}, a tp={specs[b].tp} model; an "
                                  f"adapter of a tp base is not supported (kvgpu places the adapter's weights and "
                                  f"demand on one GPU, but the base's tp engine serves it split over all its "
                                  f"{specs[b].tp} GPUs): add its size and req_rate to the base instead")
        if not (allowed_of(m.index) & allowed_of(b)).any():
            raise InvalidInstance(f"{m.where}: it may use none of the GPUs its base {specs[b].where} may use "
                                  f"(forbid, pin, node, out_of_service), so it can never sit beside it")
        out.append(b)
    return out


def _pinned_mask(m: ModelSpec, allowed: np.ndarray | None, G: int) -> np.ndarray:
    """(G,) bool: the GPUs model ``m`` may use (``allowed``, None: all), its pins among them."""
    allowed = np.ones(G, bool) if allowed is None else allowed
    if m.pin is None:
        return allowed
    out = np.zeros_like(allowed)
    out[[g for g in m.pin if g < allowed.shape[0]]] = True
    return out & allowed


def _check_demand_scale(total: float, least_gb: float, where: str) -> None:
    """Refuse demand so large that KVPR overflows although every input is finite: a GPU's
    demand over the GB it keeps free must stay a float for every free memory above the memory
    slack (``EPS`` GB, relative below 1 GB), as an infinite demand is refused.  ``total`` the
    total demand, ``least_gb`` the smallest usable GPU memory (GB)."""
    limit = sys.float_info.max * EPS * mem_unit(least_gb)
    if not total <= limit:
        raise InvalidInstance(f"{where}: the total demand (req_rate/slo) {total:.6g} is too large: KVPR (demand per "
                              f"free GB) overflows to inf; it must stay below {limit:.3g} (scale req_rate down)")


def _current(specs: list[ModelSpec], current) -> list[tuple | None]:
    """Each model's current GPUs: ``current`` (one entry per model: a GPU id, a list of them,
    -1 / None for new) overrides the models' ``cur_gpu_id``."""
    if current is None:
        return [m.cur_gpu for m in specs]
    return current_placement(current, len(specs))


def build_problem(models: Any, gpus: int, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM, *, nodes=None,
                  gpus_per_node=None, reserve_gb=None, current=None, max_moves=None, max_migrated_gb=None,
                  min_gain=None, out_of_service=None) -> Problem:
    """Validate the models, the cluster and the re-placement budget; return the :class:`Problem`.

    ``models``: anything :func:`kvgpu.schema.model_specs` reads (dicts, objects, a pandas
    DataFrame, an (N, 3) array, any iterable).  A current placement comes from the models'
    ``cur_gpu_id`` or ``current``; with one, the answer lists the migrations from it, limited by
    ``max_moves`` / ``max_migrated_gb`` when given.  ``out_of_service``: GPU ids no model may
    use (a running model there must move, and that move counts against the budget).  Raises
    :class:`kvgpu.InvalidInstance` naming the model (or option), the field and the rule.
    """
    mem = gpu_memory(gpus, gpu_mem)
    G = mem.shape[0]
    specs = model_specs(models)
    reserve = _reserve(G, reserve_gb)
    usable = mem - reserve
    bad = np.nonzero(usable <= 0)[0]
    if bad.size:
        g = int(bad[0])
        raise InvalidInstance(f"reserve_gb: GPU {g} keeps {reserve[g]} GB of its {mem[g]} GB, nothing left for models")
    _check_demand_scale(sum(m.demand for m in specs), float(usable.min()), "models")
    node_of = _node_map(G, nodes, gpus_per_node)
    off = _out_of_service(G, out_of_service)
    cur_models = _current(specs, current)
    replan = any(c is not None for c in cur_models) or max_moves is not None or max_migrated_gb is not None
    if (max_moves is not None or max_migrated_gb is not None) and all(c is None for c in cur_models):
        warnings.warn("max_moves / max_migrated_gb limit migrations, but no model runs anywhere now (no cur_gpu_id, "
                      "no current=): every model is placed as new", KvgpuWarning, stacklevel=3)
    K = -1 if max_moves is None else integer(max_moves, "max_moves", *OPTION_RANGES["max_moves"])
    unlimited = max_migrated_gb is None or (isinstance(max_migrated_gb, float) and max_migrated_gb == math.inf)
    max_gb = math.inf if unlimited else number(max_migrated_gb, "max_migrated_gb", 0.0, math.inf)
    if min_gain is None:
        gain = DEFAULT_MIN_GAIN if replan else 0.0
    else:
        gain = number(min_gain, "min_gain", 0.0, 1.0)
    if gain and not replan:
        raise InvalidInstance("min_gain applies to re-placement: the models carry no cur_gpu_id and no current= "
                              "was given")

    sizes, demand, names, objects, model_of, allow_rows, group, node_group, cur = ([] for _ in range(9))
    multi = False
    n_node_groups = 0
    node_size = np.bincount(node_of) if node_of.size else np.zeros(0, np.int64)
    top = float(usable.max())
    allowed_rows = [_allowed_gpus(m, G, off, node_of) for m in specs]
    base_of = _bases(specs, lambda b: _pinned_mask(specs[b], allowed_rows[b], G))
    # one row of allowed GPUs per item only where some model restricts its GPUs: plain models
    # cost O(1) each here, so the problem is O(models + GPUs)
    pinned = any(a is not None or m.pin is not None for a, m in zip(allowed_rows, specs))
    paired = {b for b in base_of if b >= 0} | {i for i, b in enumerate(base_of) if b >= 0}  # bases and adapters
    coloc = []
    stopped: list = [()] * len(specs)
    for i, m in enumerate(specs):
        k = m.tp * m.replicas
        if k > G:
            raise InvalidInstance(f"{m.where}: tp x replicas = {k} shards need {k} distinct GPUs; the cluster has {G}")
        allowed = allowed_rows[i]
        pins = None
        if m.pin is not None:
            pins = list(m.pin)
            if len(pins) != k:
                raise InvalidInstance(f"{m.where}: pin gives {len(pins)} GPU(s) for {k} shard(s) (tp x replicas); "
                                      f"give one GPU id per shard")
            if len(set(pins)) != len(pins):
                raise InvalidInstance(f"{m.where}: pin repeats a GPU, but shards and replicas need distinct GPUs")
        n_allowed = G if allowed is None else int(allowed.sum())
        if n_allowed < k:
            raise InvalidInstance(f"{m.where}: {k} shard(s) need distinct GPUs, but only {n_allowed} GPU(s) are "
                                  f"allowed (forbid, node, out_of_service)")
        together = m.tp > 1 and node_of.size > 0 and m.same_node is not False
        if m.same_node is not None:
            if m.tp == 1:
                raise InvalidInstance(f"{m.where}: same_node applies to the tp shards of a model; this one has tp=1")
            if m.same_node and node_of.size == 0:
                raise InvalidInstance(f"{m.where}: same_node needs the cluster's nodes (nodes or gpus_per_node)")
        if together:
            room = node_size if allowed is None else np.bincount(node_of[allowed], minlength=node_size.size)
            if room.max() < m.tp:
                raise InvalidInstance(f"{m.where}: its tp={m.tp} shards must share a node, but no node has {m.tp} "
                                      f"GPUs it may use (set same_node: false to let them span nodes)")
            if pins is not None:  # shards are interchangeable: group the pinned GPUs node by node
                pins = sorted(pins, key=lambda g: (int(node_of[g]), g))
                for r in range(m.replicas):
                    if len({int(node_of[g]) for g in pins[r * m.tp:(r + 1) * m.tp]}) > 1:
                        raise InvalidInstance(f"{m.where}: its pins cannot be split into {m.replicas} replica(s) of "
                                              f"{m.tp} shards inside one node each (same_node: false lets them span)")
        cur_ids = cur_models[i]
        if cur_ids is not None:
            if any(g >= G for g in cur_ids):
                raise InvalidInstance(f"{m.where}: cur_gpu_id names GPU {max(cur_ids)}, not one of 0..{G - 1}")
            if len(set(cur_ids)) != len(cur_ids):
                raise InvalidInstance(f"{m.where}: cur_gpu_id repeats a GPU, but its shards run on distinct GPUs")
            if len(cur_ids) > k and len(cur_ids) % m.tp:  # scaling in stops whole replicas
                raise InvalidInstance(f"{m.where}: cur_gpu_id gives {len(cur_ids)} GPUs for {k} shard(s); more "
                                      f"running copies than shards scale the model in, but {len(cur_ids)} GPUs are "
                                      f"not whole replicas of tp={m.tp} shards")
            if len(cur_ids) < k and len(cur_ids) % m.tp:  # whole replicas fewer than replicas: scaling out
                warnings.warn(f"{m.where}: tp x replicas = {k} shards but cur_gpu_id gives {len(cur_ids)} GPU(s): "
                              f"read as {len(cur_ids)} running shard(s), the other {k - len(cur_ids)} placed as new "
                              f"(give one GPU id per shard)", KvgpuWarning, stacklevel=3)
        shard_size = m.size / m.tp + m.overhead_gb
        fit = top if allowed is None else float(usable[allowed].max())
        if shard_size > fit + EPS * mem_unit(fit):
            what = "a shard" if k > 1 else "it"
            raise InvalidInstance(f"{m.where}: {what} needs {shard_size:g} GB (size / tp + overhead_gb), larger than "
                                  f"every GPU it may use (largest has {fit:g} GB" +
                                  (" after reserve_gb)" if reserve.any() else ")"))
        rows = [allowed] * k
        if pins is not None:
            rows = [np.arange(G) == g for g in pins]
        if cur_ids is not None and len(cur_ids) > k and m.tp > 1:  # whole running engines stay, or stop
            cur_ids, stopped[i] = _kept_replicas(cur_ids, m, node_of if together else _EMPTY_I)
            cur_models[i] = cur_ids
            warnings.warn(f"{m.where}: scaling in from {len(cur_ids) + len(stopped[i])} GPUs to {m.replicas} "
                          f"replica(s) of tp={m.tp}: keeps the running replica(s) on GPUs {list(cur_ids)} whole (the "
                          f"first in cur_gpu_id, tp GPUs at a time), stops those on GPUs {list(stopped[i])}; order "
                          f"cur_gpu_id to keep others", KvgpuWarning, stacklevel=3)
        starts = _start_gpus(cur_ids or (), rows, m.tp, node_of if together else _EMPTY_I)
        for c in range(k):
            sizes.append(shard_size)
            demand.append(m.demand / k)
            names.append((m.name if m.name is not None else f"#{i}") + (f"/{c}" if k > 1 else ""))
            objects.append(m.obj)
            model_of.append(i)
            if pinned:
                allow_rows.append(np.ones(G, bool) if rows[c] is None else rows[c])
            group.append(i if k > 1 or i in paired else -1)
            coloc.append(base_of[i])
            node_group.append(n_node_groups + c // m.tp if together else -1)
            cur.append(starts[c])
        if together:
            n_node_groups += m.replicas
        multi |= k > 1 or i in paired
    n = len(sizes)
    sizes_a = np.asarray(sizes, float)
    if sizes_a.sum() > usable.sum() + EPS * mem_unit(usable.sum()):
        raise InvalidInstance(f"models: total size {sizes_a.sum():g} GB is above the total GPU memory "
                              f"{usable.sum():g} GB" + (" (after reserve_gb)" if reserve.any() else ""))
    cur_a = np.asarray(cur, np.int64)
    model_of_a = np.asarray(model_of, np.int64)
    running = tuple(tuple(c) if c is not None else () for c in cur_models) if replan else ()
    if replan:
        _check_current_memory(specs, tuple(r + s for r, s in zip(running, stopped)), mem)
        held = _running_load(specs, running, G, lambda m: m.size / m.tp + m.overhead_gb)
        for g in np.nonzero(held > usable + EPS * mem_unit(usable))[0].tolist():
            warnings.warn(f"current placement: GPU {g} holds {held[g]:g} GB with overhead_gb, more than its "
                          f"{usable[g]:g} GB after reserve_gb: models there must move", KvgpuWarning, stacklevel=3)
    items = Instance(sizes_a, np.asarray(demand, float), usable, names, objects)
    allowed_a = np.asarray(allow_rows, np.uint8).reshape(n, G) if pinned else np.empty((0, 0), np.uint8)
    group_a = np.asarray(group, np.int64) if multi else _EMPTY_I
    node_group_a = np.asarray(node_group, np.int64) if n_node_groups else _EMPTY_I
    node_of_a = node_of if n_node_groups else _EMPTY_I
    prob = Problem(items, specs, model_of_a, mem, reserve, allowed_a, group_a, node_group_a, node_of_a,
                   cur_a if replan else _EMPTY_I, K, max_gb, gain,
                   out_of_service=() if off is None else tuple(np.nonzero(off)[0].tolist()),
                   coloc=np.asarray(coloc, np.int64) if len(paired) else _EMPTY_I, running=running, gpu_node=node_of,
                   stopped=tuple(stopped) if replan else ())
    if prob.has_rules:
        from dataclasses import replace

        prob = replace(prob, gpu_class=_gpu_classes(prob))
    return prob


def _kept_replicas(cur_ids: tuple, m: ModelSpec, node_of: np.ndarray) -> tuple[tuple, tuple]:
    """A tp model running more copies than its shards (scaling in): ``(kept, stopped)`` GPUs.
    A replica is one engine over ``tp`` GPUs, so whole replicas are kept: ``cur_gpu_id`` is
    read ``tp`` GPUs at a time in its order (a manifest and ``--out`` list each replica's
    shards together), with ``node_of`` (G,) node by node (a replica sits in one node), and the
    first ``replicas`` of them are kept.  Keeping one shard of two engines would be a new
    engine: a move, which the kept set makes the budget count (moves are counted on a model's
    GPUs against its running ones)."""
    order = sorted(cur_ids, key=lambda g: int(node_of[g])) if node_of.size else list(cur_ids)  # stable
    k = m.tp * m.replicas
    return tuple(order[:k]), tuple(order[k:])


def group_replicas(problem: "Problem", assign: np.ndarray) -> np.ndarray:
    """(n,) ``assign`` with each tp model's items regrouped into replicas (items ``r*tp ..
    (r+1)*tp`` are replica ``r``: one engine) so that a running replica whose GPUs the model
    keeps stays one engine: moves count a model's GPUs as a set, and a placement that keeps the
    set but pairs shards of two engines would start engines that never ran.  The other GPUs
    follow in their order (node by node where shards share a node).  Only models whose items
    may use the same GPUs (no per-shard pins) are regrouped: pins fix the replicas.  GPUs and
    KVPR are unchanged (a model's items are alike)."""
    a = np.asarray(assign, np.int64).copy()
    for m, spec in enumerate(problem.specs):
        run = problem.running[m] if problem.running else ()
        if spec.tp == 1 or spec.replicas == 1 or len(run) < spec.tp:
            continue
        items = problem.items_of(m)
        if problem.allowed.shape[0] and (problem.allowed[items] != problem.allowed[items[0]]).any():
            continue
        final = a[items].tolist()
        nodes = problem.node_of if problem.node_group.shape[0] and problem.node_group[items[0]] >= 0 else None
        kept: list = []
        for r in range(len(run) // spec.tp):
            grp = list(run[r * spec.tp:(r + 1) * spec.tp])
            one_node = nodes is None or len({int(nodes[g]) for g in grp}) == 1
            if one_node and set(grp) <= set(final):
                kept += grp
        rest = [g for g in final if g not in kept]
        if nodes is not None:
            rest.sort(key=lambda g: int(nodes[g]))  # stable: each node's GPUs are whole replicas
        a[items] = kept + rest
    return a


def _start_gpus(running: Sequence[int], rows: list, tp: int, node_of: np.ndarray) -> list[int]:
    """Each of a model's items' start GPU: its running copies matched to items that may use
    them (``rows[c]`` (G,) bool, a pinned item one GPU), so that the order of ``cur_gpu_id`` and
    ``pin`` never matters; with ``node_of`` (G,) (tp shards share a node) a replica's items
    start in one node, and the running GPUs are taken node by node.  -1 for an item left
    without one (a new copy, or one whose running GPU the rules now forbid)."""
    k = len(rows)
    start = [-1] * k
    where: dict[int, int] = {}  # replica -> node of its started items
    order = sorted(running, key=lambda g: (int(node_of[g]), g)) if node_of.size else list(running)
    for g in order:
        nd = int(node_of[g]) if node_of.size else -1
        free = [c for c in range(k) if start[c] < 0 and (rows[c] is None or rows[c][g])]
        same = [c for c in free if where.get(c // tp) == nd]
        fresh = [c for c in free if c // tp not in where]
        pick = (same or fresh or ([] if node_of.size else free))[:1]
        for c in pick:
            start[c] = g
            where[c // tp] = nd
    return start


def _running_load(specs, running, G: int, shard_gb) -> np.ndarray:
    """(G,) GB the running copies hold now, ``shard_gb(spec)`` each."""
    used = np.zeros(G)
    for spec, gpus in zip(specs, running):
        for g in gpus:
            used[g] += shard_gb(spec)
    return used


def _check_current_memory(specs, running, mem) -> None:
    """A current placement must be one that runs: its model weights within each GPU's memory."""
    used = _running_load(specs, running, mem.shape[0], lambda m: m.size / m.tp)
    over = np.nonzero(used > mem + EPS * mem_unit(mem))[0]
    if over.size:
        g = int(over[0])
        raise InvalidInstance(f"current placement: GPU {g} holds {used[g]:g} GB of models, more than its "
                              f"{mem[g]:g} GB")


def _gpu_classes(p: Problem) -> np.ndarray:
    """GPUs interchangeable under the rules: same usable memory, the same items allowed, the
    same node; a GPU some model runs on now is a class of its own."""
    G = p.n_gpus
    keys: dict = {}
    out = np.empty(G, np.int64)
    cur_gpus = {g for gpus in p.running for g in gpus}
    for g in range(G):
        key = (float(p.items.gpu_mem[g]), p.allowed[:, g].tobytes() if p.allowed.shape[0] else b"",
               int(p.node_of[g]) if p.node_of.shape[0] else -1, g if g in cur_gpus else -1)
        out[g] = keys.setdefault(key, len(keys))
    return out


def validate_batch(batch, ids=None) -> None:
    """The rules of :func:`build_problem` for plain instances, on every instance of a padded
    batch (:class:`kvgpu.batch.state.Batch`); raises :class:`InvalidInstance` naming the
    instance, the model slot and the rule.  ``ids`` (B,) int: the caller's numbers of the
    batch's instances, when it is a part of the caller's batch (default ``0 .. B-1``)."""
    xp = batch.xp
    ids = np.arange(batch.shape[0]) if ids is None else np.asarray(ids)
    if batch.shape[0] == 0:
        raise InvalidInstance("solve_batch: the batch holds no instance (B = 0)")
    s, w, mm = batch.sizes, batch.demand, batch.model_mask
    for arr, name in ((s, "model_size"), (w, "demand (req_rate/slo)")):
        for bad, rule in ((mm & ~xp.isfinite(arr), "must be finite"), (mm & (arr < 0), "must be >= 0")):
            if bool(bad.any()):
                b, n = (int(v) for v in xp.argwhere(bad)[0])
                raise InvalidInstance(f"instance {ids[b]}, model {n}: {name} {rule}, got {float(arr[b, n])}")
    gm = batch.gpu_mem
    badg = batch.gpu_mask & ~(xp.isfinite(gm) & (gm > 0))
    if bool(badg.any()):
        b, g = (int(v) for v in xp.argwhere(badg)[0])
        raise InvalidInstance(f"instance {ids[b]}, gpu {g}: GPU memory must be a positive finite number, got "
                              f"{float(gm[b, g])}")
    nog = batch.n_gpus == 0
    if bool(nog.any()):
        raise InvalidInstance(f"instance {ids[int(xp.argwhere(nog)[0, 0])]}: no GPUs (gpu_mask is all False)")
    tot_w, least = xp.where(mm, w, 0.0).sum(axis=1), xp.where(batch.gpu_mask, gm, xp.inf).min(axis=1)
    big = ~(tot_w <= sys.float_info.max * EPS * xp.minimum(least, 1.0))  # mem_unit of the smallest GPU
    if bool(big.any()):
        b = int(xp.argwhere(big)[0, 0])
        _check_demand_scale(float(tot_w[b]), float(least[b]), f"instance {ids[b]}")
    over, why = oversized(batch)
    if over.any():
        raise InvalidInstance(why)


def oversized(batch) -> tuple[np.ndarray, str]:
    """Instances of a batch that provably have no placement for their sizes alone -- a model
    larger than every GPU, or more GB of models than GPUs -- as a (B,) bool mask, and the
    reason for the first of them (empty when none)."""
    xp = batch.xp
    s, mm, gm = batch.sizes, batch.model_mask, batch.gpu_mem
    top = gm.max(axis=1)[:, None]
    big = mm & (s > top + EPS * mem_unit(top))
    tot = gm.sum(axis=1)
    over = s.sum(axis=1) > tot + EPS * mem_unit(tot)
    why = ""
    if bool(big.any()):
        b, n = (int(v) for v in xp.argwhere(big)[0])
        why = (f"instance {b}, model {n}: model_size {float(s[b, n])} GB is larger than every GPU "
               f"(largest has {float(gm[b].max())} GB)")
    elif bool(over.any()):
        b = int(xp.argwhere(over)[0, 0])
        why = f"instance {b}: total size {float(s[b].sum())} GB is above the total GPU memory {float(gm[b].sum())} GB"
    return np.asarray(big.any(axis=1) | over), why


def score_tuple(kvprs: Sequence[float]) -> tuple[float, float, float]:
    """The seed's score ``(max, second largest, mean)`` of per-GPU KVPRs (compared lexicographically)."""
    kv = list(kvprs)
    vals = sorted(kv, reverse=True)
    second = vals[1] if len(vals) > 1 else 0.0
    return (vals[0], second, sum(kv) / len(kv))


def with_rates(problem: Problem, rates) -> Problem:
    """``problem`` with each model's ``req_rate`` replaced by ``rates`` (n_models,) (req/s): the
    specs and the items' demand as :func:`build_problem` computes them from those rates (the
    same float operations, so the problem is the one ``build_problem`` returns for models with
    these rates); the total is checked as there.  Used by :mod:`kvgpu.robust` to solve one
    window (or one scalar summary) of a demand over windows."""
    from dataclasses import replace

    rates = np.asarray(rates, dtype=np.float64)
    specs = [replace(m, req_rate=float(r)) for m, r in zip(problem.specs, rates.tolist())]
    _check_demand_scale(sum(m.demand for m in specs), float(problem.items.gpu_mem.min()), "demand")
    k = [m.tp * m.replicas for m in specs]
    demand = np.asarray([specs[m].demand / k[m] for m in problem.model_of.tolist()], float).reshape(-1)
    return replace(problem, specs=specs, items=replace(problem.items, demand=demand))
