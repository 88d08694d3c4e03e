"""kvgpu export: engines, memory fractions, launch scripts, kvcached configs, manifests; reading
a placement back (``replan --current``); the default min_gain; and the small output fixes."""

import argparse
import json
import shlex
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu import export as ex
from kvgpu.cli import main
from kvgpu.io import write_placement
from kvgpu.kernels.deltas import safe_div_array
from kvgpu.problem import build_problem
from kvgpu.results import Placement

DATA = Path(__file__).parent / "data"
TWO_NODES = DATA / "export" / "two_nodes.json"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, *argv):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgpu: error: "), err
    return lines[0]


def placement_of(models, G, mem=80.0, assign=None, **kw):
    """A Placement of ``models`` on ``G`` GPUs at ``assign`` (items in order), without solving."""
    prob = build_problem(models, G, mem, **kw)
    a = np.asarray(assign, np.int64)
    inst = prob.items
    used = np.bincount(a, weights=inst.sizes, minlength=G)
    dem = np.bincount(a, weights=inst.demand, minlength=G)
    return Placement(prob, a, safe_div_array(dem, inst.gpu_mem - used, np), 0.0)


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """two_nodes.json solved, written with --out: (placement, path of the JSON)."""
    out = tmp_path_factory.mktemp("solved") / "p.json"
    assert main(["solve", str(TWO_NODES), "--out", str(out)]) == 0
    return ex.load(out), out


# -- reading a placement back ------------------------------------------------------------------

def test_out_json_round_trips_to_the_same_placement(solved):
    p, path = solved
    d = json.loads(path.read_text())
    assert d["models"][0] == {"name": "meta-llama/Llama-3.1-70B", "size": 140.0, "req_rate": 4.0, "slo": 1.0, "tp": 2,
                              "overhead_gb": 2.0}
    assert d["cluster"] == {"gpus": 4, "gpu_mem": [80.0] * 4, "reserve_gb": [4.0] * 4, "nodes": [[0, 1], [2, 3]]}
    assert p.assignment.tolist() == d["assignment"]
    assert [g["kvpr"] for g in d["gpus"]] == p.kvpr.tolist()


def test_manifest_round_trips_and_exports_the_same_files(solved, tmp_path):
    p, path = solved
    for fmt in ex.FORMATS:
        kw = {"venv": "/opt/vllm-venv"} if fmt == "kvcached" else {}
        dep = ex.export(path, fmt, tmp_path / fmt, **kw)
        again = ex.load(tmp_path / fmt / ex.MANIFEST)
        assert again.assignment.tolist() == p.assignment.tolist() and again.kvpr.tolist() == p.kvpr.tolist()
        assert ex.export(tmp_path / fmt, fmt, **kw).files == dep.files  # a folder: its manifest
        rows = json.loads(dep.files[ex.MANIFEST])["engines"]
        assert [r["port"] for r in rows] == [e.port for e in dep.engines]
        for r in rows:
            assert r["cuda_visible_devices"] == ",".join(map(str, r["local_gpus"]))
            assert fmt == "json" or r["command"] in "".join(t for n, t in dep.files.items() if n.endswith(".sh"))
        assert sorted(f.name for f in (tmp_path / fmt).iterdir()) == sorted(dep.files)


def test_edited_or_foreign_files_are_refused_by_name(solved, tmp_path):
    p, path = solved
    d = json.loads(path.read_text())
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(dict(d, gpus=[dict(g, kvpr=0.001) for g in d["gpus"]])))
    with pytest.raises(kvgpu.InvalidInstance, match="GPU 0: the file says KVPR 0.001"):
        ex.load(bad)
    bad.write_text(json.dumps(dict(d, assignment=[0, 1, 0, 0, 1, 1])))  # four models on GPU 0: over its memory
    with pytest.raises(kvgpu.InvalidInstance, match="GPU 0 holds .* more than its 76 GB"):
        ex.load(bad)
    old = {k: v for k, v in d.items() if k not in ("models", "cluster")}
    bad.write_text(json.dumps(old))
    with pytest.raises(kvgpu.InvalidInstance, match="no 'models', 'cluster'.*solve again with --out"):
        ex.load(bad)
    dep = ex.export(path, "vllm", tmp_path / "dep")
    with pytest.raises(kvgpu.InvalidInstance, match="a launch script is not read back.*manifest.json, written beside"):
        ex.load(tmp_path / "dep" / next(n for n in dep.files if n.endswith(".sh")))
    with pytest.raises(kvgpu.InvalidInstance, match="a CSV placement lacks the models"):
        ex.load(tmp_path / "p.csv")


