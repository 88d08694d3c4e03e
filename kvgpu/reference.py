"""The seed pipeline on one instance, in plain Python (SPEC.md, "The seed pipeline").

This module is the readable specification in code: one function per step,
scalar loops, no arrays.  The batch engine (:mod:`kvgpu.batch`) must take the
same decisions; both evaluate transfers with :mod:`kvgpu.kernels.deltas`.

A placement here is ``list[list[int]]``: for each GPU id, the indices of its
models in insertion order (a moved model goes to the end of its new list).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from kvgpu import seed_bound as bounds
from kvgpu.kernels import params
from kvgpu.kernels.deltas import EPS, INF, fits, safe_div, transfer_loads, transfer_new_max
from kvgpu.errors import NoPlacementFound
from kvgpu.problem import DEFAULT_GPU_MEM, Instance, make_instance, score_tuple

Placement = list  # list[list[int]]

# (ordering, policy) pairs tried, in this order, to decide whether a T is feasible.
FEASIBILITY_VARIANTS = tuple(zip(params.FEAS_ORDERING, (params.POLICY_NAMES[p] for p in params.FEAS_POLICY)))
POLICIES = params.POLICY_NAMES
T_FACTORS = params.T_FACTORS
RETUNE_FRACTIONS = params.RETUNE_FRACTIONS


# --------------------------------------------------------------------------- helpers

def loads(plc: Placement, inst: Instance) -> tuple[list[float], list[float]]:
    """Per-GPU size ``S`` and demand ``W``, summed in list order (as the seed does)."""
    s, w, _ = inst.py
    return [float(sum(s[i] for i in lst)) for lst in plc], [float(sum(w[i] for i in lst)) for lst in plc]


def kvprs(plc: Placement, inst: Instance) -> list[float]:
    S, W = loads(plc, inst)
    M = inst.py[2]
    return [safe_div(W[g], M[g] - S[g]) for g in range(len(plc))]


def score(plc: Placement, inst: Instance) -> tuple[float, float, float]:
    """The score tuple ``(max, second, mean)`` of a placement."""
    return score_tuple(kvprs(plc, inst))


def argmax_first(vals: Sequence[float], skip: int = -1) -> int:
    """Index of the first largest value (ignoring index ``skip``)."""
    best = -1
    for g, v in enumerate(vals):
        if g != skip and (best < 0 or v > vals[best]):
            best = g
    return best


def top3(vals: Sequence[float]) -> list[tuple[float, int]]:
    """The three largest ``(value, index)``, first index kept among equals; padded with ``(-inf, -1)``."""
    order = sorted(range(len(vals)), key=lambda g: -vals[g])[:3]
    out = [(vals[g], g) for g in order]
    return out + [(-INF, -1)] * (3 - len(out))


def max_excluding(t3, a: int, b: int) -> float:
    """Max KVPR over the GPUs other than ``a`` and ``b``, from :func:`top3` (O(1))."""
    for v, g in t3:
        if g != a and g != b:
            return v
    return -INF


def assignment_of(plc: Placement, n: int) -> list[int]:
    out = [-1] * n
    for g, lst in enumerate(plc):
        for i in lst:
            out[i] = g
    return out


def placement_of(assignment: Sequence[int], n_gpus: int) -> Placement:
    """Lists per GPU in model index order (how the reference data builds its starts)."""
    plc = [[] for _ in range(n_gpus)]
    for i, g in enumerate(assignment):
        plc[g].append(i)
    return plc


# --------------------------------------------------------------------------- 1a. parametric packing

def _order_key(ordering: int, inst: Instance, T: float, m_max: float) -> Callable[[int], tuple]:
    s, w, _ = inst.py
    if ordering == 0:
        return lambda i: (w[i] + T * s[i], w[i], s[i])
    if ordering == 1:
        return lambda i: (safe_div(w[i], m_max - s[i]), s[i])
    return lambda i: (safe_div(w[i], s[i]), w[i])


def pack(inst: Instance, T: float, ordering: int, policy: str) -> Placement | None:
    """Place models one by one at target ``T``; ``None`` if some model fits nowhere.

    A model fits on ``g`` if memory fits and ``T*M_g - (load_g + w + T*s) >= -EPS``.
    ``T`` is raised at the retune points (40% and 75% of the models placed).
    """
    s, w, M = inst.py
    N, G = inst.n_models, inst.n_gpus
    m_max = max(M)
    M_total = sum(M)
    remaining = sorted(range(N), key=_order_key(ordering, inst, T, m_max), reverse=True)
    plc: Placement = [[] for _ in range(G)]
    S, W, load = [0.0] * G, [0.0] * G, [0.0] * G
    retune_at = [max(1, int(f * N)) for f in RETUNE_FRACTIONS]
    placed = 0
    while remaining:
        i = remaining.pop(0)
        g = _choose_gpu(policy, T, s[i], w[i], S, W, load, M, M_total)
        if g < 0:
            return None
        plc[g].append(i)
        S[g] += s[i]
        W[g] += w[i]
        load[g] += w[i] + T * s[i]
        placed += 1
        for r, at in enumerate(retune_at):
            if remaining and placed == at:
                placed_size = sum(S)
                new_T = max(T, bounds.seed_retune_bound(s, w, M, remaining, placed_size, first=(r == 0)))
                if new_T > T + EPS:
                    T = new_T
                    load = [W[h] + T * S[h] for h in range(G)]
                    if ordering == 0 and r == 0:
                        remaining = sorted(remaining, key=_order_key(0, inst, T, m_max), reverse=True)
    return plc


def _choose_gpu(policy, T, s, w, S, W, load, M, M_total) -> int:
    """GPU for one model under ``policy`` (smallest key wins, first GPU among equals); -1 if none fits."""
    G = len(S)
    kv = [safe_div(W[g], M[g] - S[g]) for g in range(G)]
    t3 = top3(kv)
    if policy == "hybrid":
        Tf = max(T, 1e-12)
        mean_kv = sum(kv) / G
        var = sum((v - mean_kv) ** 2 for v in kv) / G
        a = 0.25 if var < 0.02 * Tf * Tf else 0.15
        mean_frac = (sum(S) + s) / M_total
    best_key, best_g = None, -1
    for g in range(G):
        if not fits(S[g] + s, M[g]):
            continue
        resid = T * M[g] - (load[g] + w + T * s)
        if resid < -EPS:
            continue
        free_after = M[g] - (S[g] + s)
        if policy == "resid":
            key = (resid, -free_after, g)
        else:
            newlocal = safe_div(W[g] + w, free_after)
            newmax = max(newlocal, max_excluding(t3, g, g))
            if policy == "minmax":
                key = (newmax, newlocal, resid, -free_after, g)
            else:
                J = newmax / Tf + a * newlocal / Tf + 0.05 * abs((S[g] + s) / M[g] - mean_frac)
                key = (J, newmax, newlocal, resid, -free_after, g)
        if best_key is None or key < best_key:
            best_key, best_g = key, g
    return best_g


def feasible(inst: Instance, T: float) -> bool:
    """``T`` is feasible if the first of the seven variants packs."""
    return any(pack(inst, T, o, p) is not None for o, p in FEASIBILITY_VARIANTS)


def search_T(inst: Instance) -> float | None:
    """Smallest feasible ``T`` found by doubling from ``low_T`` then 40 bisection steps."""
    lo = bounds.seed_start_bound(*inst.py)
    T = max(lo, 1e-9)
    hi = None
    for _ in range(50):
        if feasible(inst, T):
            hi = T
            break
        T *= 2
    if hi is None:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        if feasible(inst, mid):
            hi = mid
        else:
            lo = mid
    return hi


def parametric_candidates(inst: Instance) -> list[Placement]:
    T_high = search_T(inst)
    if T_high is None:
        return []
    out = []
    for f in T_FACTORS:
        for policy in POLICIES:
            for ordering in (0, 1, 2):
                plc = pack(inst, T_high * f, ordering, policy)
                if plc is not None:
                    out.append(plc)
    return out


# --------------------------------------------------------------------------- 1b/1c. other candidates

def regret_insertion(inst: Instance) -> Placement | None:
    """Place the model whose best and second-best GPU (by resulting max KVPR) differ most."""
    s, w, M = inst.py
    G = inst.n_gpus
    plc: Placement = [[] for _ in range(G)]
    S, W = [0.0] * G, [0.0] * G
    unplaced = list(range(inst.n_models))
    while unplaced:
        kv = [safe_div(W[g], M[g] - S[g]) for g in range(G)]
        t3 = top3(kv)
        pick, pick_g, best_regret, best_newmax = -1, -1, -INF, INF
        for i in unplaced:
            opts = []
            for g in range(G):
                if fits(S[g] + s[i], M[g]):
                    newlocal = safe_div(W[g] + w[i], M[g] - (S[g] + s[i]))
                    opts.append((max(newlocal, max_excluding(t3, g, g)), newlocal, g))
            if not opts:
                continue
            opts.sort(key=lambda o: (o[0], o[1]))
            second = opts[1][0] if len(opts) > 1 else INF
            regret = second - opts[0][0]  # inf - inf is NaN, and NaN never wins below
            if regret > best_regret or (regret == best_regret and opts[0][0] < best_newmax):
                pick, pick_g, best_regret, best_newmax = i, opts[0][2], regret, opts[0][0]
        if pick < 0:
            return None
        unplaced.remove(pick)
        plc[pick_g].append(pick)
        S[pick_g] += s[pick]
        W[pick_g] += w[pick]
    return plc


def memory_pack(inst: Instance, order: Sequence[int], n_most_free: int, rule: str = "best") -> Placement | None:
    """Memory-only packing: the first ``n_most_free`` models go to the GPU with most free memory,
    the rest by ``rule``: "best" fit (key ``(free_after, newlocal, g)``), "most" free, or "first" fit."""
    s, w, M = inst.py
    G = inst.n_gpus
    plc: Placement = [[] for _ in range(G)]
    S, W = [0.0] * G, [0.0] * G
    for k, i in enumerate(order):
        best_key, best_g = None, -1
        for g in range(G):
            if not fits(S[g] + s[i], M[g]):
                continue
            free_after = M[g] - (S[g] + s[i])
            newlocal = safe_div(W[g] + w[i], free_after)
            if k < n_most_free or rule == "most":
                key = (-free_after, newlocal, g)
            elif rule == "best":
                key = (free_after, newlocal, g)
            else:
                key = (g,)
            if best_key is None or key < best_key:
                best_key, best_g = key, g
        if best_g < 0:
            return None
        plc[best_g].append(i)
        S[best_g] += s[i]
        W[best_g] += w[i]
    return plc


def size_order(inst: Instance) -> list[int]:
    s, w, _ = inst.py
    return sorted(range(inst.n_models), key=lambda i: (s[i], w[i]), reverse=True)


def density_order(inst: Instance) -> list[int]:
    s, w, _ = inst.py
    return sorted(range(inst.n_models), key=lambda i: (safe_div(w[i], s[i]), w[i]), reverse=True)


def candidates(inst: Instance) -> list[Placement]:
    """All candidates of step 1, in the seed's order."""
    out = parametric_candidates(inst)
    for plc in (regret_insertion(inst),
                memory_pack(inst, size_order(inst), int(params.DUAL_MOST_FREE_SHARE * inst.n_models)),
                memory_pack(inst, density_order(inst), 0)):
        if plc is not None:
            out.append(plc)
    if not out:
        for rule in ("best", "most", "first"):
            plc = memory_pack(inst, size_order(inst), 0, rule)
            if plc is not None:
                return [plc]
    return out


