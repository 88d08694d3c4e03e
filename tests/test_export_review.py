"""kvgpu export as an operator runs it: what each engine loads (``serve`` / ``hf``), names as the
engines' identity, vLLM's one fraction over GPUs of different memory, the KV cache dtype, the
device's real memory, paths stored in a placement, adapters of tp bases, ports, and options
that belong to one format.  Inputs from a review are in tests/data/export/review/."""

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import kvgpu
from kvgpu import export as ex
from kvgpu.cli import main
from kvgpu.io import read_models
from kvgpu.problem import build_problem
from kvgpu.schema import ModelSpec

from test_export import _commands, cli, fails, placement_of  # noqa: F401  (shared helpers)

DATA = Path(__file__).parent / "data"
REVIEW = DATA / "export" / "review"
HF = DATA / "hf"


def _line(dep, port):
    """The argv of the engine on ``port`` in a deployment's launch script(s)."""
    for name, text in dep.files.items():
        if name.endswith(".sh"):
            for _, argv in _commands(text):
                if f"--port" in argv and str(port) in argv:
                    return argv
    raise AssertionError(f"no engine on port {port}")


def _flag(argv, flag):
    return argv[argv.index(flag) + 1]


# -- 1. what each engine loads --------------------------------------------------------------------

def test_engines_load_the_models_files_and_serve_its_name(tmp_path):
    (tmp_path / "weights" / "local").mkdir(parents=True)
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    f = tmp_path / "m.yaml"
    f.write_text("gpus: 3\ngpu_mem: 80\nreserve_gb: 2\nmodels:\n"
                 "  - {name: chat, serve: Qwen/Qwen2.5-7B-Instruct, size: 15, req_rate: 2, slo: 1}\n"
                 "  - {name: local, serve: ./weights/local, size: 14, req_rate: 1, slo: 1}\n"
                 "  - {name: sql, serve: adapters/sql, size: 0.5, req_rate: 1, slo: 1, colocate_with: local}\n"
                 "  - {name: bare, size: 10, req_rate: 1, slo: 1}\n")
    specs, _ = read_models(f)
    assert specs[1].serve == str((tmp_path / "weights" / "local").resolve())  # absolute: means one folder anywhere
    assert specs[2].serve == str((tmp_path / "adapters" / "sql").resolve())
    assert specs[0].serve == "Qwen/Qwen2.5-7B-Instruct"  # no such folder here: a repo id, kept
    p = kvgpu.solve(specs, gpus=3, gpu_mem=80, reserve_gb=2)
    for fmt in ("vllm", "sglang"):
        dep = ex.export(p, fmt)
        by = {e.model: e for e in dep.engines}
        chat = _line(dep, by["chat"].port)
        loads = chat[chat.index("serve") + 1] if fmt == "vllm" else _flag(chat, "--model-path")
        assert loads == "Qwen/Qwen2.5-7B-Instruct" and _flag(chat, "--served-model-name") == "chat"
        local = _line(dep, by["local"].port)
        assert str((tmp_path / "weights" / "local").resolve()) in local
        lora = _flag(local, "--lora-modules" if fmt == "vllm" else "--lora-paths")
        assert lora == f"sql={(tmp_path / 'adapters' / 'sql').resolve()}"
        assert any("no hf or serve key: bare loaded by name as given" in n for n in dep.notes)
        assert "# bare (loaded by its name as given: the model has no hf or serve)" in dep.files["launch.sh"]
    kv = ex.export(p, "kvcached", venv="/opt/venv")
    insts = [i for k, t in kv.files.items() if k.endswith(".yaml") for i in yaml.safe_load(t)["instances"]]
    assert {i["model"] for i in insts} == {"Qwen/Qwen2.5-7B-Instruct", str((tmp_path / "weights" / "local").resolve()),
                                           "bare"}
    assert all("--served-model-name" in i["engine_args"][0] for i in insts)
    # kvcached's router maps each instance's `model` (the path): off where clients ask for another name
    assert not any(yaml.safe_load(t)["router"]["enable_router"] for k, t in kv.files.items() if k.endswith(".yaml"))
    assert "the router routes by each instance's model" in kv.files["kvcached.yaml"]
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 0 \('a'\): field 'serve' must be what the engine loads"):
        kvgpu.solve([{"name": "a", "size": 1, "req_rate": 1, "slo": 1, "serve": 3}], 1)