# -- engines and fractions -----------------------------------------------------------------------

THREE_ON_ONE = [{"name": "a", "size": 20, "req_rate": 6, "slo": 1, "overhead_gb": 2},
                {"name": "b", "size": 10, "req_rate": 3, "slo": 1, "overhead_gb": 1},
                {"name": "c", "size": 5, "req_rate": 1, "slo": 2}]


def test_three_engines_on_a_gpu_get_equal_kv_pressure_within_memory_less_reserve():
    p = placement_of(THREE_ON_ONE, 1, 80.0, [0, 0, 0], reserve_gb=6)
    dep = ex.export(p, "json")
    e = dep.engines
    free = 80 - 6 - (22 + 11 + 5)
    assert sum(x.kv_gb for x in e) == pytest.approx(free)
    pressure = [(m["req_rate"] / m["slo"]) / x.kv_gb for m, x in zip(THREE_ON_ONE, e)]
    assert pressure == pytest.approx([p.kvpr[0]] * 3)  # every engine sees its GPU's KVPR
    util = [x.gpu_memory_utilization for x in e]
    assert sum(util) <= 1 - 6 / 80 + 1e-12
    for x, u in zip(e, util):  # vLLM: KV = fraction x total memory - weights - overhead (fractions rounded down)
        assert 0 <= (x.weights_gb + x.overhead_gb + x.kv_gb) - u * 80 < 1e-4 * 80
    taken = 0.0  # SGLang: KV = fraction x memory free at its start - weights, engines started in order
    for x in e:
        at_start = 80 - taken
        assert 0 <= (x.weights_gb + x.kv_gb) - x.mem_fraction_static * at_start < 1e-4 * at_start
        taken += x.weights_gb + x.overhead_gb + x.kv_gb
    assert taken == pytest.approx(80 - 6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_fractions_never_exceed_a_gpu_and_engines_share_its_pressure(data):
    """Random placements (tp, replicas, zero demand, reserve): per GPU the vLLM fractions add up
    to at most 1 - reserve / memory, every engine not raised to the minimum sees its GPU's KV
    pressure (tp engines: at most it), and SGLang's fractions fit the memory free at each start."""
    G = data.draw(st.integers(1, 4))
    mem = data.draw(st.sampled_from([40.0, 80.0]))
    reserve = data.draw(st.sampled_from([0.0, 4.0]))
    models = []
    for i in range(data.draw(st.integers(1, 5))):
        tp = data.draw(st.sampled_from([1, 1, 2])) if G >= 2 else 1
        models.append({"name": f"m{i}", "size": float(data.draw(st.integers(1, 20))) * tp, "tp": tp,
                       "req_rate": float(data.draw(st.integers(0, 9))), "slo": 1.0,
                       "overhead_gb": data.draw(st.sampled_from([0.0, 1.5]))})
    try:
        prob = build_problem(models, G, mem, reserve_gb=reserve)
    except kvgpu.InvalidInstance:
        return
    assign = []
    for m in range(len(models)):
        k = len(prob.items_of(m))
        assign += data.draw(st.permutations(range(G)))[:k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvgpu.KvgpuWarning)
        p = placement_of(models, G, mem, assign, reserve_gb=reserve)
    try:
        dep = ex.export(p, "json")
    except kvgpu.InvalidInstance as e:  # a GPU without room for every engine's minimum KV share
        assert "need at least" in str(e) and (p.kv_free < len(models) * ex.DEFAULT_MIN_KV_GB + 1e-9).any()
        return
    for g in range(G):
        on = [e for e in dep.engines if g in e.gpus]
        assert sum(e.gpu_memory_utilization for e in on) <= 1 - reserve / mem + 1e-12
        assert sum(e.weights_gb + e.overhead_gb + e.kv_gb for e in on) <= mem - reserve + 1e-9
        for e in on:
            if not any(x.raised for x in on) and e.kvpr > 0:
                assert e.kvpr >= p.kvpr[g] * (1 - 1e-9)  # a tp engine keeps its smallest share
                if e.tp == 1:
                    assert e.kvpr == pytest.approx(p.kvpr[g])


def test_zero_demand_gets_the_minimum_or_is_refused_by_name():
    models = [{"name": "busy", "size": 10, "req_rate": 5, "slo": 1},
              {"name": "idle", "size": 10, "req_rate": 0, "slo": 1}]
    p = placement_of(models, 1, 40.0, [0, 0])
    dep = ex.export(p, "vllm", min_kv_gb=2)
    busy, idle = dep.engines
    assert idle.kv_gb == 2 and idle.raised and busy.kv_gb == pytest.approx(18)
    assert any("raised to min_kv_gb=2" in n for n in dep.notes)
    assert any("no reserve_gb, so the fractions take the whole GPU" in n for n in dep.notes)
    with pytest.raises(kvgpu.InvalidInstance, match="GPU 0: idle would get 0 GB of KV cache.*min_kv_gb"):
        ex.export(p, "vllm", min_kv_gb=0)
    with pytest.raises(kvgpu.InvalidInstance, match=r"GPU 0: 2 engine\(s\) \(busy, idle\) need at least 11 GB"):
        ex.export(p, "vllm", min_kv_gb=11)


def test_tp_engines_are_one_process_over_their_gpus_with_one_pool_size():
    models = [{"name": "big", "size": 60, "req_rate": 4, "slo": 1, "tp": 2},
              {"name": "small", "size": 10, "req_rate": 2, "slo": 1}]
    p = placement_of(models, 2, 80.0, [0, 1, 1])
    dep = ex.export(p, "vllm")
    big = dep.engines[0]
    assert (big.gpus, big.tp, big.local_gpus) == ([0, 1], 2, [0, 1])
    assert big.kv_gb == pytest.approx(min(p.kv_split()[:2]))  # the smaller share of its two GPUs
    assert any("one KV pool size" in n for n in dep.notes)
    line = next(ln for ln in dep.files["launch.sh"].splitlines() if "vllm serve big" in ln)
    assert line.startswith("CUDA_VISIBLE_DEVICES=0,1 vllm serve big --tensor-parallel-size 2 ")
    sg = ex.export(p, "sglang")
    assert sg.engines[0].env == {}  # both GPUs free at its start
    order = [(e.model, e.mem_fraction_static) for e in sg.engines]
    assert order[0][0] == "big" and order[1][0] == "small"


# -- what each engine documents --------------------------------------------------------------------

VLLM_FLAGS = {"--tensor-parallel-size", "--served-model-name", "--gpu-memory-utilization", "--host", "--port"}
SGLANG_FLAGS = {"--model-path", "--tp-size", "--served-model-name", "--mem-fraction-static", "--host", "--port"}


def _commands(script: str):
    """(env, argv) of each engine line of a launch script."""
    for line in script.splitlines():
        if " --port " in line and not line.startswith("#"):
            words = shlex.split(line.split(" > ")[0])
            k = next(j for j, w in enumerate(words) if "=" not in w)  # the leading KEY=VALUE words
            yield dict(w.split("=", 1) for w in words[:k]), words[k:]


def test_launch_scripts_use_each_engines_documented_flags_one_script_per_node(solved, tmp_path):
    p, path = solved
    for fmt, flags in (("vllm", VLLM_FLAGS), ("sglang", SGLANG_FLAGS)):
        dep = ex.export(path, fmt, tmp_path / fmt)
        assert sorted(dep.files) == ["launch_node0.sh", "launch_node1.sh", "manifest.json"]
        seen = []
        for name in ("launch_node0.sh", "launch_node1.sh"):
            text = (tmp_path / fmt / name).read_text()
            assert text.startswith("#!/usr/bin/env bash") and (tmp_path / fmt / name).stat().st_mode & 0o111
            syntax = subprocess.run(["bash", "-n", str(tmp_path / fmt / name)], capture_output=True, text=True)
            assert syntax.returncode == 0, syntax.stderr
            ports = []
            for env, argv in _commands(text):
                assert argv[:2] == (["vllm", "serve"] if fmt == "vllm" else ["python", "-m"])
                used = {w for w in argv if w.startswith("--")}
                assert used == flags, used ^ flags
                assert set(env) <= {"CUDA_VISIBLE_DEVICES", "SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"}
                assert all(0 <= int(g) < 2 for g in env["CUDA_VISIBLE_DEVICES"].split(","))  # local ids
                ports.append(int(argv[argv.index("--port") + 1]))
                seen.append(argv)
            assert len(set(ports)) == len(ports)
        assert len(seen) == 5  # the tp model once, the replicas twice, two more models
    node1 = (tmp_path / "vllm" / "launch_node1.sh").read_text()
    assert node1.index("wait_ready 8001") < node1.index("--port 8002")  # GPU 3 shared: one after another


def test_kvcached_config_has_the_controllers_keys_and_ports(solved, tmp_path):
    p, path = solved
    dep = ex.export(path, "kvcached", tmp_path / "kv", venv="/opt/venv")
    assert sorted(dep.files) == ["kvcached_node0.yaml", "kvcached_node1.yaml", "launch_node0.sh", "launch_node1.sh",
                                 "manifest.json"]
    for name in ("kvcached_node0.yaml", "kvcached_node1.yaml"):
        cfg = yaml.safe_load((tmp_path / "kv" / name).read_text())
        assert set(cfg) <= {"kvcached", "router", "sleep_manager", "instances"}  # controller/example-config.yaml
        assert cfg["kvcached"] == {"kvcached_gpu_utilization": 0.95}  # 1 - 4 / 80
        for inst in cfg["instances"]:
            assert set(inst) <= {"name", "model", "engine", "using_venv", "venv_path", "kvcached_env", "engine_env",
                                 "engine_args"} and {"model", "engine"} <= set(inst)
            assert inst["engine"] == "vllm" and inst["using_venv"] is True and inst["venv_path"] == "/opt/venv"
            assert all("=" in kv for kv in inst["kvcached_env"] + inst["engine_env"])
            args = [w for a in inst["engine_args"] for w in shlex.split(a)]
            port = argparse.ArgumentParser(add_help=False)
            port.add_argument("--port", type=int)  # as kvcached's router finds an instance's port
            assert port.parse_known_args(args)[0].port is not None
            assert not any("memory-utilization" in a or "mem-fraction" in a for a in args)  # one shared pool
    assert cfg["router"]["enable_router"] is False  # two replicas of one name on node 1
    script = (tmp_path / "kv" / "launch_node1.sh").read_text()
    assert "ENABLE_KVCACHED=true" in script and "--gpu-memory-utilization" not in script
    assert "\nwait_ready " not in script  # one shared pool: the engines may start together


# -- bad inputs: clear errors, nothing written --------------------------------------------------------

def test_bad_inputs_are_refused_by_name_and_nothing_is_written(solved, tmp_path):
    p, path = solved
    out = tmp_path / "none"
    with pytest.raises(kvgpu.InvalidInstance, match="give venv"):
        ex.export(path, "kvcached", out)
    with pytest.raises(kvgpu.InvalidInstance, match="format must be one of"):
        ex.export(path, "tgi", out)
    with pytest.raises(kvgpu.InvalidInstance, match="base_port .* above 65535"):
        ex.export(path, "vllm", out, base_port=65534)
    assert not out.exists() and [f.name for f in tmp_path.iterdir()] == []
    unnamed = placement_of([{"size": 10, "req_rate": 1, "slo": 1}], 1, 80.0, [0])
    with pytest.raises(kvgpu.InvalidInstance, match="model 0: has no name; an engine serves a model by its name"):
        ex.export(unnamed, "vllm")
    spans = placement_of([{"name": "x", "size": 20, "req_rate": 1, "slo": 1, "tp": 2, "same_node": False}], 4, 80.0,
                         [1, 2], gpus_per_node=2)
    with pytest.raises(kvgpu.InvalidInstance, match=r"replica 0 spans nodes \[0, 1\]"):
        ex.export(spans, "vllm")


def test_cli_export_prints_engines_and_refuses_in_one_line(solved, tmp_path, capsys):
    p, path = solved
    code, out, err = cli(capsys, "export", path, "--format", "sglang", "-o", tmp_path / "d", "--base-port", 9000)
    assert code == 0 and "5 engine(s) written to" in out and "9000" in out and "raised to min_kv_gb" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert "the folder is not empty" in fails(capsys, "export", path, "--format", "vllm", "-o", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert "--min-kv-gb must be >= 0" in fails(capsys, "export", path, "--format", "vllm", "-o", tmp_path / "e",
                                               "--min-kv-gb", -1)
    assert "invalid choice: 'tgi'" in fails(capsys, "export", path, "--format", "tgi", "-o", tmp_path / "e")
    assert not (tmp_path / "e").exists()


# -- replan --current ---------------------------------------------------------------------------------

def test_solve_export_replan_current_moves_nothing(solved, tmp_path, capsys):
    p, path = solved
    ex.export(path, "vllm", tmp_path / "dep")
    for current in (tmp_path / "dep", tmp_path / "dep" / "manifest.json", path):
        code, out, err = cli(capsys, "replan", "--current", current, "--json")
        assert code == 0, err
        d = json.loads(out)
        assert d["replan"]["moved_models"] == 0 and d["replan"]["plan"] == []
        assert d["assignment"] == p.assignment.tolist() and d["replan"]["gain"] == pytest.approx(0.0, abs=1e-12)
    code, out, err = cli(capsys, "replan", TWO_NODES, "--current", tmp_path / "dep", "--json")  # matched by name
    assert code == 0 and json.loads(out)["replan"]["moved_models"] == 0


def test_replan_current_matches_by_name_new_models_load_and_missing_ones_stop(solved, tmp_path, capsys):
    p, path = solved
    doc = json.loads(TWO_NODES.read_text())
    doc["models"] = doc["models"][1:] + [{"name": "new-one", "size": 8, "req_rate": 1, "slo": 1}]  # the 70B stops
    f = tmp_path / "next.json"
    f.write_text(json.dumps(doc))
    code, out, err = cli(capsys, "replan", f, "--current", path, "--json")
    assert code == 0, err
    assert "not among the models: meta-llama/Llama-3.1-70B; they stop" in err
    d = json.loads(out)
    plan = d["replan"]["plan"]
    assert [s["model"] for s in plan if s["from"] == -1] == ["new-one"]  # loaded; the others run where they ran
    assert {s["model"] for s in plan} <= {"new-one", "Qwen/Qwen2.5-7B", "mistral-7b", "idle-model"}
    assert d["replan"]["start_kvpr"] == pytest.approx(0.055556, rel=1e-4)  # GPUs 2 and 3 as they run
    doc["models"][0]["cur_gpu_id"] = [2, 3]
    f.write_text(json.dumps(doc))
    assert "gives cur_gpu_id, and --current" in fails(capsys, "replan", f, "--current", path)
    assert "replan needs the models" in fails(capsys, "replan")
    assert "a launch script is not read back" in fails(capsys, "replan", "--current", tmp_path / "x.sh")


# -- default min_gain ------------------------------------------------------------------------------------

def test_replan_moves_nothing_for_a_tiny_gain_by_default(capsys):
    f = DATA / "clusters" / "replan_tiny_gain.json"
    code, out, err = cli(capsys, "replan", f, "--max-moves", 4, "--json")
    d = json.loads(out)
    assert code == 0 and d["replan"]["moved_models"] == 0 and "below min_gain 1%" in d["replan"]["note"]
    d = json.loads(cli(capsys, "replan", f, "--max-moves", 4, "--min-gain", 0, "--json")[1])
    assert d["replan"]["moved_models"] == 2 and d["max_kvpr"] == pytest.approx(0.164271, rel=1e-5)


# -- small output fixes ---------------------------------------------------------------------------------

def test_empty_colocate_with_is_refused_but_a_blank_csv_cell_is_not_given(tmp_path, capsys):
    base = {"name": "a", "size": 1, "req_rate": 1, "slo": 1}
    with pytest.raises(kvgpu.InvalidInstance, match="model 1 .*'colocate_with' is empty"):
        kvgpu.solve([base, dict(base, name="b", colocate_with=" ")], 2)
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"gpus": 2, "models": [base, dict(base, name="b", colocate_with="")]}))
    assert "field 'colocate_with' is empty" in fails(capsys, "solve", f)
    c = tmp_path / "m.csv"
    c.write_text("name,size,req_rate,slo,colocate_with\na,1,1,1,\nb,1,1,1,a\n")
    code, out, err = cli(capsys, "solve", c, "--gpus", 2, "--json")
    assert code == 0 and json.loads(out)["model_gpus"][0] == json.loads(out)["model_gpus"][1]


