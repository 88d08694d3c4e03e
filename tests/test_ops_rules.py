"""The words operators use: GPUs out of service (``out_of_service``, ``--drain``), a model kept
inside one node (``node: K``) and an adapter beside its base model (``colocate_with``) -- each
holds on every path (start, search, proof, re-placement budgets), checked against brute force
on tiny instances and on the operators' cases."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import brute_force_problem, check_placement, check_plan_executable, close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rules import cluster_problems

import kvgpu
from kvgpu.io import read_models
from kvgpu.problem import build_problem

OPS = Path(__file__).parent / "data" / "ops"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kvgpu.cli", *map(str, args)], capture_output=True, text=True)


def _solve_or_refusal(models, G, mem, kw):
    """``(placement, None)`` or ``(None, NoPlacementFound)``."""
    try:
        return kvgpu.solve(models, G, gpu_mem=mem, **kw), None
    except kvgpu.NoPlacementFound as e:
        return None, e


def _agrees_with_brute_force(models, G, mem, kw, node_of=None):
    """Solve, and hold the answer against brute force: valid, optimal when proven, never a
    false refusal.  Returns the placement (None when both say there is none; skipped input: False)."""
    try:
        prob = build_problem(models, G, mem, **kw)
    except kvgpu.InvalidInstance:
        return False
    opt, _ = brute_force_problem(prob)
    p, refusal = _solve_or_refusal(models, G, mem, kw)
    if p is None:
        assert opt == np.inf, f"refused ({refusal}), but brute force places it at {opt}"
        assert refusal.proven
        return None
    check_placement(prob, p, node_of)
    if prob.is_replan:
        check_plan_executable(p.problem, p)
    assert p.max_kvpr >= opt * (1 - 1e-9)
    assert p.lower_bound <= opt * (1 + 1e-9)
    if p.proven_optimal:
        assert close(p.max_kvpr, opt), "proven optimal but brute force does better"
    return p


# ----------------------------------------------------------------------------- out of service

@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems(), st.data())
def test_out_of_service_gpus_are_never_used_and_answers_match_brute_force(draw, data):
    models, G, mem, kw = draw
    kw = dict(kw, out_of_service=data.draw(st.lists(st.integers(0, G - 1), min_size=1, max_size=G - 1, unique=True)))
    _agrees_with_brute_force(models, G, mem, kw)


def test_drain_node_case_leaves_gpus_2_and_3_at_the_optimum_under_the_gb_budget():
    specs, opts = read_models(OPS / "drain_node.yaml")
    assert opts["out_of_service"] == [2, 3]
    kw = dict(gpu_mem=opts["gpu_mem"], out_of_service=opts["out_of_service"], max_migrated_gb=60)
    prob = build_problem(specs, opts["gpus"], opts["gpu_mem"], out_of_service=[2, 3], max_migrated_gb=60)
    opt, _ = brute_force_problem(prob)
    p = kvgpu.replan(specs, opts["gpus"], **kw)
    check_placement(prob, p)
    check_plan_executable(p.problem, p)
    assert not set(p.assignment.tolist()) & {2, 3}
    assert close(p.max_kvpr, opt) and p.proven_optimal
    assert {m.model for m in p.plan} >= {"mistral-7b", "gemma-2-9b", "phi-3-mini"}
    assert sum(m.size_gb for m in p.plan) <= 60 + 1e-9
    assert p.to_dict()["out_of_service"] == [2, 3]


def test_drain_flag_and_file_key_give_the_same_answer(tmp_path):
    data = yaml.safe_load((OPS / "drain_node.yaml").read_text())
    del data["out_of_service"]
    plain = tmp_path / "no_key.yaml"
    plain.write_text(yaml.safe_dump(data))
    keyed = _cli("replan", OPS / "drain_node.yaml", "--max-migrated-gb", 60, "--json")
    flag = _cli("replan", plain, "--max-migrated-gb", 60, "--drain", "2,3", "--json")
    both = _cli("replan", OPS / "drain_node.yaml", "--max-migrated-gb", 60, "--drain", "3", "--json")
    for r in (keyed, flag, both):
        assert r.returncode == 0, r.stderr
    a, b, c = (json.loads(r.stdout) for r in (keyed, flag, both))
    assert a["assignment"] == b["assignment"] == c["assignment"]
    assert not set(a["assignment"]) & {2, 3}
    table = _cli("solve", plain, "--drain", "2,3")
    assert table.returncode == 0 and "(out of service)" in table.stdout


def test_drain_beyond_the_budget_is_refused_saying_so():
    specs, opts = read_models(OPS / "drain_node.yaml")
    with pytest.raises(kvgpu.NoPlacementFound, match="out_of_service") as e:  # 40.6 GB must leave
        kvgpu.replan(specs, 4, gpu_mem=80, out_of_service=[2, 3], max_migrated_gb=30)
    assert e.value.proven
    with pytest.raises(kvgpu.NoPlacementFound, match="max_moves=2"):
        kvgpu.replan(specs, 4, gpu_mem=80, out_of_service=[2, 3], max_moves=2)


@pytest.mark.parametrize("oos, message", [
    ([4], "out_of_service names GPU 4, not one of 0..3"),
    ([0, 1, 2, 3], "all 4 GPU"),
    ([-1], "out_of_service must be an integer from 0"),
    ([1.5], "out_of_service must be an integer"),
    ([True], "boolean"),
    ([[1]], "flat list"),
])
def test_bad_out_of_service_is_named(oos, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        kvgpu.solve([{"name": "a", "size": 10, "req_rate": 1, "slo": 1}], 4, out_of_service=oos)


def test_out_of_service_against_pins_and_room_is_named():
    a = {"name": "a", "size": 10, "req_rate": 1, "slo": 1}
    with pytest.raises(kvgpu.InvalidInstance, match="pinned to GPU 1, which is out of service"):
        kvgpu.solve([dict(a, pin=1)], 4, out_of_service=[1])
    with pytest.raises(kvgpu.InvalidInstance, match="only 2 GPU.*out_of_service"):
        kvgpu.solve([dict(a, replicas=3)], 4, out_of_service=[1, 2])


def test_cli_drain_and_file_key_errors_are_one_line(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("gpus: 2\nout_of_servce: [1]\nmodels:\n  - {name: a, size: 1, req_rate: 1, slo: 1}\n")
    r = _cli("solve", f)
    assert r.returncode == 2 and "did you mean 'out_of_service'" in r.stderr and "Traceback" not in r.stderr
    f.write_text("gpus: 2\nout_of_service: [2]\nmodels:\n  - {name: a, size: 1, req_rate: 1, slo: 1}\n")
    r = _cli("solve", f)
    assert r.returncode == 2 and "out_of_service names GPU 2" in r.stderr and str(f) in r.stderr
    r = _cli("solve", f, "--drain", "x")
    assert r.returncode == 2 and "--drain" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("size", f, "--max-kvpr", "1")
    assert r.returncode == 2 and "out_of_service" in r.stderr


# ----------------------------------------------------------------------------- node: K

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems(), st.data())
def test_node_key_keeps_every_shard_inside_its_node(draw, data):
    models, G, mem, kw = draw
    if G != 4:
        return
    kw = dict(kw, gpus_per_node=2)
    kw.pop("nodes", None)
    for m in models:
        if data.draw(st.booleans()):
            m["node"] = data.draw(st.integers(0, 1))
    _agrees_with_brute_force(models, G, mem, kw, node_of=np.arange(4) // 2)


def test_node_key_is_checked():
    a = {"name": "a", "size": 10, "req_rate": 1, "slo": 1, "node": 1}
    p = kvgpu.solve([a, dict(a, name="b"), dict(a, name="c", node=None)], 8, gpus_per_node=4)
    assert all(g >= 4 for g in p.gpus_of_models()[0] + p.gpus_of_models()[1])
    with pytest.raises(kvgpu.InvalidInstance, match="needs the cluster's nodes"):
        kvgpu.solve([a], 4)
    with pytest.raises(kvgpu.InvalidInstance, match="node 1 is not one of the cluster's nodes 0..0"):
        kvgpu.solve([a], 4, gpus_per_node=4)
    with pytest.raises(kvgpu.InvalidInstance, match="pinned to GPU 0, which is outside its node 1"):
        kvgpu.solve([dict(a, pin=0)], 4, gpus_per_node=2)
    with pytest.raises(kvgpu.InvalidInstance, match="only 2 GPU"):
        kvgpu.solve([dict(a, replicas=3)], 4, gpus_per_node=2)
    with pytest.raises(kvgpu.InvalidInstance, match="field 'node' must be an integer"):
        kvgpu.solve([dict(a, node="x")], 4, gpus_per_node=2)
    with pytest.raises(kvgpu.InvalidInstance, match=r"\bnode\b.*\bsiz(ed|ing)\b"):
        kvgpu.size([a], 0.5)


# ----------------------------------------------------------------------------- colocate_with

@st.composite
def with_adapters(draw):
    """A draw of ``cluster_problems`` plus 1-2 adapters (0.3-2 GB, tp=1), each beside a model of
    the draw; in re-placements an adapter runs beside its base or elsewhere (it must then move),
    or is new.  At most 9 items."""
    models, G, mem, kw = draw(cluster_problems())
    items = sum(m.get("tp", 1) * m.get("replicas", 1) for m in models)
    for j in range(draw(st.integers(1, 2))):
        if items >= 9:
            break
        bases = [m for m in models if m.get("tp", 1) == 1]  # an adapter of a tp base is refused
        if not bases:
            break
        base = draw(st.sampled_from(bases))
        a = {"name": f"lora{j}", "size": draw(st.sampled_from([0.3, 1.0, 2.0])), "req_rate": draw(st.integers(0, 9)),
             "slo": draw(st.sampled_from([0.5, 1, 2])), "colocate_with": base["name"]}
        if draw(st.integers(0, 4)) == 0:
            a["forbid"] = [draw(st.integers(0, G - 1))]
        if "max_moves" in kw:
            a["cur_gpu_id"] = draw(st.integers(-1, G - 1))
        models.insert(draw(st.integers(0, len(models))), a)  # before or after its base
        items += 1
    return models, G, mem, kw


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(with_adapters())
def test_adapters_sit_beside_their_base_and_answers_match_brute_force(draw):
    models, G, mem, kw = draw
    _agrees_with_brute_force(models, G, mem, kw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(with_adapters(), st.integers(0, 3))
def test_search_alone_keeps_adapters_beside_their_base(draw, seed):
    """Without the proof: start, search moves and their budget keep the rule on their own."""
    models, G, mem, kw = draw
    try:
        prob = build_problem(models, G, mem, **kw)
        p = kvgpu.solve(models, G, gpu_mem=mem, exact=False, seed=seed, effort=20, **kw)
    except (kvgpu.InvalidInstance, kvgpu.NoPlacementFound):
        return
    check_placement(prob, p)


def test_lora_case_puts_each_adapter_beside_a_base_replica_at_the_optimum():
    specs, opts = read_models(OPS / "lora_with_base.yaml")
    prob = build_problem(specs, opts["gpus"], opts["gpu_mem"])
    opt, _ = brute_force_problem(prob)
    p = kvgpu.solve(specs, opts["gpus"], gpu_mem=opts["gpu_mem"])
    check_placement(prob, p)
    assert close(p.max_kvpr, opt) and p.proven_optimal
    base, sql, support = p.gpus_of_models()
    assert sql[0] in base and support[0] in base and sql != support  # one adapter per replica
    r = _cli("solve", OPS / "lora_with_base.yaml", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["assignment"] == p.assignment.tolist()


def test_replan_moves_an_adapter_with_its_base_or_not_at_all():
    base = {"name": "base", "size": 16, "req_rate": 4, "slo": 1, "cur_gpu_id": 0}
    lora = {"name": "lora", "size": 0.5, "req_rate": 2, "slo": 1, "cur_gpu_id": 0, "colocate_with": "base"}
    other = {"name": "other", "size": 30, "req_rate": 1, "slo": 1, "cur_gpu_id": 1}
    with pytest.raises(kvgpu.NoPlacementFound, match="max_moves=1") as e:  # both must leave GPU 0
        kvgpu.replan([base, lora, other], 3, gpu_mem=48, max_moves=1, out_of_service=[0])
    assert e.value.proven
    p = kvgpu.replan([lora, base, other], 3, gpu_mem=48, max_moves=2, out_of_service=[0])
    check_placement(p.problem, p)
    check_plan_executable(p.problem, p)
    a = p.gpus_of_models()
    assert a[0] == a[1] and a[0] != [0]
    assert [m.model for m in p.plan] == ["base", "lora"]  # the adapter follows its base, listed first or not
    # an adapter running away from its base must join it (one move), or its base comes to it
    p = kvgpu.replan([base, dict(lora, cur_gpu_id=2), other], 3, gpu_mem=48, max_moves=1)
    check_placement(p.problem, p)
    assert p.moved_models == 1


@pytest.mark.parametrize("change, message", [
    ({"colocate_with": "bse"}, "no model's name \\(did you mean 'base'\\?\\)"),
    ({"colocate_with": "lora"}, "names the model itself"),
    ({"colocate_with": 3}, "must be the name of another model"),
    ({"tp": 2}, "adapter of one shard"),
    ({"replicas": 2}, "adapter of one shard"),
    ({"forbid": [0, 1]}, "may use none of the GPUs its base"),
])
def test_bad_colocation_is_named(change, message):
    base = {"name": "base", "size": 16, "req_rate": 4, "slo": 1, "pin": [0, 1], "replicas": 2}
    lora = dict({"name": "lora", "size": 0.5, "req_rate": 2, "slo": 1, "colocate_with": "base"}, **change)
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        kvgpu.solve([base, lora], 3, gpu_mem=48)


def test_an_adapter_of_a_tp_base_is_refused():
    """A tp engine serves an adapter on all its GPUs; kvgpu would place it on one: refused."""
    base = {"name": "base", "size": 16, "req_rate": 4, "slo": 1, "tp": 2}
    lora = {"name": "lora", "size": 0.5, "req_rate": 2, "slo": 1, "colocate_with": "base"}
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 1 \('lora'\): colocate_with names model 0 \('base'\), "
                                                    r"a tp=2 model; an adapter of a tp base is not supported"):
        kvgpu.solve([base, lora], 3, gpu_mem=48)


def test_colocation_chains_duplicates_and_other_paths_are_refused_by_name():
    base = {"name": "base", "size": 16, "req_rate": 4, "slo": 1}
    a = {"name": "a", "size": 0.5, "req_rate": 2, "slo": 1, "colocate_with": "base"}
    b = {"name": "b", "size": 0.5, "req_rate": 2, "slo": 1, "colocate_with": "a"}
    with pytest.raises(kvgpu.InvalidInstance, match="chains are not supported: name the base model 'base'"):
        kvgpu.solve([base, a, b], 2)
    with pytest.raises(kvgpu.InvalidInstance, match="which 2 models are called"):
        kvgpu.solve([base, dict(base), a], 3)
    with pytest.raises(kvgpu.InvalidInstance, match="mode='seed'"):
        kvgpu.solve([base, a], 2, mode="seed")
    with pytest.raises(kvgpu.InvalidInstance, match="backend='numpy'"):  # and 'cuda': the same refusal
        kvgpu.solve([base, a], 2, backend="numpy")
    with pytest.raises(kvgpu.InvalidInstance, match=r"colocate_with.*\bsizing\b"):
        kvgpu.size([base, a], 0.5)
    with pytest.raises(kvgpu.InvalidInstance, match="did you mean 'colocate_with'"):
        kvgpu.solve([base, dict(a, colocate=a.pop("colocate_with"))], 2)


def test_colocate_with_from_a_csv_file(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("name,size,req_rate,slo,replicas,colocate_with\nbase,16,3,2,2,\nlora,0.3,4,2,,base\n")
    r = _cli("solve", f, "--gpus", 3, "--gpu-mem", 48, "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)["model_gpus"]
    assert a[1][0] in a[0]
