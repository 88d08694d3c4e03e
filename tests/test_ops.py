"""An operator's loop: every entry point honours every field of the file (or refuses it by
name), the same status words everywhere for the same proof, and output that does not mislead
(CSV/JSON column meanings, names with line breaks, memory segments of the plot).  The cases of
``tests/data/ops/`` with their right answers (found by hand / brute force), and per field and
entry point a file whose answer changes when the field is dropped."""
import csv
import json
import math
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from conftest import brute_force_problem, check_placement
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu import cluster, plot, sweep
from kvgpu.capacity import node_lists  # the sizing's node layout, to build the oracle's problem
from kvgpu.cli import main
from kvgpu.io import GPU_COLUMNS, MODEL_COLUMNS
from kvgpu.problem import build_problem
from kvgpu.results import interval, percent, printable

OPS = Path(__file__).parent / "data" / "ops"


def cli(capsys, *argv):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv):
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# -- ops/size_reserve_ignored.yaml, ops/size_nodes_ignored.yaml ------------------------------------


def test_size_and_headroom_keep_the_files_reserve(capsys):
    f = OPS / "size_reserve_ignored.yaml"
    d = cli_json(capsys, "size", f, "--max-kvpr", 0.1)
    assert d["gpus"] == 2 and d["proven"] and d["reserve_gb"] == 8  # one GPU gives 2/12 = 0.1667
    assert d["cheaper"][0]["proven_impossible"]
    assert cli_json(capsys, "solve", f, "--gpus", 1)["max_kvpr"] == pytest.approx(2 / 12)
    h = cli_json(capsys, "size", f, "--max-kvpr", 0.1, "--headroom", "--gpus", 1)
    assert h["factor"] == pytest.approx(0.6) and h["proven"]
    code, out, _ = cli(capsys, "size", f, "--max-kvpr", 0.1)
    assert code == 0 and out.startswith("2 GPUs of 80 GB (8 GB reserved each) meet max KVPR 0.1")


def test_size_and_headroom_refuse_a_tp_model_wider_than_the_nodes(capsys):
    f = OPS / "size_nodes_ignored.yaml"
    for argv in (("size", f, "--max-kvpr", 0.1), ("size", f, "--max-kvpr", 0.1, "--headroom", "--gpus", 4),
                 ("solve", f, "--gpus", 4)):
        code, out, err = cli(capsys, *argv)
        assert code == 2 and not out, argv
        assert "'big'" in err and "tp=4 shards must share a node" in err, err
    with pytest.raises(kvgpu.InvalidInstance, match="nodes hold 2 GPU"):
        kvgpu.size([{"name": "big", "size": 120, "req_rate": 1, "slo": 1, "tp": 4}], 0.1, gpus_per_node=2)
    # same_node: false lets them span nodes, as solve reads it
    r = kvgpu.size([{"name": "big", "size": 120, "req_rate": 1, "slo": 1, "tp": 4, "same_node": False}], 0.1,
                   gpus_per_node=2)
    assert r.gpus == 4


# -- every field x every entry point --------------------------------------------------------------

TWO = [{"name": "m1", "size": 30, "req_rate": 1, "slo": 1}, {"name": "m2", "size": 30, "req_rate": 1, "slo": 1}]
BIG = [{"name": "big", "size": 60, "req_rate": 2, "slo": 1, "tp": 2}]
# on GPUs of 40, 80, 80 GB in nodes {0, 1}, {2}: big's shards share node 0 (KVPR 1/10 on the 40 GB
# GPU); without nodes they take the two 80 GB GPUs (1/50)
UNEVEN = {"gpus": 3, "gpu_mem": [40, 80, 80]}
# for sizing: two replicas of a tp=2 model in nodes of 3 GPUs need 5 GPUs ({0,1,2}, {3,4}), 4 without
PAIRS = [dict(BIG[0], replicas=2)]

