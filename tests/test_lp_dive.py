"""The dive on the configuration LP (kvgpu.lp_dive) and the node-level replica swaps
(kvgpu.node_moves): every placement it returns keeps every rule
(memory, pins, forbidden GPUs, shards apart, tp replicas inside one node, adapters beside their
base -- checked independently of the module's own check), it is never worse than the placement
it starts from, and it is deterministic; under ``exact=True`` the engine's answer keeps its figures
consistent."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvgpu
from conftest import brute_force_problem, check_placement
from kvgpu import generate
from kvgpu.lp_bound import impossible_at, node_conflict_at
from kvgpu.lp_dive import complete, dive, improve
from kvgpu.node_moves import move_replicas, swap_replicas
from kvgpu.problem import build_problem
from kvgpu.rule_check import kvpr_of, rule_breach
from test_ops_rules import with_adapters
from test_rules import _problem_or_skip, cluster_problems


def _new_models(models, kw):
    """A draw as a new placement: no running copies, no budget (the dive is not for re-placements)."""
    kw = {k: v for k, v in kw.items() if k not in ("max_moves", "max_migrated_gb")}
    return [{k: v for k, v in m.items() if k != "cur_gpu_id"} for m in models], kw


def assert_keeps_every_rule(prob, a):
    """``check_placement`` of the tests, and tp replicas inside one node counted by hand: a
    model's shards in each node come in whole replicas (a multiple of tp)."""
    check_placement(prob, SimpleNamespace(assignment=a))
    if prob.node_of.shape[0]:
        for m, spec in enumerate(prob.specs):
            if spec.tp > 1 and spec.same_node is not False:
                nodes = prob.node_of[a[prob.model_of == m]]
                assert (np.bincount(nodes) % spec.tp == 0).all(), f"{spec.where}: a tp replica spans nodes"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(with_adapters(), st.sampled_from([1.0, 1.15, 1.6]))