# --------------------------------------------------------------------------- 2. improve_local

class _Gpus:
    """Mutable per-GPU state of one placement: lists, S, W and KVPR."""

    def __init__(self, plc: Placement, inst: Instance):
        self.inst = inst
        self.plc = [list(x) for x in plc]
        self.S, self.W = loads(self.plc, inst)
        M = inst.py[2]
        self.kv = [safe_div(self.W[g], M[g] - self.S[g]) for g in range(len(plc))]

    def transfer(self, src: int, dst: int, a: int, b: int, others: float) -> float | None:
        """New global max if model ``a`` goes src -> dst (and ``b`` dst -> src when ``b >= 0``);
        ``None`` when memory does not fit."""
        s, w, M = self.inst.py
        s_in, w_in = (s[b], w[b]) if b >= 0 else (0.0, 0.0)
        Ss, Ws, Sd, Wd = transfer_loads(self.S[src], self.W[src], self.S[dst], self.W[dst], s[a], w[a], s_in, w_in)
        if not (fits(Ss, M[src]) and fits(Sd, M[dst])):
            return None
        return transfer_new_max(safe_div(Ws, M[src] - Ss), safe_div(Wd, M[dst] - Sd), others)

    def apply(self, src: int, dst: int, a: int, b: int) -> None:
        s, w, M = self.inst.py
        s_in, w_in = (s[b], w[b]) if b >= 0 else (0.0, 0.0)
        self.S[src], self.W[src], self.S[dst], self.W[dst] = transfer_loads(
            self.S[src], self.W[src], self.S[dst], self.W[dst], s[a], w[a], s_in, w_in)
        self.plc[src].remove(a)
        self.plc[dst].append(a)
        if b >= 0:
            self.plc[dst].remove(b)
            self.plc[src].append(b)
        for g in (src, dst):
            self.kv[g] = safe_div(self.W[g], M[g] - self.S[g])