def test_hf_models_serve_their_folder_and_kv_dtype_and_placements_store_absolute_paths(tmp_path, monkeypatch,
                                                                                      capsys):
    """6 and 5: a relative hf folder is stored absolute in --out; export and --current use the stored
    figures (the files are not read again); kv_cache_dtype reaches --kv-cache-dtype."""
    shutil.copytree(HF / "mistral", tmp_path / "models" / "mistral")
    (tmp_path / "m.yaml").write_text("gpus: 2\ngpu_mem: 80\nreserve_gb: 2\nmodels:\n"
                                     "  - {name: m, hf: ./models/mistral, req_rate: 2, slo: 1, kv_cache_dtype: fp8}\n"
                                     "  - {name: plain, size: 20, req_rate: 1, slo: 1}\n")
    folder = str((tmp_path / "models" / "mistral").resolve())
    out = tmp_path / "runs" / "p.json"
    out.parent.mkdir()
    assert main(["solve", str(tmp_path / "m.yaml"), "--out", str(out)]) == 0
    stored = json.loads(out.read_text())["models"][0]
    assert stored["hf"] == folder and stored["size"] == 14.496047104 and stored["kv_bytes_per_token"] == 65536
    shutil.rmtree(tmp_path / "models")  # stored figures stand: nothing re-read
    monkeypatch.chdir(tmp_path / "runs")
    for fmt, value in (("vllm", "fp8"), ("sglang", "fp8_e4m3")):
        dep = ex.export(out, fmt)
        m = next(e for e in dep.engines if e.model == "m")
        argv = _line(dep, m.port)
        assert folder in argv and _flag(argv, "--kv-cache-dtype") == value
        plain = _line(dep, next(e.port for e in dep.engines if e.model == "plain"))
        assert "--kv-cache-dtype" not in plain
    code, _, err = cli(capsys, "replan", "--current", str(out), "--json")
    assert code == 0, err
    spec = ModelSpec(0, "model 0 ('m')", "m", 14.0, 1.0, 1.0, hf=folder, kv_cache_dtype="float16")
    p = placement_of([spec], 1, 80.0, [0])
    with pytest.raises(kvgpu.InvalidInstance, match="m: kv_cache_dtype 'float16' has no --kv-cache-dtype value in vLLM"):
        ex.export(p, "vllm")


# -- 2. a tp model scaling in keeps whole running engines -------------------------------------------

# -- 3. names are the identity ------------------------------------------------------------------------

def test_duplicate_names_are_refused_where_names_are_identity(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["solve", str(REVIEW / "dup.yaml"), "--out", str(out)]) == 0  # solving needs no identity
    capsys.readouterr()
    line = fails(capsys, "export", out, "--format", "vllm", "-o", tmp_path / "d")
    assert "model 1 ('a'): the same name as" in line and "model 0 ('a')" in line
    line = fails(capsys, "replan", REVIEW / "dup2.yaml", "--current", out)
    assert "the same name as" in line and "matches models by name" in line
    assert not (tmp_path / "d").exists()


# -- 4. vLLM's one fraction over GPUs of different memory -----------------------------------------------

def test_vllm_tp_engine_over_gpus_of_different_memory_is_refused_sglang_is_not(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["solve", str(REVIEW / "het.yaml"), "--out", str(out)]) == 0
    with pytest.raises(kvgpu.InvalidInstance, match=r"big \(replica 0, GPUs \[0, 1\]\): vLLM applies one "
                                                    r"--gpu-memory-utilization to every rank"):
        ex.export(out, "vllm")
    dep = ex.export(out, "sglang")
    big = next(e for e in dep.engines if e.model == "big")
    free = [80.0, 141.0]
    for e in dep.engines[:dep.engines.index(big)]:  # engines started before it took their share
        for g in e.gpus:
            free[g] -= e.weights_gb + e.overhead_gb + e.kv_gb
    assert big.mem_fraction_static * min(free) >= big.weights_gb + big.kv_gb - 1e-3
    # equal memory: one fraction holds every rank's share, and no GPU is over-committed
    p = placement_of([{"name": "t", "size": 100, "req_rate": 1, "slo": 1, "tp": 2}], 2, [80.0, 80.0], [0, 1],
                     reserve_gb=2)
    (e,) = ex.export(p, "vllm").engines
    assert e.gpu_memory_utilization * 80 <= 78 + 1e-9
    # a small engine whose fraction is floored to 4 decimals is no false refusal
    small = placement_of([{"name": "s", "size": 0.01, "req_rate": 0, "slo": 1},
                          {"name": "b", "size": 40, "req_rate": 9, "slo": 1}], 1, [80.0], [0, 0], reserve_gb=2)
    assert [e.model for e in ex.export(small, "vllm", min_kv_gb=0.001).engines] == ["s", "b"]


