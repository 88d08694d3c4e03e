"""Batches of instances as padded struct-of-arrays, and the state of their placements.

Shapes (``B`` instances or lanes, ``N`` model slots, ``G`` GPU slots):

* ``sizes`` (B, N) float64, GB; ``demand`` (B, N) float64, ``req_rate / slo``;
  ``model_mask`` (B, N) bool, True for real models (padding has size and demand 0);
* ``gpu_mem`` (B, G) float64, GB; ``gpu_mask`` (B, G) bool (padding has memory 0).

A placement is ``assign`` (B, N) int64 (GPU id, -1 for padding) plus ``pos``
(B, N) int64, the insertion stamp that gives each GPU's list order (a moved model
gets a fresh, larger stamp, i.e. goes to the end of its new GPU's list).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from kvgpu._namespace import get_namespace
from kvgpu.batch.arrays import argsort_stable, seq_sum
from kvgpu.errors import InvalidInstance
from kvgpu.kernels.deltas import INF, safe_div_array
from kvgpu.problem import Instance


@dataclass(frozen=True)
class Batch:
    """Padded instances (see module doc for shapes); lane ``l`` may be a copy of an instance."""

    sizes: object
    demand: object
    model_mask: object
    gpu_mem: object
    gpu_mask: object

    @property
    def xp(self):
        return get_namespace(self.sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, N, G)``."""
        return (self.sizes.shape[0], self.sizes.shape[1], self.gpu_mem.shape[1])

    def take(self, lanes) -> "Batch":
        """The lanes ``lanes`` (an int index array) as a new batch."""
        return Batch(*(getattr(self, f.name)[lanes] for f in fields(self)))

    @property
    def n_models(self):
        return self.model_mask.sum(axis=1)

    @property
    def n_gpus(self):
        return self.gpu_mask.sum(axis=1)


def make_batch(sizes, demand, gpu_mem, model_mask=None, gpu_mask=None) -> Batch:
    """Validate shapes and fill masks; padding is zeroed so that it never weighs anything."""
    xp = get_namespace(sizes, demand, gpu_mem)
    sizes = xp.asarray(sizes, dtype=xp.float64)
    demand = xp.asarray(demand, dtype=xp.float64)
    gpu_mem = xp.asarray(gpu_mem, dtype=xp.float64)
    if sizes.ndim != 2 or demand.shape != sizes.shape:
        raise InvalidInstance(f"sizes and demand must both have shape (B, N); got {sizes.shape} and {demand.shape}")
    if gpu_mem.ndim == 1 and gpu_mem.shape[0] == sizes.shape[0]:
        raise InvalidInstance("gpu_mem must have shape (B, G); use gpu_mem[:, None] for one GPU per instance")
    if gpu_mem.ndim != 2 or gpu_mem.shape[0] != sizes.shape[0]:
        raise InvalidInstance(f"gpu_mem must have shape (B, G) with B = {sizes.shape[0]}; got {gpu_mem.shape}")
    if gpu_mem.shape[1] == 0 and sizes.shape[0] > 0:
        raise InvalidInstance(f"gpu_mem has shape {gpu_mem.shape}: no GPU at all; every instance needs one (G >= 1)")
    model_mask = xp.ones(sizes.shape, bool) if model_mask is None else xp.asarray(model_mask, dtype=bool)
    gpu_mask = xp.ones(gpu_mem.shape, bool) if gpu_mask is None else xp.asarray(gpu_mask, dtype=bool)
    if model_mask.shape != sizes.shape or gpu_mask.shape != gpu_mem.shape:
        raise InvalidInstance("model_mask must match sizes (B, N) and gpu_mask must match gpu_mem (B, G)")
    return Batch(xp.where(model_mask, sizes, 0.0), xp.where(model_mask, demand, 0.0), model_mask,
                 xp.where(gpu_mask, gpu_mem, 0.0), gpu_mask)


def batch_from_instances(instances: Sequence[Instance]) -> Batch:
    """Pad validated single instances into one NumPy batch."""
    B = len(instances)
    N = max(1, max(i.n_models for i in instances))
    G = max(i.n_gpus for i in instances)
    sizes, demand = np.zeros((B, N)), np.zeros((B, N))
    mmask = np.zeros((B, N), bool)
    mem, gmask = np.zeros((B, G)), np.zeros((B, G), bool)
    for b, inst in enumerate(instances):
        n, g = inst.n_models, inst.n_gpus
        sizes[b, :n], demand[b, :n], mmask[b, :n] = inst.sizes, inst.demand, True
        mem[b, :g], gmask[b, :g] = inst.gpu_mem, True
    return Batch(sizes, demand, mmask, mem, gmask)


def gpu_loads(batch: Batch, assign, pos):
    """Per-GPU size and demand ``(S, W)``, each (L, G), summed in each GPU's list order.

    Summing in list order (one model per lane per step) reproduces the reference's rounding."""
    xp = batch.xp
    L, N, G = batch.shape
    order = argsort_stable(xp, xp.where(assign >= 0, pos, xp.iinfo(pos.dtype).max))
    S, W = xp.zeros((L, G)), xp.zeros((L, G))
    rows = xp.arange(L)
    for k in range(N):
        i = order[:, k]
        g = assign[rows, i]
        real = g >= 0
        if not bool(real.any()):
            break
        r, gg = rows[real], g[real]
        S[r, gg] = S[r, gg] + batch.sizes[r, i[real]]
        W[r, gg] = W[r, gg] + batch.demand[r, i[real]]
    return S, W


def kvpr(xp, S, W, M, gmask, pad=-INF):
    """KVPR per GPU (L, G); padded GPUs get ``pad`` (``-inf`` so they never are the max)."""
    return xp.where(gmask, safe_div_array(W, M - S, xp), pad)


def score(batch: Batch, assign, pos):
    """The score tuple per lane as three (L,) arrays: max, second largest, mean KVPR."""
    xp = batch.xp
    S, W = gpu_loads(batch, assign, pos)
    kv = kvpr(xp, S, W, batch.gpu_mem, batch.gpu_mask)
    srt = -xp.sort(-kv, axis=1)
    second = srt[:, 1] if kv.shape[1] > 1 else xp.zeros(kv.shape[0])
    second = xp.where(batch.n_gpus > 1, second, 0.0)
    mean = seq_sum(xp, xp.where(batch.gpu_mask, kv, 0.0)) / batch.n_gpus
    return srt[:, 0], second, mean
