"""The seed pipeline's start bound ``low_T`` for many lanes at once (array twin of
:mod:`kvgpu.seed_bound`), from the closed-form terms of :mod:`kvgpu.bounds`.

Every function takes models already gathered *in the order the reference
iterates them* (``so``/``wo`` (L, N) with ``valid`` (L, N)), so that running sums
round exactly as the reference's loops do, and ``P`` (L, G+1), the prefix sums
of each lane's memories sorted largest first (``P[:, k]`` = ``k`` largest).
The k-prefix term is not a valid bound (see :mod:`kvgpu.seed_bound`); the bounds kvgpu
reports are those of :mod:`kvgpu.bounds`.
"""

from __future__ import annotations

from kvgpu.bounds import bounded_div, glob, individual, pair, per_lane, size_desc, triplet
from kvgpu.bounds import mem_prefix  # noqa: F401 -- the engine's pack and pipeline use it from here
from kvgpu.kernels.params import K_PREFIX_START


def seed_kprefix(xp, ss, ws, vs, P, k_max):
    """The seed's k-prefix term for ``k = 1 .. k_max`` (per-lane array); not a valid bound."""
    L, N = ss.shape
    ts = xp.cumsum(xp.where(vs, ss, 0.0), axis=1)
    tw = xp.cumsum(xp.where(vs, ws, 0.0), axis=1)
    last = xp.maximum(vs.sum(axis=1) - 1, 0)
    best = xp.zeros(L)
    for k in range(1, int(k_max.max()) + 1 if k_max.size else 1):
        cross = vs & (ts > P[:, k - 1:k])
        idx = xp.where(cross.any(axis=1), xp.argmax(cross, axis=1), last)
        val = bounded_div(xp, per_lane(xp, tw, idx), P[:, k] - per_lane(xp, ts, idx))
        best = xp.where((k <= k_max) & vs.any(axis=1), xp.maximum(best, val), best)
    return best


def seed_bounds(xp, so, wo, valid, P, n_gpus, placed_size, k_max, with_pair, with_triplet):
    """Max of the seed's bound terms over the given models (see :mod:`kvgpu.bounds`)."""
    terms = [individual(xp, so, wo, valid, P), glob(xp, so, wo, valid, P, n_gpus, placed_size)]
    if with_pair:
        ss, ws, vs = size_desc(xp, so, wo, valid)
        terms += [pair(xp, ss, ws, vs, P), seed_kprefix(xp, ss, ws, vs, P, k_max)]
        if with_triplet:
            terms.append(triplet(xp, ss, ws, vs, P, n_gpus))
    out = terms[0]
    for t in terms[1:]:
        out = xp.maximum(out, t)
    return out


def seed_start_bound(batch, P):
    """``low_T`` of the seed for every lane (models in index order)."""
    xp = batch.xp
    n_gpus = batch.n_gpus
    return seed_bounds(xp, batch.sizes, batch.demand, batch.model_mask, P, n_gpus, 0.0,
                       xp.minimum(n_gpus, K_PREFIX_START), True, True)


