"""The ``numba`` backend: compacted batches through the compiled kernels of :mod:`kvgpu.kernels`.

:func:`solve_seed` runs the seed pipeline (:mod:`kvgpu.kernels.cpu`); :func:`improve` runs the
search beyond it (:mod:`kvgpu.kernels.search`) and the optimality proof
(:mod:`kvgpu.kernels.exact`) from any placement, whichever backend made it.
"""

from __future__ import annotations

import numpy as np

from kvgpu.batch.pipeline import compact, scatter_back
from kvgpu.batch.state import Batch
from kvgpu.errors import NoPlacementFound


def _front_packed(batch: Batch):
    """``(n_models, n_gpus)`` (B,) int64 when every row's real models and GPUs are its first
    slots -- how :func:`kvgpu.batch.state.batch_from_instances` and most callers pad -- else
    None.  Such a batch compacts by slicing, with no permutation to apply and undo."""
    n = batch.model_mask.sum(axis=1)
    g = batch.gpu_mask.sum(axis=1)
    N, G = batch.sizes.shape[1], batch.gpu_mem.shape[1]
    models_first = (batch.model_mask == (np.arange(N) < n[:, None])).all()
    if models_first and (batch.gpu_mask == (np.arange(G) < g[:, None])).all():
        return n.astype(np.int64), g.astype(np.int64)
    return None


def compacted(batch: Batch):
    """``(arrays for the kernels, model_perm, gpu_perm)``: real models and GPUs first, trimmed --
    ``(sizes (B, N') float64 GB, demand (B, N') float64, gpu_mem (B, G') float64 GB, n_models (B,)
    int64, n_gpus (B,) int64)``, contiguous, what the batch kernels (CPU and device) take;
    the permutations are None where the batch is already front-packed (:func:`_front_packed`)."""
    packed = _front_packed(batch)
    if packed is not None:
        n, g = packed
        N, G = max(1, int(n.max())), max(1, int(g.max()))
        c = np.ascontiguousarray
        return (c(batch.sizes[:, :N]), c(batch.demand[:, :N]), c(batch.gpu_mem[:, :G]), n, g), None, None
    sub, pm, pg = compact(batch)
    arrays = (np.ascontiguousarray(sub.sizes), np.ascontiguousarray(sub.demand), np.ascontiguousarray(sub.gpu_mem),
              sub.n_models.astype(np.int64), sub.n_gpus.astype(np.int64))
    return arrays, pm, pg


def expand(batch: Batch, a, p, pm, pg):
    """Compact results ``a``, ``p`` (B, N') int64 (of :func:`compacted`'s ids) back to the batch's
    slots: ``(assign, pos)`` (B, N) int64, -1 for padding."""
    B, N, _ = batch.shape
    assign = np.full((B, N), -1, np.int64)
    pos = np.full((B, N), -1, np.int64)
    if pm is None:  # front-packed: compact ids are the batch's own
        assign[:, :a.shape[1]], pos[:, :a.shape[1]] = a, p
    else:
        scatter_back(np, assign, pos, np.arange(B), a, p, pm, pg)
    return assign, pos


def compact_placement(batch: Batch, assign, pos, pm, pg):
    """A placement in batch slots (``assign``/``pos`` (B, N) int64, -1 for padding) in the compact
    ids of :func:`compacted` (``pm``, ``pg`` its model and GPU permutations, None for a
    front-packed batch): ``(a, p)`` (B, N') int64, contiguous."""
    if pm is None:  # front-packed: the batch's GPU slots are the compact ids
        width = max(1, int(batch.model_mask.sum(axis=1).max()))
        real = batch.model_mask[:, :width]
        a, p = np.where(real, assign[:, :width], -1), np.where(real, pos[:, :width], -1)
    else:
        inv = np.full(batch.gpu_mem.shape, -1, np.int64)  # batch GPU slot -> compact GPU id
        np.put_along_axis(inv, pg, np.broadcast_to(np.arange(pg.shape[1]), pg.shape), axis=1)
        a_orig = np.take_along_axis(assign, pm, axis=1)
        real = np.take_along_axis(batch.model_mask, pm, axis=1)
        a = np.where(real, np.take_along_axis(inv, np.where(real, a_orig, 0), axis=1), -1)
        p = np.where(real, np.take_along_axis(pos, pm, axis=1), -1)
    return np.ascontiguousarray(a, dtype=np.int64), np.ascontiguousarray(p, dtype=np.int64)


def _kernels(B: int, groups: list[str]) -> bool:
    """Compile (or load) what ``B`` instances need -- the instance kernels of ``groups``, and
    the parallel batch kernels beyond one instance -- saying so on a first run
    (:func:`kvgpu.warmup.ensure`).  Returns True when one instance runs without them."""
    from kvgpu.warmup import batch_of, ensure

    ensure(groups if B == 1 else list(groups) + batch_of(groups))
    return B == 1


def _one(arrays):
    """The one instance of compacted ``arrays``: ``(s, w, M)`` and its model count."""
    n, G = int(arrays[3][0]), int(arrays[4][0])
    return arrays[0][0, :n], arrays[1][0, :n], arrays[2][0, :G], n