# -- 7. the device's real memory ---------------------------------------------------------------------

def test_fractions_of_the_devices_real_memory_keep_the_planned_gb(solved_two_nodes):
    p = solved_two_nodes
    nominal = ex.export(p, "vllm")
    assert any("give --device-memory-gb" in n for n in nominal.notes)
    real = ex.export(p, "vllm", device_memory_gb=85.5)
    assert not any("device-memory-gb" in n for n in real.notes)
    for e in real.engines:
        planned = e.weights_gb + e.overhead_gb + e.kv_gb  # GB the split gives it, proportional to demand
        assert planned - 85.5e-4 <= e.gpu_memory_utilization * 85.5 <= planned + 1e-9
    sg = ex.export(p, "sglang", device_memory_gb=[85.5] * 4)
    assert all(e.mem_fraction_static < n.mem_fraction_static
               for e, n in zip(sg.engines, ex.export(p, "sglang").engines))
    kv = ex.export(p, "kvcached", venv="/v", device_memory_gb=85.5)
    assert "kvcached_gpu_utilization: 0.8888" in kv.files["kvcached_node0.yaml"]  # (80 - 4) / 85.5, floored
    with pytest.raises(kvgpu.InvalidInstance, match="device_memory_gb 70 for GPU 0 is less than its gpu_mem 80"):
        ex.export(p, "vllm", device_memory_gb=70)
    with pytest.raises(kvgpu.InvalidInstance, match="device_memory_gb: 2 values for 4 GPUs"):
        ex.export(p, "vllm", device_memory_gb=[85.5, 85.5])


@pytest.fixture(scope="module")
def solved_two_nodes():
    return kvgpu.solve(kvgpu.io.read_models(DATA / "export" / "two_nodes.json")[0], gpus=4, gpu_mem=80, reserve_gb=4,
                       gpus_per_node=2)


# -- 8. an adapter of a tp base ------------------------------------------------------------------------

def test_an_adapter_of_a_tp_base_is_refused_up_front(capsys):
    line = fails(capsys, "solve", REVIEW / "co.yaml")
    assert "model 1 ('ad1'): colocate_with names" in line and "a tp=2 model; an adapter of a tp base" in line


# -- 9 and 10. ports, options of one format, notes ------------------------------------------------------

def test_kvcached_router_port_is_no_engine_port_and_ports_count_per_node(tmp_path):
    models = [{"name": f"m{i}", "size": 5, "req_rate": 1, "slo": 1} for i in range(5)]
    p = placement_of(models, 2, 80.0, [0, 0, 0, 1, 1], reserve_gb=2)
    dep = ex.export(p, "kvcached", base_port=8078, venv="/v")
    cfg = yaml.safe_load(dep.files["kvcached.yaml"])
    ports = {e.port for e in dep.engines}
    assert 8080 in ports and cfg["router"]["router_port"] not in ports
    two = placement_of(models * 1, 4, 80.0, [0, 0, 0, 2, 3], reserve_gb=2, gpus_per_node=2)
    with pytest.raises(kvgpu.InvalidInstance, match="base_port 65534: 3 engines on a node need ports up to 65536"):
        ex.export(two, "vllm", base_port=65534)