def best_move(st: _Gpus, worst: int):
    """Best move of a model off ``worst`` (first among equals); ``None`` unless it improves."""
    t3 = top3(st.kv)
    best, action = st.kv[worst], None
    for a in st.plc[worst]:
        for d in range(len(st.plc)):
            if d == worst:
                continue
            new = st.transfer(worst, d, a, -1, max_excluding(t3, worst, d))
            if new is not None and new + EPS < best:
                best, action = new, (worst, d, a, -1)
    return action


def first_swap(st: _Gpus, worst: int):
    """First improving swap of a model on ``worst`` with a model on any other GPU."""
    t3 = top3(st.kv)
    cur = st.kv[worst]
    for a in st.plc[worst]:
        for d in range(len(st.plc)):
            if d == worst:
                continue
            others = max_excluding(t3, worst, d)
            for b in st.plc[d]:
                new = st.transfer(worst, d, a, b, others)
                if new is not None and new + EPS < cur:
                    return (worst, d, a, b)
    return None


def best_pair_swap(st: _Gpus, src: int, dst: int):
    """Best improving swap between GPUs ``src`` and ``dst``."""
    others = max_excluding(top3(st.kv), src, dst)
    best, action = max(st.kv), None
    for a in st.plc[src]:
        for b in st.plc[dst]:
            new = st.transfer(src, dst, a, b, others)
            if new is not None and new + EPS < best:
                best, action = new, (src, dst, a, b)
    return action


