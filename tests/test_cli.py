"""The CLI end to end, in a subprocess as a user runs it."""
import json
import subprocess
import sys

import pytest

MODELS = [{"name": "chat", "size": 16, "req_rate": 4, "slo": 2}, {"name": "code", "size": 26, "req_rate": 2, "slo": 1},
          {"name": "rag", "size": 7.6, "req_rate": 6, "slo": 5}, {"name": "sum", "size": 14.5, "req_rate": 1, "slo": 2}]


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvgpu.cli", *args], capture_output=True, text=True)


def test_solve_json_file(tmp_path):
    f = tmp_path / "models.json"
    f.write_text(json.dumps(MODELS))
    out = run("solve", str(f), "--gpus", "2", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert sorted(m for g in d["gpus"] for m in g["models"]) == ["chat", "code", "rag", "sum"]
    assert d["lower_bound"] <= d["max_kvpr"] and len(d["gpus"]) == 2


def test_solve_csv_table_and_gpu_mem_list(tmp_path):
    f = tmp_path / "models.csv"
    f.write_text("name,size,req_rate,slo\n" + "".join(f"{m['name']},{m['size']},{m['req_rate']},{m['slo']}\n"
                                                      for m in MODELS))
    out = run("solve", str(f), "--gpus", "3", "--gpu-mem", "40,80,24")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("KVPR = demand / GB left for the KV cache") and lines[1].split()[:2] == ["GPU", "mem"]
    assert [ln.split()[1] for ln in lines[2:5]] == ["40.0", "80.0", "24.0"]
    summary = next(ln for ln in lines if ln.startswith("max KVPR"))
    assert "lower bound" in summary and "gap" in summary and "upper limit on the distance from the optimum" in summary


@pytest.mark.parametrize("content, suffix, message", [
    ("name,size,req_rate,slo\na,10,1,1\nb,ten,1,1\n", ".csv", "line 3 ('b'): field 'size' must be a number"),
    ("name,size,req_rate\na,10,1\n", ".csv", "line 2 ('a'): missing field 'slo'"),
    ('[{"name": "a", "size": 10, "req_rate": 1, "slo": 1},\n {"name": "b", "size": 10, "req_rate": 1 "slo": 1}]',
     ".json", "line 2: invalid JSON"),
    ('[{"name": "a", "size": 10, "req_rate": 1, "slo": 0}]', ".json", "line 1, model 0 ('a'): field 'slo' must be > 0"),
    ('[{"name": "a", "size": 100, "req_rate": 1, "slo": 1}]', ".json", "larger than every GPU"),
])
def test_bad_files_get_clear_errors(tmp_path, content, suffix, message):
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    out = run("solve", str(f), "--gpus", "2")
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr
    if "line" in message:
        assert str(f) in out.stderr


def test_missing_gpus_is_an_error(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(MODELS))
    out = run("solve", str(f))
    assert out.returncode == 2 and "--gpus" in out.stderr


def test_demo():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "46 models, 16 GPUs" in out.stdout
    d = json.loads(run("demo", "--json").stdout)
    assert len(d["gpus"]) == 16 and sum(len(g["models"]) for g in d["gpus"]) == 46
    assert d["lower_bound"] <= d["max_kvpr"]
    assert d["mode"] == "search" and d["backend"] == "numba"  # the defaults
    seed = json.loads(run("demo", "--json", "--mode", "seed").stdout)
    assert d["max_kvpr"] <= seed["max_kvpr"]


def test_certify_proves_the_optimum(tmp_path):
    # three 30 GB models of demand 1 on two 80 GB GPUs: two share a GPU, optimum 2/20 = 0.1
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"name": n, "size": 30, "req_rate": 1, "slo": 1} for n in "abc"]))
    out = run("certify", str(f), "--gpus", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("optimal (proven): max KVPR 0.1,")
    d = json.loads(run("solve", str(f), "--gpus", "2", "--exact", "--json").stdout)
    assert d["proven_optimal"] is True and d["max_kvpr"] == pytest.approx(0.1)
    unproven = run("certify", str(f), "--gpus", "2", "--exact-work", "0")
    assert unproven.stdout.startswith("at most ") and "not proven optimal" in unproven.stdout
