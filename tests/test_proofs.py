"""Every "proven" true: re-placements whose pins, replicas and running copies are listed in any
order (and across nodes), replicas scaled in and out, move plans named a cycle only when no
order exists, demand that overflows refused, full GPUs left under a budget.  Brute force is
the oracle (conftest)."""
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import brute_force_problem, check_placement, check_plan_executable, close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu import migration
from kvgpu.cli import main
from kvgpu.kernels.deltas import fits
from kvgpu.problem import build_problem
from test_rules import _problem_or_skip, cluster_problems

DATA = Path(__file__).parent / "data"


def _checked(p):
    check_placement(p.problem, p)
    check_plan_executable(p.problem, p)
    return p


@pytest.mark.parametrize("pin", [[0, 1], [1, 0]])
def test_the_order_of_pins_never_changes_the_answer(pin):
    c = json.loads((DATA / "proofs" / "replan_pin_order_false_optimal.json").read_text())
    c["models"][0]["pin"] = pin
    p = _checked(kvgpu.replan(c["models"], c["gpus"], max_moves=1))
    assert close(p.max_kvpr, 0.2625) and p.proven_optimal
    assert [(m.model, m.src, m.dst) for m in p.moves] == [("b", 1, 0)]
    assert [(m.model, m.src, m.dst) for m in p.plan if m.src < 0] == [("r", -1, 0)]  # the new replica loads


R = {"name": "r", "size": 30, "req_rate": 1, "slo": 1, "replicas": 2}
T = {"name": "t", "size": 60, "req_rate": 1, "slo": 1, "tp": 2}


@pytest.mark.parametrize("model, G, kw", [
    (dict(R, pin=pin, cur_gpu_id=cur), 2, budget) for pin in ([1, 0], [0, 1]) for cur in (0, 1)
    for budget in ({"max_moves": 0}, {"max_migrated_gb": 10})] + [
    (dict(T, pin=pin, cur_gpu_id=cur), 4, dict(nodes, max_moves=0)) for pin in ([3, 2], [2, 3]) for cur in (2, 3)
    for nodes in ({}, {"gpus_per_node": 2}, {"nodes": [[3, 2], [1, 0]]})])
