import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

from kvgpu.kernels.deltas import safe_div
from kvgpu.problem import make_instance

DATA = Path(__file__).parent / "data"
FULL = os.environ.get("KVGPU_FULL") == "1"

# The CUDA tier (tests/cuda) runs only under the CUDA simulator or on a device, with its checks
# loaded as a plugin (tests/cuda/tier.py); elsewhere the main run skips the folder.
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("KVGPU_CUDA_TIER") == "device":
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "cuda"))  # tier.py, parity.py, fake_cupy.py
    pytest_plugins = ["tier"]
else:
    collect_ignore_glob = ["cuda/test_*.py"]


def load(name):
    return json.loads((DATA / name).read_text())["cases"]


@pytest.fixture(scope="session")
def seed_functions():
    return load("seed_functions.json")


@pytest.fixture(scope="session")
def seed_cases():
    return load("seed_pipeline_cases.json")


@pytest.fixture(scope="session")
def adrs50():
    return load("adrs50.json")


def close(a, b, rtol=1e-9):
    """Float equality to ``rtol``; infinities must match exactly."""
    a, b = float(a), float(b)
    if a == b:
        return True
    return bool(np.isfinite(a) and np.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b)))


def padded(insts):
    """Keyword arguments of ``kvgpu.solve_batch`` for validated instances, padded by hand (kept
    independent of the engine's own padding code)."""
    B, N, G = len(insts), max(i.n_models for i in insts), max(i.n_gpus for i in insts)
    sizes, demand, mem = np.zeros((B, N)), np.zeros((B, N)), np.zeros((B, G))
    mm, gm = np.zeros((B, N), bool), np.zeros((B, G), bool)
    for b, i in enumerate(insts):
        sizes[b, :i.n_models], demand[b, :i.n_models], mm[b, :i.n_models] = i.sizes, i.demand, True
        mem[b, :i.n_gpus], gm[b, :i.n_gpus] = i.gpu_mem, True
    return dict(sizes=sizes, demand=demand, gpu_mem=mem, model_mask=mm, gpu_mask=gm)


def brute_force_optimum(inst):
    """The optimal max KVPR by trying every assignment (tiny instances only)."""
    s, w, M = inst.py
    best = np.inf
    for a in itertools.product(range(inst.n_gpus), repeat=inst.n_models):
        S = [0.0] * inst.n_gpus
        W = [0.0] * inst.n_gpus
        for i, g in enumerate(a):
            S[g] += s[i]
            W[g] += w[i]
        if all(S[g] <= M[g] for g in range(inst.n_gpus)):
            best = min(best, max(safe_div(W[g], M[g] - S[g]) for g in range(inst.n_gpus)))
    return best


@st.composite
def tiny_instances(draw, max_gpus=3, max_models=6):
    """Valid instances small enough for :func:`brute_force_optimum`: 1-3 GPUs of 40/80/141 GB
    (equal or mixed), up to 6 models of 1-60 GB, rates 0-9, SLOs 1-9."""
    g = draw(st.integers(1, max_gpus))
    mem = draw(st.one_of(st.lists(st.sampled_from([40.0, 80.0, 141.0]), min_size=g, max_size=g),
                         st.sampled_from([40.0, 80.0]).map(lambda m: [m] * g)))
    models = draw(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 9), st.integers(1, 9)), min_size=1,
                           max_size=max_models))
    models = [m for m in models if m[0] <= max(mem)]
    assume(models and sum(m[0] for m in models) <= sum(mem))
    return make_instance(models, g, mem)


