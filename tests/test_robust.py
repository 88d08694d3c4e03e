"""The robust objective over demand windows (kvgpu.robust): brute force on tiny instances is
the oracle (optimal rate, validity, bound), W = 1 is today's solve bit for bit, and the rules
the robust engine does not keep are refused by name."""

import numpy as np
import pytest

import kvgpu
from kvgpu import robust
from kvgpu.problem import build_problem
from kvgpu.results import Placement

from conftest import brute_assignments, check_placement

#: The robust engine at default effort must be optimal on at least this share of tiny instances.
OPTIMAL_SHARE = 0.98
N_TINY = 120


def tiny_case(seed: int, rules: bool, gpus: int | None = None):
    """2-4 GPUs (80 GB, or 40/80 mixed), 2-7 models, 2-6 windows of bursty demand: a base
    rate per model, and in each window a random group of models 3-8x busier.  With ``rules``:
    one model tp=2 (two shards on distinct GPUs) and one pinned or forbidding a GPU."""
    rng = np.random.default_rng(seed)
    G, n, W = int(rng.integers(2, 5)), int(rng.integers(2, 8)), int(rng.integers(2, 7))
    G = G if gpus is None else gpus
    mem = [80.0] * G if rng.random() < 0.6 else [float(rng.choice([40.0, 80.0])) for _ in range(G)]
    models = []
    for i in range(n):
        models.append({"name": f"m{i}", "model_size": float(rng.integers(4, 30)), "req_rate": 1.0,
                       "slo": float(rng.integers(1, 6))})
    while sum(m["model_size"] for m in models) > 0.8 * sum(mem):
        models.pop()
    n = len(models)
    if rules and n >= 2:
        models[0]["tp"] = 2
        if rng.random() < 0.5:
            models[1]["pin"] = [int(rng.integers(0, G))]
        else:
            models[1]["forbid"] = [int(rng.integers(0, G))]
    base = rng.uniform(0.2, 3.0, n)
    D = base[:, None] * rng.uniform(0.5, 1.5, (n, W))
    for t in range(W):
        busy = rng.random(n) < 0.4
        D[busy, t] *= rng.uniform(3, 8)
    return models, G, mem, D


def brute_windows(prob, wd):
    """The robust optimum of a tiny problem by trying every assignment (the tests' oracle)."""
    A, ok, S, L = brute_assignments(prob, wd)
    free = prob.items.gpu_mem[None, :, None] - S[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kv = np.where(free > 0, L / free, np.where(L > 0, np.inf, 0.0))
    v = np.where(ok, kv.max(axis=(1, 2)), np.inf)
    return float(v.min())


def _cases():
    """(seed, rules, cluster options): a third with rules; some with reserve_gb, a GPU out of
    service, or nodes of 2 GPUs (the tp=2 model's shards share a node)."""
    for seed in range(N_TINY):
        extra = {1: {"reserve_gb": 3.0}, 2: {"out_of_service": [0]}, 3: {"gpus_per_node": 2}}.get(seed % 5, {})
        yield seed, seed % 3 == 0, extra


def test_tiny_instances_against_brute_force():
    optimal, tried, proven = 0, 0, 0
    for seed, rules, extra in _cases():
        models, G, mem, D = tiny_case(seed, rules)
        if ("out_of_service" in extra and (G < 3 or any(m.get("pin") == [0] for m in models))) or \
                ("gpus_per_node" in extra and G % 2):
            extra = {}
        prob = build_problem(models, G, mem, **extra)
        wd = robust.item_demand(prob, D)
        opt = brute_windows(prob, wd)
        p = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False, **extra)  # the heuristic alone
        check_placement(prob, p)
        assert p.kvpr_by_window.shape == (D.shape[1], G)
        assert np.array_equal(p.kvpr, p.kvpr_by_window.max(axis=0))
        assert p.max_kvpr >= opt * (1 - 1e-9), (seed, p.max_kvpr, opt)
        assert p.lower_bound <= opt * (1 + 1e-9), (seed, p.lower_bound, opt, p.bound_source)
        optimal += p.max_kvpr <= opt * (1 + 1e-9)
        tried += 1
        q = kvgpu.solve(models, G, gpu_mem=mem, demand=D, **extra)  # default: tiny problems are enumerated
        check_placement(prob, q)
        assert q.proven and q.max_kvpr <= opt * (1 + 1e-9) and q.lower_bound <= opt * (1 + 1e-9)
        proven += q.proven_optimal
    print(f"robust heuristic optimal on {optimal}/{tried} tiny instances; default (enumerated) proven on {proven}")
    assert optimal >= OPTIMAL_SHARE * tried
    assert proven == tried