def test_a_running_copy_stays_and_the_other_loads_whatever_the_order(model, G, kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", kvgpu.KvgpuWarning)
        p = _checked(kvgpu.replan([model], G, **kw))
    # one running replica of two scales out in silence; one running shard of a tp=2 replica is said
    assert ["cur_gpu_id gives 1 GPU" in str(w.message) for w in seen] == ([True] if model.get("tp") else [])
    assert sorted(p.assignment.tolist()) == sorted(model["pin"]) and p.moves == []
    other = (set(model["pin"]) - {model["cur_gpu_id"]}).pop()
    assert [(m.src, m.dst) for m in p.plan] == [(-1, other)]


def test_replica_scale_in_keeps_two_of_three_copies_and_moves_nothing(capsys):
    f = DATA / "ops" / "replan_scale_in.yaml"
    c = yaml.safe_load(f.read_text())
    p = _checked(kvgpu.replan(c["models"], c["gpus"], gpu_mem=c["gpu_mem"], max_moves=0))
    assert close(p.max_kvpr, 0.04405, rtol=1e-4) and p.moves == []
    llama = p.assignment[p.problem.model_of == 0].tolist()
    assert len(llama) == 2 and set(llama) < {0, 1, 3}
    stops = [m for m in p.plan if m.dst < 0]
    assert [(m.model, m.src) for m in stops] == [("llama-3.1-8b", ({0, 1, 3} - set(llama)).pop())]
    assert main(["replan", str(f), "--max-moves", "0"]) == 0
    out = capsys.readouterr().out
    assert "0 model(s) moved" in out and "->stop" in out and "max KVPR 0.0440" in out


def test_scale_out_loads_new_copies_like_new_models():
    """Two running copies of four: the two new ones load (free, like a new model); moving a
    running one counts as a move."""
    m = [{"name": "x", "size": 20, "req_rate": 4, "slo": 1, "replicas": 4, "cur_gpu_id": [2, 0]},
         {"name": "y", "size": 50, "req_rate": 1, "slo": 1, "cur_gpu_id": 1}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvgpu.KvgpuWarning)  # whole replicas: scaling out, nothing to warn of
        p = _checked(kvgpu.replan(m, 4, gpu_mem=80, max_moves=0))
    assert p.moves == [] and sorted((s.src, s.dst) for s in p.plan) == [(-1, 1), (-1, 3)]


def test_a_plan_lists_an_order_where_one_exists():
    c = json.loads((DATA / "proofs" / "plan_false_cycle.json").read_text())
    p = _checked(kvgpu.replan(c["models"], c["gpus"], gpu_mem=c["gpu_mem"]))
    assert p.plan_note is None and p.plan


def _orders_exist(problem, assign):
    """Brute force: does any order of the plan's steps (any pairing of a model's leaving and
    arriving GPUs, any choice of the copies it stops) keep every GPU within its memory?"""
    M = problem.items.gpu_mem
    used = np.zeros(problem.n_gpus)
    todo = []
    for m, running in enumerate(problem.running):
        items = np.nonzero(problem.model_of == m)[0]
        gb = problem.items.sizes[items[0]]
        used[list(running)] += gb
        final = set(assign[items].tolist())
        todo.append([gb, sorted(final - set(running)), sorted(set(running) - final)])

    dead = set()

    def go():
        if all(not a and not lv for _, a, lv in todo):
            return True
        key = tuple((tuple(sorted(a)), tuple(sorted(lv))) for _, a, lv in todo)
        if key in dead:
            return False
        dead.add(key)  # a state on the current path is never reached again (steps only shrink it)
        for t in todo:
            gb, arriving, leaving = t
            for src in list(leaving):
                if len(leaving) > len(arriving):  # a stop
                    leaving.remove(src)
                    used[src] -= gb
                    ok = go()
                    used[src] += gb
                    leaving.append(src)
                    if ok:
                        return True
            for dst in list(arriving):
                if not fits(used[dst] + gb, M[dst]):
                    continue
                srcs = leaving if len(leaving) >= len(arriving) else leaving + [-1]
                for src in list(srcs):
                    arriving.remove(dst)
                    used[dst] += gb
                    if src >= 0:
                        leaving.remove(src)
                        used[src] -= gb
                    ok = go()
                    if src >= 0:
                        leaving.append(src)
                        used[src] += gb
                    used[dst] -= gb
                    arriving.append(dst)
                    if ok:
                        return True
        return False

    return go()


@st.composite
def small_plans(draw):
    """2-4 GPUs of 40-80 GB, 2-5 models (some with 2 replicas, running 1-3 copies), a running
    placement and a final one, both within memory."""
    G = draw(st.integers(2, 4))
    mem = draw(st.lists(st.sampled_from([40.0, 60.0, 80.0]), min_size=G, max_size=G))
    models, used, final_used, final = [], [0.0] * G, [0.0] * G, []
    for i in range(draw(st.integers(2, 5))):
        k = draw(st.sampled_from([1, 1, 2]))
        size = float(draw(st.integers(5, 40)))
        r = draw(st.integers(0, min(G, k + 1)))
        cur = [g for g in draw(st.permutations(range(G))) if used[g] + size <= mem[g]][:r]
        end = [g for g in draw(st.permutations(range(G))) if final_used[g] + size <= mem[g]][:k]
        if len(end) < k:
            continue
        for g in cur:
            used[g] += size
        for g in end:
            final_used[g] += size
        models.append({"name": f"m{i}", "size": size, "req_rate": 1, "slo": 1, "replicas": k,
                       "cur_gpu_id": cur if cur else -1})
        final.append(end)
    return models, G, mem, final


@settings(max_examples=150, deadline=None)
@given(small_plans())
def test_a_cycle_is_named_only_when_no_order_exists(draw):
    models, G, mem, final = draw
    if not models:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvgpu.KvgpuWarning)
        prob = build_problem(models, G, mem, max_moves=len(models))
    assign = np.array([g for end in final for g in end], np.int64)
    steps, note = migration.plan(prob, assign)

    class P:  # what check_plan_executable reads of a placement
        plan, plan_note, assignment = steps, note, assign

    check_plan_executable(prob, P)
    assert (note is None) == _orders_exist(prob, assign), note