def brute_force_problem(prob, lex=False):
    """The optimal max KVPR of a constrained :class:`kvgpu.problem.Problem` and a placement
    reaching it, by trying every assignment of items to GPUs (tiny problems only).  The rules
    as an operator states them: allowed GPUs, a model's items on distinct GPUs, node groups
    inside one node, memory, and -- for a re-placement -- the budget counted per model: a
    model moves when one of its running shards has to be copied (``min(shards, running) -
    |new GPUs & current GPUs|`` shards: copies beyond its shards stop, new copies load), at
    most ``max_moves`` models and ``max_migrated_gb`` GB.
    Returns ``(inf, None)`` when nothing satisfies them.  ``lex=True``: the balanced optimum
    instead -- ``(sorted KVPRs, placement)``, the least sorted vector of GPU KVPRs (largest
    first, compared term by term, exactly)."""
    inst = prob.items
    A, ok, S, W = brute_assignments(prob)
    if not ok.any():
        return np.inf, None
    with np.errstate(divide="ignore", invalid="ignore"):
        kv = np.where(inst.gpu_mem[None, :] - S > 0, W / (inst.gpu_mem[None, :] - S), np.where(W > 0, np.inf, 0.0))
    if lex:
        vec = -np.sort(-kv[ok], axis=1)
        k = int(np.lexsort(vec.T[::-1])[0])  # the first column is the primary key
        return vec[k], A[ok][k]
    top2 = -np.sort(-kv, axis=1)[:, :2] if kv.shape[1] > 1 else np.concatenate([kv, np.zeros_like(kv)], axis=1)
    top2 = np.where(ok[:, None], top2, np.inf)
    k = int(np.lexsort((top2[:, 1], top2[:, 0]))[0])  # least max, then least second max
    return float(top2[k, 0]), A[k]


def brute_assignments(prob, demand=None):
    """Every assignment of a tiny problem's items to GPUs and which keep its rules (those of
    :func:`brute_force_problem`): ``(A (C, n), ok (C,) bool, S (C, G) GB, L)`` with ``L`` the
    demand per GPU, (C, G) -- or (C, G, W) for per-window item demand ``demand`` (n, W)."""
    from kvgpu.kernels.deltas import fits

    inst = prob.items
    n, G = inst.n_models, inst.n_gpus
    A = np.array(list(itertools.product(range(G), repeat=n)), dtype=np.int64).reshape(-1, n)
    ok = np.ones(A.shape[0], bool)
    if prob.allowed.shape[0]:
        ok &= prob.allowed[np.arange(n)[None, :], A].astype(bool).all(axis=1)
    for grp, cmp in ((prob.group, np.not_equal), (prob.node_group, None)):
        if not grp.shape[0]:
            continue
        for i in range(n):
            for j in range(i + 1, n):
                if grp[i] >= 0 and grp[i] == grp[j]:
                    if cmp is None:
                        ok &= prob.node_of[A[:, i]] == prob.node_of[A[:, j]]
                    else:
                        ok &= A[:, i] != A[:, j]
    ok &= ~np.isin(A, list(prob.out_of_service)).any(axis=1)  # stated apart from ``allowed``
    for m, a_items, b_items in colocated_items(prob):  # an adapter beside one of its base's items
        for i in a_items:
            ok &= (A[:, [i]] == A[:, b_items]).any(axis=1)
    w = inst.demand if demand is None else demand
    S = np.zeros((A.shape[0], G))
    W = np.zeros((A.shape[0], G) + w.shape[1:])
    for i in range(n):
        np.add.at(S, (np.arange(A.shape[0]), A[:, i]), inst.sizes[i])
        np.add.at(W, (np.arange(A.shape[0]), A[:, i]), w[i])
    ok &= fits(S, inst.gpu_mem[None, :]).all(axis=1)
    if prob.is_replan:
        moved = np.zeros(A.shape[0], np.int64)
        gb = np.zeros(A.shape[0])
        for m, spec in enumerate(prob.specs):
            items = np.nonzero(prob.model_of == m)[0]
            cur = prob.running[m]
            if not cur:
                continue
            hit = np.zeros(A.shape[0], np.int64)
            for g in cur:
                hit += (A[:, items] == g).any(axis=1)
            copies = np.maximum(0, min(len(items), len(cur)) - hit)
            moved += copies > 0
            gb += copies * spec.size / spec.tp
        if prob.max_moves >= 0:
            ok &= moved <= prob.max_moves
        ok &= gb <= prob.max_migrated_gb * (1 + 1e-9) + 1e-12
    return A, ok, S, W