def test_kvcached_options_are_refused_with_other_formats_and_notes_name_the_right_engine(solved_two_nodes, tmp_path,
                                                                                         capsys):
    p = solved_two_nodes
    for kw in ({"venv": "/v"}, {"kvcached_engine": "sglang"}):
        with pytest.raises(kvgpu.InvalidInstance, match="applies to format kvcached only, not vllm"):
            ex.export(p, "vllm", **kw)
    out = tmp_path / "p.json"
    assert main(["solve", str(DATA / "export" / "two_nodes.json"), "--out", str(out)]) == 0
    capsys.readouterr()
    line = fails(capsys, "export", out, "--format", "sglang", "-o", tmp_path / "d", "--venv", "/v")
    assert "venv (--venv) applies to format kvcached only, not sglang" in line
    bare = placement_of([{"name": "a", "size": 10, "req_rate": 1, "slo": 1},
                         {"name": "l", "size": 0.5, "req_rate": 1, "slo": 1, "colocate_with": "a"}], 1, 80.0, [0, 0])
    for fmt, kw in (("sglang", {}), ("kvcached", {"kvcached_engine": "sglang"})):
        notes = " ".join(ex.export(bare, fmt, **kw).notes)
        assert "vLLM" not in notes, notes
    assert "--mem-fraction-static may take all the memory" in " ".join(ex.export(bare, "sglang").notes)


# -- 2. a tp model scaling in keeps whole running engines -----------------------------------------------

def test_a_tp_model_scaling_in_keeps_whole_running_engines(tmp_path, capsys):
    """tpp.yaml exported, replanned as tpp1.yaml (2 replicas of big -> 1) from the export: big stays
    one running engine (GPUs 0,1); a shard of each engine (0 and 3) would be a new engine, a move."""
    from conftest import brute_force_problem, check_placement

    out = tmp_path / "p.json"
    assert main(["solve", str(REVIEW / "tpp.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    ex.export(out, "vllm", tmp_path / "v")
    models, _ = ex.current_of(tmp_path / "v", read_models(REVIEW / "tpp1.yaml")[0])
    assert models[0].cur_gpu == (0, 1, 2, 3)  # the manifest lists each replica's shards together
    for ms, kw in ((models, {}), (read_models(REVIEW / "sc.yaml")[0], {})):
        with pytest.warns(kvgpu.KvgpuWarning, match=r"keeps the running replica\(s\) on GPUs \[0, 1\] whole.*"
                                                    r"stops those on GPUs \[2, 3\]"):
            prob = build_problem(ms, 4, 80.0, reserve_gb=2, max_moves=1, min_gain=0.0)
        assert prob.running[0] == (0, 1) and prob.stopped[0] == (2, 3)
        p = kvgpu.solve(ms, gpus=4, gpu_mem=80, reserve_gb=2, max_moves=1, min_gain=0.0)
        big = sorted(p.assignment[prob.items_of(0)].tolist())
        assert check_placement(prob, p) == p.moved_models
        assert big == [0, 1] or p.moved_models >= 1  # off its engine: counted
        best, _ = brute_force_problem(prob)
        assert p.max_kvpr == pytest.approx(best)
        zero = kvgpu.solve(ms, gpus=4, gpu_mem=80, reserve_gb=2, max_moves=0)
        assert sorted(zero.assignment[prob.items_of(0)].tolist()) == [0, 1] and zero.moved_models == 0
    code, text, err = cli(capsys, "replan", REVIEW / "tpp1.yaml", "--current", tmp_path / "v", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert sorted(d["assignment"][:2]) == [0, 1] or d["replan"]["moved_models"] >= 1


def test_answers_keep_running_replicas_whole_engines():
    """Moves count a model's GPUs as a set: the answer's replicas are regrouped so a running
    engine whose GPUs the model keeps stays one engine (and its export starts it as it ran)."""
    from kvgpu.problem import group_replicas

    m = [{"name": "t", "size": 40, "req_rate": 1, "slo": 1, "tp": 2, "replicas": 2, "cur_gpu_id": [0, 1, 2, 3]}]
    prob = build_problem(m, 5, 80.0)
    assert group_replicas(prob, np.array([0, 3, 1, 2])).tolist() == [0, 1, 2, 3]
    assert group_replicas(prob, np.array([3, 4, 1, 0])).tolist() == [0, 1, 3, 4]  # one engine kept, one new
    nodes = build_problem(m, 6, 80.0, gpus_per_node=2)
    assert group_replicas(nodes, np.array([0, 1, 4, 5])).tolist() == [0, 1, 4, 5]
    assert group_replicas(nodes, np.array([4, 5, 1, 0])).tolist() == [0, 1, 4, 5]
    p = kvgpu.solve(m, gpus=4, gpu_mem=80, min_gain=0.0)
    engines = ex.engines_of(p)
    assert sorted(e.gpus for e in engines) == [[0, 1], [2, 3]] and p.moved_models == 0
