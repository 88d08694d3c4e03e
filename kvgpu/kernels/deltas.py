"""Delta arithmetic of one transfer between two GPUs, written once.

A *transfer* takes ``(s_out, w_out)`` off a source GPU and puts ``(s_in, w_in)``
back on it; the destination receives the opposite.  A move is a transfer with
``s_in = w_in = 0``, a swap one with both sides set, a donation is a move.
Every scan of the seed pipeline (move, swap, donation) and every engine (the
scalar reference, the NumPy/CuPy batch engine) evaluates its candidates with
:func:`transfer_loads`, so all of them perform the same floating-point
operations in the same order and therefore take the same decisions.

The functions are plain arithmetic: they work on Python floats and, by
broadcasting, on arrays of any shape from any array namespace.
``safe_div`` (scalar) and :func:`safe_div_array` (arrays) are the only pair that
must differ, because arrays cannot branch.

Units: sizes and memory in GB, demand ``w = req_rate / slo`` in requests per
second per second of SLO; KVPR is demand per free GB.
"""

from __future__ import annotations

import math

import numpy as _np  # only for errstate; CuPy raises no such warnings

#: Slack of every comparison in the seed pipeline: memory fits with ``+EPS``,
#: a change "improves" when ``new + EPS < old``.
EPS = 1e-12

INF = math.inf


def safe_div(a: float, b: float) -> float:
    """KVPR-style division of scalars: ``b <= 0`` gives ``+inf`` if ``a > 0`` else ``0``."""
    if b <= 0:
        return INF if a > 0 else 0.0
    return a / b


def safe_div_array(a, b, xp):
    """Elementwise :func:`safe_div` for arrays of namespace ``xp`` (same shapes or broadcastable)."""
    with _np.errstate(divide="ignore", invalid="ignore"):  # x/0 and 0/0 entries are fixed below
        q = a / b
    bad = b <= 0
    if bool(bad.any()):  # rare (full GPUs): skip the two selects when nothing needs fixing
        q = xp.where(bad, xp.where(a > 0, INF, 0.0), q)
    return q


def transfer_loads(S_src, W_src, S_dst, W_dst, s_out, w_out, s_in, w_in):
    """Memory and demand of both GPUs after a transfer.

    Returns ``(S_src', W_src', S_dst', W_dst')``.  Shapes broadcast; for a move
    pass ``s_in = w_in = 0`` (adding an exact zero keeps the move's rounding).
    """
    return (S_src - s_out + s_in, W_src - w_out + w_in,
            S_dst + s_out - s_in, W_dst + w_out - w_in)


def mem_unit(M):
    """The unit slacks are measured in: 1 (GB) for memories of at least 1 GB, else ``M`` itself,
    so that a slack never overfills GPUs measured in tiny units while the seed's absolute
    ``+1e-12`` stays exact for real GPUs (scalars or arrays)."""
    return (M < 1.0) * M + (M >= 1.0) * 1.0


def fmul(a, b):
    """``a * b``, rounded on its own wherever it runs.  A CUDA compiler fuses ``a * b + c`` into
    one multiply-add (rounded once, not twice), which can change a decision; every product
    whose sum decides something is written ``fmul(a, b) + c``, which the device kernels compile
    to a product that is never fused (:mod:`kvgpu.kernels.jit`).  Scalars or arrays."""
    return a * b


def fits(S_after, M):
    """Memory rule with the seed's slack: ``S' <= M + EPS`` (relative below 1 GB, see
    :func:`mem_unit`; scalars or arrays)."""
    # mem_unit, inlined for numba; its products by 0 or 1 are exact, so a fused add rounds alike
    return S_after <= M + fmul(EPS, (M < 1.0) * M + (M >= 1.0) * 1.0)


#: Relative tolerance of the score comparison: two terms closer than this are equal, so the
#: order in which a sum was taken never decides between two placements.
SCORE_RTOL = 1e-9


def better(a0, a1, a2, b0, b1, b2):
    """Is the score ``(max, second, mean)`` ``a`` better than ``b``?  Lexicographic, each term
    compared with the relative tolerance ``SCORE_RTOL``.  This is the one comparison of
    placements kvgpu makes (search, re-placement, tests); only the seed pipeline's internal
    candidate selection keeps the seed's exact rule, which its reproduction needs."""
    for a, b in ((a0, b0), (a1, b1), (a2, b2)):
        if a == b:
            continue
        if not (abs(a) < INF and abs(b) < INF):
            return a < b
        tol = fmul(SCORE_RTOL, max(abs(a), abs(b)))
        if a < b - tol:
            return True
        if a > b + tol:
            return False
    return False


def lex_better(a, b, rtol=SCORE_RTOL) -> bool:
    """Is the placement with per-GPU KVPRs ``a`` better than ``b`` in the balanced order?

    Both sorted in decreasing order and compared term by term (the largest, then the largest of
    the others, ...), each term with :func:`better`'s relative tolerance.  Host code, for the
    engine's balancing passes and the tests (the kernels compare ``(max, second, mean)``).

    Parameters
    ----------
    a, b : array_like, shape (G,) -- KVPR of each GPU (``inf`` for a GPU out of KV memory).
    rtol : float -- terms closer than this (relative) are equal.
    """
    va = _np.sort(_np.asarray(a, dtype=float))[::-1]
    vb = _np.sort(_np.asarray(b, dtype=float))[::-1]
    for x, y in zip(va.tolist(), vb.tolist()):
        if x == y:
            continue
        if not (abs(x) < INF and abs(y) < INF):
            return x < y
        tol = rtol * max(abs(x), abs(y))
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False


def overflow(load, cap):
    """How far ``load`` exceeds ``cap`` (0 when it fits): the penalty of the search's repair
    step, where a GPU's load at a target KVPR ``T`` is ``S + W / T`` (``<= M`` iff KVPR ``<= T``)."""
    return load - cap if load > cap else 0.0


def transfer_new_max(kvpr_src, kvpr_dst, others):
    """Global max KVPR after a transfer, given the max over all *other* GPUs.

    Written with comparisons (not ``max``) so that scalars and arrays share it.
    """
    m = kvpr_src if kvpr_src >= kvpr_dst else kvpr_dst
    return m if m >= others else others


def transfer_new_max_array(kvpr_src, kvpr_dst, others, xp):
    """Array form of :func:`transfer_new_max`."""
    return xp.maximum(xp.maximum(kvpr_src, kvpr_dst), others)