def colocated_items(prob):
    """``(model, adapter items, base items)`` of each model with ``colocate_with``, found by the
    base's name in the specs (independently of the problem's rule arrays)."""
    out = []
    for m, spec in enumerate(prob.specs):
        if spec.colocate_with is not None:
            base = next(k for k, b in enumerate(prob.specs) if b.name == spec.colocate_with)
            out.append((m, np.nonzero(prob.model_of == m)[0], np.nonzero(prob.model_of == base)[0]))
    return out


def check_placement(prob, p, node_of=None):
    """Assert that ``p`` keeps every rule of ``prob`` (the independent check of the tests) and
    return the number of moved models.  ``node_of`` (G,): each GPU's node, to check ``node: K``."""
    from kvgpu.kernels.deltas import fits

    a = p.assignment
    inst = prob.items
    assert a.shape == (inst.n_models,) and ((0 <= a) & (a < inst.n_gpus)).all()
    S = np.bincount(a, weights=inst.sizes, minlength=inst.n_gpus)
    assert fits(S, inst.gpu_mem).all(), "memory broken"
    for m, spec in enumerate(prob.specs):
        items = np.nonzero(prob.model_of == m)[0]
        gs = a[items].tolist()
        assert len(set(gs)) == len(gs), f"{spec.where}: shards share a GPU"
        if spec.pin is not None:  # one GPU per shard; a model's shards are interchangeable
            assert sorted(gs) == sorted(spec.pin), f"{spec.where}: pin broken"
        assert not set(gs) & set(spec.forbid), f"{spec.where}: forbidden GPU used"
        assert not set(gs) & set(prob.out_of_service), f"{spec.where}: a GPU out of service used"
        if spec.node is not None and node_of is not None:
            assert {int(node_of[g]) for g in gs} == {spec.node}, f"{spec.where}: outside its node"
    for m, a_items, b_items in colocated_items(prob):
        assert set(a[a_items].tolist()) <= set(a[b_items].tolist()), f"{prob.specs[m].where}: not beside its base"
    if prob.node_group.shape[0]:
        for k in set(prob.node_group.tolist()) - {-1}:
            nodes = {int(prob.node_of[g]) for g in a[prob.node_group == k]}
            assert len(nodes) == 1, "tp shards straddle nodes"
    moved = 0
    if prob.is_replan:
        gb = 0.0
        for m, spec in enumerate(prob.specs):
            items = np.nonzero(prob.model_of == m)[0]
            cur = set(prob.running[m])
            copies = max(0, min(len(items), len(cur)) - len(cur & set(a[items].tolist())))
            moved += copies > 0
            gb += copies * spec.size / spec.tp
        if prob.max_moves >= 0:
            assert moved <= prob.max_moves, "over the move budget"
        assert gb <= prob.max_migrated_gb * (1 + 1e-9) + 1e-12, "over the GB budget"
        assert p.moved_models == moved
    return moved


def check_plan_executable(prob, p):
    """Replay ``p.plan`` from the current placement: every step lands where there is room
    (unless the plan says it needs a cycle broken), and it ends at ``p.assignment``."""
    from kvgpu.kernels.deltas import fits

    inst = prob.items
    used = np.zeros(inst.n_gpus)
    sets = {m: set(prob.running[m]) for m in range(len(prob.specs))}
    for m, gpus in enumerate(prob.running):
        used[list(gpus)] += inst.sizes[np.nonzero(prob.model_of == m)[0][0]]
    for step in p.plan:
        m = step.index
        size = inst.sizes[np.nonzero(prob.model_of == m)[0][0]]
        assert step.src >= 0 or step.dst >= 0
        if step.dst >= 0:
            if p.plan_note is None:
                assert fits(used[step.dst] + size, inst.gpu_mem[step.dst]), f"step {step} does not fit"
            assert step.dst not in sets[m]
            used[step.dst] += size
            sets[m].add(step.dst)
        if step.src >= 0:
            assert step.src in sets[m]
            sets[m].discard(step.src)
            used[step.src] -= size
    for m in sets:
        assert sets[m] == set(p.assignment[prob.model_of == m].tolist())
