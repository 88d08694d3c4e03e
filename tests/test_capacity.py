"""Capacity planning (kvgpu.size, kvgpu.headroom, kvgpu size): answers checked against brute force
on tiny instances -- the fewest GPUs / the cheapest mix by trying every grouping of the models."""
import itertools
import json
import math
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu.kernels.deltas import safe_div

# -- the oracle ---------------------------------------------------------------------------------


def items_of(models):
    """(size, demand, model) per shard / replica, expanded here independently of kvgpu.cluster."""
    out = []
    for i, m in enumerate(models):
        tp, rep = m.get("tp", 1), m.get("replicas", 1)
        size = m["size"] if "size" in m else m["model_size"]
        out += [(size / tp, m["req_rate"] / m["slo"] / (tp * rep), i)] * (tp * rep)
    return out


def partitions(n):
    """Every partition of range(n) into blocks (Bell(n) of them)."""
    def rec(i, blocks):
        if i == n:
            yield [list(b) for b in blocks]
            return
        for b in blocks:
            b.append(i)
            yield from rec(i + 1, blocks)
            b.pop()
        blocks.append([i])
        yield from rec(i + 1, blocks)
        blocks.pop()
    yield from rec(0, [])


def block_kvpr(items, block, mem):
    """KVPR of one GPU of ``mem`` GB holding ``block``; inf if it breaks memory or anti-affinity."""
    S = sum(items[i][0] for i in block)
    W = sum(items[i][1] for i in block)
    if S > mem or len({items[i][2] for i in block}) < len(block):
        return math.inf
    return safe_div(W, mem - S)


def no_ties(items, mems, X, rtol=1e-7):
    """No group of models sits within ``rtol`` of the target on any memory (float noise could
    then decide feasibility differently in the oracle and the solver)."""
    for r in range(1, len(items) + 1):
        for block in itertools.combinations(range(len(items)), r):
            for mem in mems:
                k = block_kvpr(items, block, mem)
                if math.isfinite(k) and abs(k - X) <= rtol * X:
                    return False
    return True


def smallest_type(items, block, mems, X):
    """Index of the smallest memory (``mems`` ascending) on which ``block`` meets ``X``; None if none."""
    return next((t for t, m in enumerate(mems) if block_kvpr(items, block, m) <= X), None)


def fewest_gpus(items, mem, X):
    """Fewest GPUs of ``mem`` GB with max KVPR <= X (every partition of the items tried)."""
    return min((len(p) for p in partitions(len(items)) if all(block_kvpr(items, b, mem) <= X for b in p)),
               default=None)


def mix_feasible(items, mems, counts, X):
    """Do ``counts`` GPUs of memories ``mems`` (ascending) meet X?  A partition works when its
    blocks can go to distinct GPUs at least as large as each needs (Hall's condition by suffix)."""
    for p in partitions(len(items)):
        need = [smallest_type(items, b, mems, X) for b in p]
        if None in need:
            continue
        if all(sum(t >= u for t in need) <= sum(counts[u:]) for u in range(len(mems))):
            return True
    return False


def cheapest_cost(items, mems, prices, X):
    best = math.inf
    for p in partitions(len(items)):
        need = [smallest_type(items, b, mems, X) for b in p]
        if None not in need:
            best = min(best, sum(min(prices[t:]) for t in need))
    return best


def check_placement(result, models, X, mems=None):
    """The answer's placement is on the answer's GPUs, respects memory and distinct GPUs for
    shards, and its max KVPR (recomputed here) is at most X."""
    p = result.placement
    expected = [t.memory for t, c in zip(result.types, result.counts) for _ in range(c)]
    assert p.instance.gpu_mem.tolist() == expected
    items = items_of(models)
    gpus_of = p.gpus_of_models() if p.model_of is not None else [[g] for g in p.assignment.tolist()]
    S, W = np.zeros(len(expected)), np.zeros(len(expected))
    for i, gs in enumerate(gpus_of):
        assert len(set(gs)) == len(gs)
        mine = [it for it in items if it[2] == i]
        assert len(mine) == len(gs)
        for (s, w, _), g in zip(mine, gs):
            S[g] += s
            W[g] += w
    assert (S <= np.array(expected) + 1e-9).all()
    assert max(safe_div(w, m - s) for s, w, m in zip(S, W, expected)) <= X * (1 + 1e-12)
    assert result.achieved <= X