def test_csv_numbers_are_rounded_for_print_json_exact_and_one_gpu_is_singular(tmp_path):
    p = kvgpu.solve([{"name": "a", "size": 0.1, "req_rate": 1, "slo": 1, "overhead_gb": 0.2}], 1)
    write_placement(p, tmp_path / "p.csv")
    write_placement(p, tmp_path / "p.json")
    assert "0.3," in (tmp_path / "p.csv").read_text() and "0.30000000000000004" not in (tmp_path / "p.csv").read_text()
    assert json.loads((tmp_path / "p.json").read_text())["gpus"][0]["models_gb"] == 0.1 + 0.2
    assert str(p).splitlines()[-1].startswith("(1 model, 1 GPU, ")


def test_kvcached_with_sglang_needs_no_venv_and_an_empty_folder_is_filled(solved, tmp_path):
    p, path = solved
    (tmp_path / "kv").mkdir()  # exists, empty: filled at once
    dep = ex.export(path, "kvcached", tmp_path / "kv", kvcached_engine="sglang")
    cfg = yaml.safe_load((tmp_path / "kv" / "kvcached_node0.yaml").read_text())
    (inst,) = cfg["instances"]
    assert inst["engine"] == "sglang" and "using_venv" not in inst
    assert inst["engine_args"] == ["--tp-size 2 --served-model-name meta-llama/Llama-3.1-70B", "--port=30000"] and inst["engine_env"] == ["CUDA_VISIBLE_DEVICES=0,1"]
    assert sorted(f.name for f in (tmp_path / "kv").iterdir()) == sorted(dep.files)
    assert [f.name for f in tmp_path.iterdir()] == ["kv"]  # no temporary folder left


