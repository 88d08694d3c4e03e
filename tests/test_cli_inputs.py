"""The CLI on bad input: exit status 2 and one `kvgpu: error:` line naming the file, the line and
the field (or the option); warnings as one `kvgpu: warning:` line; outputs checked before the
solve and written all at once (through kvgpu.cli.main, in-process)."""
import json
import os
import shutil
from pathlib import Path

import pytest

import kvgpu.cli
from kvgpu.cli import main

INPUTS = Path(__file__).parent / "data" / "inputs"
GOOD = "name,size,req_rate,slo\nchat,16,4,2\ncode,26,2,1\n"


def fails(capsys, *argv):
    """Run ``kvgpu argv``; expect exit status 2, nothing on stdout and one error line; return it."""
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgpu: error: "), err
    return lines[0]


@pytest.mark.parametrize("name, words", [
    ("04_infinite_demand_accepted.json", ["line 1, model 0 ('a')", "demand req_rate/slo", "overflows"]),
    ("11_size_and_model_size_conflict.json", ["line 1, model 0 ('a')", "'model_size' (70)", "'size' (10)"]),
    ("12_typo_rule_key_ignored.json", ["line 1, model 0 ('a')", "did you mean 'replicas'?", "did you mean 'pin'?"]),
    ("15_yaml_int_key.yaml", ["line 3, model 0 ('a')", "key 5 is not a field name"]),
    ("16_gpu_mem_null.json", ["line 1: gpu_mem must be a number of GB"]),
    ("17_csv_error_no_line.csv", ["line 3 ('b')", "field 'size' must be >= 0"]),
])
def test_bad_input_files(capsys, name, words):
    line = fails(capsys, "solve", INPUTS / name, "--gpus", 2)
    assert str(INPUTS / name) in line
    for w in words:
        assert w in line