@st.composite
def sizing_cases(draw, rules=False, max_items=6, n_models=(2, 6)):
    """2-6 models of 1-60 GB (rates 0-9, SLOs 1-9; with ``rules`` tp and replicas of 1-2) and a
    target 1.05-4 times the worst model's KVPR alone on an 80 GB GPU."""
    n = draw(st.integers(n_models[0], min(n_models[1], max_items)))
    models, left = [], max_items - n  # shards beyond one per model still allowed
    for i in range(n):
        m = {"name": f"m{i}", "size": draw(st.integers(1, 60)), "req_rate": draw(st.integers(0, 9)),
             "slo": draw(st.integers(1, 9))}
        if rules:
            for key in ("tp", "replicas"):
                k = m.get("tp", 1) * m.get("replicas", 1)
                if k <= left and draw(st.booleans()):  # doubling adds k shards
                    m[key], left = 2, left - k
        models.append(m)
    items = items_of(models)
    alone = max(w / (80 - s) for s, w, _ in items)
    X = (alone if alone > 0 else 0.05) * draw(st.floats(1.05, 4.0))
    return models, X


SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                       HealthCheck.too_slow])

# -- one GPU type -------------------------------------------------------------------------------


@SLOW
@given(sizing_cases())
def test_fewest_gpus_is_brute_force_optimum(case):
    """Plain models: the exact search settles G-1, so the answer is proven and exactly the fewest."""
    models, X = case
    items = items_of(models)
    assume(no_ties(items, [80.0], X))
    r = kvgpu.size(models, X)
    check_placement(r, models, X)
    assert r.gpus == fewest_gpus(items, 80.0, X)
    assert r.proven and r.count_lower_bound == r.gpus
    assert [m.counts for m in r.cheaper] == ([(r.gpus - 1,)] if r.gpus > 1 else [])


@SLOW
@given(sizing_cases(rules=True))
def test_fewest_gpus_with_tp_and_replicas(case):
    """tp / replicas (shards on distinct GPUs): never below the fewest, equal when proven, and the
    bound on the count is valid."""
    models, X = case
    items = items_of(models)
    assume(no_ties(items, [80.0], X))
    r = kvgpu.size(models, X)
    check_placement(r, models, X)
    best = fewest_gpus(items, 80.0, X)
    assert r.gpus >= best >= r.count_lower_bound
    assert r.gpus >= max(m.get("tp", 1) * m.get("replicas", 1) for m in models)
    if r.proven:
        assert r.gpus == best


def test_not_proven_without_exact_work_then_proven_with_it():
    """Bounds alone do not settle 2 GPUs here (the count bound says 2); the exact search does."""
    models = [{"name": "m0", "size": 7, "req_rate": 3, "slo": 2}, {"name": "m1", "size": 28, "req_rate": 6, "slo": 3},
              {"name": "m2", "size": 8, "req_rate": 7, "slo": 9}, {"name": "m3", "size": 43, "req_rate": 3, "slo": 3},
              {"name": "m4", "size": 14, "req_rate": 4, "slo": 6}]
    X = 0.1032
    assert fewest_gpus(items_of(models), 80.0, X) == 3
    loose = kvgpu.size(models, X, exact_work=0)
    assert loose.gpus == 3 and not loose.proven and loose.count_lower_bound == 2
    assert "2 might too, not proven" in loose.summary() and "at least 2 GPUs are needed" in loose.summary()
    tight = kvgpu.size(models, X)
    assert tight.proven and tight.count_lower_bound == 3
    assert "2 cannot (proven: exact search" in tight.summary()