def improve_local(plc: Placement, inst: Instance, max_iters: int = 4000) -> Placement:
    """Moves then swaps out of the worst GPU until neither helps (at most ``max_iters`` steps),
    then up to 12 best swaps between the worst and second-worst GPU."""
    st = _Gpus(plc, inst)
    for _ in range(max_iters):
        worst = argmax_first(st.kv)
        action = best_move(st, worst) or first_swap(st, worst)
        if action is None:
            break
        st.apply(*action)
    if len(st.plc) > 1:
        for _ in range(12):
            worst = argmax_first(st.kv)
            action = best_pair_swap(st, worst, argmax_first(st.kv, skip=worst))
            if action is None:
                break
            st.apply(*action)
    return st.plc


# --------------------------------------------------------------------------- 4. refine_peak

def donors(st: _Gpus, worst: int, top_k: int = 12) -> list[int]:
    """Top ``top_k // 2`` models of ``worst`` by demand, then the top ``max(1, top_k - that)`` by size."""
    lst = st.plc[worst]
    by_w = sorted(lst, key=lambda i: st.inst.py[1][i], reverse=True)[:max(1, top_k // 2)]
    by_s = sorted(lst, key=lambda i: st.inst.py[0][i], reverse=True)[:max(1, top_k - len(by_w))]
    return list(dict.fromkeys(by_w + by_s))


def refine_peak(plc: Placement, inst: Instance, passes: int = 2, top_k: int = 12) -> Placement:
    """Donate one model from the worst GPU to one of the two lowest-KVPR GPUs, if that strictly
    lowers the global max; ``passes`` times, stopping early when nothing helps."""
    st = _Gpus(plc, inst)
    G = len(st.plc)
    for _ in range(passes):
        worst = argmax_first(st.kv)
        targets = [g for g in sorted(range(G), key=lambda g: st.kv[g]) if g != worst][:2]
        if not targets or not st.plc[worst]:
            break
        t3 = top3(st.kv)
        best, action = st.kv[worst], None
        for a in donors(st, worst, top_k):
            for d in targets:
                new = st.transfer(worst, d, a, -1, max_excluding(t3, worst, d))
                if new is not None and new + EPS < best:
                    best, action = new, (worst, d, a, -1)
        if action is None:
            break
        st.apply(*action)
    return st.plc


# --------------------------------------------------------------------------- the pipeline

def seed_pipeline(inst: Instance, trace: dict | None = None) -> Placement:
    """Steps 1-5 of the seed pipeline; ``trace`` (if given) receives the score tuple after
    selection, after refine_peak and at the end."""
    best, best_score = None, None
    for cand in candidates(inst):
        plc = improve_local(cand, inst, 4000)
        sc = score(plc, inst)
        if best_score is None or sc < best_score:
            best, best_score = plc, sc
    if best is None:
        raise NoPlacementFound("no candidate packing fits the models in GPU memory")
    if trace is not None:
        trace["selected"] = best_score
    best = refine_peak(best, inst)
    if trace is not None:
        trace["after_refine_peak"] = score(best, inst)
    best = improve_local(best, inst, 1500)
    if trace is not None:
        trace["final"] = score(best, inst)
    return best


def compute_model_placement(gpu_num: int, models: Sequence[Any], gpu_mem=DEFAULT_GPU_MEM) -> dict:
    """The seed pipeline with the ADRS evaluator's signature: ``{gpu_id: [model, ...]}`` for every
    GPU id, holding the caller's own model objects."""
    inst = make_instance(models, gpu_num, gpu_mem)
    plc = seed_pipeline(inst)
    return {g: [inst.objects[i] for i in plc[g]] for g in range(gpu_num)}