#: field -> (file with it, the same file without it)
FIELDS = {
    "reserve_gb": ({"gpu_mem": 80, "reserve_gb": 8, "models": TWO}, {"gpu_mem": 80, "models": TWO}),
    "overhead_gb": ({"gpu_mem": 80, "models": [dict(m, overhead_gb=4) for m in TWO]}, {"gpu_mem": 80, "models": TWO}),
    "gpus_per_node": ({**UNEVEN, "gpus_per_node": 2, "models": BIG}, {**UNEVEN, "models": BIG}),
    "nodes": ({**UNEVEN, "nodes": [[0, 1], [2]], "models": BIG}, {**UNEVEN, "models": BIG}),
}
#: size takes one memory: its own files for the node fields
SIZE_FIELDS = {
    "gpus_per_node": ({"gpus_per_node": 3, "models": PAIRS}, {"models": PAIRS}),
    "nodes": ({"nodes": [[0, 1, 2], [3, 4]], "models": PAIRS}, {"models": PAIRS}),
}
# the running placement of replan: where the answer with the field already is
RUNNING = {"reserve_gb": [0, 0], "overhead_gb": [0, 0], "gpus_per_node": [[0, 1]], "nodes": [[0, 1]]}

PLAIN = 1 / 6  # two 30 GB models on one 80 GB GPU keeping 8 GB (or 2 x 4 GB of overhead): 2 / 12
NODES = 0.1

#: (field, entry point) -> (command line after the file, the answer's key in --json, the answer)
EXPECTED = {
    **{(f, "solve"): (("--gpus", 1), "max_kvpr", PLAIN) for f in ("reserve_gb", "overhead_gb")},
    **{(f, "certify"): (("--gpus", 1), "max_kvpr", PLAIN) for f in ("reserve_gb", "overhead_gb")},
    **{(f, "replan"): (("--gpus", 1), "max_kvpr", PLAIN) for f in ("reserve_gb", "overhead_gb")},
    **{(f, "size"): (("--max-kvpr", 0.1), "gpus", 2) for f in ("reserve_gb", "overhead_gb")},
    **{(f, "headroom"): (("--max-kvpr", 0.1, "--gpus", 1), "factor", 0.6) for f in ("reserve_gb", "overhead_gb")},
    **{(f, "solve"): ((), "max_kvpr", NODES) for f in ("gpus_per_node", "nodes")},
    **{(f, "certify"): ((), "max_kvpr", NODES) for f in ("gpus_per_node", "nodes")},
    **{(f, "replan"): ((), "max_kvpr", NODES) for f in ("gpus_per_node", "nodes")},
    ("gpus_per_node", "size"): (("--max-kvpr", 1), "gpus", 5),
    ("nodes", "size"): (("--max-kvpr", 1), "gpus", "nodes: lists GPU ids"),  # refused by name
    **{(f, "headroom"): (("--max-kvpr", 0.2), "factor", 2.0) for f in ("gpus_per_node", "nodes")},
}


