"""Batched ``improve_local`` and ``refine_peak``: every candidate transfer of a step at once.

All lanes advance together.  In one step each lane evaluates all its moves
(models of the worst GPU x all GPUs, shape ``(L, K, G)``), its swaps (worst's
models x all other models, ``(L, K, N)``) or its donations (donors x 2 targets,
``(L, D, 2)``) with the single evaluator :func:`eval_transfers`, applies its
chosen action, and lanes with nothing left to do drop out of the active set.
Scan order and tie-breaking are those of :mod:`kvgpu.reference`.
"""

from __future__ import annotations

from kvgpu.batch.array_engine import ArrayEngine, engine_for
from kvgpu.batch.arrays import quiet_fp, argsort_stable, first_of_min, inverse_perm, max_excluding, sort_desc, top3
from kvgpu.batch.state import Batch, gpu_loads, kvpr
from kvgpu.kernels.deltas import EPS, INF, fits, safe_div_array, transfer_loads, transfer_new_max_array

# Lanes per chunk are chosen so that one (lanes, K, N) candidate array stays near this many entries.
CHUNK_ENTRIES = 1 << 21


def _gather(xp, A, lanes, idx):
    """``A[lanes[l], idx[l, ...]]`` for an (L, X) array ``A`` and ids ``idx`` of shape (L', ...)."""
    if idx.shape[0] == 1 and lanes.shape[0] != 1:  # ids shared by all lanes (e.g. every GPU)
        idx = xp.broadcast_to(idx, (lanes.shape[0],) + idx.shape[1:])
    rows = lanes.reshape((-1,) + (1,) * (idx.ndim - 1))
    return A[rows, idx]


def array_transfers(xp, S, W, M, sizes, demand, lanes, t3, src, dst, a, b):
    """The ``transfers`` step in array code: new global max KVPR and memory fit of transfers.

    Parameters
    ----------
    S, W : (L, G) float64 -- per-GPU size and demand of every lane; ``M`` (L, G) float64 memories.
    sizes, demand : (L, N) float64.
    lanes : (L',) int64 -- the lanes evaluated; ``t3``: their :func:`kvgpu.batch.arrays.top3`.
    src, dst, a, b : int64 arrays broadcastable to one shape (L', ...) -- model ``a`` moves from
        GPU ``src`` to ``dst`` and, where ``b >= 0``, model ``b`` from ``dst`` to ``src``.

    Returns
    -------
    (new, fits) : float64 and bool arrays of that shape.
    """
    # each id array is gathered at its own (broadcastable) shape; arithmetic broadcasts
    if b.size == 1:
        b = xp.broadcast_to(b, (lanes.shape[0],) + (1,) * (b.ndim - 1))
    has_b = b >= 0
    bb = xp.where(has_b, b, 0)
    s_in = xp.where(has_b, _gather(xp, sizes, lanes, bb), 0.0)
    w_in = xp.where(has_b, _gather(xp, demand, lanes, bb), 0.0)
    Ss, Ws, Sd, Wd = transfer_loads(
        _gather(xp, S, lanes, src), _gather(xp, W, lanes, src), _gather(xp, S, lanes, dst),
        _gather(xp, W, lanes, dst), _gather(xp, sizes, lanes, a), _gather(xp, demand, lanes, a), s_in, w_in)
    Ms, Md = _gather(xp, M, lanes, src), _gather(xp, M, lanes, dst)
    ok = fits(Ss, Ms) & fits(Sd, Md)
    new = transfer_new_max_array(safe_div_array(Ws, Ms - Ss, xp), safe_div_array(Wd, Md - Sd, xp),
                                 max_excluding(xp, t3, src, dst), xp)
    return new, ok