def test_one_gpu_and_a_max_gpus_the_solver_cannot_meet():
    r = kvgpu.size([{"name": "a", "size": 20, "req_rate": 1, "slo": 1}], 0.1)
    assert r.gpus == 1 and r.proven and r.cheaper == [] and r.summary().startswith("1 GPU of 80 GB meets max KVPR 0.1")
    models = [{"name": f"m{i}", "size": s, "req_rate": q, "slo": o}
              for i, (s, q, o) in enumerate([(7, 3, 2), (28, 6, 3), (8, 7, 9), (43, 3, 3), (14, 4, 6)])]
    with pytest.raises(kvgpu.NoPlacementFound, match="found with up to 2 GPUs.*not proven impossible") as e:
        kvgpu.size(models, 0.1032, max_gpus=2, exact_work=0)  # the bounds allow 2; 3 are needed
    assert not e.value.proven


def test_bin_packing_and_cardinality_bounds_prove_the_count():
    """Five 30 GB models: at most two share a GPU, so 3 GPUs, proven without any exact search."""
    models = [{"name": f"m{i}", "size": 30, "req_rate": 0.1, "slo": 1} for i in range(5)]
    r = kvgpu.size(models, 1.0, exact_work=0)
    assert r.gpus == 3 and r.proven and "at most 2 of the 5" in r.cheaper[0].reason
    r = kvgpu.size([{"size": 40, "req_rate": 4, "slo": 1}] * 6, 0.5, exact_work=0)  # 40 + 4/0.5 = 48 GB each
    assert r.gpus == 6 and r.proven


def test_pins_and_forbids_are_refused_tp_replicas_kept_as_items():
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 0 \('a'\): pin names GPU ids.*sized"):
        kvgpu.size([{"name": "a", "size": 10, "req_rate": 1, "slo": 1, "pin": 0}], 0.1)
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 1: forbid names GPU ids"):
        kvgpu.size([{"size": 10, "req_rate": 1, "slo": 1}, {"size": 10, "req_rate": 1, "slo": 1, "forbid": [1]}], 0.1)
    r = kvgpu.size([{"name": "big", "size": 60, "req_rate": 3, "slo": 1, "tp": 2, "replicas": 2}], 1.0)
    assert r.gpus == 4 and r.proven and "'big' needs 4 distinct GPUs" in r.cheaper[0].reason


# -- several GPU types --------------------------------------------------------------------------

TYPES = [{"name": "A40", "memory": 48, "price": 1.0}, {"name": "H100", "memory": 80, "price": 1.7}]


def covered(mix, cheaper):
    return any(all(a <= b for a, b in zip(mix, m.counts)) for m in cheaper)


@SLOW
@given(sizing_cases(rules=False, max_items=5, n_models=(2, 5)))
def test_cheapest_mix_is_brute_force_optimum(case):
    """Two types: never below the brute-force cheapest cost and equal to it when proven, every
    mix proven impossible is impossible, and every cheaper mix is covered by one listed."""
    models, X = case
    items = items_of(models)
    assume(no_ties(items, [48.0, 80.0], X))
    r = kvgpu.size(models, X, gpu_types=TYPES)
    check_placement(r, models, X)
    best = cheapest_cost(items, [48.0, 80.0], [1.0, 1.7], X)
    assert r.cost >= best - 1e-9
    if r.proven:
        assert r.cost == pytest.approx(best, rel=1e-12)
    for m in r.cheaper:
        assert m.cost < r.cost
        if m.proven:
            assert not mix_feasible(items, [48.0, 80.0], m.counts, X)
    for c in itertools.product(range(len(items) + 1), repeat=2):
        # mixes of more GPUs than models never help (max_gpus defaults to one per model)
        if 0 < sum(c) <= len(items) and c[0] * 1.0 + c[1] * 1.7 < r.cost * (1 - 1e-9):
            assert covered(c, r.cheaper), c


@SLOW
@given(sizing_cases(rules=True, max_items=5, n_models=(1, 4)))
def test_cheapest_mix_with_tp_and_replicas(case):
    models, X = case
    items = items_of(models)
    assume(no_ties(items, [48.0, 80.0], X))
    r = kvgpu.size(models, X, gpu_types=TYPES)
    check_placement(r, models, X)
    best = cheapest_cost(items, [48.0, 80.0], [1.0, 1.7], X)
    assert r.cost >= best - 1e-9
    for m in r.cheaper:
        assert m.cost < r.cost
        if m.proven:
            assert not mix_feasible(items, [48.0, 80.0], m.counts, X)
    if r.proven:
        assert r.cost == pytest.approx(best, rel=1e-12)