def _file(tmp_path, doc, name, running=None):
    doc = dict(doc)
    if running is not None:
        doc["models"] = [dict(m, cur_gpu_id=g) for m, g in zip(doc["models"], running)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def _answer(capsys, entry, path, argv, key):
    cmd = {"headroom": ("size", path, "--headroom"), "size": ("size", path)}.get(entry, (entry, path))
    code, out, err = cli(capsys, *cmd, *argv, "--json")
    if code:
        return err
    return json.loads(out)[key]


@pytest.mark.parametrize("field, entry", sorted(EXPECTED))
def test_each_entry_point_honours_each_field(tmp_path, capsys, field, entry):
    """The answer with the field is the right one, and differs from the answer without it: a
    dropped field fails this test."""
    argv, key, right = EXPECTED[(field, entry)]
    with_it, without = (SIZE_FIELDS if entry == "size" and field in SIZE_FIELDS else FIELDS)[field]
    running = RUNNING[field] if entry == "replan" else None
    got = _answer(capsys, entry, _file(tmp_path, with_it, "with", running), argv, key)
    dropped = _answer(capsys, entry, _file(tmp_path, without, "without", running), argv, key)
    if isinstance(right, str):  # refused: exit 2, one line naming the file and the field
        assert isinstance(got, str) and right in got and str(tmp_path) in got, got
    else:
        assert got == pytest.approx(right, rel=1e-9), (got, right)
    assert dropped != got


def test_every_cluster_field_is_read_by_every_command():
    """The fields a file gives are the fields the reader passes on: none is left behind."""
    from kvgpu.io import FILE_KEYS

    assert set(cluster.FIELDS) <= set(FILE_KEYS)
    c = cluster.read({"gpus": 3, "gpu_mem": 40, "reserve_gb": 2, "nodes": [[0], [1, 2]]}, gpus_per_node=None)
    assert c.rules() == {"reserve_gb": 2, "nodes": [[0], [1, 2]], "gpus_per_node": None}
    c = cluster.read({"nodes": [[0], [1, 2]], "reserve_gb": 2}, gpus_per_node=2, reserve_gb=[1, 1])
    assert c.rules() == {"reserve_gb": [1, 1], "nodes": None, "gpus_per_node": 2}
    assert c.flags == ("--reserve-gb", "--gpus-per-node")


def test_api_size_and_headroom_take_the_cluster_fields():
    assert kvgpu.size(TWO, 0.1, reserve_gb=8).gpus == 2
    assert kvgpu.size(TWO, 0.1).gpus == 1
    assert kvgpu.headroom(TWO, 1, max_kvpr=0.1, reserve_gb=8).factor == pytest.approx(0.6)
    h = kvgpu.headroom(BIG, 3, max_kvpr=0.2, gpu_mem=[40, 80, 80], nodes=[[0, 1], [2]])
    assert h.factor == pytest.approx(2.0)
    r = kvgpu.size(PAIRS, 1.0, gpus_per_node=3)
    assert r.gpus == 5 and r.placement.problem.node_of.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(kvgpu.InvalidInstance, match="reserve_gb: sizing takes one number"):
        kvgpu.size(TWO, 0.1, reserve_gb=[8, 8])
    with pytest.raises(kvgpu.InvalidInstance, match="reserve_gb: keeps 80 GB of the 80 GB"):
        kvgpu.size(TWO, 0.1, reserve_gb=80)
    with pytest.raises(kvgpu.InvalidInstance, match="nodes: lists GPU ids"):
        kvgpu.size(TWO, 0.1, nodes=[[0]])


def test_size_with_gpu_types_keeps_nodes_within_one_type():
    types = [{"name": "A40", "memory": 48, "price": 1.0}, {"name": "H100", "memory": 80, "price": 1.7}]
    r = kvgpu.size(PAIRS + TWO, 1.0, gpu_types=types, gpus_per_node=2, reserve_gb=4)
    nodes = r.placement.problem.node_of
    kinds = r.gpu_type_of()
    for k in set(nodes.tolist()):
        assert len({kinds[g] for g in np.nonzero(nodes == k)[0]}) == 1
    assert (r.placement.problem.reserve == 4).all() and r.achieved <= 1.0


def test_size_refuses_a_model_rule_it_cannot_see(monkeypatch):
    """A rule the sizing's bounds do not see is refused by name, never sized as if absent: any
    ModelSpec field outside capacity.SIZED_FIELDS that a model sets."""
    from kvgpu import capacity

    monkeypatch.setattr(capacity, "SIZED_FIELDS", tuple(f for f in capacity.SIZED_FIELDS if f != "same_node"))
    with pytest.raises(kvgpu.InvalidInstance, match="the rule 'same_node' is not one sizing can honour"):
        kvgpu.size([dict(BIG[0], same_node=False)], 0.1)


@pytest.mark.parametrize("field", [*cluster.RULES, "overhead_gb", "out_of_service", "colocate_with", "node"])
def test_sweep_refuses_file_fields_by_name(field):
    assert field in sweep.NOT_SWEPT
    with pytest.raises(kvgpu.InvalidInstance, match=f"'{field}' .*a sweep draws plain instances"):
        sweep.load_spec({"gpus": 4, field: 1})


# -- ops/size_proof_wording.csv: the same words for the same proof ---------------------------------


def test_size_solve_and_certify_say_the_same_for_the_same_placement(capsys):
    f = OPS / "size_proof_wording.csv"
    code, sized, _ = cli(capsys, "size", f, "--max-kvpr", 0.5, "--gpu-mem", 48)
    assert code == 0
    code, solved, _ = cli(capsys, "solve", f, "--gpus", 2, "--gpu-mem", 48)
    assert code == 0
    code, certified, _ = cli(capsys, "certify", f, "--gpus", 2, "--gpu-mem", 48)
    assert code == 0 and certified.startswith("optimal (proven): max KVPR 0.111731844")
    last = [ln for ln in sized.splitlines() if ln.startswith("max KVPR")]
    assert last == [ln for ln in solved.splitlines() if ln.startswith("max KVPR")]
    assert last[0].endswith("optimal (proven)") and "not proven" not in sized
    assert cli_json(capsys, "size", f, "--max-kvpr", 0.5, "--gpu-mem", 48)["placement"]["status"] == "optimal (proven)"


def test_an_open_gap_never_reads_as_closed():
    assert percent(0.0) == "0.00%" and percent(0.0123) == "1.23%"
    assert percent(3e-7) == "3e-05%" and percent(4.9e-5) == "0.0049%"
    assert percent(math.inf).startswith("unbounded")
    assert interval(0.111731844, 0.111731845) == "[0.111731844, 0.111731845]"
    assert interval(0.5, 0.5) == "[0.5, 0.5]" and interval(0.1, 0.2) == "[0.1, 0.2]"


# -- ops/csv_gpu_memory_column.json: one meaning per column name ----------------------------------


def test_csv_and_json_columns_mean_the_same(tmp_path, capsys):
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    f = OPS / "csv_gpu_memory_column.json"
    assert cli(capsys, "solve", f, "--out", out_csv)[0] == 0
    assert cli(capsys, "solve", f, "--out", out_json)[0] == 0
    rows = list(csv.DictReader(out_csv.open()))
    gpus = json.loads(out_json.read_text())["gpus"]
    assert list(rows[0]) == [*MODEL_COLUMNS, *(f"gpu_{k}" for k in GPU_COLUMNS)]
    for row in rows:
        g = gpus[int(row["gpu"])]
        for k in GPU_COLUMNS:  # gpu_X of the CSV is gpus[gpu][X] of the JSON
            assert float(row[f"gpu_{k}"]) == pytest.approx(float(g[k])), k
        assert float(row["gpu_memory_gb"]) == 80 and float(row["gpu_reserved_gb"]) == 10
        assert float(row["gpu_kv_free_gb"]) == 80 - 10 - float(row["gpu_models_gb"])
    assert {r["model"]: float(r["model_gb"]) for r in rows} == {"a": 10, "b": 20}


# -- ops/table_newline_names.json: a name cannot forge a row ---------------------------------------


def test_names_with_line_breaks_print_escaped(capsys):
    code, out, _ = cli(capsys, "solve", OPS / "table_newline_names.json", "--gpus", 3)
    assert code == 0
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("GPU"))
    body = lines[head + 1:head + 4]
    assert [int(ln.split()[0]) for ln in body] == [0, 1, 2]  # one row per GPU, in order
    assert lines[head + 4].startswith("max KVPR")
    assert "\\n   9    80.0" in out and "cr\\rret" in out and "sep\\u2028x" in out and 'q"t' in out
    assert not any(c in out for c in "\r\u2028")
    # JSON keeps the names exactly
    names = sum((g["models"] for g in cli_json(capsys, "solve", OPS / "table_newline_names.json", "--gpus", 3)["gpus"]),
                [])
    assert sorted(names) == sorted(m["name"] for m in json.loads((OPS / "table_newline_names.json").read_text()))


