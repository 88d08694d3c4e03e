"""Model files read right, or refused with the file, the line and the field: the issue's input
cases (tests/data/inputs/), every text encoding, pandas' CSVs, YAML's surprises, random bytes;
outputs written all at once or not at all."""
import ast
import codecs
import csv
import io
import json
import os
import string
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu.io import atomic_output, check_output_path, read_models, read_text, write_placement
from kvgpu.schema import MAX_COUNT, ModelSpec, model_specs

INPUTS = Path(__file__).parent / "data" / "inputs"


def read_quietly(path):
    """read_models, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_models(path)


def refused(path, pattern):
    with pytest.raises(kvgpu.InvalidInstance, match=pattern) as e:
        read_quietly(path)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- the input files

def test_04_demand_overflow_refused_with_file_line_and_model():
    refused(INPUTS / "04_infinite_demand_accepted.json",
            r"04_infinite_demand_accepted.json, line 1, model 0 \('a'\): demand req_rate/slo = 1e\+300/1e-10 overflows")


def test_05_06_small_and_tiny_values_read_exactly():
    specs, opts = read_quietly(INPUTS / "05_g1_rounding_crash.json")
    assert opts == {"gpus": 1, "gpu_mem": 0.3} and [s.size for s in specs] == [0.1, 0.2]
    specs, opts = read_quietly(INPUTS / "06_tiny_units_memory_overfilled.json")
    assert opts == {"gpus": 2, "gpu_mem": 1e-12} and [s.size for s in specs] == [1e-12] * 3
    assert [s.where for s in specs][2].endswith("06_tiny_units_memory_overfilled.json, line 4, model 2 ('e2')")


def test_11_size_and_model_size_conflict_refused():
    refused(INPUTS / "11_size_and_model_size_conflict.json",
            r"line 1, model 0 \('a'\): keys 'model_size' \(70\) and 'size' \(10\) both give 'size', "
            r"with different values")


def test_12_typo_keys_refused_with_suggestions():
    refused(INPUTS / "12_typo_rule_key_ignored.json",
            r"12_typo_rule_key_ignored.json, line 1, model 0 \('a'\): unknown key 'replica' \(did you mean "
            r"'replicas'\?\); unknown key 'pinned' \(did you mean 'pin'\?\)")


def test_tp_key_alias_accepted():
    specs, opts = read_quietly(INPUTS / "tp_key_alias.yaml")
    assert [(s.name, s.tp) for s in specs] == [("qwen2.5-32b", 2), ("llama-3.1-8b", 1)]
    assert opts == {"gpus": 2, "gpu_mem": 80.0}
    assert specs[0].where == f"{INPUTS / 'tp_key_alias.yaml'}, line 6, model 0 ('qwen2.5-32b')"


def test_13_bom_keeps_the_first_column():
    specs, _ = read_quietly(INPUTS / "13_bom_names_lost.csv")
    assert [(s.name, s.size, s.req_rate, s.slo) for s in specs] == [("chat", 16, 4, 2), ("code", 26, 2, 1)]


def test_14_pandas_export_read_right():
    a, b = read_quietly(INPUTS / "14_pandas_exported.csv")[0]
    assert (a.name, a.size, a.tp, a.pin, a.cur_gpu) == ("a", 100.0, 2, None, (0,))
    assert (b.name, b.size, b.tp, b.pin, b.cur_gpu) == ("b", 10.0, 1, (1,), None)
    assert b.where.endswith("14_pandas_exported.csv, line 3 ('b')")


def test_15_yaml_int_key_refused():
    refused(INPUTS / "15_yaml_int_key.yaml",
            r"15_yaml_int_key.yaml, line 3, model 0 \('a'\): key 5 is not a field name")


def test_16_gpu_mem_null_refused():
    refused(INPUTS / "16_gpu_mem_null.json", r"16_gpu_mem_null.json, line 1: gpu_mem must be a number of GB or a "
                                              r"list of them \(one per GPU\), got None")


def test_17_negative_size_names_line_3():
    refused(INPUTS / "17_csv_error_no_line.csv", r"17_csv_error_no_line.csv, line 3 \('b'\): field 'size' must be >= 0")


def test_18_latin1_read_with_a_warning():
    with pytest.warns(kvgpu.KvgpuWarning,
                      match=r"18_latin1.csv, line 2: not UTF-8 \(byte 0xe9\); read as Windows-1252"):
        specs, _ = read_models(INPUTS / "18_latin1.csv")
    assert [s.name for s in specs] == ["café"]


def test_no_kv_memory_left_csv_reads():
    (s,) = read_quietly(INPUTS / "no_kv_memory_left.csv")[0]
    assert (s.name, s.size, s.demand) == ("llama-3.1-70b-fp16-shard-like", 80.0, 0.5)


def test_02_generator_of_the_case_keeps_every_model():
    tree = ast.parse((INPUTS / "02_generator_models_dropped.py").read_text())
    src = next(ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "models")
    models = eval(src)  # the case's own model list
    assert len(model_specs(m for m in models)) == len(model_specs(iter(models))) == 4


# ---------------------------------------------------------------- encodings

MODELS = [{"name": "chat-é", "size": 16, "req_rate": 4, "slo": 2},
          {"name": "code €", "size": 26.5, "req_rate": 2, "slo": 1}]


def as_csv(models, delim=","):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim, lineterminator="\n")
    w.writerow(["name", "size", "req_rate", "slo"])
    for m in models:
        w.writerow([m["name"], m["size"], m["req_rate"], m["slo"]])
    return buf.getvalue()


def documents(models):
    return {".csv": as_csv(models), ".json": json.dumps({"gpus": 2, "models": models}, ensure_ascii=False, indent=1),
            ".yaml": yaml.safe_dump({"gpus": 2, "models": models}, allow_unicode=True)}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le+bom", "utf-16-be+bom", "utf-32"])
@pytest.mark.parametrize("suffix", [".csv", ".json", ".yaml"])
def test_every_unicode_encoding_reads_the_same(tmp_path, encoding, suffix):
    text = documents(MODELS)[suffix]
    if encoding.endswith("+bom"):
        codec = encoding[:-4]
        data = (codecs.BOM_UTF16_LE if codec.endswith("le") else codecs.BOM_UTF16_BE) + text.encode(codec)
    else:
        data = text.encode(encoding)
    f = tmp_path / f"m{suffix}"
    f.write_bytes(data)
    specs, _ = read_quietly(f)
    assert [(s.name, s.size, s.req_rate, s.slo) for s in specs] == [tuple(m.values()) for m in MODELS]


def test_windows_1252_and_undefined_bytes(tmp_path):
    f = tmp_path / "m.csv"
    f.write_bytes(as_csv(MODELS).encode("cp1252"))
    with pytest.warns(kvgpu.KvgpuWarning, match="line 2: not UTF-8"):
        assert [s.name for s in read_models(f)[0]] == ["chat-é", "code €"]
    f.write_bytes(b"name,size,req_rate,slo\nx\x81\x8d,1,1,1\n")  # bytes Windows-1252 leaves undefined
    with pytest.warns(kvgpu.KvgpuWarning):
        assert read_models(f)[0][0].name == "x\x81\x8d"


def test_utf16_without_bom_and_broken_text_after_a_bom(tmp_path):
    f = tmp_path / "m.csv"
    f.write_bytes(as_csv(MODELS).encode("utf-16-le"))
    refused(f, r"m.csv, line 1: a NUL character: not a text file, or UTF-16 without a byte-order mark")
    f.write_bytes(codecs.BOM_UTF16_LE + b"n\x00a")
    refused(f, r"m.csv: not valid UTF-16 text after its byte-order mark")
    f.write_bytes(codecs.BOM_UTF8 + b"name\xff")
    refused(f, r"m.csv: not valid UTF-8-SIG text after its byte-order mark")
    f.write_bytes(codecs.BOM_UTF8 + "a\r\nb é".encode())
    assert read_text(f) == "a\r\nb é"  # the mark dropped, line ends kept for the CSV reader


def test_unreadable_and_unknown_files(tmp_path):
    refused(tmp_path / "missing.csv", r"missing.csv: cannot read \(No such file or directory\)")
    (tmp_path / "d.json").mkdir()
    refused(tmp_path / "d.json", r"d.json: is a folder; give a model file")
    (tmp_path / "m.txt").write_text("[]")
    refused(tmp_path / "m.txt", r"m.txt: models are read from .csv, .json, .yaml, .yml files, not '.txt'")


# ---------------------------------------------------------------- CSV

def test_pandas_csv_round_trip_and_index_column(tmp_path):
    frame = pd.DataFrame([{"name": "a", "size": 100, "req_rate": 1, "slo": 1, "tp": 2, "cur_gpu_id": 0},
                          {"name": "b", "size": 10, "req_rate": 1.5, "slo": 2, "pin": 1, "forbid": "0;2"},
                          {"name": "c", "size": 7.25, "req_rate": 0, "slo": 0.5, "same_node": True}])
    f = tmp_path / "m.csv"
    frame.to_csv(f, index=False)  # tp, pin, cur_gpu_id come out as 2.0, 1.0, 0.0 with empty cells
    specs, opts = read_quietly(f)
    assert opts == {} and specs == model_specs(frame, where=[f"{f}, line {k}" for k in (2, 3, 4)])
    assert [(s.tp, s.pin, s.forbid, s.cur_gpu, s.same_node) for s in specs] == \
        [(2, None, (), (0,), None), (1, (1,), (0, 2), None, None), (1, None, (), None, True)]
    frame.to_csv(f)  # with the index: a first column without a name
    refused(f, r"m.csv, line 1: the first column has no name "
               r"\(a pandas index\? write the CSV with to_csv\(index=False\)\)")
    pd.read_csv(f).to_csv(f, index=False)  # the index read back and written again
    refused(f, r"m.csv, line 1: the first column has no name \(a pandas index\?")


@pytest.mark.parametrize("text, pattern", [
    ("", r"m.csv: empty file \(need a header row"),
    ("\n\n", r"m.csv: empty file"),
    ("name,size,req_rate,slo,replica\n", r"m.csv, line 1: unknown key 'replica' \(did you mean 'replicas'\?\)"),
    ("name,size,size,slo\n", r"m.csv, line 1: column 'size' appears twice"),
    ("name,,req_rate,slo\n", r"m.csv, line 1: column 2 has no name"),
    ("name,size,req_rate,slo\na,1,1\n", r"m.csv, line 2: 3 values for 4 columns \(name, size, req_rate, slo\)"),
    ("name,size,req_rate,slo\na,1,1,1,\n", r"m.csv, line 2: 5 values for 4 columns"),
    ("name,size,req_rate,slo\n\n\na,1,1,0\n", r"m.csv, line 4 \('a'\): field 'slo' must be > 0"),
    ('name,size,req_rate,slo\n"two\nlines",1,1,1\nb,x,1,1\n', r"m.csv, line 4 \('b'\): field 'size' must be a number"),
    ("name,size,req_rate,slo\r\na,1,1,1\r\nb,1,yes,1\r\n",
     r"m.csv, line 3 \('b'\): field 'req_rate' must be a number, got 'yes'"),
    ("name,size,req_rate,slo,tp\na,1,1,1,2.5\n", r"line 2 \('a'\): field 'tp' must be an integer, got '2.5'"),
    ("name,size,req_rate,slo\na,16,5,1\nb,16,4,-2\n", r"m.csv, line 3 \('b'\): field 'slo' must be > 0"),
    ("name;size;req_rate;slo\na;16,5;1;1\n",
     r"line 2 \('a'\): field 'size' must be a number, got '16,5' \(a decimal comma"),
])
def test_bad_csv_names_file_line_and_field(tmp_path, text, pattern):
    f = tmp_path / "m.csv"
    f.write_text(text)
    refused(f, pattern)


def test_csv_blank_lines_separators_and_header_only(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("\nname , size,req_rate,slo,pin\n\na,1,1,1,0;1\n\n")
    (s,) = read_quietly(f)[0]
    assert (s.where, s.pin) == (f"{f}, line 4 ('a')", (0, 1))
    f.write_text("name;size;req_rate;slo;pin\na;1;1;1;0,1\n")  # a spreadsheet's ';' separators
    assert read_quietly(f)[0][0].pin == (0, 1)
    f.write_text("name\tsize\treq_rate\tslo\na\t1\t1\t1\n")
    assert read_quietly(f)[0][0].size == 1.0
    f.write_text("name,size,req_rate,slo\n")
    assert read_quietly(f) == ([], {})


# ---------------------------------------------------------------- JSON and YAML

@pytest.mark.parametrize("suffix, text, pattern", [
    (".json", '{"gpus": 2, "gpu": 3, "models": []}',
     r"m.json, line 1: unknown top-level key 'gpu' \(did you mean 'gpus'\?\)"),
    (".json", '{"gpus": 2, "models": [{"size": 1, "size": 2, "req_rate": 1, "slo": 1}]}',
     r"m.json, line 1, model 0: key 'size' appears twice"),
    (".json", '{"gpus": 2, "gpus": 3, "models": []}', r"m.json: key 'gpus' appears twice"),
    (".json", '{"gpus": 2}', r"m.json: no 'models' list"),
    (".json", '{"models": {"a": 1}}', r"m.json, line 1: 'models' must be a list of models, got dict"),
    (".json", '"models"', r"m.json: expected a list of models or an object with a 'models' list, got str"),
    (".json", "", r"m.json, line 1: invalid JSON \(Expecting value\)"),
    (".json", '[\n{"size": 1, "req_rate": 1, "slo": 1},\n{"size": 1 "req_rate": 1}]', r"m.json, line 3: invalid JSON"),
    (".json", '[{"size": NaN, "req_rate": 1, "slo": 1}]', r"m.json, line 1, model 0: field 'size' has no value"),
    (".json", '[{"size": Infinity, "req_rate": 1, "slo": 1}]', r"model 0: field 'size' must be finite, got inf"),
    (".json", '[{"size": 1e999, "req_rate": 1, "slo": 1}]', r"model 0: field 'size' must be finite"),
    (".json", '[{"size": 1' + "0" * 5000 + ', "req_rate": 1, "slo": 1}]', r"m.json: invalid JSON \(Exceeds the limit"),
    (".json", "[" * 100000 + "]" * 100000, r"m.json: invalid JSON \(nested too deeply\)"),
    (".json", '{"gpus": 2.5, "models": []}', r"m.json, line 1: gpus must be an integer, got 2.5"),
    (".json", '{"gpus": 10000000, "models": []}', r"gpus must be an integer from 1 to 1000000"),
    (".json", '{"gpus": 2, "gpu_mem": [80, [80]], "models": []}', r"gpu_mem must be one number or a flat list"),
    (".json", '{"gpus": 2, "reserve_gb": -1, "models": []}', r"line 1: reserve_gb must be >= 0, got -1"),
    (".json", '{"nodes": [[0, 1], [1, 2]], "models": []}', r"nodes: GPU 1 is in node 0 and node 1"),
    (".json", '{"nodes": [0, 1], "models": []}', r"nodes must be a list of lists of GPU ids \(one list per node\), got list"),
    (".json", '{"nodes": [[0], []], "models": []}', r"nodes: node 1 has no GPUs"),
    (".json", '{"nodes": [[0]], "gpus_per_node": 1, "models": []}', r"give 'nodes' or 'gpus_per_node', not both"),
    (".json", '{"description": 5, "models": []}', r"description must be text, got int"),
    (".yaml", "gpus: true\nmodels: []\n", r"m.yaml, line 1: gpus must be an integer, got True \(a boolean\)"),
    (".yaml", "- {name: a, size: yes, req_rate: 1, slo: 1}\n",
     r"m.yaml, line 1, model 0 \('a'\): field 'size' must be a number, got True"),
    (".yaml", "models:\n  - {name: a, size: 1, req_rate: 1, slo: 1}\n  - {name: b, size: 1, size: 2}\n",
     r"m.yaml, line 3: invalid YAML \(key 'size' appears twice\)"),
    (".yaml", "gpus: 2\ngpus: 3\nmodels: []\n", r"m.yaml, line 2: invalid YAML \(key 'gpus' appears twice\)"),
    (".yaml", "gpus: 2\ngpu_mem: null\nmodels: []\n", r"m.yaml, line 2: gpu_mem must be a number of GB or a list"),
    (".yaml", "gpus: 2\n5: x\nmodels: []\n", r"m.yaml, line 2: top-level key 5 is not text"),
    (".yaml", "models:\n  - [1, 2\n", r"m.yaml, line 3: invalid YAML"),
    (".yaml", "", r"m.yaml: expected a list of models .* got an empty file"),
    (".yaml", "- a\n---\n- b\n", r"m.yaml, line 2: invalid YAML \(but found another document\)"),
    (".yaml", "- {size: 2024-02-30, req_rate: 1, slo: 1}\n", r"m.yaml: invalid YAML value \(day is out of range"),
    (".yaml", "- {size: 2024-02-03, req_rate: 1, slo: 1}\n",
     r"model 0: field 'size' must be a number, got datetime.date"),
    (".yaml", "- !!python/object:os.system {}\n", r"m.yaml, line 1: invalid YAML \(could not determine a constructor"),
    (".yaml", "- {size: \x07}\n", r"m.yaml, line 1: invalid YAML \(character U\+0007 is not allowed\)"),
    (".yaml", "x: " + "[" * 5000 + "]" * 5000, r"m.yaml: invalid YAML \(nested too deeply\)"),
])
def test_bad_json_and_yaml_name_file_line_and_field(tmp_path, suffix, text, pattern):
    f = tmp_path / f"m{suffix}"
    f.write_text(text)
    refused(f, pattern)


def test_file_options_typed_and_model_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# cluster\ndescription: two nodes\ngpus: 4\ngpu_mem: [80, 80, '141', 141.0]\n"
                 "nodes: [[0, 1], [2, 3]]\nreserve_gb: 2\n"
                 "models:\n  - name: a\n    size: 10\n    req_rate: 1\n    slo: 1\n\n"
                 "  - {name: b, size: 20, req_rate: 2, slo: 1, same_node: yes, tp: 2}\n")
    specs, opts = read_quietly(f)
    assert opts == {"description": "two nodes", "gpus": 4, "gpu_mem": [80.0, 80.0, 141.0, 141.0],
                    "nodes": [[0, 1], [2, 3]], "reserve_gb": 2.0}
    assert [s.where for s in specs] == [f"{f}, line 8, model 0 ('a')", f"{f}, line 13, model 1 ('b')"]
    assert (specs[1].same_node, specs[1].tp) == (True, 2)
    j = tmp_path / "c.json"
    two = [{"name": n, "size": 1, "req_rate": 1, "slo": 1} for n in "ab"]
    j.write_text(json.dumps({"gpus_per_node": 8, "models": two}, indent=2))
    specs, opts = read_quietly(j)
    assert opts == {"gpus_per_node": 8}
    assert [s.where for s in specs] == [f"{j}, line 4, model 0 ('a')", f"{j}, line 10, model 1 ('b')"]
    j.write_text('[{"size": 1, "req_rate": 1, "slo": 1},\n\n {"size": 1, "req_rate": 1, "slo": 1}]')
    assert [s.where for s in read_quietly(j)[0]] == [f"{j}, line 1, model 0", f"{j}, line 3, model 1"]


# ---------------------------------------------------------------- random input: clean errors or right reads

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200),
                      st.sampled_from([codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE])
                      .flatmap(lambda bom: st.binary(max_size=120).map(lambda b: bom + b)),
                      st.text(alphabet=string.printable + "é€\x00\ufeff\u2028", max_size=200).map(str.encode)),
       suffix=st.sampled_from([".csv", ".json", ".yaml"]))
def test_random_bytes_give_clean_errors(tmp_path, data, suffix):
    f = tmp_path / f"r{suffix}"
    f.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", kvgpu.KvgpuWarning)  # (the filter added last wins)
        try:
            specs, opts = read_models(f)
        except kvgpu.InvalidInstance as e:
            assert str(f) in str(e) and "\n" not in str(e)
            return
    assert all(isinstance(s, ModelSpec) for s in specs) and isinstance(opts, dict)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
              st.sampled_from(["size", "req_rate", "slo", "tp", "pin", "cur_gpu_id", "models", "gpus", "1", "0;1"])),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.sampled_from(["name", "size", "req_rate", "slo", "tp", "pin", "forbid",
                                                            "cur_gpu_id", "models", "gpus", "gpu_mem", "nodes",
                                                            "reserve_gb", "x"]), kids, max_size=5)),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=JSON_VALUES, suffix=st.sampled_from([".json", ".yaml"]))
def test_random_documents_give_clean_errors_or_valid_records(tmp_path, doc, suffix):
    f = tmp_path / f"r{suffix}"
    f.write_text(json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc))
    try:
        specs, opts = read_quietly(f)
    except kvgpu.InvalidInstance as e:
        assert str(f) in str(e) and "\n" not in str(e)
        return
    assert all(s.size >= 0 and s.slo > 0 and np.isfinite(s.demand) for s in specs)
    assert set(opts) <= {"gpus", "gpu_mem", "nodes", "gpus_per_node", "reserve_gb", "description"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["name", "size", "model_size", "req_rate", "slo", "tp", "pin", "forbid",
                                        "cur_gpu_id", "same_node", "replica", "", "Unnamed: 0"]),
                       min_size=1, max_size=6),
       rows=st.lists(st.lists(st.sampled_from(["", "1", "2.0", "-1", "x", "0;1", "1e400", "true", "nan", " 3 ", "é"]),
                              max_size=7), max_size=4))
def test_random_csv_cells_give_clean_errors_or_valid_records(tmp_path, header, rows):
    f = tmp_path / "r.csv"
    f.write_text("\n".join(",".join(r) for r in [header, *rows]))
    try:
        specs, _ = read_quietly(f)
    except kvgpu.InvalidInstance as e:
        assert str(f) in str(e) and "\n" not in str(e)
        return
    assert all(s.size >= 0 and s.slo > 0 and np.isfinite(s.demand) for s in specs)


# ---------------------------------------------------------------- round trip of valid models

NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                max_size=12).filter(lambda t: t.strip())
GPU_IDS = st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=3).map(tuple)
SPECS = st.builds(
    lambda name, size, rate, slo, tp, rep, pin, forbid, cur, over, node: ModelSpec(
        0, "", name, size, rate, slo, tp, rep, pin, forbid, cur, over, node),
    st.one_of(st.none(), NAMES), st.floats(0, 1e6), st.floats(0, 1e6), st.floats(1e-6, 1e6),
    st.integers(1, MAX_COUNT), st.integers(1, 8), st.one_of(st.none(), GPU_IDS), st.lists(st.integers(0, 99),
                                                                                            max_size=3).map(tuple),
    st.one_of(st.none(), GPU_IDS), st.floats(0, 100), st.one_of(st.none(), st.booleans()))


def write_csv(specs) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)  # "\r\n" lines: a "\r" in a name is then quoted too
    cols = ["name", "size", "req_rate", "slo", "tp", "replicas", "pin", "forbid", "cur_gpu_id", "overhead_gb",
            "same_node"]
    w.writerow(cols)
    ids = lambda t: ";".join(map(str, t)) if t else ""  # noqa: E731
    for s in specs:
        w.writerow([s.name or "", repr(s.size), repr(s.req_rate), repr(s.slo), s.tp, s.replicas, ids(s.pin),
                    ids(s.forbid), ids(s.cur_gpu) if s.cur_gpu else "-1", repr(s.overhead_gb),
                    "" if s.same_node is None else str(s.same_node).lower()])
    return buf.getvalue()


def content(specs):
    return [(s.name, s.size, s.req_rate, s.slo, s.tp, s.replicas, s.pin, s.forbid, s.cur_gpu, s.overhead_gb,
             s.same_node) for s in specs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(SPECS, max_size=4), suffix=st.sampled_from([".csv", ".json", ".yaml"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
@example(specs=[ModelSpec(0, "", "0\x85", 0.0, 0.0, 1.0, 1, 1, None, (), None, 0.0, None)], suffix=".yaml",
         encoding="utf-8")  # a NEL in a name: CI's draw that PyYAML's writer folds
def test_valid_models_written_and_read_back_are_equal(tmp_path, specs, suffix, encoding):
    if suffix == ".csv":
        text = write_csv(specs)
    elif suffix == ".json":
        text = json.dumps({"gpus": 3, "models": [s.to_dict() for s in specs]}, ensure_ascii=False)
    else:
        data = {"gpus": 3, "models": [s.to_dict() for s in specs]}
        text = yaml.safe_dump(data, allow_unicode=True)
        if yaml.safe_load(text) != data:
            # PyYAML's writer puts U+0085 (a YAML line break) raw inside a quoted name, which every
            # YAML reader then folds to a space; escaped, the same file is what a user would write
            text = yaml.safe_dump(data, allow_unicode=False)
    f = tmp_path / f"r{suffix}"
    f.write_bytes(text.encode(encoding))
    got, opts = read_quietly(f)
    assert content(got) == content(specs)
    assert opts == ({} if suffix == ".csv" else {"gpus": 3})


# ---------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def placement():
    return kvgpu.solve([{"name": "a", "size": 10, "req_rate": 1, "slo": 1}, {"name": "b", "size": 20, "req_rate": 2,
                                                                               "slo": 1}], 2)


class Broken:
    """A placement whose JSON has a NaN: json.dump fails part-way through the file."""

    def to_dict(self):
        return {"max_kvpr": 1.0, "gpus": [{"kvpr": float("nan")}]}


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, placement):
    out = tmp_path / "p.json"
    write_placement(placement, out)
    before = out.read_bytes()
    assert json.loads(before)["assignment"] == placement.assignment.tolist()
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_placement(Broken(), out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["p.json"]
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "plot.png") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"
            tmp.write_bytes(b"half")
            raise RuntimeError("drawing failed")
    assert os.listdir(tmp_path) == ["p.json"]


def test_atomic_output_replaces_whole_and_honours_the_umask(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("old")
    with atomic_output(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the end
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["x.csv"]
    mask = os.umask(0)
    os.umask(mask)
    with atomic_output(tmp_path / "y.csv") as tmp:
        tmp.write_text("y")
    assert (tmp_path / "y.csv").stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(OSError):
        with atomic_output(tmp_path / "missing" / "z.csv"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["x.csv", "y.csv"]


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "p.JSON", (".json", ".csv")) == tmp_path / "p.JSON"
    with pytest.raises(kvgpu.InvalidInstance, match=r"--out .*p.txt: the file name must end in .json or .csv"):
        check_output_path(tmp_path / "p.txt", (".json", ".csv"), "--out")
    with pytest.raises(kvgpu.InvalidInstance, match=r"missing/p.json: the folder '.*missing' does not exist"):
        check_output_path(tmp_path / "missing" / "p.json", (".json",))
    (tmp_path / "d.json").mkdir()
    with pytest.raises(kvgpu.InvalidInstance, match=r"d.json: is a folder"):
        check_output_path(tmp_path / "d.json", (".json",))
    if Path("/proc/self").is_dir():  # a folder no one can create files in, even root
        with pytest.raises(kvgpu.InvalidInstance, match=r"/proc/p.json: cannot write in the folder '/proc'"):
            check_output_path("/proc/p.json", (".json",))
    assert sorted(os.listdir(tmp_path)) == ["d.json"]  # the probe file is gone
