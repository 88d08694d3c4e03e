"""The seed pipeline's start bound ``low_T`` in scalar code, for :mod:`kvgpu.reference`.

:func:`seed_start_bound` is the exact "low_T" of the seed pipeline (SPEC.md), used only to start
its search for ``T``, and :func:`seed_retune_bound` the bounds it recomputes while packing.  They
include the k-prefix term as the seed computes it, which is **not** a valid lower bound in
general (three 30 GB models of demand 1 on three 80 GB GPUs: the k=2 term gives 3/70, the
optimum is 1/50), so they are never reported to users: the bounds kvgpu reports are those of
:mod:`kvgpu.bounds`.

Heterogeneous memory: every ``k*M`` becomes "the sum of the ``k`` largest
memories", which is what the mediant argument needs, and equals ``k*M`` when
all GPUs have the same memory.
"""

from __future__ import annotations

from typing import Sequence

from kvgpu.kernels.params import DEN_FLOOR, K_PREFIX_RETUNE, K_PREFIX_START, N_PAIR, N_TRIPLET, WINDOW


def _div(a: float, den: float) -> float:
    return a / max(den, DEN_FLOOR)


def mem_prefix(gpu_mem: Sequence[float]) -> list[float]:
    """``P[k]`` = sum of the ``k`` largest memories, ``P[0] = 0`` (length G+1)."""
    P = [0.0]
    for m in sorted(gpu_mem, reverse=True):
        P.append(P[-1] + m)
    return P


def by_size_desc(sizes: Sequence[float], idx: Sequence[int]) -> list[int]:
    """``idx`` sorted by size, largest first, stable."""
    return sorted(idx, key=lambda i: sizes[i], reverse=True)


def individual(sizes, demand, idx, m_max):
    return max((_div(demand[i], m_max - sizes[i]) for i in idx), default=0.0)


def pair(sizes, demand, order, P, n_top=N_PAIR):
    """Pairs among the ``n_top`` largest (``order`` is size-descending) that cannot share a GPU."""
    top = order[:n_top]
    best = 0.0
    m1 = P[1]
    for a in range(len(top)):
        i = top[a]
        for b in range(a + 1, len(top)):
            j = top[b]
            if sizes[i] + sizes[j] > m1:
                best = max(best, _div(demand[i] + demand[j], P[2] - sizes[i] - sizes[j]))
    return best


def triplet(sizes, demand, order, P, n_top=N_TRIPLET, window=WINDOW):
    """Windowed triplets among the ``n_top`` largest whose size exceeds two GPUs."""
    top = order[:n_top]
    n = len(top)
    best = 0.0
    for a in range(n):
        for b in range(a + 1, min(n, a + window + 1)):
            for c in range(b + 1, min(n, b + window + 1)):
                i, j, k = top[a], top[b], top[c]
                tot = sizes[i] + sizes[j] + sizes[k]
                if tot > P[2]:
                    best = max(best, _div(demand[i] + demand[j] + demand[k], P[3] - tot))
    return best


def _prefix_sets(sizes, demand, order, P, k_max):
    """Yield ``(k, n_taken, sum_w, sum_s)``: models by size until the total exceeds ``P[k-1]``."""
    for k in range(1, k_max + 1):
        ts = tw = 0.0
        n = 0
        for i in order:
            ts += sizes[i]
            tw += demand[i]
            n += 1
            if ts > P[k - 1]:
                break
        yield k, n, tw, ts


def seed_kprefix(sizes, demand, order, P, k_max):
    """The seed's k-prefix term ``sum w / (kM - sum s)`` (not a valid bound in general, see module doc)."""
    return max((_div(tw, P[k] - ts) for k, _, tw, ts in _prefix_sets(sizes, demand, order, P, k_max)),
               default=0.0)


def _whole_instance_terms(sizes, demand, gpu_mem):
    """Individual, global, pair and (G >= 3) triplet terms over all models; also returns the
    memory prefix sums and the size-descending order the other terms need."""
    G = len(gpu_mem)
    idx = range(len(sizes))
    P = mem_prefix(gpu_mem)
    order = by_size_desc(sizes, idx)
    terms = [
        individual(sizes, demand, idx, P[1]),
        _div(sum(demand), P[G] - sum(sizes)),
        pair(sizes, demand, order, P),
    ]
    if G >= 3:
        terms.append(triplet(sizes, demand, order, P))
    return terms, P, order


def seed_start_bound(sizes, demand, gpu_mem) -> float:
    """The seed pipeline's ``low_T``: max of individual, global, pair, triplet and k-prefix (k <= 6)."""
    terms, P, order = _whole_instance_terms(sizes, demand, gpu_mem)
    return max(terms + [seed_kprefix(sizes, demand, order, P, min(len(gpu_mem), K_PREFIX_START))])


def seed_retune_bound(sizes, demand, gpu_mem, remaining, placed_size, first: bool) -> float:
    """Bounds over the models still ``remaining`` at a retune point of a pack.

    First retune: individual, "global" (``sum w_rem / (sum M - S_placed - S_rem)``),
    pair and k-prefix (k <= min(G, K_PREFIX_RETUNE)); second: individual and global only.
    """
    G = len(gpu_mem)
    P = mem_prefix(gpu_mem)
    terms = [
        individual(sizes, demand, remaining, P[1]),
        _div(sum(demand[i] for i in remaining), P[G] - placed_size - sum(sizes[i] for i in remaining)),
    ]
    if first:
        order = by_size_desc(sizes, remaining)
        terms.append(pair(sizes, demand, order, P))
        terms.append(seed_kprefix(sizes, demand, order, P, min(G, K_PREFIX_RETUNE)))
    return max(terms)