def test_plan_lines_and_warnings_escape_names():
    assert printable("plain name é") == "plain name é" and printable("a\nb") == "a\\nb"
    p = kvgpu.replan([{"name": "x\ny", "size": 10, "req_rate": 1, "slo": 1, "cur_gpu_id": 0},
                      {"name": "z", "size": 60, "req_rate": 9, "slo": 1, "cur_gpu_id": 0}], 2)
    text = str(p)
    assert "x\\ny" in text and "x\ny" not in text
    with pytest.warns(kvgpu.KvgpuWarning, match=r"models: full\\nname"):
        kvgpu.solve([{"name": "full\nname", "size": 80, "req_rate": 1, "slo": 1}], 1)


# -- ops/plot_reserve.yaml: the whole memory, reserve and overhead as their own segments -----------


def test_plot_bars_show_reserve_and_overhead():
    specs, gpus, kw = _read(OPS / "plot_reserve.yaml")
    p = kvgpu.solve(specs, gpus, **kw)
    fig = plot.placement_figure(p)
    try:
        ax = next(a for a in fig.axes if a.get_ylabel() == "GPU memory (GB)")
        bars = {c.get_label(): [r.get_height() for r in c.patches] for c in ax.containers}
        assert bars["model weights"] == pytest.approx([4.0])
        assert bars["engine overhead (overhead_gb)"] == pytest.approx([1.6])
        assert bars["reserved (reserve_gb)"] == pytest.approx([10.0])
        assert bars["left for KV cache"] == pytest.approx([8.4])
        assert sum(h[0] for h in bars.values()) == pytest.approx(24.0)  # the whole GPU
    finally:
        matplotlib.pyplot.close(fig)


