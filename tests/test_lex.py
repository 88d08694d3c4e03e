"""Balanced placements (``objective="lex"``): after the largest KVPR, the largest of the other
GPUs, and so on.  Brute force over every assignment is the oracle on tiny problems (with rules
and re-placements); the operators' cases check that no GPU is left empty while a crowded one
would gain from a move."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import brute_force_problem, check_placement, tiny_instances
from hypothesis import HealthCheck, given, settings
from test_rules import cluster_problems

import kvgpu
from kvgpu.kernels.deltas import lex_better
from kvgpu.problem import build_problem

DATA = Path(__file__).parent / "data"
#: Sorted vectors closer than this (relative, term by term) are the same optimum.
RTOL = 1e-6
RESULTS = {"lex": 0, "total": 0}


def _sorted(kv):
    return np.sort(np.asarray(kv, float))[::-1]


def _balanced_optimum(prob):
    """Brute force's least sorted KVPR vector of ``prob``, None when nothing fits (finitely)."""
    best, placement = brute_force_problem(prob, lex=True)
    return None if placement is None or not np.isfinite(best[0]) else best


def _record(prob, best, p, seed_p):
    """Check ``p`` (objective lex) against brute force's ``best`` sorted vector and ``seed_p``
    (objective seed, same seed): never better than brute force, never worse in the max, never
    lex-worse than the seed order's answer; count the lexicographic optima."""
    check_placement(prob, p)
    assert not lex_better(p.kvpr, best, rtol=1e-9), "better than brute force"
    assert p.max_kvpr <= seed_p.max_kvpr * (1 + 1e-9) or np.isinf(seed_p.max_kvpr), "max worse than objective seed"
    assert not lex_better(seed_p.kvpr, p.kvpr, rtol=1e-9), "balanced order worse than the seed order's answer"
    RESULTS["total"] += 1
    RESULTS["lex"] += not lex_better(best, p.kvpr, rtol=RTOL)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems())
def test_balanced_against_brute_force_with_rules_and_replacement(draw):
    models, G, mem, kw = draw
    try:
        prob = build_problem(models, G, mem, **kw)
    except kvgpu.InvalidInstance:
        return  # a draw that breaks an input rule (the tests of bad input check those)
    best = _balanced_optimum(prob)
    if best is None:
        return
    p = kvgpu.solve(models, G, gpu_mem=mem, **kw)
    assert p.objective.startswith("lex")
    _record(prob, best, p, kvgpu.solve(models, G, gpu_mem=mem, objective="seed", **kw))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(tiny_instances(max_gpus=5, max_models=7))
def test_balanced_against_brute_force_plain(inst):
    models = [{"size": float(s), "req_rate": float(w), "slo": 1} for s, w in zip(inst.sizes, inst.demand)]
    mem = inst.gpu_mem.tolist()
    prob = build_problem(models, inst.n_gpus, mem)
    best = _balanced_optimum(prob)
    if best is None:
        return
    p = kvgpu.solve(models, inst.n_gpus, gpu_mem=mem)
    _record(prob, best, p, kvgpu.solve(models, inst.n_gpus, gpu_mem=mem, objective="seed"))


def test_lexicographic_optimum_on_at_least_97_percent():
    """The share of the draws above (2-5 GPUs, 2-8 items; rules, re-placements under budgets)
    where the default solve reached brute force's balanced optimum (to ``RTOL``).  Measured at
    default effort: all of 194-205 draws in each of four runs (hypothesis seeds 1-3 and the
    default); on 133 random tiny instances with replicas and tp in nodes, lex 132 and the
    seed order 124.  Runs after them, skipped alone."""
    if RESULTS["total"] < 50:
        pytest.skip("run with the brute-force tests above")
    print(f"lexicographic optimum on {RESULTS['lex']} / {RESULTS['total']}")
    assert RESULTS["lex"] / RESULTS["total"] >= 0.97