def test_a_lora_adapter_is_served_by_its_bases_engine_with_its_kv_share():
    models = [{"name": "llama", "size": 16, "req_rate": 4, "slo": 1, "replicas": 2, "overhead_gb": 1},
              {"name": "sql-lora", "size": 0.5, "req_rate": 2, "slo": 1, "colocate_with": "llama"},
              {"name": "qwen", "size": 15, "req_rate": 3, "slo": 1, "overhead_gb": 1}]
    p = placement_of(models, 2, 80.0, [0, 1, 1, 1], reserve_gb=2)
    dep = ex.export(p, "vllm")
    assert [(e.model, e.gpus, e.adapters) for e in dep.engines] == [("llama", [0], []), ("llama", [1], ["sql-lora"]),
                                                                    ("qwen", [1], [])]
    served, qwen = dep.engines[1], dep.engines[2]
    kv = p.kv_split()
    assert served.kv_gb == pytest.approx(kv[1] + kv[2]) and served.weights_gb == 16.5
    assert served.kvpr == pytest.approx(p.kvpr[1]) and qwen.kvpr == pytest.approx(p.kvpr[1])  # equal pressure
    assert served.gpu_memory_utilization + qwen.gpu_memory_utilization <= 1 - 2 / 80 + 1e-12
    line = next(c for _, c in _commands(dep.files["launch.sh"]) if "8001" in c)
    assert line[line.index("--lora-modules") + 1] == "sql-lora=sql-lora" and "--enable-lora" in line
    sg = ex.export(p, "sglang")
    assert "--lora-paths sql-lora=sql-lora" in sg.files["launch.sh"]
    assert any("served by their base's engine" in n for n in dep.notes)