def test_mix_summary_and_json():
    models = [{"name": f"m{i}", "size": 30, "req_rate": 0.1, "slo": 1} for i in range(5)]
    r = kvgpu.size(models, 1.0, gpu_types=[{"name": "H100", "memory": 80, "price": 2.0},
                                           kvgpu.GpuType("A40", 48, 1.0)])
    assert [t.name for t in r.types] == ["A40", "H100"] and r.counts == (1, 2) and r.cost == 5.0
    text = r.summary()
    assert text.startswith("cheapest mix found for max KVPR 1: 1 x A40 + 2 x H100 = 3 GPUs, cost 5")
    assert "this is the cheapest" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["counts"] == {"A40": 1, "H100": 2} and d["proven"] and d["gpu_type_of"] == ["A40", "H100", "H100"]
    assert all(m["proven_impossible"] and m["cost"] < 5 for m in d["cheaper"])


def test_long_mix_lists_are_cut_in_the_summary():
    demo = json.loads(resources.files("kvgpu").joinpath("data/demo.json").read_text())
    types = [{"name": "A10", "memory": 24, "price": 0.8}, {"name": "L40", "memory": 48, "price": 1.2},
             {"name": "H100", "memory": 80, "price": 2.0}, {"name": "H200", "memory": 141, "price": 3.5}]
    r = kvgpu.size(demo["models"], 0.075, gpu_types=types)
    check_placement(r, demo["models"], 0.075)
    assert len(r.cheaper) > 12 and all(m.cost < r.cost for m in r.cheaper)
    lines = r.summary().splitlines()
    assert sum(ln.startswith("  ") and "cost" in ln for ln in lines) == 12
    assert f"... and {len(r.cheaper) - 12} cheaper mixes more" in r.summary()
    assert len(r.to_dict()["cheaper"]) == len(r.cheaper)


# -- headroom -----------------------------------------------------------------------------------


def brute_optimum(items, mems):
    """Optimal max KVPR on GPUs of memories ``mems`` (tiny: every assignment)."""
    best = math.inf
    for a in itertools.product(range(len(mems)), repeat=len(items)):
        blocks = [[i for i, g in enumerate(a) if g == h] for h in range(len(mems))]
        best = min(best, max(block_kvpr(items, b, m) for b, m in zip(blocks, mems)))
    return best


@SLOW
@given(sizing_cases(rules=True, max_items=5), st.integers(1, 3), st.floats(0.3, 3.0))
def test_headroom_factor_is_sustained_and_the_limit_is_valid(case, gpus, scale):
    models, X = case
    items = items_of(models)
    assume(max(m.get("tp", 1) * m.get("replicas", 1) for m in models) <= gpus)
    opt = brute_optimum(items, [80.0] * gpus)
    assume(0 < opt < math.inf)
    X = opt * scale
    try:
        h = kvgpu.headroom(models, gpus, max_kvpr=X)
    except kvgpu.NoPlacementFound:  # the rules' greedy start found no packing: nothing to check
        assert any("tp" in m or "replicas" in m for m in models)
        return
    # every rate times the factor, on the placement found: max KVPR at most X
    grown = [dict(m, req_rate=m["req_rate"] * h.factor) for m in models]
    gi = items_of(grown)
    gpus_of = h.placement.gpus_of_models() if h.placement.model_of is not None else \
        [[g] for g in h.placement.assignment.tolist()]
    S, W = np.zeros(gpus), np.zeros(gpus)
    for i, gs in enumerate(gpus_of):
        for (s, w, _), g in zip([it for it in gi if it[2] == i], gs):
            S[g] += s
            W[g] += w
    assert max(safe_div(w, 80.0 - s) for s, w in zip(S, W)) <= X * (1 + 1e-9)
    assert h.factor <= X / opt * (1 + 1e-9) and h.upper_limit >= X / opt * (1 - 1e-9)
    if h.proven:
        assert h.factor == pytest.approx(X / opt, rel=1e-8)
    if not any("tp" in m or "replicas" in m for m in models):
        assert h.proven  # the exact search settles tiny plain instances