def test_every_dive_completed_keeps_every_rule(draw, share):
    """Dives at targets around the optimum (brute force), completed and searched: whatever the
    target, the placement keeps every rule, and never beats the optimum."""
    models, G, mem, kw = draw
    models, kw = _new_models(models, kw)
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    opt, _ = brute_force_problem(prob)
    if not np.isfinite(opt) or opt <= 0:
        return
    T = opt * share
    part = dive(prob, T)
    fixed = part >= 0
    inst = prob.items
    load = np.bincount(part[fixed], weights=(inst.sizes + inst.demand / T)[fixed], minlength=G)
    assert (load <= inst.gpu_mem * (1 + 1e-6)).all(), "a fixed configuration does not fit at the target"
    if prob.allowed.shape[0]:
        assert prob.allowed[np.nonzero(fixed)[0], part[fixed]].all()
    for effort in (0, 5):
        a = complete(prob, part, opt * 0.5, effort, 0)
        if a is None:
            continue
        assert_keeps_every_rule(prob, a)
        assert rule_breach(prob, a) is None
        assert kvpr_of(prob, a).max() >= opt * (1 - 1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(with_adapters())
def test_improve_is_valid_strictly_better_and_deterministic(draw):
    """From the search's placement: None, or a placement keeping every rule with a lower max
    KVPR; the same twice."""
    models, G, mem, kw = draw
    models, kw = _new_models(models, kw)
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    try:
        p = kvgpu.solve(models, G, gpu_mem=mem, exact=False, effort=2, **kw)
    except kvgpu.NoPlacementFound:
        return
    a = improve(prob, p.assignment, 1e-3 * p.max_kvpr, effort=5)
    assert (a is None) == (improve(prob, p.assignment, 1e-3 * p.max_kvpr, effort=5) is None)
    if a is not None:
        assert_keeps_every_rule(prob, a)
        assert kvpr_of(prob, a).max() < p.max_kvpr
        assert (a == improve(prob, p.assignment, 1e-3 * p.max_kvpr, effort=5)).all()


def test_rule_breach_names_each_broken_rule():
    models = [{"name": "big", "size": 60, "tp": 2, "req_rate": 1, "slo": 1},
              {"name": "pinned", "size": 10, "req_rate": 1, "slo": 1, "pin": 3},
              {"name": "lora", "size": 1, "req_rate": 1, "slo": 1, "colocate_with": "pinned"}]
    prob = build_problem(models, 4, 80.0, gpus_per_node=2)
    assert rule_breach(prob, np.array([0, 1, 3, 3])) is None
    assert rule_breach(prob, np.array([0, 0, 3, 3])) == "shards on distinct GPUs"
    assert rule_breach(prob, np.array([1, 2, 3, 3])) == "a replica in one node"
    assert rule_breach(prob, np.array([0, 1, 2, 2])) == "allowed GPUs"
    assert rule_breach(prob, np.array([0, 1, 3, 2])) == "an adapter beside its base"
    assert rule_breach(prob, np.array([0, 1, 3, -1])) == "an item has no GPU"
    heavy = build_problem([{"size": 50, "req_rate": 1, "slo": 1}] * 2, 2, 80.0)
    assert rule_breach(heavy, np.array([0, 0])) == "memory"


def test_tensor_parallel_cluster_dives_keep_nodes_and_exact_true_is_never_worse():
    """The bench's tensor-parallel family (16 GPUs in nodes of 8): every dive's completion keeps
    the rules; ``exact=True`` (bound, then dive) is never worse than the search alone, its
    figures agree with its placement and its bound stays below its answer."""
    models, o = generate.tp_cluster(np.random.default_rng(0), 16)
    prob = build_problem(models, o["gpus"], o["gpu_mem"], gpus_per_node=o["gpus_per_node"])
    plain = kvgpu.solve(models, **o, exact=False)
    for share in (0.98, 1.0, 1.05):
        a = complete(prob, dive(prob, plain.max_kvpr * share), plain.lower_bound, 10, 0)
        if a is not None:
            assert_keeps_every_rule(prob, a)
    proved = kvgpu.solve(models, **o, exact=True)
    assert_keeps_every_rule(prob, proved.assignment)
    assert proved.max_kvpr <= plain.max_kvpr * (1 + 1e-9)
    assert proved.max_kvpr == pytest.approx(kvpr_of(prob, proved.assignment).max(), rel=1e-12)
    assert proved.lower_bound <= proved.max_kvpr * (1 + 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems(), st.integers(0, 2))
def test_replica_swaps_keep_every_rule_and_never_raise_the_max(draw, seed):
    """Swapping whole tp replicas between nodes, from the search's placement of brute-force-sized
    problems with nodes, pins and replicas (re-placement budgets dropped): valid, max not higher."""
    models, G, mem, kw = draw
    models, kw = _new_models(models, kw)
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    try:
        p = kvgpu.solve(models, G, gpu_mem=mem, exact=False, effort=0, seed=seed, **kw)
    except kvgpu.NoPlacementFound:
        return
    a = swap_replicas(prob, p.assignment)
    assert_keeps_every_rule(prob, a)
    assert kvpr_of(prob, a).max() <= p.max_kvpr * (1 + 1e-12)


def test_replica_swaps_move_a_replica_to_the_node_where_it_lowers_the_peak():
    """Two nodes of two GPUs: a busy tp=2 model and a quiet one start beside the busy single
    models (pinned to node 0); swapping the replicas puts the quiet one there."""
    models = [{"name": "busy", "size": 20, "tp": 2, "req_rate": 8, "slo": 1},
              {"name": "quiet", "size": 20, "tp": 2, "req_rate": 1, "slo": 1},
              {"name": "a", "size": 30, "req_rate": 8, "slo": 1, "pin": 0},
              {"name": "b", "size": 30, "req_rate": 8, "slo": 1, "pin": 1}]
    prob = build_problem(models, 4, 80.0, gpus_per_node=2)
    start = np.array([0, 1, 2, 3, 0, 1])  # busy beside a and b
    a = swap_replicas(prob, start)
    assert a.tolist() == [2, 3, 0, 1, 0, 1]
    assert kvpr_of(prob, a).max() < kvpr_of(prob, start).max()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(with_adapters(), st.integers(0, 2))
def test_replica_moves_keep_every_rule_and_never_raise_the_max(draw, seed):
    """Moving whole tp replicas to other nodes, alone or with the models they displace, from the
    search's placement (pins, replicas, adapters, nodes): valid, max not higher, deterministic."""
    models, G, mem, kw = draw
    models, kw = _new_models(models, kw)
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    try:
        p = kvgpu.solve(models, G, gpu_mem=mem, exact=False, effort=0, seed=seed, **kw)
    except kvgpu.NoPlacementFound:
        return
    a = move_replicas(prob, p.assignment)
    assert_keeps_every_rule(prob, a)
    assert kvpr_of(prob, a).max() <= p.max_kvpr * (1 + 1e-12)
    assert (a == move_replicas(prob, p.assignment)).all()


def test_a_replica_moves_with_the_model_it_displaces():
    """Node 0 holds the busy tp=2 model beside two busy single models; node 1 holds two quiet
    single models.  Moving the replica into node 1 and the quiet models it displaces into node 0
    lowers the peak; no swap of replicas can (there is one replica)."""
    models = [{"name": "busy", "size": 20, "tp": 2, "req_rate": 8, "slo": 1},
              {"name": "a", "size": 30, "req_rate": 8, "slo": 1},
              {"name": "b", "size": 30, "req_rate": 8, "slo": 1},
              {"name": "c", "size": 30, "req_rate": 1, "slo": 1},
              {"name": "d", "size": 30, "req_rate": 1, "slo": 1}]
    prob = build_problem(models, 4, 80.0, gpus_per_node=2)
    start = np.array([0, 1, 0, 1, 2, 3])
    assert (swap_replicas(prob, start) == start).all()
    a = move_replicas(prob, start)
    assert_keeps_every_rule(prob, a)
    assert set(a[:2].tolist()) == {2, 3}
    assert kvpr_of(prob, a).max() < kvpr_of(prob, start).max()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems())
