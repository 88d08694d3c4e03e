"""kvgpu.schema: every form of models read into the same records, every bad value refused with
an InvalidInstance naming the model, the field and the rule (cases 02, 11, 12, 20 of the issue's
inputs, and the classes they stand for)."""
import ast
import decimal
import fractions
import math
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu.schema import (KEYS, MAX_COUNT, MAX_GPU_ID, OPTION_RANGES, ModelSpec, check_keys, choice,
                          current_placement, gpu_memory, integer, model_specs, number, per_gpu)

INPUTS = Path(__file__).parent / "data" / "inputs"
ROWS = [("chat", 16.0, 4.0, 2.0), ("code", 26.0, 2.0, 1.0), ("rag", 7.6, 6.0, 5.0)]
DICTS = [{"name": n, "size": s, "req_rate": r, "slo": o} for n, s, r, o in ROWS]


@dataclass
class AdrsModel:
    """The ADRS evaluator's model: the four fields and whatever else it carries."""
    model_name: str
    model_size: float
    req_rate: float
    slo: float
    tenant: str = "t"  # not a kvgpu field: objects may carry anything

    def size(self):  # a method with a field's name is not data
        return -1


def fields(specs):
    return [(s.name, s.size, s.req_rate, s.slo) for s in specs]


# ---------------------------------------------------------------- every form of models

def test_every_form_of_models_gives_the_same_records():
    want = fields(model_specs(DICTS))
    assert want == [(n, s, r, o) for n, s, r, o in ROWS]
    frame = pd.DataFrame(ROWS, columns=["name", "model_size", "req_rate", "slo"])
    Row = namedtuple("Row", "name size req_rate slo")
    forms = {
        "generator": (d for d in DICTS),  # case 02: a generator is consumed exactly once
        "iterator": iter(DICTS),
        "tuple": tuple(DICTS),
        "objects": [AdrsModel(*r) for r in ROWS],
        "namedtuples": [Row(*r) for r in ROWS],
        "DataFrame": frame,
        "DataFrame rows": (row for _, row in frame.iterrows()),
        "model_name key": [{"model_name": n, "model_size": s, "req_rate": r, "slo": o} for n, s, r, o in ROWS],
        "numeric strings": [{"name": n, "size": f" {s} ", "req_rate": str(r), "slo": str(o)} for n, s, r, o in ROWS],
    }
    for form, models in forms.items():
        assert fields(model_specs(models)) == want, form
    nameless = [(None, s, r, o) for _, s, r, o in want]
    assert fields(model_specs(np.array([r[1:] for r in ROWS]))) == nameless
    assert fields(model_specs([list(r[1:]) for r in ROWS])) == nameless
    assert fields(model_specs(np.array([r[1:] for r in ROWS], dtype=object))) == nameless


def test_records_keep_the_callers_objects_and_pass_through_specs():
    objs = [AdrsModel(*r) for r in ROWS]
    specs = model_specs(objs)
    assert [s.obj for s in specs] == objs and [s.index for s in specs] == [0, 1, 2]
    assert specs[1].where == "model 1 ('code')" and specs[1].demand == 2.0
    assert model_specs(specs) == specs  # ModelSpec records pass through
    assert model_specs(iter(specs))[2] is specs[2]


def test_optional_fields_aliases_and_text_cells():
    (s,) = model_specs([{"name": "big", "model_size": "140", "req_rate": 6, "slo": 2, "tensor_parallel_size": "2.0",
                         "num_replicas": 2.0, "pin": "0;2;4;6", "forbid": "[5, 7]", "cur_gpu_id": "1,3",
                         "overhead_gb": "1.5", "same_node": "TRUE"}])
    assert (s.tp, s.replicas, s.pin, s.forbid, s.cur_gpu, s.overhead_gb, s.same_node) == \
        (2, 2, (0, 2, 4, 6), (5, 7), (1, 3), 1.5, True)
    assert type(s.tp) is int and all(type(g) is int for g in s.pin)
    (d,) = model_specs([{"size": 1, "req_rate": 1, "slo": 1}])
    assert (d.name, d.tp, d.replicas, d.pin, d.forbid, d.cur_gpu, d.overhead_gb, d.same_node) == \
        (None, 1, 1, None, (), None, 0.0, None)
    same = model_specs([{"size": 10, "model_size": "10.0", "tp": 2, "tp_size": 2, "req_rate": 1, "slo": 1}])
    assert same[0].size == 10.0 and same[0].tp == 2  # one value under two keys is fine
    assert model_specs([{"size": 1, "req_rate": 1, "slo": 1, "pin": 3, "forbid": []}])[0].pin == (3,)