def test_overflowing_demand_is_refused_like_infinite_demand(capsys):
    f = DATA / "proofs" / "overflow_inf_proven.json"
    models = json.loads(f.read_text())
    with pytest.raises(kvgpu.InvalidInstance, match="total demand .* too large: KVPR .* overflows"):
        kvgpu.solve(models, 2)
    assert main(["solve", str(f), "--gpus", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and str(f) in err and "overflows" in err
    with pytest.raises(kvgpu.InvalidInstance, match="instance 1: the total demand"):
        kvgpu.solve_batch(sizes=np.array([[10.0, 5.0], [79.5, 10.0]]), demand=np.array([[1.0, 1.0], [1e308, 1.0]]),
                          gpu_mem=np.full((2, 2), 80.0))
    p = kvgpu.solve([dict(models[0], req_rate=1e290), models[1]], 2)  # large but within range: finite
    assert np.isfinite(p.max_kvpr)


def test_full_gpus_under_a_gb_budget_get_room_for_their_kv_cache():
    c = json.loads((DATA / "proofs" / "replan_gb_budget_keeps_full_gpus.json").read_text())
    p = kvgpu.replan(c["models"], c["gpus"], gpu_mem=c["gpu_mem"], max_migrated_gb=62)
    check_placement(p.problem, p)
    assert not np.isfinite(p.start_kvpr) and np.isfinite(p.max_kvpr)
    assert p.max_kvpr <= 7.2 * (1 + 1e-9) and sum(m.size_gb for m in p.moves) <= 62
    tight = kvgpu.replan(c["models"], c["gpus"], gpu_mem=c["gpu_mem"], max_moves=7)
    check_placement(tight.problem, tight)
    assert np.isfinite(tight.max_kvpr) and tight.moved_models <= 7


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_full_gpus_under_a_move_budget_get_room_when_brute_force_finds_it(seed):
    """Tiny clusters with full GPUs now: under a move budget, the answer is finite wherever brute
    force finds a finite placement within it (and equal to it where proven)."""
    rng = np.random.default_rng(seed)
    G = 3
    models, used = [], np.zeros(G)
    for i in range(int(rng.integers(3, 6))):
        g = int(rng.integers(0, G))
        size = float(rng.integers(5, 40))
        if used[g] + size > 80:
            continue
        used[g] += size
        models.append({"name": f"m{i}", "size": size, "req_rate": float(rng.integers(1, 9)), "slo": 1,
                       "cur_gpu_id": g})
    g = int(np.argmax(used))
    if used[g] < 80:  # fill the fullest GPU to the brim
        models.append({"name": "fill", "size": 80 - used[g], "req_rate": 1, "slo": 1, "cur_gpu_id": g})
    kw = {"max_moves": int(rng.integers(1, 3)), "min_gain": 0.0}  # the search itself: any gain counts
    prob = build_problem(models, G, 80.0, **kw)
    opt, _ = brute_force_problem(prob)
    try:
        p = kvgpu.replan(models, G, gpu_mem=80.0, **kw)
    except kvgpu.NoPlacementFound:
        assert opt == np.inf
        return
    check_placement(p.problem, p)
    assert np.isfinite(p.max_kvpr) or not np.isfinite(opt)
    if p.proven_optimal:
        assert close(p.max_kvpr, opt)


def test_pins_and_running_copies_in_every_order_give_one_answer():
    """A tp=2 model with 2 replicas pinned across two nodes, one replica running: every order of
    the pins and of the running GPUs gives the same proven optimum as brute force."""
    base = [{"name": "t", "size": 40, "req_rate": 4, "slo": 1, "tp": 2, "replicas": 2},
            {"name": "a", "size": 30, "req_rate": 6, "slo": 1, "cur_gpu_id": 1},
            {"name": "b", "size": 20, "req_rate": 3, "slo": 1, "cur_gpu_id": 2}]
    answers = set()
    for pin in itertools.permutations([0, 1, 2, 3]):
        for cur in ([0, 1], [1, 0]):
            models = [dict(base[0], pin=list(pin), cur_gpu_id=cur)] + base[1:]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", kvgpu.KvgpuWarning)
                prob = build_problem(models, 4, 80.0, gpus_per_node=2, max_moves=0)
                opt, _ = brute_force_problem(prob)
                p = _checked(kvgpu.replan(models, 4, gpu_mem=80.0, gpus_per_node=2, max_moves=0))
            assert close(p.max_kvpr, opt) and p.proven_optimal and p.moves == []
            answers.add(round(p.max_kvpr, 9))
    assert len(answers) == 1


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems(), st.sampled_from([0.0, 0.01, 0.5]))
def test_a_bound_covers_the_placements_its_scope_names(draw, min_gain):
    """``bound_scope`` names the placements ``lower_bound`` is proven for: every placement
    (the budget not seen), or those within the migration budget.  Checked against brute force
    with and without the budget, min_gain's fallback to the baseline included (the case of a
    0% gain once labelled a within-budget proof 'without the migration budget')."""
    models, G, mem, kw = draw
    if "max_moves" not in kw:
        return
    kw["min_gain"] = min_gain
    prob = _problem_or_skip(models, G, mem, kw)
    if prob is None:
        return
    budgeted, _ = brute_force_problem(prob)
    free = _problem_or_skip(models, G, mem, {k: v for k, v in kw.items()
                                             if k not in ("max_moves", "max_migrated_gb", "min_gain")})
    unbudgeted = brute_force_problem(free)[0] if free is not None else np.inf
    try:
        p = kvgpu.replan(models, G, gpu_mem=mem, **kw)
    except kvgpu.NoPlacementFound:
        return
    if "within the migration budget" in p.bound_scope:
        assert p.lower_bound <= budgeted * (1 + 1e-9)
    else:
        assert p.lower_bound <= unbudgeted * (1 + 1e-9), (p.bound_scope, p.lower_bound, unbudgeted)
