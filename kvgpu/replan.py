"""Re-placement: from the placement a cluster runs now to a better one, moving few models."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from kvgpu.api import DEFAULT_EFFORT, Placement, batch_from_instances, finish_single
from kvgpu.batch import bounds as batch_bounds
from kvgpu.problem import DEFAULT_GPU_MEM, InvalidInstance, NoPlacementFound, _field, _label, make_instance, records


class Move(NamedTuple):
    """One migration: model (name, or ``#index``), from GPU, to GPU."""

    model: str
    src: int
    dst: int


def current_gpus(models: Any) -> list[int]:
    """The ``cur_gpu_id`` of every model (-1 for a new one; missing means new)."""
    out = []
    for m in records(models):
        try:
            out.append(_field(m, ("cur_gpu_id",)))
        except KeyError:
            out.append(-1)
    return out


def replan(models: Any, gpus: int, *, current: Sequence[int] | None = None, max_moves: int,
           gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM, effort: int = DEFAULT_EFFORT, seed: int = 0) -> Placement:
    """The best placement found with at most ``max_moves`` models on another GPU than now.

    ``current`` (N,): each model's GPU now, -1 for a new model (default: the models'
    ``cur_gpu_id``).  New models are placed first and cost no move.  Then a steepest descent on
    the peak (:mod:`kvgpu.kernels.replan`) and ``effort`` rounds of the repair search of
    :mod:`kvgpu.kernels.search`, both counting moved models.  The result's ``moves`` lists the
    migrations ``(model, from, to)``: first those of the descent in its order, then the rest by
    model index (a model moved twice appears once, current GPU to final one); ``max_moves=0``
    leaves every placed model where it is.  Raises :class:`InvalidInstance` for a bad current placement (unknown GPU,
    or a GPU over its memory) and :class:`NoPlacementFound` when a new model fits nowhere.
    """
    from kvgpu.kernels.replan import replan_instance
    from kvgpu.kernels.search import improve_instance

    inst = make_instance(models, gpus, gpu_mem)
    cur = np.asarray(current_gpus(models) if current is None else current)
    if cur.shape != (inst.n_models,):
        raise InvalidInstance(f"current: {cur.size} GPU ids given for {inst.n_models} models")
    if isinstance(max_moves, bool) or int(max_moves) != max_moves or max_moves < 0:
        raise ValueError(f"max_moves must be a non-negative integer, got {max_moves!r}")
    for i, g in enumerate(cur.tolist()):
        if int(g) != g or not -1 <= g < inst.n_gpus:
            raise InvalidInstance(f"{_label(i, inst.names[i])}: cur_gpu_id must be -1 (new) or a GPU id "
                                  f"0..{inst.n_gpus - 1}, got {g!r}")
    cur = cur.astype(np.int64)
    used = np.bincount(cur[cur >= 0], weights=inst.sizes[cur >= 0], minlength=inst.n_gpus)
    over = np.nonzero(used > inst.gpu_mem + 1e-12)[0]
    if over.size:
        g = int(over[0])
        raise InvalidInstance(f"current placement: GPU {g} holds {used[g]} GB of models, more than its "
                              f"{inst.gpu_mem[g]} GB")
    n = inst.n_models
    assign = np.empty(n, np.int64)
    steps = np.empty((8 * n + 8, 3), np.int64)
    rows = replan_instance(inst.sizes, inst.demand, inst.gpu_mem, cur, int(max_moves), assign, steps)
    if rows < 0:
        raise NoPlacementFound("a new model fits on no GPU next to the models already placed", [0])
    b = batch_from_instances([inst])
    lb = batch_bounds.lower_bound(b)
    # then the repair search under the same budget (chains of moves the greedy descent misses)
    pos = np.arange(n, dtype=np.int64)
    rules = (cur, int(max_moves), np.empty((0, 0), np.uint8), np.empty(0, np.int64))
    improve_instance(inst.sizes, inst.demand, inst.gpu_mem, float(lb[0]), assign, pos, int(effort), int(seed), rules)
    p = finish_single(inst, b, assign, pos, lb, mode="replan")
    order = {}
    for k in range(rows):
        order[int(steps[k, 0])] = k
    later = [i for i in range(n) if i not in order]
    seq = [i for i, _ in sorted(order.items(), key=lambda x: x[1])] + later
    p.moves = [Move(p._name(i), int(cur[i]), int(assign[i])) for i in seq if cur[i] >= 0 and assign[i] != cur[i]]
    return p