@pytest.mark.parametrize("cur, want", [(-1, None), (None, None), (float("nan"), None), ("", None), ("-1", None),
                                       (2, (2,)), (2.0, (2,)), ("2", (2,)), ([0, 1], (0, 1)), ("0;1", (0, 1))])
def test_cur_gpu_id_new_or_gpus(cur, want):
    assert model_specs([{"size": 1, "req_rate": 1, "slo": 1, "cur_gpu_id": cur}])[0].cur_gpu == want


def test_dataframe_nan_means_not_given():
    # case 20: NaN cur_gpu_id means "new"; pandas turns an int column with gaps into floats
    frame = pd.DataFrame([{"name": "a", "size": 20, "req_rate": 5, "slo": 5, "cur_gpu_id": 0, "tp": 2},
                          {"name": "b", "size": 30, "req_rate": 2, "slo": 1, "cur_gpu_id": None, "pin": 1}])
    a, b = model_specs(frame)
    assert (a.cur_gpu, a.tp, a.pin) == ((0,), 2, None)
    assert (b.cur_gpu, b.tp, b.pin) == (None, 1, (1,))
    assert a.obj["name"] == "a" and b.obj["name"] == "b"  # the rows, as dicts
    nullable = frame.astype({"tp": "Int64"})  # pandas' NA, not NaN
    assert [s.tp for s in model_specs(nullable)] == [2, 1]


