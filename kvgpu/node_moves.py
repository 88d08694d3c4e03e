"""Node-level moves: swap whole tensor-parallel replicas between nodes.

The search (:mod:`kvgpu.kernels.search`) moves and swaps single items; a tp replica whose shards
must share a node can then change node only when every shard moves at once, which no single
step does.  Where replicas fill nodes, the placement gets stuck with each replica's node as the
start drew it.  :func:`swap_replicas` tries every pair of replicas of the same width (tp) in
different nodes: replica A takes B's GPUs and B takes A's (the shards of a replica are
interchangeable), which keeps both inside one node; a swap is taken when it lowers the largest
KVPR of the GPUs it touches (so the max of the whole placement never rises) and keeps every
rule (:func:`kvgpu.rule_check.rule_breach`).  Best swap first, until none gains.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import SCORE_RTOL, safe_div_array
from kvgpu.problem import Problem
from kvgpu.rule_check import rule_breach

#: Most swaps taken by one call (each one lowers a local peak; a guard against long walks).
MAX_SWAPS = 200


def _replicas(problem: Problem) -> list:
    """(node group id, its item ids) of every tp replica kept inside one node."""
    ng = problem.node_group
    if not ng.shape[0]:
        return []
    return [(int(g), np.nonzero(ng == g)[0]) for g in np.unique(ng[ng >= 0]).tolist()]


def _gain(problem: Problem, assign: np.ndarray, S: np.ndarray, W: np.ndarray, A: np.ndarray,
          B: np.ndarray) -> float:
    """How much swapping replicas ``A`` and ``B`` (item ids, equal counts) lowers the largest
    KVPR of the GPUs they occupy (negative: it rises); -inf where memory breaks."""
    inst = problem.items
    ga, gb = assign[A], assign[B]
    touched = np.concatenate([ga, gb])
    s_a, w_a = inst.sizes[A[0]], inst.demand[A[0]]
    s_b, w_b = inst.sizes[B[0]], inst.demand[B[0]]
    S2, W2 = S[touched].copy(), W[touched].copy()
    k = ga.size
    S2[:k] += s_b - s_a
    W2[:k] += w_b - w_a
    S2[k:] += s_a - s_b
    W2[k:] += w_a - w_b
    M = inst.gpu_mem[touched]
    if (S2 > M).any():
        return -np.inf
    before = safe_div_array(W[touched], M - S[touched], np).max()
    after = safe_div_array(W2, M - S2, np).max()
    return float(before - after)


def swap_replicas(problem: Problem, assign: np.ndarray) -> np.ndarray:
    """Swap tp replicas of the same width between nodes while a swap lowers the peak of the
    GPUs it touches (module doc).  ``assign`` (n,) int64, a placement keeping the rules; returns
    a new array, never worse in the max KVPR."""
    a = assign.copy()
    reps = _replicas(problem)
    if len(reps) < 2:
        return a
    inst = problem.items
    G = problem.n_gpus
    for _ in range(MAX_SWAPS):
        S = np.bincount(a, weights=inst.sizes, minlength=G)
        W = np.bincount(a, weights=inst.demand, minlength=G)
        peak = safe_div_array(W, inst.gpu_mem - S, np)
        tried = []
        for x in range(len(reps)):
            A = reps[x][1]
            for y in range(x + 1, len(reps)):
                B = reps[y][1]
                if A.size != B.size or problem.node_of[a[A[0]]] == problem.node_of[a[B[0]]]:
                    continue
                g = _gain(problem, a, S, W, A, B)
                local = max(peak[a[A]].max(), peak[a[B]].max())
                if g > local * SCORE_RTOL * 10:
                    tried.append((-g, x, y))
        for _, x, y in sorted(tried):
            A, B = reps[x][1], reps[y][1]
            b = a.copy()
            b[A], b[B] = a[B], a[A]
            if rule_breach(problem, b) is None:
                a = b
                break
        else:
            return a
    return a