class LaneState:
    """Placement state of ``L`` lanes: assign, pos (list order), S, W, the next stamp; ``engine``
    (:class:`kvgpu.batch.array_engine.ArrayEngine`, None: the plain array code) evaluates the
    transfers."""

    def __init__(self, batch: Batch, assign, pos, engine: ArrayEngine | None = None):
        self.engine = engine_for(batch, engine)
        xp = self.engine.xp
        self.b, self.xp = batch, xp
        self.assign, self.pos = assign.copy(), pos.copy()
        self.S, self.W = gpu_loads(batch, self.assign, self.pos)
        self.stamp = xp.where(self.assign >= 0, self.pos, -1).max(axis=1) + 1

    def kv(self, lanes, pad=-INF):
        b = self.b
        return kvpr(self.xp, self.S[lanes], self.W[lanes], b.gpu_mem[lanes], b.gpu_mask[lanes], pad)

    def members(self, lanes, g):
        """Models on GPU ``g`` (L',) of each lane in list order: ``(idx (L', K), ok (L', K))``."""
        xp = self.xp
        on = self.assign[lanes] == g[:, None]
        big = xp.iinfo(self.pos.dtype).max
        order = argsort_stable(xp, xp.where(on, self.pos[lanes], big))
        K = max(1, int(on.sum(axis=1).max()))
        idx = order[:, :K]
        return idx, xp.take_along_axis(on, idx, axis=1)

    def eval_transfers(self, lanes, t3, src, dst, a, b):
        """New global max and memory fit of transfers: model ``a`` src -> dst and, where ``b >= 0``,
        model ``b`` dst -> src.  All id arrays broadcast to one shape (L', ...).  Runs the engine's
        ``transfers`` step (:func:`array_transfers` unless a kernel was given)."""
        bt = self.b
        step = self.engine.transfers or array_transfers
        return step(self.xp, self.S, self.W, bt.gpu_mem, bt.sizes, bt.demand, lanes, t3, src, dst, a, b)

    def apply(self, lanes, src, dst, a, b):
        """Apply one transfer per lane (``b = -1`` for a move); moved models go to the list ends."""
        xp, bt = self.xp, self.b
        if lanes.shape[0] == 0:
            return
        has_b = b >= 0
        bb = xp.where(has_b, b, 0)
        s_in = xp.where(has_b, bt.sizes[lanes, bb], 0.0)
        w_in = xp.where(has_b, bt.demand[lanes, bb], 0.0)
        Ss, Ws, Sd, Wd = transfer_loads(self.S[lanes, src], self.W[lanes, src], self.S[lanes, dst],
                                        self.W[lanes, dst], bt.sizes[lanes, a], bt.demand[lanes, a], s_in, w_in)
        self.S[lanes, src], self.W[lanes, src] = Ss, Ws
        self.S[lanes, dst], self.W[lanes, dst] = Sd, Wd
        self.assign[lanes, a] = dst
        self.pos[lanes, a] = self.stamp[lanes]
        sw = lanes[has_b]
        self.assign[sw, b[has_b]] = src[has_b]
        self.pos[sw, b[has_b]] = self.stamp[sw] + 1
        self.stamp[lanes] += 2


