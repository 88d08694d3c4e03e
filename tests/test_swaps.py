"""The windowed best swap of improve_local (kvgpu.kernels.cpu.best_swap) takes the seed's
decision: the record scan over every pair in list order, checked pair by pair in Python."""

import numpy as np
from hypothesis import given, settings, strategies as st

from kvgpu.kernels import cpu
from kvgpu.kernels.deltas import EPS, fits, safe_div, transfer_loads, transfer_new_max
from kvgpu.kernels.rules import new_state, no_rules


def _record_scan(S, W, M, s, w, src, dst, others, best, mem, start):
    ba = bb = -1
    for p in range(start[src], start[src + 1]):
        for q in range(start[dst], start[dst + 1]):
            a, b = mem[p], mem[q]
            Ss, Ws, Sd, Wd = transfer_loads(S[src], W[src], S[dst], W[dst], s[a], w[a], s[b], w[b])
            if not (fits(Ss, M[src]) and fits(Sd, M[dst])):
                continue
            new = transfer_new_max(safe_div(Ws, M[src] - Ss), safe_div(Wd, M[dst] - Sd), others)
            if new + EPS < best:
                best, ba, bb = new, a, b
    return ba, bb


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(40, 400), st.sampled_from(["int", "real", "zeros", "ties"]))
def test_best_swap_is_the_record_scan(seed, n, kind):
    rng = np.random.default_rng(seed)
    G = 3
    s = rng.integers(1, 6, n).astype(float) if kind in ("int", "ties") else rng.uniform(0.5, 6.0, n)
    w = rng.integers(1, 9, n).astype(float) if kind != "real" else rng.uniform(0.1, 9.0, n)
    if kind == "zeros":
        w[rng.random(n) < 0.1] = 0.0
    if kind == "ties":
        s[:] = 2.0
    assign = rng.integers(0, G, n)
    M = np.array([np.bincount(assign, weights=s, minlength=G)[g] * rng.uniform(1.02, 1.3) for g in range(G)])
    pos = rng.permutation(n).astype(np.int64)
    S, W = cpu.list_loads(assign, pos, s, w, G)
    kv = cpu.kvprs(S, W, M)
    src = int(np.argmax(kv))
    dst = int(np.argsort(-kv, kind="stable")[1])
    others = float(np.delete(kv, [src, dst]).max())
    mem, start = np.empty(n, np.int64), np.empty(G + 1, np.int64)
    cpu.gpu_lists_into(assign, np.argsort(pos, kind="stable"), mem, start)
    rules = no_rules()
    for best in (kv[src], kv[src] * (1 + 1e-3), max(others, kv[dst]) * 1.001):
        got = cpu.best_swap(S, W, M, s, w, src, dst, others, best, mem, start, np.empty(n), np.empty(n, np.int64),
                            np.empty(n, np.int64), rules, new_state(rules, assign, G))
        assert tuple(got) == _record_scan(S, W, M, s, w, src, dst, others, best, mem, start)


def _first_scan(S, W, M, s, w, assign, mem, lo, hi, worst, t3, cur):
    n = s.shape[0]
    for p in range(hi - lo):
        for q in range(n):
            if lo <= q < hi:
                continue
            a, b = mem[lo + p], mem[q]
            d = assign[b]
            Ss, Ws, Sd, Wd = transfer_loads(S[worst], W[worst], S[d], W[d], s[a], w[a], s[b], w[b])
            if not (fits(Ss, M[worst]) and fits(Sd, M[d])):
                continue
            if transfer_new_max(safe_div(Ws, M[worst] - Ss), safe_div(Wd, M[d] - Sd),
                                cpu.max_excluding(t3, worst, d)) + EPS < cur:
                return p * n + q
    return (hi - lo) * n


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(6, 120), st.integers(2, 6), st.integers(1, 5))
def test_first_swap_is_the_serial_scans_for_any_number_of_threads(seed, n, G, nt):
    """improve_local's first improving swap: the smallest candidate over the threads of a block
    is the serial scan's, which is the record of the scan in order (GPUs, then list order)."""
    rng = np.random.default_rng(seed)
    s, w = rng.integers(1, 8, n).astype(float), rng.integers(0, 9, n).astype(float)
    assign = rng.integers(0, G, n)
    M = np.bincount(assign, weights=s, minlength=G) * rng.uniform(1.05, 1.5, G) + 1.0
    pos = rng.permutation(n).astype(np.int64)
    S, W = cpu.list_loads(assign, pos, s, w, G)
    kv = cpu.kvprs(S, W, M)
    worst = int(np.argmax(kv))
    mem, start = np.empty(n, np.int64), np.empty(G + 1, np.int64)
    cpu.gpu_lists_into(assign, np.argsort(pos, kind="stable"), mem, start)
    t3 = cpu.top3(kv)
    rules = no_rules()
    rs = new_state(rules, assign, G)
    lo, hi = start[worst], start[worst + 1]
    want = _first_scan(S, W, M, s, w, assign, mem, lo, hi, worst, t3, kv[worst])
    got = min(cpu.first_swap(S, W, M, s, w, assign, mem, start, worst, t3, kv[worst], rules, rs, t, nt)
              for t in range(nt))
    assert got == want
