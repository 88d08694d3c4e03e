"""Models in from JSON, CSV, YAML and a DataFrame; placements out as JSON and CSV."""
import csv
import json

import numpy as np
import pandas as pd
import pytest

import kvgpu
from kvgpu.io import read_models, write_placement

ROWS = [("chat", 16, 4, 2), ("code", 26, 2, 1), ("rag", 7.6, 6, 5)]


def test_every_input_form_gives_the_same_placement(tmp_path):
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"gpus": 2, "models": [dict(zip(("name", "size", "req_rate", "slo"), r)) for r in ROWS]}))
    cs = tmp_path / "m.csv"
    cs.write_text("name,size,req_rate,slo\n" + "".join(",".join(map(str, r)) + "\n" for r in ROWS))
    ym = tmp_path / "m.yaml"
    ym.write_text("gpus: 2\nmodels:\n" + "".join(f"  - {{name: {n}, size: {s}, req_rate: {q}, slo: {o}}}\n"
                                                 for n, s, q, o in ROWS))
    df = pd.DataFrame(ROWS, columns=["name", "model_size", "req_rate", "slo"])
    got = [kvgpu.solve(read_models(f)[0], 2).assignment.tolist() for f in (js, cs, ym)]
    got.append(kvgpu.solve(df, 2).assignment.tolist())
    assert got[1:] == got[:-1]
    assert read_models(ym)[1] == {"gpus": 2}
    assert kvgpu.solve(df, 2).by_gpu()[got[0][0]][0]["name"] == "chat"  # DataFrame rows come back as dicts


def test_bad_yaml_and_dataframe_rows_are_named(tmp_path):
    ym = tmp_path / "bad.yaml"
    ym.write_text("models:\n  - {name: a, size: 10, req_rate: 1, slo: 1}\n  - {name: b, size: [1, req_rate: 1}\n")
    with pytest.raises(kvgpu.InvalidInstance, match=r"bad.yaml, line \d+: invalid YAML"):
        read_models(ym)
    ym.write_text("- {name: a, size: ten, req_rate: 1, slo: 1}\n")
    with pytest.raises(kvgpu.InvalidInstance, match=r"bad.yaml, line 1, model 0 \('a'\): field 'size' must be a number"):
        read_models(ym)
    df = pd.DataFrame([["a", 10, 1, 1], ["b", 10, 1, 0]], columns=["name", "size", "req_rate", "slo"])
    with pytest.raises(kvgpu.InvalidInstance, match=r"model 1 \('b'\): field 'slo' must be > 0, got 0"):
        kvgpu.solve(df, 2)


def test_placement_written_as_json_and_csv(tmp_path):
    p = kvgpu.solve([dict(zip(("name", "size", "req_rate", "slo"), r)) for r in ROWS], 2)
    write_placement(p, tmp_path / "p.json")
    write_placement(p, tmp_path / "p.csv")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["assignment"] == p.assignment.tolist()
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["model"] for r in rows] == ["chat", "code", "rag"]
    assert [int(r["gpu"]) for r in rows] == p.assignment.tolist()
    assert np.isclose(max(float(r["gpu_kvpr"]) for r in rows), p.max_kvpr)
    with pytest.raises(kvgpu.InvalidInstance, match="placements are written as .json or .csv"):
        write_placement(p, tmp_path / "p.txt")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.csv", "p.json"]  # nothing else, no temporary file
