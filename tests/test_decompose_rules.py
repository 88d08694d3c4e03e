"""Decomposition of clusters with rules (kvgpu.decompose_rules): the partition keeps tp groups,
pins and ``node: K`` inside one group; forced decompositions of small rule clusters keep every
rule (the tests' independent check) and stay close to the whole-cluster answer; refusals by
name; the same seed gives the same answer."""

import warnings

import numpy as np
import pytest
from conftest import brute_force_problem, check_placement, close
from hypothesis import HealthCheck, given, settings
from test_rules import cluster_problems

import kvgpu
from kvgpu import decompose_rules
from kvgpu.errors import InvalidInstance
from kvgpu.generate import tp_cluster
from kvgpu.problem import build_problem

PER_NODE = 8


def _ruled(seed: int, gpus: int, tp_pin: bool = False):
    """A tp cluster (nodes of 8, 70% full) with every rule the decomposition keeps: tp shards in
    nodes and replicas (the generator's), a pinned model (and with ``tp_pin`` a pinned tp=2
    model), a model that forbids GPUs, one held to a node (``node: K``), an adapter beside a
    replicated base, and a GPU out of service.  Returns ``(models, options)``.

    ``tp_pin`` only for the partition: with it the whole-cluster start finds no placement of
    these 64-GPU clusters (the greedy start and its overflow repair fail, the exact search gives
    up after its work), so there is nothing to compare with."""
    rng = np.random.default_rng(seed)
    models, opts = tp_cluster(rng, gpus, fill=0.7)
    single = [m for m in models if m["tp"] == 1 and m.get("replicas", 1) == 1]
    pairs = [m for m in models if m["tp"] == 2]
    nodes = rng.permutation(gpus // PER_NODE)
    off = int(nodes[0]) * PER_NODE + 7  # out of service
    single[0]["pin"] = int(nodes[1]) * PER_NODE + 1
    single[1]["forbid"] = [int(g) for g in rng.choice(gpus, 5, replace=False) if g != off]
    single[2]["node"] = int(nodes[2])
    if pairs and tp_pin:
        pairs[0]["pin"] = [int(nodes[3]) * PER_NODE + 2, int(nodes[3]) * PER_NODE + 5]
    base = next(m for m in models if m.get("replicas", 1) > 1)
    models.append({"name": "lora", "size": 0.5, "req_rate": 0.5, "slo": 5.0, "colocate_with": base["name"]})
    return models, dict(opts, out_of_service=[off])


def _node_of(gpus: int) -> np.ndarray:
    return np.arange(gpus) // PER_NODE


@pytest.fixture(scope="module")
def solved():
    """Forced decompositions and whole-cluster solves of 64- and 128-GPU rule clusters (computed
    once for the tests of this module): ``[(models, options, decomposed, whole)]``."""
    out = []
    for seed, gpus in ((0, 64), (1, 64), (2, 64), (3, 128)):
        models, opts = _ruled(seed, gpus)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dec = kvgpu.solve(models, decompose=True, seed=5, **opts)
            whole = kvgpu.solve(models, decompose=False, objective="seed", seed=5, **opts)
        out.append((models, opts, dec, whole))
    return out


def test_forced_decomposition_keeps_every_rule_and_stays_close_to_the_whole_cluster(solved):
    ratios = []
    for models, opts, dec, whole in solved:
        assert dec.decomposed and "decomposition" in dec.note
        check_placement(dec.problem, dec, node_of=_node_of(opts["gpus"]))
        assert dec.lower_bound == pytest.approx(whole.lower_bound, rel=1e-9) or dec.lower_bound <= dec.max_kvpr
        assert dec.lower_bound <= dec.max_kvpr
        ratios.append(dec.max_kvpr / whole.max_kvpr)
    print("decomposed / whole max KVPR:", [round(r, 4) for r in ratios], "mean", round(float(np.mean(ratios)), 4))
    assert np.mean(ratios) <= 1.02


def test_partition_keeps_nodes_pins_and_node_rules_in_one_group():
    models, opts = _ruled(7, 128, tp_pin=True)
    prob = build_problem(models, opts["gpus"], opts["gpu_mem"], gpus_per_node=PER_NODE,
                         out_of_service=opts["out_of_service"])
    gpu_group, item_group, K = decompose_rules.partition(prob, 0.1, 32)
    assert K == 4
    node_of = _node_of(128)
    for nd in range(128 // PER_NODE):  # whole nodes
        assert len(set(gpu_group[node_of == nd].tolist())) == 1
    allowed = prob.allowed.astype(bool)
    for m, spec in enumerate(prob.specs):
        items = np.nonzero(prob.model_of == m)[0]
        for i in items.tolist():  # each item's group holds GPUs it may use
            assert allowed[i][gpu_group == item_group[i]].any()
        if spec.pin is not None or spec.node is not None:
            assert len(set(item_group[items].tolist())) == 1
        if spec.tp > 1:  # a replica's shards in one group
            for r in range(spec.replicas):
                assert len(set(item_group[items[r * spec.tp:(r + 1) * spec.tp]].tolist())) == 1
    adapter = [m for m, s in enumerate(prob.specs) if s.colocate_with][0]
    base = [m for m, s in enumerate(prob.specs) if s.name == prob.specs[adapter].colocate_with][0]
    assert set(item_group[prob.model_of == adapter].tolist()) <= set(item_group[prob.model_of == base].tolist())
    assert len(set(item_group[prob.model_of == base].tolist())) == 1


def test_same_seed_same_answer(solved):
    models, opts, dec, _ = solved[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = kvgpu.solve(models, decompose=True, seed=5, **opts)
    assert (again.assignment == dec.assignment).all() and again.max_kvpr == dec.max_kvpr


def test_replacement_refused_by_name_and_solved_whole_when_automatic(monkeypatch):
    models = [dict(name=f"m{i}", size=20.0, req_rate=1.0 + i, slo=1.0, tp=2, cur_gpu_id=[2 * i, 2 * i + 1])
              for i in range(4)]
    with pytest.raises(InvalidInstance, match="re-placement .*solved whole"):
        kvgpu.solve(models, 16, gpus_per_node=8, decompose=True, max_moves=1)
    monkeypatch.setattr(decompose_rules, "AUTO_GPUS", 8)
    p = kvgpu.solve(models, 16, gpus_per_node=8, max_moves=1)
    assert not p.decomposed


def test_automatic_from_the_threshold(monkeypatch):
    models, opts = tp_cluster(np.random.default_rng(3), 32, fill=0.6)
    assert not kvgpu.solve(models, effort=3, **opts).decomposed
    monkeypatch.setattr(decompose_rules, "AUTO_GPUS", 32)
    p = kvgpu.solve(models, effort=3, **opts)
    assert p.decomposed and "groups of whole nodes" in p.note
    assert not kvgpu.solve(models, effort=3, decompose=False, **opts).decomposed


def test_dask_refused_where_nothing_is_decomposed():
    models = [dict(size=10.0, req_rate=1.0, slo=1.0, tp=2), dict(size=10.0, req_rate=1.0, slo=1.0)]
    with pytest.raises(InvalidInstance, match="nothing is decomposed"):
        kvgpu.solve(models, 4, dask=_FakeClient())
    with pytest.raises(InvalidInstance, match="decompose=False"):
        kvgpu.solve(models, 4, decompose=False, dask=_FakeClient())


class _FakeClient:
    """Enough of a dask Client to be accepted (never used: the solve is refused first)."""

    def scheduler_info(self):
        raise AssertionError("not reached")

    def submit(self, *a, **k):
        raise AssertionError("not reached")

    def gather(self, f):
        raise AssertionError("not reached")


def test_a_split_that_does_not_solve_is_solved_whole_and_said(monkeypatch):
    models, opts = tp_cluster(np.random.default_rng(3), 32, fill=0.6)
    monkeypatch.setattr(decompose_rules, "solve", lambda *a, **k: None)
    p = kvgpu.solve(models, effort=3, decompose=True, **opts)
    assert not p.decomposed and "solved whole" in p.note
    check_placement(p.problem, p)


DATA = __import__("pathlib").Path(__file__).parent / "data" / "ops"


def test_interleaved_nodes_from_a_file_keep_tp_in_a_node(capsys):
    # nodes [[0, 2, 4], [1, 3, 5]]: groups are whole nodes whatever their GPU ids
    import yaml

    from kvgpu import cli

    spec = yaml.safe_load((DATA / "second_max_tp_nodes.yaml").read_text())
    p = kvgpu.solve(spec["models"], spec["gpus"], gpu_mem=spec["gpu_mem"], nodes=spec["nodes"], decompose=True)
    assert p.decomposed
    node_of = np.zeros(6, np.int64)
    for k, node in enumerate(spec["nodes"]):
        node_of[node] = k
    check_placement(p.problem, p, node_of=node_of)
    assert cli.main(["solve", str(DATA / "second_max_tp_nodes.yaml"), "--decompose", "on"]) == 0
    assert "solved by decomposition" in capsys.readouterr().out


def test_a_base_whose_replicas_fit_no_group_is_solved_whole_and_said():
    # 3 GPUs in groups of one: the base's two replicas and its adapters (one unit) fit no group
    import yaml

    spec = yaml.safe_load((DATA / "lora_with_base.yaml").read_text())
    p = kvgpu.solve(spec["models"], spec["gpus"], gpu_mem=spec["gpu_mem"], decompose=True)
    assert not p.decomposed and "solved whole" in p.note
    check_placement(p.problem, p)


def test_dask_local_cluster_gives_the_local_answer():
    pytest.importorskip("distributed")
    from kvgpu import sweep

    models, opts = tp_cluster(np.random.default_rng(11), 32, fill=0.6)
    local = kvgpu.solve(models, decompose=True, effort=6, seed=3, **opts)
    client = sweep.dask_client(local_workers=2)
    try:
        remote = kvgpu.solve(models, decompose=True, effort=6, seed=3, dask=client, **opts)
    finally:
        client.close()
    assert remote.decomposed and (remote.assignment == local.assignment).all()
    assert remote.max_kvpr == local.max_kvpr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems())
def test_forced_on_tiny_rule_problems_valid_never_a_false_refusal_against_brute_force(draw):
    # tiny problems (2-4 GPUs, tp, replicas, pins, forbid, nodes of 2): split into groups of one
    # or two GPUs, or solved whole where no split solves; a re-placement is refused by name
    models, G, mem, kw = draw
    try:
        prob = build_problem(models, G, mem, **kw)
    except InvalidInstance:
        return
    if prob.is_replan:
        with pytest.raises(InvalidInstance, match="re-placement"):
            kvgpu.solve(models, G, gpu_mem=mem, decompose=True, **kw)
        return
    opt, _ = brute_force_problem(prob)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = kvgpu.solve(models, G, gpu_mem=mem, decompose=True, **kw)
    except kvgpu.NoPlacementFound as e:
        assert opt == np.inf and e.proven, f"refused, but brute force places it at {opt}"
        return
    node_of = np.arange(G) // kw["gpus_per_node"] if "gpus_per_node" in kw else None
    check_placement(prob, p, node_of)
    assert p.max_kvpr >= opt * (1 - 1e-9) and p.lower_bound <= opt * (1 + 1e-9)
    if p.proven_optimal:
        assert close(p.max_kvpr, opt)


def test_effort_zero_searches_nothing_and_rule_refusals_of_the_whole_path_hold():
    models, opts = tp_cluster(np.random.default_rng(3), 32, fill=0.6)
    p = kvgpu.solve(models, decompose=True, effort=0, **opts)
    assert p.decomposed and "0 repair round(s)" in p.note
    check_placement(p.problem, p, node_of=_node_of(32))
    with pytest.raises(InvalidInstance, match="backend='numpy'"):
        kvgpu.solve(models, decompose=True, backend="numpy", **opts)


def test_a_pinned_tp_cluster_the_whole_start_cannot_place_is_placed_by_groups():
    # with the tp=2 model pinned, the whole-cluster start of this 64-GPU cluster finds nothing
    # (greedy and overflow repair fail, the exact search gives up); its groups of 16 GPUs solve
    models, opts = _ruled(1, 64, tp_pin=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = kvgpu.solve(models, decompose=True, **opts)
    assert p.decomposed
    check_placement(p.problem, p, node_of=_node_of(64))


def test_below_the_automatic_split_the_whole_search_and_the_groups_both_run():
    """From 32 GPUs a rule cluster is searched whole and by decomposition, the better kept: with
    2 GPUs out of service the whole search of these tp clusters finds no placement at all (its
    exact search gives up), the groups do; the answer keeps every rule and says which ran."""
    import warnings

    from conftest import check_placement

    for seed in (0, 2):
        models, o = tp_cluster(np.random.default_rng(seed), 32)
        with pytest.raises(kvgpu.NoPlacementFound) as whole:
            kvgpu.solve(models, **o, out_of_service=[3, 30], decompose=False)
        assert not whole.value.proven
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kvgpu.KvgpuWarning)
            split = kvgpu.solve(models, **o, out_of_service=[3, 30], decompose=True)
            p = kvgpu.solve(models, **o, out_of_service=[3, 30])
        check_placement(p.problem, p, p.problem.node_of)
        assert p.max_kvpr <= split.max_kvpr * (1 + 1e-9) and p.lower_bound <= p.max_kvpr
        assert "the whole-cluster search found no placement" in p.note and p.decomposed