def test_second_max_case_moves_the_replica_to_an_empty_gpu():
    """ops/second_max_tp_nodes.yaml at seed 0: max 0.25349 (the reranker alone, optimal), and
    the second largest 0.075 -- not 0.221 with GPUs 2 and 4 empty."""
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "solve", str(DATA / "ops" / "second_max_tp_nodes.yaml"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    kv = _sorted([g["kvpr"] for g in d["gpus"]])
    assert abs(kv[0] - 0.25349) < 1e-5 and abs(kv[1] - 0.075) < 1e-9
    assert all(g["models"] for g in d["gpus"]) and d["objective"].startswith("lex")
    seed = subprocess.run([sys.executable, "-m", "kvgpu.cli", "solve", str(DATA / "ops" / "second_max_tp_nodes.yaml"),
                           "--json", "--objective", "seed"], capture_output=True, text=True)
    assert seed.returncode == 0, seed.stderr
    assert json.loads(seed.stdout)["objective"].startswith("seed")


def test_objective_option_is_checked():
    models = [{"size": 10, "req_rate": 1, "slo": 1}]
    with pytest.raises(kvgpu.InvalidInstance, match="objective: 'max' is not available"):
        kvgpu.solve(models, 2, objective="max")
    with pytest.raises(kvgpu.InvalidInstance, match="objective 'lex'"):
        kvgpu.solve(models, 2, mode="seed", objective="lex")
    with pytest.raises(kvgpu.InvalidInstance, match="objective 'lex'"):
        kvgpu.solve(models, 2, effort=0, objective="lex")
    assert kvgpu.solve(models, 2, mode="seed").objective.startswith("seed")
    assert kvgpu.solve(models, 2, effort=0).objective.startswith("seed")
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "solve", str(DATA / "ops" / "second_max_tp_nodes.yaml"),
                          "--mode", "seed", "--objective", "lex"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert "objective 'lex'" in out.stderr


def test_batches_say_they_use_the_seed_order():
    r = kvgpu.solve_batch(np.array([[10.0, 20.0]]), np.array([[1.0, 2.0]]), np.array([[80.0, 80.0, 80.0]]))
    assert r.objective.startswith("seed")


def _movable_gain(p):
    """A move of one item off a GPU holding several onto an empty GPU that lowers the sorted
    vector while keeping every rule (None when there is none)."""
    prob = p.problem
    used = np.bincount(p.assignment, minlength=prob.n_gpus)
    empty = np.nonzero(used == 0)[0]
    for i in np.nonzero(used[p.assignment] > 1)[0]:
        for g in empty:
            a = p.assignment.copy()
            a[i] = g
            try:
                check_placement(prob, _as_placement(prob, a))
            except AssertionError:
                continue
            S = np.bincount(a, weights=prob.items.sizes, minlength=prob.n_gpus)
            W = np.bincount(a, weights=prob.items.demand, minlength=prob.n_gpus)
            kv = W / (prob.items.gpu_mem - S)
            if lex_better(kv, p.kvpr, rtol=1e-9):
                return int(i), int(g)
    return None


def _as_placement(prob, a):
    from kvgpu.results import Placement

    S = np.bincount(a, weights=prob.items.sizes, minlength=prob.n_gpus)
    W = np.bincount(a, weights=prob.items.demand, minlength=prob.n_gpus)
    return Placement(prob, a, W / np.maximum(prob.items.gpu_mem - S, 1e-300), 0.0)


def operator_cluster(seed=0, tail_scale=1.0):
    """The operator's cluster of issue 17: 64 x 80 GB GPUs in 8 nodes, 40 models -- 70B models
    with tp=4 and tp=8, replicated 8B-14B models, a long tail of small ones with little demand
    (``tail_scale`` multiplies the tail's request rates: the evening)."""
    rng = np.random.default_rng(seed)
    models = [{"name": f"llama-70b-tp4-{i}", "size": 140.0, "tp": 4, "req_rate": float(rng.integers(4, 12)),
               "slo": 2.0} for i in range(4)]
    models += [{"name": f"llama-70b-tp8-{i}", "size": 140.0, "tp": 8, "req_rate": float(rng.integers(8, 20)),
                "slo": 2.0} for i in range(2)]
    models += [{"name": f"mid-{i}", "size": float(rng.choice([16.0, 20.0, 28.0])), "replicas": int(rng.integers(2, 5)),
                "req_rate": float(rng.integers(6, 20)), "slo": float(rng.integers(1, 4))} for i in range(8)]
    models += [{"name": f"tail-{i}", "size": float(rng.choice([2.0, 4.0, 7.0, 14.0])),
                "req_rate": float(rng.integers(1, 5)) * tail_scale, "slo": float(rng.integers(2, 10))}
               for i in range(26)]
    return models, {"gpus": 64, "gpu_mem": 80.0, "gpus_per_node": 8}


@pytest.mark.parametrize("tail_scale", [1.0, 5.0])
def test_operator_cluster_leaves_no_gpu_empty_while_a_move_gains(tail_scale):
    """No empty GPU while a GPU holds several models and moving one there lowers the sorted
    vector (all rules kept); the max stays the seed order's.  Also in the evening (the long
    tail's demand x5)."""
    models, opts = operator_cluster(tail_scale=tail_scale)
    gpus = opts.pop("gpus")
    p = kvgpu.solve(models, gpus, **opts)
    check_placement(p.problem, p)
    assert _movable_gain(p) is None
    assert kvgpu.solve(models, gpus, **opts).assignment.tolist() == p.assignment.tolist()  # same seed, same answer
    seed = kvgpu.solve(models, gpus, objective="seed", **opts)
    assert p.max_kvpr <= seed.max_kvpr * (1 + 1e-9)
    assert not lex_better(seed.kvpr, p.kvpr)