def _chunks(xp, L, per_lane):
    step = max(1, CHUNK_ENTRIES // max(1, per_lane))
    for lo in range(0, L, step):
        yield xp.arange(lo, min(L, lo + step))


@quiet_fp
def improve_local(batch: Batch, assign, pos, max_iters: int = 4000, engine: ArrayEngine | None = None):
    """Batched :func:`kvgpu.reference.improve_local`; returns the new ``(assign, pos)``.  ``engine``:
    see :class:`kvgpu.batch.array_engine.ArrayEngine` (None: the plain array code)."""
    st = LaneState(batch, assign, pos, engine)
    xp = st.xp
    L, N, G = batch.shape
    for lanes in _chunks(xp, L, N * max(N, G)):
        _descend(st, lanes, max_iters)
        _pair_swaps(st, lanes)
    return st.assign, st.pos


def _descend(st: LaneState, lanes, max_iters):
    """Phase 1: best move off the worst GPU, else its first improving swap, until neither helps."""
    xp, bt = st.xp, st.b
    G = bt.shape[2]
    gids = xp.arange(G)
    for _ in range(max_iters):
        if lanes.shape[0] == 0:
            break
        kv = st.kv(lanes)
        worst = xp.argmax(kv, axis=1)
        cur = kv[xp.arange(lanes.shape[0]), worst]
        t3 = top3(xp, kv, bt.gpu_mask[lanes])
        a_idx, a_ok = st.members(lanes, worst)
        # moves: (L', K, G)
        w3 = worst[:, None, None]
        new, ok = st.eval_transfers(lanes, t3, w3, gids[None, None, :], a_idx[:, :, None],
                                    xp.full((1, 1, 1), -1))
        valid = ok & a_ok[:, :, None] & bt.gpu_mask[lanes][:, None, :] & (gids[None, None, :] != w3)
        flat, m = first_of_min(xp, new.reshape(new.shape[0], -1), valid.reshape(valid.shape[0], -1))
        do_move = m + EPS < cur
        mv = xp.nonzero(do_move)[0]
        st.apply(lanes[mv], worst[mv], flat[mv] % G, a_idx[mv, flat[mv] // G], xp.full(mv.shape, -1))
        # swaps, only where no move helps: worst's models x every model elsewhere, scan order
        # (worst's list, then target GPU id, then the target's list).
        rest = xp.nonzero(~do_move)[0]
        done = xp.zeros(lanes.shape[0], bool)
        if rest.shape[0]:
            rl = lanes[rest]
            asg = st.assign[rl]
            b_ord = argsort_stable(xp, st.pos[rl])
            key = xp.take_along_axis(xp.where(asg >= 0, asg, G), b_ord, axis=1)
            b_ord = xp.take_along_axis(b_ord, argsort_stable(xp, key), axis=1)
            d_b = xp.take_along_axis(asg, b_ord, axis=1)
            ws = worst[rest]
            sub_t3 = (t3[0][rest], t3[1][rest])
            new, ok = st.eval_transfers(rl, sub_t3, ws[:, None, None], d_b[:, None, :],
                                        a_idx[rest][:, :, None], b_ord[:, None, :])
            valid = (ok & a_ok[rest][:, :, None] & (d_b[:, None, :] >= 0) & (d_b[:, None, :] != ws[:, None, None])
                     & (new + EPS < cur[rest][:, None, None]))
            valid = valid.reshape(valid.shape[0], -1)
            first = xp.argmax(valid, axis=1)
            found = valid.any(axis=1)
            fr = xp.nonzero(found)[0]
            Nn = b_ord.shape[1]
            ai = a_idx[rest][fr, first[fr] // Nn]
            bi = b_ord[fr, first[fr] % Nn]
            st.apply(rl[fr], ws[fr], d_b[fr, first[fr] % Nn], ai, bi)
            done[rest[~found]] = True
        lanes = lanes[~done]


def _pair_swaps(st: LaneState, lanes, rounds: int = 12):
    """Phase 2: up to ``rounds`` best swaps between the worst and the second-worst GPU."""
    xp, bt = st.xp, st.b
    lanes = lanes[bt.n_gpus[lanes] > 1]
    for _ in range(rounds):
        if lanes.shape[0] == 0:
            break
        kv = st.kv(lanes)
        r = xp.arange(lanes.shape[0])
        worst = xp.argmax(kv, axis=1)
        cur = kv[r, worst]
        kv2 = kv.copy()
        kv2[r, worst] = -INF
        second = xp.argmax(kv2, axis=1)
        t3 = top3(xp, kv, bt.gpu_mask[lanes])
        a_idx, a_ok = st.members(lanes, worst)
        b_idx, b_ok = st.members(lanes, second)
        new, ok = st.eval_transfers(lanes, t3, worst[:, None, None], second[:, None, None],
                                    a_idx[:, :, None], b_idx[:, None, :])
        valid = (ok & a_ok[:, :, None] & b_ok[:, None, :]).reshape(lanes.shape[0], -1)
        flat, m = first_of_min(xp, new.reshape(lanes.shape[0], -1), valid)
        do = xp.nonzero(m + EPS < cur)[0]
        Kb = b_idx.shape[1]
        st.apply(lanes[do], worst[do], second[do], a_idx[do, flat[do] // Kb], b_idx[do, flat[do] % Kb])
        lanes = lanes[do]


@quiet_fp
def refine_peak(batch: Batch, assign, pos, passes: int = 2, top_k: int = 12, engine: ArrayEngine | None = None):
    """Batched :func:`kvgpu.reference.refine_peak`; returns the new ``(assign, pos)``.  ``engine``:
    see :class:`kvgpu.batch.array_engine.ArrayEngine` (None: the plain array code)."""
    st = LaneState(batch, assign, pos, engine)
    xp = st.xp
    L, N, G = batch.shape
    lanes = xp.arange(L)
    gids = xp.arange(G)
    n_w_max = max(1, top_k // 2)
    for _ in range(passes):
        if lanes.shape[0] == 0:
            break
        Lp = lanes.shape[0]
        r = xp.arange(Lp)
        kv = st.kv(lanes)
        worst = xp.argmax(kv, axis=1)
        cur = kv[r, worst]
        t3 = top3(xp, kv, batch.gpu_mask[lanes])
        # targets: the two lowest-KVPR GPUs other than the worst, GPU id order among equals
        excl = ~batch.gpu_mask[lanes] | (gids[None, :] == worst[:, None])
        tord = argsort_stable(xp, xp.where(excl, INF, kv))  # ascending KVPR, then real GPUs first
        tord = xp.take_along_axis(tord, argsort_stable(xp, xp.take_along_axis(excl, tord, axis=1)), axis=1)[:, :2]
        t_ok = ~xp.take_along_axis(excl, tord, axis=1)
        # donors: top by demand, then top by size, duplicates dropped; list order among equals
        asg, p = st.assign[lanes], st.pos[lanes]
        on = asg == worst[:, None]
        n_on = on.sum(axis=1)
        rank_w = inverse_perm(xp, sort_desc(xp, [batch.demand[lanes], -p], on))
        rank_s = inverse_perm(xp, sort_desc(xp, [batch.sizes[lanes], -p], on))
        n_w = xp.minimum(n_w_max, n_on)
        k_s = xp.maximum(1, top_k - n_w)
        in_w = on & (rank_w < n_w[:, None])
        donor = in_w | (on & (rank_s < k_s[:, None]))
        key = xp.where(in_w, rank_w, n_w[:, None] + rank_s)
        D = min(N, top_k)
        d_idx = argsort_stable(xp, xp.where(donor, key, N + top_k))[:, :D]
        d_ok = xp.take_along_axis(donor, d_idx, axis=1)
        new, ok = st.eval_transfers(lanes, t3, worst[:, None, None], tord[:, None, :], d_idx[:, :, None],
                                    xp.full((1, 1, 1), -1))
        valid = (ok & d_ok[:, :, None] & t_ok[:, None, :]).reshape(Lp, -1)
        flat, m = first_of_min(xp, new.reshape(Lp, -1), valid)
        do = xp.nonzero(m + EPS < cur)[0]
        nt = tord.shape[1]
        st.apply(lanes[do], worst[do], tord[do, flat[do] % nt], d_idx[do, flat[do] // nt], xp.full(do.shape, -1))
        lanes = lanes[do]
    return st.assign, st.pos