def test_node_level_bound_never_refutes_a_reachable_target(draw):
    """The node-level test against brute force (nodes of 2 GPUs, tp=2 replicas, pins): never a
    proof at or above the optimum."""
    models, G, mem, kw = draw
    models, kw = _new_models(models, kw)
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    opt, _ = brute_force_problem(prob)
    if np.isfinite(opt) and opt > 0:
        assert not node_conflict_at(prob, opt * (1 + 1e-7))


def test_node_level_bound_sees_replicas_that_need_a_node_each():
    """Three tp=5 replicas whose shards (45 GB) cannot share an 80 GB GPU, in two nodes of 8: 15
    shards on 16 GPUs pass the GPU configurations, but each replica needs a node of its own."""
    models = [{"name": f"m{i}", "size": 225, "tp": 5, "req_rate": 1, "slo": 1} for i in range(3)]
    prob = build_problem(models, 16, 80.0, gpus_per_node=8)
    assert node_conflict_at(prob, 1.0) and not impossible_at(prob, 1.0)
    room = build_problem(models, 24, 80.0, gpus_per_node=8)  # a third node: no proof
    assert not node_conflict_at(room, 1.0)
    light = build_problem([dict(m, size=150) for m in models], 16, 80.0, gpus_per_node=8)  # 30 GB shards share
    assert not node_conflict_at(light, 1.0)


def test_node_level_bound_against_brute_force_where_it_proves():
    """Two nodes of 3 GPUs and three tp=2 models (a replica needs 2 of its node's 3 GPUs), with a
    single model: random sizes and rates, brute force over every assignment.  The test never
    refutes the optimum, and below it does prove targets the GPU configurations do not."""
    rng = np.random.default_rng(0)
    proofs = 0
    for _ in range(25):
        models = [{"name": f"t{i}", "size": float(rng.integers(30, 90)), "tp": 2,
                   "req_rate": float(rng.integers(1, 9)), "slo": 1} for i in range(3)]
        models.append({"name": "s", "size": float(rng.integers(5, 40)), "req_rate": float(rng.integers(0, 9)),
                       "slo": 1})
        prob = build_problem(models, 6, 80.0, gpus_per_node=3)
        opt, _ = brute_force_problem(prob)
        if not (np.isfinite(opt) and opt > 0):
            continue
        assert not node_conflict_at(prob, opt * (1 + 1e-7))
        proofs += node_conflict_at(prob, opt * 0.9) and not impossible_at(prob, opt * 0.9)
    assert proofs >= 1  # 10 of the 24 with a placement when written
