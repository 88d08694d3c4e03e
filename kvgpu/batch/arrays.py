"""Small array helpers of the batch engine, written once for NumPy and CuPy (``xp``).

Conventions: a leading lane axis ``L``; "first" always means the smallest index,
which is how every scan of the seed pipeline breaks ties.
"""

from __future__ import annotations

import functools

import numpy as np

from kvgpu.kernels.deltas import EPS, INF


def quiet_fp(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: masked-out entries (padding, GPUs a
    model does not fit on) legitimately compute ``x/0`` and ``inf - inf``, then get discarded."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def argsort_stable(xp, x, axis=-1):
    """Stable argsort (CuPy's sort is always stable and accepts only ``kind='stable'``)."""
    return xp.argsort(x, axis=axis, kind="stable")


def sort_desc(xp, keys, valid):
    """Permutation ``(L, N)`` sorting each row by ``keys`` (most significant first) descending,
    stable (equal keys keep index order), with invalid entries last.  Keys must not be ``-inf``
    (the most significant pass marks invalid entries with ``+inf`` after negation)."""
    keys = list(keys)
    perm = None
    for n, k in enumerate(keys[::-1]):
        col = -k if n + 1 < len(keys) else xp.where(valid, -k, INF)
        if perm is not None:
            col = xp.take_along_axis(col, perm, axis=-1)
        step = argsort_stable(xp, col)
        perm = step if perm is None else xp.take_along_axis(perm, step, axis=-1)
    return perm


def inverse_perm(xp, perm):
    """Inverse of each row permutation of ``perm`` (L, N)."""
    inv = xp.empty_like(perm)
    rows = xp.arange(perm.shape[0])[:, None]
    inv[rows, perm] = xp.arange(perm.shape[1])[None, :]
    return inv


def seq_sum(xp, x):
    """Left-to-right sum along the last axis (cumsum does not use pairwise summation), so the
    rounding matches Python's ``sum`` in the reference.  The last axis must not be empty."""
    return xp.cumsum(x, axis=-1)[..., -1]


def lex_argmin(xp, keys, valid, axis=-1):
    """Index of the lexicographically smallest key tuple along ``axis`` (first among equals)
    and whether any entry is valid.  ``keys`` are arrays of one shape, most significant first,
    or callables returning them: the scan stops once no row has a tie left, so tie-break keys
    are usually never computed."""
    mask = valid
    for n, k in enumerate(keys):
        kk = xp.where(mask, k() if callable(k) else k, INF)
        mask = mask & (kk == kk.min(axis=axis, keepdims=True))
        if n + 1 < len(keys) and not bool((mask.sum(axis=axis) > 1).any()):
            break
    return xp.argmax(mask, axis=axis), valid.any(axis=axis)


def first_of_min(xp, vals, valid):
    """Scan semantics of the seed's ``if new + EPS < best: best = new``: the first entry of the
    smallest cluster (values within ``EPS`` of the minimum).  Returns ``(index, minimum)`` along
    the last axis; the minimum is ``inf`` where nothing is valid."""
    v = xp.where(valid, vals, INF)
    m = v.min(axis=-1)
    idx = xp.argmax(valid & (v <= m[..., None] + EPS), axis=-1)
    return idx, m


def top3(xp, kv, gmask):
    """The three largest values of ``kv`` (L, G) and their GPU ids (first id among equals); padded
    GPUs never count.  Returns ``(vals (L, 3), ids (L, 3))`` padded with ``(-inf, -1)``."""
    L, G = kv.shape
    v = xp.where(gmask, kv, -INF)
    order = argsort_stable(xp, -v)[:, :3]
    vals = xp.take_along_axis(v, order, axis=-1)
    ids = xp.where(vals > -INF, order, -1)
    if G < 3:
        pad = 3 - G
        vals = xp.concatenate([vals, xp.full((L, pad), -INF)], axis=1)
        ids = xp.concatenate([ids, xp.full((L, pad), -1, dtype=ids.dtype)], axis=1)
    return vals, ids


def max_excluding(xp, t3, a, b):
    """Max KVPR over GPUs other than ``a`` and ``b``, from :func:`top3` in O(1).

    ``a`` and ``b`` are GPU-id arrays of shape ``(L, ...)`` (same number of dims)."""
    vals, ids = t3
    shape = (vals.shape[0],) + (1,) * (max(a.ndim, b.ndim) - 1)
    v = [vals[:, k].reshape(shape) for k in range(3)]
    i = [ids[:, k].reshape(shape) for k in range(3)]
    ok0 = (i[0] != a) & (i[0] != b)
    ok1 = (i[1] != a) & (i[1] != b)
    return xp.where(ok0, v[0], xp.where(ok1, v[1], v[2]))


def unique_rows(rows):
    """First occurrence of each distinct row of an int64 NumPy array (R, C), and each row's
    group: ``(first (U,), back (R,))`` with ``rows[first][back] == rows``.  Rows are grouped by a
    64-bit hash and the grouping is verified row by row (a collision falls back to exact rows)."""
    weights = np.random.default_rng(0).integers(1, 2**62, rows.shape[1], dtype=np.int64)
    h = (rows * weights).sum(axis=1)  # int64 arithmetic wraps: a hash, verified below
    _, first, back = np.unique(h, return_index=True, return_inverse=True)
    if not (rows[first][back] == rows).all():
        _, first, back = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first, back.reshape(-1)