def solve_seed(batch: Batch):
    """Same contract as :func:`kvgpu.batch.pipeline.solve_seed` (NumPy arrays in and out;
    raises :class:`kvgpu.NoPlacementFound` naming the instances no candidate packs)."""
    from kvgpu.kernels import cpu

    arrays, pm, pg = compacted(batch)
    a = np.full(arrays[0].shape, -1, np.int64)
    p = np.full(arrays[0].shape, -1, np.int64)
    ok = np.zeros(batch.shape[0], bool)
    if _kernels(batch.shape[0], ["seed"]):
        s, w, M, n = _one(arrays)
        ok[0] = cpu.seed_instance(s, w, M, a[0, :n], p[0, :n])
    else:
        cpu.seed_batch(*arrays, a, p, ok)
    if not ok.all():
        bad = np.nonzero(~ok)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}", bad)
    return expand(batch, a, p, pm, pg)


def lower_bound(batch: Batch, hi):
    """:func:`kvgpu.bounds.lower_bound` in compiled code (:mod:`kvgpu.kernels.bound`), the same
    values: ``hi`` (B,) float64 achieved max KVPRs; returns (B,) float64."""
    from kvgpu.kernels import bound

    hi = np.ascontiguousarray(hi, dtype=np.float64)
    if hi.shape != (batch.shape[0],):
        raise ValueError(f"hi must have shape ({batch.shape[0]},), one value per instance; got {hi.shape}")
    arrays = tuple(np.ascontiguousarray(x) for x in (batch.sizes, batch.demand, batch.model_mask, batch.gpu_mem,
                                                     batch.gpu_mask))
    out = np.empty(batch.shape[0])
    from kvgpu.warmup import ensure

    ensure(["bound_batch"])  # the batch kernel, whatever B: one instance takes the array code (backends.lower_bound)
    bound.lower_bound_batch(*arrays, hi, out)
    return out


def pack_memory(batch: Batch, work: int):
    """Placements that fit in memory, by exact search (for instances the seed could not pack):
    ``(assign, pos, status)``, ``status`` (B,) one of :data:`kvgpu.kernels.exact.FEASIBLE`,
    ``INFEASIBLE`` (proven) or ``UNKNOWN`` (not found within ``work`` nodes)."""
    from kvgpu.kernels import exact
    from kvgpu.kernels.rules import no_rules

    arrays, pm, pg = compacted(batch)
    a = np.full(arrays[0].shape, -1, np.int64)
    p = np.full(arrays[0].shape, -1, np.int64)
    status = np.zeros(batch.shape[0], np.int64)
    if _kernels(batch.shape[0], ["exact"]):
        s, _, M, n = _one(arrays)
        status[0], _ = exact.feasible(s, np.zeros(n), M, np.inf, int(work), a[0, :n], no_rules(), np.empty(0, np.int64))
        p[0, :n] = np.arange(n)
    else:
        exact.pack_memory_batch(arrays[0], arrays[2], arrays[3], arrays[4], int(work), a, p, status)
    a[status != exact.FEASIBLE] = -1
    assign, pos = expand(batch, a, p, pm, pg)
    return assign, pos, status


def improve(batch: Batch, assign, pos, lb, effort: int, patience: int, seed: int, exact_work=0):
    """Search from the placements ``assign``/``pos`` (B, N) (batch slots, -1 for padding).

    ``effort`` search rounds per instance (:func:`kvgpu.kernels.search.improve_instance`), then
    the optimality proof (:func:`kvgpu.kernels.exact.certify_instance`) with ``exact_work`` work
    (an int for every instance, or (B,) int: 0 skips an instance's proof).  ``lb`` (B,): proven
    lower bounds.  Returns ``(assign, pos, lb)``, ``lb`` raised by the proof where it got further."""
    from kvgpu.kernels import exact, search
    from kvgpu.kernels.rules import no_rules

    arrays, pm, pg = compacted(batch)
    B = batch.shape[0]
    a, p = compact_placement(batch, assign, pos, pm, pg)
    lo = np.array(lb, dtype=float)
    work = np.broadcast_to(np.asarray(exact_work, np.int64), (B,)).copy()
    groups = (["search"] if effort > 0 else []) + (["exact"] if work.any() else [])
    if _kernels(B, groups):
        s, w, M, n = _one(arrays)
        if effort > 0:
            search.improve_instance(s, w, M, lo[0], a[0, :n], p[0, :n], int(effort), int(patience), int(seed),
                                    no_rules())
        if work[0] > 0:
            lo[0], _ = exact.certify_instance(s, w, M, lo[0], a[0, :n], p[0, :n], int(work[0]), no_rules(),
                                              np.empty(0, np.int64))
    else:
        if effort > 0:
            search.improve_batch(*arrays, lo, int(effort), int(patience), int(seed), a, p)
        if work.any():
            exact.certify_batch(*arrays, lo, work, a, p, np.zeros(B, np.int64))
    assign, pos = expand(batch, a, p, pm, pg)
    return assign, pos, lo