def _read(path):
    from kvgpu.io import read_models

    specs, opts = read_models(path)
    c = cluster.read(opts)
    return specs, c.gpus, {"gpu_mem": c.gpu_mem, **c.rules()}


def test_plot_without_reserve_or_overhead_has_no_empty_segments():
    p = kvgpu.solve([[30, 5, 1], [20, 1, 1]], 2)
    fig = plot.placement_figure(p)
    try:
        ax = next(a for a in fig.axes if a.get_ylabel() == "GPU memory (GB)")
        assert [c.get_label() for c in ax.containers] == ["model weights", "left for KV cache"]
    finally:
        matplotlib.pyplot.close(fig)


# -- brute force: size and headroom with reserve, overhead and nodes --------------------------------

BRUTE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                        HealthCheck.too_slow])


@st.composite
def ruled_cases(draw, max_items=5):
    """1-3 models of 1-50 GB (tp / replicas of 1-2, at most ``max_items`` shards), an overhead of
    0-3 GB per model, a reserve of 0-16 GB per 80 GB GPU, nodes of 1-3 GPUs or none."""
    n = draw(st.integers(1, 3))
    models, left = [], max_items - n
    for i in range(n):
        m = {"name": f"m{i}", "size": draw(st.integers(1, 50)), "req_rate": draw(st.integers(0, 9)),
             "slo": draw(st.integers(1, 9)), "overhead_gb": draw(st.sampled_from([0, 1, 3]))}
        for key in ("tp", "replicas"):
            k = m.get("tp", 1) * m.get("replicas", 1)
            if k <= left and draw(st.booleans()):
                m[key], left = 2, left - k
        models.append(m)
    return models, draw(st.sampled_from([0, 4, 16])), draw(st.sampled_from([None, 1, 2, 3]))


def _oracle(models, G, reserve, per_node):
    """Optimal max KVPR on G GPUs of 80 GB under every rule, by brute force (inf: no placement)."""
    try:
        prob = build_problem(models, G, 80.0, reserve_gb=reserve or None, nodes=node_lists([G], per_node))
    except kvgpu.InvalidInstance:  # the rules refuse this cluster (too few GPUs, no node wide enough)
        return math.inf, None
    return brute_force_problem(prob)[0], prob


@BRUTE
@given(ruled_cases(), st.floats(1.05, 4.0))
def test_size_with_rules_is_never_wrongly_proven(case, scale):
    models, reserve, per_node = case
    opt1 = min(_oracle(models, G, reserve, per_node)[0] for G in range(1, 7))
    assume(0 < opt1 < math.inf)
    X = opt1 * scale
    best = next((G for G in range(1, 9) if _oracle(models, G, reserve, per_node)[0] <= X * (1 - 1e-7)), None)
    assume(best is not None and best == next(G for G in range(1, 9)
                                             if _oracle(models, G, reserve, per_node)[0] <= X * (1 + 1e-7)))
    r = kvgpu.size(models, X, reserve_gb=reserve, gpus_per_node=per_node)
    _, prob = _oracle(models, r.gpus, reserve, per_node)
    check_placement(prob, r.placement)  # every rule of the sized cluster kept
    assert r.placement.max_kvpr <= X and (r.placement.problem.reserve == reserve).all()
    assert r.gpus >= best >= r.count_lower_bound
    if r.proven:
        assert r.gpus == best


@BRUTE
@given(ruled_cases(), st.integers(1, 4), st.floats(0.3, 3.0))
def test_headroom_with_rules_is_never_wrongly_proven(case, gpus, scale):
    models, reserve, per_node = case
    opt, _ = _oracle(models, gpus, reserve, per_node)
    assume(0 < opt < math.inf)
    X = opt * scale
    try:
        h = kvgpu.headroom(models, gpus, max_kvpr=X, reserve_gb=reserve or None,
                           nodes=node_lists([gpus], per_node))
    except kvgpu.NoPlacementFound as e:  # the rules' start found nothing: never claimed proven
        assert not e.proven
        return
    assert h.factor <= X / opt * (1 + 1e-9) and h.upper_limit >= X / opt * (1 - 1e-9)
    if h.proven:
        assert h.factor == pytest.approx(X / opt, rel=1e-8)