def test_headroom_words():
    models = [{"name": "a", "size": 20, "req_rate": 4, "slo": 1}, {"name": "b", "size": 20, "req_rate": 4, "slo": 1}]
    h = kvgpu.headroom(models, 2, max_kvpr=0.2)  # best: one per GPU, 4/60 each -> x3
    assert h.factor == pytest.approx(3.0) and h.proven
    assert h.summary().startswith("2 GPUs sustain every request rate x3 under max KVPR 0.2")
    h = kvgpu.headroom(models, 2, max_kvpr=0.05)
    assert h.factor == pytest.approx(0.75) and "only if every request rate shrinks to x0.75" in h.summary()
    assert json.loads(json.dumps(h.to_dict()))["factor"] == pytest.approx(0.75)


# -- errors -------------------------------------------------------------------------------------

M = [{"name": "a", "size": 20, "req_rate": 2, "slo": 1}, {"name": "b", "size": 30, "req_rate": 1, "slo": 2}]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_kvpr=0), "max_kvpr: must be a positive finite number"),
    (dict(max_kvpr=-0.1), "max_kvpr: must be a positive finite number"),
    (dict(max_kvpr=float("nan")), "max_kvpr: must be a positive finite number"),
    (dict(max_kvpr=float("inf")), "max_kvpr: must be a positive finite number"),
    (dict(max_kvpr="0.1"), "max_kvpr: must be a positive number"),
    (dict(max_kvpr=True), "max_kvpr: must be a positive number"),
    (dict(max_kvpr=0.1, gpu_types=[]), "gpu_types: no GPU types given"),
    (dict(max_kvpr=0.1, gpu_types="H100"), "gpu_types: must be a list"),
    (dict(max_kvpr=0.1, gpu_types=[{"name": "x", "memory": 80, "price": 0}]), r"gpu_types\[0\] \('x'\): price"),
    (dict(max_kvpr=0.1, gpu_types=[{"name": "x", "memory": "80", "price": 1}]), r"gpu_types\[0\] \('x'\): memory"),
    (dict(max_kvpr=0.1, gpu_types=[{"name": "x", "memory": 80}]), r"gpu_types\[0\]: missing field 'price'"),
    (dict(max_kvpr=0.1, gpu_types=[{"name": "x", "mem": 80, "price": 1}]), "unknown key 'mem'"),
    (dict(max_kvpr=0.1, gpu_types=[{"name": "x", "memory": 80, "price": 1}] * 2), "'x' is given twice"),
    (dict(max_kvpr=0.1, gpu_mem=80, gpu_types=TYPES), "not both"),
    (dict(max_kvpr=0.1, gpu_mem=[80, 40]), "gpu_mem: sizing takes one memory"),
    (dict(max_kvpr=0.1, gpu_mem=0), "gpu_mem: must be a positive finite number"),
    (dict(max_kvpr=0.1, max_gpus=0), "max_gpus: must be an integer from 1"),
    (dict(max_kvpr=0.1, max_gpus=True), "max_gpus: must be an integer from 1"),
    (dict(max_kvpr=0.1, max_gpus=10 ** 20), "max_gpus: must be an integer from 1"),
    (dict(max_kvpr=0.07, max_gpus=1), "max_gpus: 1 GPUs cannot meet max KVPR 0.07"),
    (dict(max_kvpr=0.1, exact_work=-1), "exact_work must be an integer from 0"),
    (dict(max_kvpr=0.1, exact_work=10 ** 20), "exact_work must be an integer from 0"),
    (dict(max_kvpr=0.1, exact_work=1.5), "exact_work must be an integer, got 1.5"),
])
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        kvgpu.size(M, **kwargs)