def test_to_dict_round_trip():
    (s,) = model_specs([{"name": "m", "size": 8, "req_rate": 1, "slo": 2, "tp": 2, "pin": [0, 1], "cur_gpu_id": 3,
                         "same_node": False}])
    assert s.to_dict() == {"name": "m", "size": 8.0, "req_rate": 1.0, "slo": 2.0, "tp": 2, "pin": [0, 1],
                           "same_node": False, "cur_gpu_id": 3}
    assert model_specs([s.to_dict()])[0] == s


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("models, message", [
    (None, "models must be a list of models"),
    ("models.csv", "to read a file, use kvgpu.io.read_models"),
    ({"gpus": 2, "models": DICTS}, "got one dict \\(it has a 'models' key"),
    (5, "models must be a list \\(or any iterable\\) of models, got int"),
    (np.zeros(3), r"shape \(N, 3\).*got shape \(3,\)"),
    (np.zeros((2, 4)), r"shape \(N, 3\)"),
    ([5], "model 0: expected a dict, an object with attributes or a \\(size, req_rate, slo\\) row, got 5"),
    ([[1, 2]], "model 0: a model given as a row must have 3 values"),
    (pd.DataFrame([[1, 1, 1]], columns=["size", "size", "slo"]), "two columns named 'size'"),
])
def test_bad_containers_are_refused(models, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        model_specs(models)


BASE = {"name": "a", "size": 10, "req_rate": 1, "slo": 1}


@pytest.mark.parametrize("change, message", [
    # case 12: typos refused with the closest key; serving stacks' spellings suggested
    ({"replica": 3, "pinned": 2}, "model 0 \\('a'\\): unknown key 'replica' \\(did you mean 'replicas'\\?\\); "
                                  "unknown key 'pinned' \\(did you mean 'pin'\\?\\)"),
    ({"gpu_count": 2}, "unknown key 'gpu_count' \\(did you mean 'tp'\\?\\)"),
    ({"tenant": "x"}, "unknown key 'tenant' \\(known keys: "),
    ({5: "x"}, "key 5 is not a field name"),
    # case 11: two keys for one field
    ({"model_size": 70}, "keys 'size' \\(10\\) and 'model_size' \\(70\\) both give 'size', with different values"),
    ({"tp": 2, "tp_size": 4}, "both give 'tp'"),
    # booleans are not numbers; text must be numeric
    ({"size": True}, "field 'size' must be a number, got True \\(a boolean\\)"),
    ({"tp": np.bool_(True)}, "field 'tp' must be an integer, got .*True.* \\(a boolean\\)"),
    ({"size": "ten"}, "field 'size' must be a number, got 'ten'"),
    ({"size": "16,5"}, "decimal comma"),
    ({"size": [10]}, "field 'size' must be a number"),
    # missing values
    ({"slo": None}, "field 'slo' has no value \\(got None\\)"),
    ({"size": float("nan")}, "field 'size' has no value"),
    ({"size": " "}, "field 'size' has no value"),
    # ranges and overflow (case 04: finite inputs whose demand is not)
    ({"size": -26}, "field 'size' must be >= 0, got -26"),
    ({"req_rate": -1}, "field 'req_rate' must be >= 0"),
    ({"slo": 0}, "field 'slo' must be > 0, got 0"),
    ({"size": float("inf")}, "field 'size' must be finite, got inf"),
    ({"size": "1e400"}, "field 'size' must be finite"),
    ({"size": 10**400}, "field 'size' is too large"),
    ({"req_rate": 1e300, "slo": 1e-10}, "demand req_rate/slo = 1e\\+300/1e-10 overflows"),
    ({"tp": 0}, "field 'tp' must be an integer from 1 to 65536, got 0"),
    ({"tp": 1.5}, "field 'tp' must be an integer, got 1.5"),
    ({"tp": 10**30}, "field 'tp' must be an integer from 1 to 65536"),
    ({"replicas": MAX_COUNT + 1}, "field 'replicas' must be an integer from 1 to 65536"),
    ({"tp": "yes"}, "field 'tp' must be an integer, got 'yes'"),
    ({"pin": -1}, "field 'pin' must be an integer from 0 to 2147483647, got -1"),
    ({"pin": 2**31}, "field 'pin' must be an integer from 0 to 2147483647"),
    ({"pin": []}, "field 'pin' needs at least one GPU id"),
    ({"pin": [[0, 1]]}, "field 'pin' must be a GPU id or a flat list"),
    ({"pin": "0;x"}, "field 'pin' must be an integer, got 'x'"),
    ({"forbid": {1, 2}}, "field 'forbid' must be a GPU id or a flat list"),
    ({"cur_gpu_id": -2}, "field 'cur_gpu_id' must be an integer from -1"),
    ({"cur_gpu_id": [0, -1]}, "field 'cur_gpu_id' \\(-1 alone means new; a list holds GPU ids >= 0\\) must be"),
    ({"cur_gpu_id": []}, "field 'cur_gpu_id' is an empty list"),
    ({"overhead_gb": -0.5}, "field 'overhead_gb' must be >= 0"),
    ({"same_node": 1}, "field 'same_node' must be true or false, got 1"),
    ({"same_node": "maybe"}, "field 'same_node' must be true or false"),
    ({"name": True}, "field 'name' must be text, got True"),
])
def test_bad_fields_are_refused_naming_model_field_and_rule(change, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        model_specs([{**BASE, **change}])


def test_missing_fields_and_totals():
    with pytest.raises(kvgpu.InvalidInstance, match="model 1 \\('b'\\): missing field 'size' or 'model_size'"):
        model_specs([BASE, {"name": "b", "req_rate": 1, "slo": 1}])
    with pytest.raises(kvgpu.InvalidInstance, match="model 0: missing field 'slo'"):
        model_specs([{"size": 1, "req_rate": 1}])
    with pytest.raises(kvgpu.InvalidInstance, match="the total demand .* overflows"):
        model_specs([dict(BASE, req_rate=1e308)] * 2)
    with pytest.raises(kvgpu.InvalidInstance, match="the total size overflows"):
        model_specs([dict(BASE, size=1e308)] * 2)
    with pytest.raises(kvgpu.InvalidInstance,
                       match="attributes 'size' \\(2\\) and 'model_size' \\(1\\) both give 'size'"):
        model_specs([namedtuple("M", "model_size size req_rate slo")(1, 2, 1, 1)])


def test_where_labels_from_files_and_direct_construction():
    specs = model_specs(DICTS, where=["m.csv, line 2", "m.csv, line 3", "m.csv, line 5"])
    assert [s.where for s in specs] == ["m.csv, line 2 ('chat')", "m.csv, line 3 ('code')", "m.csv, line 5 ('rag')"]
    with pytest.raises(kvgpu.InvalidInstance, match="m.csv, line 3 \\('code'\\): field 'slo' must be > 0"):
        model_specs([DICTS[0], dict(DICTS[1], slo=0)], where=["m.csv, line 2", "m.csv, line 3"])
    with pytest.raises(kvgpu.InvalidInstance, match="2 labels for 3 models"):
        model_specs(DICTS, where=["a", "b"])
    # a hand-made record obeys the same rules
    assert ModelSpec(0, "x", "n", 1, "2", 1, tp=2.0).tp == 2
    with pytest.raises(kvgpu.InvalidInstance, match="x: field 'size' must be >= 0"):
        ModelSpec(0, "x", None, -1, 1, 1)
    with pytest.raises(kvgpu.InvalidInstance, match="overflows"):
        ModelSpec(0, "x", None, 1, 1e300, 1e-300)


def test_check_keys():
    check_keys(["name", " size ", "tp_size"], "f.csv, line 1")
    with pytest.raises(kvgpu.InvalidInstance, match="f.csv, line 1: unknown key 'reqrate' \\(did you mean 'req_rate'"):
        check_keys(["name", "reqrate"], "f.csv, line 1")


# ---------------------------------------------------------------- scalar validators (case 20's options)

@pytest.mark.parametrize("value, lo, hi, message", [
    (True, 0, None, "effort must be an integer, got True \\(a boolean\\)"),
    (1.5, 0, None, "effort must be an integer, got 1.5"),
    (float("inf"), 0, None, "effort must be finite, got inf"),
    (float("nan"), 0, None, "effort must be finite, got nan"),
    (None, 0, None, "effort must be an integer, got None"),
    ("abc", 0, None, "effort must be an integer, got 'abc'"),
    ("10**20", 0, None, "effort must be an integer, got '10\\*\\*20'"),
    (-1, 0, None, "effort must be an integer >= 0, got -1"),
    (10**20, 0, 10**6, "effort must be an integer from 0 to 1000000, got 100000000000000000000"),
    ("1e12", 0, 10**6, "effort must be an integer from 0 to 1000000, got '1e12'"),
    ([3], 0, None, "effort must be an integer, got \\[3\\]"),
])
def test_integer_refusals(value, lo, hi, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message):
        integer(value, "effort", lo, hi)


def test_huge_integers_are_named_not_printed():
    for v in (10**5000, "9" * 5000, -(10**5000)):
        with pytest.raises(kvgpu.InvalidInstance, match="effort must be an integer from 0 to 1000000, got an? "
                                                        "(integer|number) of (about )?500[01] digits"):
            integer(v, "effort", 0, 10**6)
    with pytest.raises(kvgpu.InvalidInstance, match="x must be finite"):
        number("9" * 5000, "x")


def test_integer_reads():
    for v in (2, 2.0, np.int64(2), np.float32(2), "2", " 2.0 ", "+2", decimal.Decimal("2"), fractions.Fraction(4, 2)):
        got = integer(v, "x", 0, 5)
        assert got == 2 and type(got) is int, v
    assert integer("12345678901234567890123", "x") == 12345678901234567890123  # exact, no float detour
    assert integer(2**62, "exact_work", *OPTION_RANGES["exact_work"]) == 2**62


def test_number():
    assert number("2.5", "x", 0) == 2.5 and number(np.float32(0.5), "x") == 0.5
    with pytest.raises(kvgpu.InvalidInstance, match="gpu_mem must be > 0, got 0"):
        number(0, "gpu_mem", 0, lo_open=True)
    with pytest.raises(kvgpu.InvalidInstance, match="x must be from 0 to 1, got 2"):
        number(2, "x", 0, 1)
    with pytest.raises(kvgpu.InvalidInstance, match="x must be <= 1, got 2"):
        number(2, "x", None, 1)
    with pytest.raises(kvgpu.InvalidInstance, match="x must be a number, got False \\(a boolean\\)"):
        number(False, "x")
    with pytest.raises(kvgpu.InvalidInstance, match="x must be a number, got 1j"):
        number(1j, "x")


# every option case of tests/data/inputs/20_api_non_invalidinstance.py, by the validator the API calls
OPTION_CASES = {
    "gpus=inf": lambda: gpu_memory(float("inf"), 80),
    "gpus=10**12": lambda: gpu_memory(10**12, 80),
    "gpus=2**70": lambda: gpu_memory(2**70, 80),
    "gpus=True": lambda: gpu_memory(True, 80),
    "gpus=0": lambda: gpu_memory(0, 80),
    "models=None": lambda: model_specs(None),
    "gpu_mem='abc'": lambda: gpu_memory(2, "abc"),
    "gpu_mem=[80,'x']": lambda: gpu_memory(2, [80, "x"]),
    "gpu_mem=None": lambda: gpu_memory(2, None),
    "gpu_mem=[[80,80]]": lambda: gpu_memory(2, [[80, 80]]),
    "gpu_mem=np [[80,80]]": lambda: gpu_memory(2, np.array([[80.0, 80.0]])),
    "gpu_mem=True": lambda: gpu_memory(2, True),
    "gpu_mem=[80,True]": lambda: gpu_memory(2, [80, True]),
    "gpu_mem=0": lambda: gpu_memory(2, 0),
    "gpu_mem=-80": lambda: gpu_memory(2, -80),
    "gpu_mem=inf": lambda: gpu_memory(2, float("inf")),
    "gpu_mem=[80]*3 for 2": lambda: gpu_memory(2, [80, 80, 80]),
    "gpu_mem=[]": lambda: gpu_memory(2, []),
    "gpu_mem=[1e308]*2 (total overflows)": lambda: gpu_memory(2, [1e308, 1e308]),
    "size=True": lambda: model_specs([{"name": "a", "size": True, "req_rate": 5, "slo": 5}]),
    "effort=None": lambda: integer(None, "effort", *OPTION_RANGES["effort"]),
    "effort=10**20": lambda: integer(10**20, "effort", *OPTION_RANGES["effort"]),
    "seed=2**63": lambda: integer(2**63, "seed", *OPTION_RANGES["seed"]),
    "seed=1.5": lambda: integer(1.5, "seed", *OPTION_RANGES["seed"]),
    "seed=-1": lambda: integer(-1, "seed", *OPTION_RANGES["seed"]),
    "exact_work=10**20": lambda: integer(10**20, "exact_work", *OPTION_RANGES["exact_work"]),
    "max_moves=10**30": lambda: integer(10**30, "max_moves", *OPTION_RANGES["max_moves"]),
    "backend='bogus'": lambda: choice("bogus", "backend", ("auto", "numpy", "numba", "cuda")),
    "mode='bogus'": lambda: choice("bogus", "mode", ("search", "seed")),
    "mode=None": lambda: choice(None, "mode", ("search", "seed")),
    "current too short": lambda: current_placement([0], 2),
    "current=None": lambda: current_placement(None, 2),
    "current=[x, 1]": lambda: current_placement(["x", 1], 2),
    "current=[True, 1]": lambda: current_placement([True, 1], 2),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_case_20_options_are_clean_invalid_instance(case):
    with pytest.raises(kvgpu.InvalidInstance) as e:
        OPTION_CASES[case]()
    name = case.split("=")[0].split(" ")[0]
    assert name in str(e.value) and "\n" not in str(e.value)


def test_20_every_option_case_has_a_validator_test():
    tree = ast.parse((INPUTS / "20_api_non_invalidinstance.py").read_text())
    cases = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "cases")
    names = [k.value.split(" (")[0] for k in cases.keys]
    lead = {"solve_batch B=0", "solve_batch N=0", "DataFrame, NaN cur_gpu_id", "current=[None, 1]",
            "current=[nan, 1]", "rules + backend='bogus'", "replan + mode='bogus'"}
    # those are read right (test_schema: NaN/None mean new) or are batch-array shapes (the lead's)
    assert {n for n in names if n not in lead} <= set(OPTION_CASES), set(names) - lead - set(OPTION_CASES)


def test_good_options():
    assert gpu_memory(2, 80).tolist() == [80.0, 80.0] and gpu_memory(3, [40, "80", 141.5]).tolist() == [40, 80, 141.5]
    assert gpu_memory(2.0, np.array([80, 70])).dtype == np.float64
    assert per_gpu([1, 0], "reserve_gb") == (1.0, 0.0) and per_gpu(0, "reserve_gb") == 0.0
    assert choice("seed", "mode", ("search", "seed")) == "seed"
    # case 20: None and NaN in current mean a new model, as -1 does
    assert current_placement([None, 1], 2) == [None, (1,)]
    assert current_placement(np.array([np.nan, 1.0]), 2) == [None, (1,)]
    assert current_placement(iter([-1, [0, 2]]), 2) == [None, (0, 2)]


# ---------------------------------------------------------------- anything else: clean refusal or a valid record

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 10), st.floats(), st.floats(0, 100),
    st.text(max_size=8), st.sampled_from(["", " 2.0 ", "1e400", "0;2", "[1, 2]", "-1", "nan", "true", "1,5", "²"]),
    st.lists(st.integers(-2, 2**32), max_size=3), st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=2),
    st.decimals(allow_nan=True), st.fractions(), st.just(np.int64(3)), st.just(np.float64("nan")),
    st.just(np.bool_(False)), st.just({"a": 1}), st.just(object()))