def test_tp_shards_share_a_node():
    """4 GPUs in nodes of 2, a tp=2 model (and a pin or forbid): brute force over placements
    that keep the shards in one node."""
    optimal = 0
    for seed in range(300, 330):
        models, G, mem, D = tiny_case(seed, True, gpus=4)
        prob = build_problem(models, G, mem, gpus_per_node=2)
        assert prob.node_group.shape[0]
        opt = brute_windows(prob, robust.item_demand(prob, D))
        p = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False, gpus_per_node=2)
        check_placement(prob, p)
        shards = p.assignment[prob.model_of == 0]
        assert shards[0] // 2 == shards[1] // 2, seed  # one node
        assert p.lower_bound <= opt * (1 + 1e-9) and p.max_kvpr >= opt * (1 - 1e-9)
        optimal += p.max_kvpr <= opt * (1 + 1e-9)
        q = kvgpu.solve(models, G, gpu_mem=mem, demand=D, gpus_per_node=2)
        assert q.proven and q.max_kvpr <= opt * (1 + 1e-9)
    assert optimal >= OPTIMAL_SHARE * 30


@pytest.mark.parametrize("rules", [False, True])
def test_one_window_is_todays_solve_bit_for_bit(rules):
    for seed in range(6):
        models, G, mem, D = tiny_case(100 + seed, rules)
        today = kvgpu.solve([dict(m, req_rate=float(r)) for m, r in zip(models, D[:, 0])], G, gpu_mem=mem)
        for given in (D[:, :1], D[:, 0]):
            p = kvgpu.solve(models, G, gpu_mem=mem, demand=given)
            assert type(p) is Placement
            assert np.array_equal(p.assignment, today.assignment)
            assert np.array_equal(p.kvpr, today.kvpr) and p.lower_bound == today.lower_bound
            assert p.proven == today.proven and p.backend == today.backend
            assert np.array_equal(p.kvpr_by_window, today.kvpr[None, :])


def test_pair_bound_sees_windows_together():
    """Three equal models, two GPUs, each pair busy together in one window: every window alone
    has optimum 1 / (M - 2s) (the idle model joins a busy one), but every placement puts two
    models on one GPU and they are busy together in some window: the optimum is 2 / (M - 2s),
    which only the pair bound reaches."""
    models = [{"name": k, "model_size": 20.0, "req_rate": 1.0, "slo": 1.0} for k in "abc"]
    D = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    p = kvgpu.solve(models, 2, demand=D, exact=False)
    assert p.max_kvpr == pytest.approx(2 / 40)
    assert p.lower_bound == pytest.approx(2 / 40) and "pair" in p.bound_source
    per_window = max(kvgpu.solve([dict(m, req_rate=float(r)) for m, r in zip(models, D[:, t])], 2).max_kvpr
                     for t in range(3))
    assert per_window == pytest.approx(1 / 40)


def test_result_figures():
    models, G, mem, D = tiny_case(7, False)
    p = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False)
    wd = robust.item_demand(build_problem(models, G, mem), D)
    busy = p.busiest_window
    L = np.zeros((G, D.shape[1]))
    np.add.at(L, p.assignment, wd)
    assert np.allclose(p.demand, L[np.arange(G), busy])
    assert np.allclose(p.kvpr, np.where(p.kv_free > 0, p.demand / p.kv_free, 0.0))
    split = p.kv_split()
    for g in range(G):
        on = p.assignment == g
        if on.any() and p.kv_free[g] > 0:
            assert split[on].sum() == pytest.approx(p.kv_free[g])
    d = p.to_dict()
    assert d["windows"] == D.shape[1] and len(d["kvpr_by_window"]) == D.shape[1]
    assert "robust over" in str(p)


def test_refusals_name_the_rule():
    models, G, mem, D = tiny_case(3, False)
    for kwargs, word in (({"backend": "numba"}, "backend='numba'"),
                         ({"mode": "seed"}, "mode='seed'"), ({"decompose": True}, "decompose=True"),
                         ({"objective": "lex"}, "objective='lex'"), ({"current": [0] * len(models)}, "re-placement"),
                         ({"models": [models[0], dict(models[1], colocate_with="m0")] + models[2:]},
                          "colocate_with")):
        ms = kwargs.pop("models", models)
        with pytest.raises(kvgpu.InvalidInstance, match=word.replace("(", r"\(")):
            kvgpu.solve(ms, G, gpu_mem=mem, demand=D, **kwargs)
    with pytest.raises(kvgpu.InvalidInstance, match="model 1, window 1"):
        bad = D.copy()
        bad[1, 1] = -1
        kvgpu.solve(models, G, gpu_mem=mem, demand=bad)
    with pytest.raises(kvgpu.InvalidInstance, match="expected shape"):
        kvgpu.solve(models, G, gpu_mem=mem, demand=D[:-1])


def test_exact_true_beyond_enumeration_says_so():
    rng = np.random.default_rng(0)
    models = [{"model_size": 10.0, "req_rate": 1.0, "slo": 1.0} for _ in range(12)]
    D = rng.uniform(0, 5, (12, 3))
    p = kvgpu.solve(models, 4, demand=D, exact=True, exact_work=1000)
    assert not p.proven and "not proven" in p.note