def test_replan_plot_shows_what_moved():
    """The memory bars of a re-placement split the weights into those that stayed, those copied
    there (as many GB as the plan moves) and new models' (the GB loaded); the title names the
    moves."""
    models = [{"name": "a", "size": 30, "req_rate": 9, "slo": 1, "cur_gpu_id": 0},
              {"name": "b", "size": 30, "req_rate": 9, "slo": 1, "cur_gpu_id": 0},
              {"name": "c", "size": 10, "req_rate": 1, "slo": 1, "cur_gpu_id": 1},
              {"name": "new", "size": 12, "req_rate": 2, "slo": 1, "cur_gpu_id": -1}]
    p = kvgpu.replan(models, 3)
    assert p.moved_models == 1  # one of a, b leaves GPU 0
    fig = plot.placement_figure(p)
    try:
        ax = next(a for a in fig.axes if a.get_ylabel() == "GPU memory (GB)")
        bars = {c.get_label(): np.array([r.get_height() for r in c.patches]) for c in ax.containers}
        moved = bars["weights moved here (re-placement)"]
        assert moved.sum() == pytest.approx(sum(m.size_gb for m in p.moves)) == 30
        assert moved[p.moves[0].dst] == 30
        assert bars["new model weights (re-placement)"].sum() == pytest.approx(12)
        assert sum(bars.values()) == pytest.approx([80, 80, 80])
        m = p.moves[0]
        assert f"1 model(s) moved, 30 GB copied ({m.model} {m.src}->{m.dst})" in fig.get_suptitle()
    finally:
        matplotlib.pyplot.close(fig)


# -- size and solve read gpus_per_node alike ------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(per_node=st.integers(1, 5), reserve=st.sampled_from([0, 4]),
       models=st.lists(st.tuples(st.integers(5, 70), st.integers(1, 6), st.sampled_from([1, 2])), min_size=1,
                       max_size=4))
def test_size_answer_is_a_cluster_solve_accepts(per_node, reserve, models):
    """Whatever size answers (a partial last node included: 2 GPUs in nodes of 4), solve takes
    the same file with that many GPUs, and size's placement keeps solve's rules there."""
    specs = [{"name": f"m{i}", "size": s, "req_rate": r, "slo": 1, "tp": tp, "same_node": tp <= per_node}
             for i, (s, r, tp) in enumerate(models)]
    assume(all(s / tp <= 80 - reserve - 1 for s, _, tp in models))
    try:
        r = kvgpu.size(specs, 0.5, gpu_mem=80, reserve_gb=reserve or None, gpus_per_node=per_node, max_gpus=12)
    except kvgpu.InvalidInstance:
        return  # refused by name (a target no count up to 12 meets)
    if r.placement is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvgpu.KvgpuWarning)  # the last node partial: a warning, not a refusal
        prob = build_problem(specs, r.gpus, 80, reserve_gb=reserve or None, gpus_per_node=per_node)
        p = kvgpu.solve(specs, r.gpus, gpu_mem=80, reserve_gb=reserve or None, gpus_per_node=per_node, effort=1)
    G = r.gpus  # solve's gpus_per_node: consecutive ids, the last node smaller -- size's nodes
    assert r.nodes() == [list(range(g, min(g + per_node, G))) for g in range(0, G, per_node)]
    check_placement(prob, r.placement)
    check_placement(prob, p)


def test_size_two_gpus_in_nodes_of_four_then_solve(capsys, tmp_path):
    """ops/gpn.yaml: size answers 2 GPUs, a partial node of 4; solve --gpus 2 takes it."""
    f = OPS / "gpn.yaml"
    code, out, err = cli(capsys, "size", f, "--max-kvpr", 0.1)
    assert code == 0 and "2 GPUs of 80 GB (2 GB reserved each, nodes of 4: 2 GPUs, a partial node)" in out, err
    d = cli_json(capsys, "size", f, "--max-kvpr", 0.1)
    assert d["nodes"] == [[0, 1]]
    code, out, err = cli(capsys, "solve", f, "--gpus", d["gpus"])
    assert code == 0 and "gpus_per_node=4 does not divide the 2 GPUs" in err, err