ALL_KEYS = [k for keys in KEYS.values() for k in keys]


def valid(s: ModelSpec) -> bool:
    return (math.isfinite(s.size) and s.size >= 0 and math.isfinite(s.req_rate) and s.req_rate >= 0
            and math.isfinite(s.slo) and s.slo > 0 and math.isfinite(s.demand)
            and type(s.tp) is int and 1 <= s.tp <= MAX_COUNT
            and type(s.replicas) is int and 1 <= s.replicas <= MAX_COUNT
            and all(type(g) is int and 0 <= g <= MAX_GPU_ID for g in (s.pin or ()) + s.forbid + (s.cur_gpu or ()))
            and (s.pin is None or len(s.pin) > 0) and math.isfinite(s.overhead_gb) and s.overhead_gb >= 0
            and s.same_node in (None, True, False) and (s.name is None or isinstance(s.name, str)))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.dictionaries(st.one_of(st.sampled_from(ALL_KEYS), st.sampled_from(ALL_KEYS),
                                          st.text(max_size=6), st.integers()), VALUES, max_size=8), max_size=3))
def test_random_models_give_clean_errors_or_valid_records(models):
    try:
        specs = model_specs(models)
    except kvgpu.InvalidInstance as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len(specs) == len(models) and all(valid(s) for s in specs)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.one_of(st.none(), st.integers(-5, 5)), st.one_of(st.none(), st.integers(-5, 2**70)))
def test_random_integers_give_clean_errors_or_ints_in_range(value, lo, hi):
    try:
        n = integer(value, "x", lo, hi)
    except kvgpu.InvalidInstance:
        return
    assert type(n) is int and (lo is None or n >= lo) and (hi is None or n <= hi)


@settings(max_examples=300, deadline=None)
@given(st.one_of(VALUES, st.integers(-2, 5)), st.one_of(VALUES, st.lists(VALUES, max_size=4)))
def test_random_gpu_memory_gives_clean_errors_or_positive_finite_memory(gpus, mem):
    try:
        out = gpu_memory(gpus, mem)
    except kvgpu.InvalidInstance:
        return
    assert out.dtype == np.float64 and out.ndim == 1 and 1 <= out.size and np.isfinite(out).all() and (out > 0).all()
