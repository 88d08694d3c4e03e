"""Two checks on a placement that every module may use: each GPU's KVPR, and the first rule a
placement breaks (in Python, independently of the kernels' incremental bookkeeping)."""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import fits, safe_div_array
from kvgpu.problem import Problem


def kvpr_of(problem: Problem, assign: np.ndarray) -> np.ndarray:
    """(G,) float64: each GPU's KVPR under ``assign`` (n,) int64."""
    inst, G = problem.items, problem.n_gpus
    S = np.bincount(assign, weights=inst.sizes, minlength=G)
    W = np.bincount(assign, weights=inst.demand, minlength=G)
    return safe_div_array(W, inst.gpu_mem - S, np)


def rule_breach(problem: Problem, assign: np.ndarray) -> str | None:
    """The first rule ``assign`` (n,) int64 breaks, in words, or None: memory, allowed GPUs
    (pins, forbidden GPUs, ``node: K``, GPUs out of service), a model's items on distinct GPUs,
    a tp replica inside one node, an adapter beside its base.  Not the migration budget."""
    inst, G = problem.items, problem.n_gpus
    n = inst.n_models
    if assign.shape != (n,) or (n and not ((assign >= 0) & (assign < G)).all()):
        return "an item has no GPU"
    S = np.bincount(assign, weights=inst.sizes, minlength=G)
    if not fits(S, inst.gpu_mem).all():
        return "memory"
    if problem.allowed.shape[0] and not problem.allowed[np.arange(n), assign].all():
        return "allowed GPUs"
    if set(problem.out_of_service) & set(assign.tolist()):
        return "a GPU out of service"
    for arr, words in ((problem.group, "shards on distinct GPUs"), (problem.node_group, "a replica in one node")):
        if not arr.shape[0]:
            continue
        where = assign if arr is problem.group else problem.node_of[assign]
        for gid in np.unique(arr[arr >= 0]).tolist():
            on = where[arr == gid]
            if (arr is problem.group and np.unique(on).size != on.size) or \
                    (arr is problem.node_group and np.unique(on).size != 1):
                return words
    if problem.coloc.shape[0]:
        for i in np.nonzero(problem.coloc >= 0)[0].tolist():
            if assign[i] not in assign[problem.group == problem.coloc[i]]:
                return "an adapter beside its base"
    return None