def test_bad_models():
    with pytest.raises(kvgpu.InvalidInstance, match="no models to size"):
        kvgpu.size([], 0.1)
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 0 \('a'\): it needs 90 GB .* larger than every GPU"):
        kvgpu.size([{"name": "a", "size": 90, "req_rate": 1, "slo": 1}], 0.1)
    with pytest.raises(kvgpu.InvalidInstance, match="field 'tp' must be an integer"):
        kvgpu.size([{"name": "a", "size": 10, "req_rate": 1, "slo": 1, "tp": "two"}], 0.1)
    with pytest.raises(kvgpu.NoPlacementFound, match="no number of GPUs meets max KVPR 0.01: 'a' alone") as e:
        kvgpu.size([{"name": "a", "size": 60, "req_rate": 1, "slo": 1}], 0.01)  # 1/20 = 0.05 alone
    assert e.value.proven
    with pytest.raises(kvgpu.InvalidInstance, match="max_kvpr"):
        kvgpu.headroom(M, 2, max_kvpr=0)


def test_any_iterable_of_models():
    assert kvgpu.size((m for m in M), 0.1).gpus == kvgpu.size(M, 0.1).gpus
    assert kvgpu.headroom((m for m in M), 2, max_kvpr=0.1).placement.instance.n_models == 2


# -- CLI ----------------------------------------------------------------------------------------


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvgpu.cli", "size", *args], capture_output=True, text=True)


@pytest.fixture
def models_file(tmp_path):
    f = tmp_path / "models.json"
    f.write_text(json.dumps({"gpus": 3, "models": [{"name": f"m{i}", "size": 30, "req_rate": 0.1, "slo": 1}
                                                   for i in range(5)]}))
    return str(f)


def test_cli_size_text_and_json(models_file):
    out = run(models_file, "--max-kvpr", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == ("3 GPUs of 80 GB meet max KVPR 1 (achieved 0.01); 2 cannot (proven: at that "
                                          "target at most 2 of the 5 shards/models fit on one GPU, so they need 3 GPUs)")
    assert "gives gpus: 3, not used" in out.stderr  # the file's cluster size is not silently dropped
    out = run(models_file, "--max-kvpr", "1", "--gpu-types", "H100:80:2.0,A40:48:1", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["counts"] == {"A40": 1, "H100": 2} and d["cost"] == 5 and d["proven"]
    assert len(d["placement"]["gpus"]) == 3 and d["achieved_max_kvpr"] <= 1


def test_cli_headroom(models_file):
    out = run(models_file, "--max-kvpr", "0.02", "--headroom")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 GPUs sustain every request rate x") and "max KVPR 0.02" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-kvpr", "abc"], "--max-kvpr: must be a number"),
    (["--max-kvpr", "-1"], "max_kvpr: must be a positive finite number"),
    (["--max-kvpr", "1", "--gpu-types", "H100:80"], "--gpu-types: 'H100:80' is not NAME:MEMORY_GB:PRICE"),
    (["--max-kvpr", "1", "--gpu-types", "H100:80:0"], "price: must be a positive finite number"),
    (["--max-kvpr", "1", "--gpu-types", "H100:80:1", "--gpu-mem", "80"], "not both"),
    (["--max-kvpr", "1", "--gpus", "4"], "--gpus is for --headroom"),
    (["--max-kvpr", "1", "--headroom", "--max-gpus", "4"], "--max-gpus are for sizing"),
    (["--max-kvpr", "1", "--max-gpus", "2"], "max_gpus: 2 GPUs cannot meet max KVPR 1"),
])
def test_cli_errors_one_line(models_file, args, message):
    out = run(models_file, *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("kvgpu: error: ") and message in out.stderr
    assert len([ln for ln in out.stderr.splitlines() if ln.startswith("kvgpu: error")]) == 1
    assert "Traceback" not in out.stderr


def test_cli_refuses_pins_and_needs_a_cluster_for_headroom(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("name,size,req_rate,slo,pin\na,10,1,1,0\n")
    out = run(str(f), "--max-kvpr", "1")
    assert out.returncode == 2 and "pin names GPU ids" in out.stderr
    f.write_text("name,size,req_rate,slo\na,10,1,1\n")
    out = run(str(f), "--max-kvpr", "1", "--headroom")
    assert out.returncode == 2 and "--headroom needs the cluster: give --gpus N" in out.stderr