def test_replan_size_and_batch_take_one_window_and_refuse_more():
    models, G, mem, D = tiny_case(11, False)
    ones = [dict(m, req_rate=float(r)) for m, r in zip(models, D[:, 0])]
    cur = [i % G for i in range(len(models))]
    with pytest.raises(kvgpu.InvalidInstance, match="re-placement"):
        kvgpu.replan(models, G, gpu_mem=mem, current=cur, max_moves=1, demand=D)
    a = kvgpu.replan(ones, G, gpu_mem=mem, current=cur, max_moves=1)
    b = kvgpu.replan(models, G, gpu_mem=mem, current=cur, max_moves=1, demand=D[:, :1])
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.kvpr, b.kvpr) and a.plan == b.plan
    target = 2 * kvgpu.solve(ones, G, gpu_mem=mem).max_kvpr
    s1, s2 = kvgpu.size(ones, target), kvgpu.size(models, target, demand=D[:, :1])
    assert s1.gpus == s2.gpus and np.array_equal(s1.placement.assignment, s2.placement.assignment)
    with pytest.raises(kvgpu.InvalidInstance, match="size: demand over W = "):
        kvgpu.size(models, target, demand=D)
    prob = build_problem(ones, G, mem)
    sizes, w, M = prob.items.sizes[None], prob.items.demand[None], prob.items.gpu_mem[None]
    r1, r2 = kvgpu.solve_batch(sizes, w, M), kvgpu.solve_batch(sizes, w[:, :, None], M)
    assert np.array_equal(r1.assignment, r2.assignment) and np.array_equal(r1.kvpr, r2.kvpr, equal_nan=True)
    with pytest.raises(kvgpu.InvalidInstance, match="solve_batch: demand of shape"):
        kvgpu.solve_batch(sizes, np.repeat(w[:, :, None], 3, axis=2), M)


def test_written_placement_keeps_the_windows(tmp_path):
    import json

    models, G, mem, D = tiny_case(9, False)
    p = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False)
    out = tmp_path / "p.json"
    kvgpu.io.write_placement(p, out)
    d = json.loads(out.read_text())
    assert np.allclose(np.array(d["kvpr_by_window"], float), p.kvpr_by_window)
    assert d["max_kvpr"] == p.max_kvpr and d["bound_source"] == p.bound_source


def test_larger_problems_keep_every_rule():
    """8 GPUs of mixed memory, 24 models (tp=2 shards, pins, forbids, a GPU out of service),
    12 windows: the placement keeps every rule; the bound stays below it."""
    rng = np.random.default_rng(5)
    mem = [80.0] * 4 + [40.0] * 4
    models = [{"name": f"m{i}", "model_size": float(rng.integers(4, 20)), "req_rate": 1.0,
               "slo": float(rng.integers(1, 6))} for i in range(24)]
    models[0]["tp"], models[1]["tp"], models[1]["replicas"] = 2, 2, 2
    models[2]["pin"], models[3]["forbid"], models[4]["pin"] = [5], [0, 1, 2], [1]
    D = rng.uniform(0.5, 3, (24, 12)) * np.where(rng.random((24, 12)) < 0.3, 5.0, 1.0)
    opts = dict(gpu_mem=mem, out_of_service=[7], reserve_gb=[2.0] * 8)
    prob = build_problem(models, 8, **opts)
    p = kvgpu.solve(models, 8, demand=D, **opts)
    check_placement(prob, p)
    assert 0 < p.lower_bound <= p.max_kvpr and not (p.assignment == 7).any()
    assert np.allclose(p.kvpr_by_window, robust.window_kvpr(prob.items.sizes, robust.item_demand(prob, D),
                                                            prob.items.gpu_mem, p.assignment).T)


def test_blocks_give_the_same_answer(monkeypatch):
    """The step, bound and enumeration evaluations split into column blocks (``robust.CHUNK``)
    choose exactly what one array would."""
    models, G, mem, D = tiny_case(4, True)
    whole = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False)
    proven = kvgpu.solve(models, G, gpu_mem=mem, demand=D)
    monkeypatch.setattr(robust, "CHUNK", 7)
    small = kvgpu.solve(models, G, gpu_mem=mem, demand=D, exact=False)
    assert np.array_equal(whole.assignment, small.assignment) and whole.lower_bound == small.lower_bound
    assert np.array_equal(proven.assignment, kvgpu.solve(models, G, gpu_mem=mem, demand=D).assignment)


def test_no_placement_is_proven_on_tiny_problems():
    """50 + 50 + 40 GB on two 80 GB GPUs: no pair fits one GPU, so nothing fits (140 GB <= 160 GB
    passes the total check): the enumeration proves it."""
    models = [{"name": k, "model_size": 50.0, "req_rate": 1.0, "slo": 1.0} for k in "ab"] + \
        [{"name": "c", "model_size": 20.0, "req_rate": 1.0, "slo": 1.0, "forbid": [0, 1]}]
    with pytest.raises(kvgpu.InvalidInstance):  # refused before any search: no GPU allowed
        kvgpu.solve(models, 2, demand=np.ones((3, 2)))
    models[2] = {"name": "c", "model_size": 40.0, "req_rate": 1.0, "slo": 1.0}
    with pytest.raises(kvgpu.NoPlacementFound) as e:
        kvgpu.solve(models, 2, demand=np.ones((3, 2)))
    assert e.value.proven