@pytest.mark.parametrize("argv, words", [
    (["--gpus", "1e12"], "--gpus must be an integer from 1 to 1000000, got '1e12'"),
    (["--gpus", "0"], "--gpus must be an integer from 1 to 1000000, got '0'"),
    (["--gpus", "two"], "--gpus must be an integer, got 'two'"),
    (["--gpus", "2", "--effort", "10**20"], "--effort must be an integer, got '10**20'"),
    (["--gpus", "2", "--effort", "100000000000000000000"], "--effort must be an integer from 0 to 1000000"),
    (["--gpus", "2", "--effort", "1.5"], "--effort must be an integer, got '1.5'"),
    (["--gpus", "2", "--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--gpus", "2", "--seed", "9" * 5000], "--seed must be an integer from 0 to 9223372036854775807, got a number of"),
    (["--gpus", "2", "--exact-work", "nan"], "--exact-work must be finite, got 'nan'"),
    (["--gpus", "2", "--gpu-mem", "0"], "--gpu-mem must be > 0, got '0'"),
    (["--gpus", "2", "--gpu-mem", "80,x"], "--gpu-mem[1] must be a number, got 'x'"),
    (["--gpus", "2", "--gpu-mem", "inf"], "--gpu-mem must be finite"),
    (["--gpus", "2", "--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
    (["--gpus", "2", "--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_numbers_and_options_on_the_command_line(capsys, tmp_path, argv, words):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    assert words in fails(capsys, "solve", f, *argv)


def test_replan_max_moves_range(capsys, tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("name,size,req_rate,slo,cur_gpu_id\na,10,1,1,0\n")
    assert "--max-moves must be an integer from 0 to" in fails(capsys, "replan", f, "--gpus", 2, "--max-moves", 10**30)
    assert "--max-moves must be an integer" in fails(capsys, "replan", f, "--gpus", 2, "--max-moves", "true")


def test_missing_and_unknown_files(capsys, tmp_path):
    line = fails(capsys, "solve", tmp_path / "nope.csv", "--gpus", 2)
    assert "nope.csv: cannot read (No such file or directory)" in line
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    assert "m.xlsx: models are read from .csv, .json, .yaml, .yml files" in fails(capsys, "solve", tmp_path / "m.xlsx")


def test_latin1_file_warns_in_one_line_and_solves(capsys):
    assert main(["solve", str(INPUTS / "18_latin1.csv"), "--gpus", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"kvgpu: warning: {INPUTS / '18_latin1.csv'}, line 2: not UTF-8 (byte 0xe9); read as "
                                "Windows-1252 (Latin-1); save the file as UTF-8 to be sure of its text"]
    assert json.loads(out)["gpus"][0]["models"] == ["café"]


def test_pandas_bom_and_alias_files_solve(capsys):
    for name, argv in (("14_pandas_exported.csv", ["--gpus", "2"]), ("13_bom_names_lost.csv", ["--gpus", "2"]),
                       ("tp_key_alias.yaml", [])):
        assert main(["solve", str(INPUTS / name), "--json", *argv]) == 0, name
        d = json.loads(capsys.readouterr().out)
        if name.startswith("14"):  # a: tp 2 (written 2.0) on both GPUs; b: pinned to GPU 1 (written 1.0)
            assert d["model_gpus"][1] == [1] and sorted(d["model_gpus"][0]) == [0, 1]
        if name.startswith("13"):
            assert sorted(m for g in d["gpus"] for m in g["models"]) == ["chat", "code"]
        if name.startswith("tp"):
            assert sorted(d["model_gpus"][0]) == [0, 1]


# ---------------------------------------------------------------- outputs

@pytest.fixture
def no_solve(monkeypatch):
    def solve(*a, **k):
        raise AssertionError("the output path must be refused before solving")
    monkeypatch.setattr(kvgpu.cli, "solve", solve)


@pytest.mark.parametrize("flag, name, words", [
    ("--out", "missing/p.json", "the folder"),
    ("--out", "p.txt", "the file name must end in .json or .csv"),
    ("--out", "d.json", "is a folder"),
    ("--plot", "missing/p.png", "the folder"),
    ("--plot", "p.json", "the file name must end in .png or .svg"),
])
def test_bad_output_paths_are_refused_before_solving(capsys, tmp_path, no_solve, flag, name, words):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    if name == "d.json":
        (tmp_path / name).mkdir()
    before = sorted(os.listdir(tmp_path))
    line = fails(capsys, "solve", f, "--gpus", 2, flag, tmp_path / name)
    assert f"{flag} {tmp_path / name}" in line and words in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_unwritable_folder_refused_before_solving(capsys, tmp_path, no_solve):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    assert "cannot write in the folder '/proc'" in fails(capsys, "solve", f, "--gpus", 2, "--out", "/proc/p.json")


def test_outputs_written_together_or_not_at_all(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["solve", str(f), "--gpus", "2", "--out", str(out), "--plot", str(png)]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert json.loads(before)["assignment"] and png.read_bytes().startswith(b"\x89PNG")
    from kvgpu import plot

    def broken(p, path):
        Path(path).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(plot, "placement", broken)
    f.write_text(GOOD.replace("chat,16", "chat,17"))
    line = fails(capsys, "solve", f, "--gpus", 2, "--out", out, "--plot", png)
    assert "No space left on device" in line
    assert out.read_bytes() == before and png.read_bytes().startswith(b"\x89PNG")  # the previous run's files
    assert sorted(os.listdir(tmp_path)) == ["m.csv", "p.json", "p.png"]  # no temporary file left


def test_demo_reads_its_file_through_the_same_reader(capsys):
    assert main(["demo", "--mode", "seed", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["gpus"]) == 16 and sum(len(g["models"]) for g in d["gpus"]) == 46


def test_help_shows_the_ranges(capsys):
    with pytest.raises(SystemExit) as e:
        main(["solve", "--help"])
    assert e.value.code == 0 and "1..1000000" in capsys.readouterr().out


def test_no_traceback_for_a_case_from_a_copy(capsys, tmp_path):
    # the same refusal wherever the file lives (the message names the path as given)
    g = tmp_path / "models.csv"
    shutil.copy(INPUTS / "17_csv_error_no_line.csv", g)
    line = fails(capsys, "certify", g, "--gpus", 2)
    assert line.startswith(f"kvgpu: error: {g}, line 3 ('b'): field 'size'")


@pytest.mark.parametrize("argv, words", [
    (["--mode", "seed", "--effort", "100"], "steer search mode; mode 'seed' runs the seed pipeline alone"),
    (["--mode", "seed", "--patience", "3"], "steer search mode; mode 'seed' runs the seed pipeline alone"),
    (["--mode", "seed", "--seed", "5"], "steer search mode; mode 'seed' runs the seed pipeline alone"),
])
def test_seed_mode_refuses_search_options_rather_than_dropping_them(capsys, tmp_path, argv, words):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    assert words in fails(capsys, "solve", f, "--gpus", 2, *argv)


@pytest.mark.parametrize("argv, words", [
    (["--effort", "-3"], "--effort must be an integer from 0 to"),
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--max-gpus", "x"], "--max-gpus must be an integer, got 'x'"),
    (["--headroom", "--gpus", "two"], "--gpus must be an integer, got 'two'"),
])
def test_size_options_are_refused_as_options(capsys, tmp_path, argv, words):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    assert words in fails(capsys, "size", f, "--max-kvpr", "0.1", *argv)


def test_a_cluster_error_names_only_the_flags_given(capsys, tmp_path):
    f = tmp_path / "m.json"
    f.write_text('{"gpus": 1, "gpu_mem": 20, "models": [{"name": "a", "size": 16, "req_rate": 1, "slo": 1},'
                 ' {"name": "b", "size": 16, "req_rate": 1, "slo": 1}]}')
    line = fails(capsys, "solve", f)
    assert line.startswith(f"kvgpu: error: {f}: ") and "command line" not in line
    line = fails(capsys, "solve", f, "--gpu-mem", 20)
    assert line.startswith(f"kvgpu: error: {f} (with --gpu-mem from the command line): ")


def test_size_max_gpus_range_is_the_apis(capsys, tmp_path):
    f = tmp_path / "m.csv"
    f.write_text(GOOD)
    assert "--max-gpus must be an integer from 1 to 100000, got '500000'" in fails(
        capsys, "size", f, "--max-kvpr", "0.1", "--max-gpus", 500000)


def test_a_folder_given_as_the_model_file_is_said(capsys, tmp_path):
    assert f"{tmp_path}: is a folder; give a model file" in fails(capsys, "solve", tmp_path, "--gpus", 2)


def test_a_migration_limit_beyond_floats_is_no_limit_like_inf(capsys, tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("name,size,req_rate,slo,cur_gpu_id\na,10,1,1,0\nb,20,1,1,0\n")
    outs = []
    for limit in ("inf", "1e400"):
        assert main(["replan", str(f), "--gpus", "2", "--max-migrated-gb", limit, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["assignment"])
    assert outs[0] == outs[1] and len(set(outs[0])) == 2  # unlimited: one of the two moves off GPU 0
    assert "--max-migrated-gb must be finite, got 'nan'" in fails(capsys, "replan", f, "--gpus", 2,
                                                                   "--max-migrated-gb", "nan")
