"""Every invalid-input rule of SPEC.md is refused with an error naming the model and the rule."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

import kvgpu
from kvgpu import InvalidInstance


def m(size, rate, slo, name=None):
    return {"name": name, "model_size": size, "req_rate": rate, "slo": slo}


OK = [m(20, 4, 5, "a"), m(30, 2, 5, "b")]


@pytest.mark.parametrize("models, gpus, gpu_mem, pattern", [
    ([m(90, 1, 1, "huge")], 2, 80, r"model 0 \('huge'\).*larger than every GPU"),
    (OK + [m(10, 1, 0, "zero-slo")], 2, 80, r"model 2 \('zero-slo'\): field 'slo' must be > 0, got 0"),
    (OK + [m(10, 1, -2, "neg-slo")], 2, 80, r"model 2 \('neg-slo'\): field 'slo' must be > 0, got -2"),
    (OK + [m(-1, 1, 1, "neg-size")], 2, 80, r"model 2 \('neg-size'\): field 'model_size' must be >= 0"),
    (OK + [m(10, -1, 1, "neg-rate")], 2, 80, r"model 2 \('neg-rate'\): field 'req_rate' must be >= 0"),
    (OK + [m(math.nan, 1, 1, "nan")], 2, 80, r"model 2 \('nan'\): field 'model_size' has no value \(got nan\)"),
    (OK + [m(10, math.inf, 1, "inf-rate")], 2, 80, r"model 2 \('inf-rate'\).*'req_rate' must be finite"),
    (OK + [m(10, 1, math.inf, "inf-slo")], 2, 80, r"model 2 \('inf-slo'\).*'slo' must be finite"),
    (OK + [m("ten", 1, 1, "text")], 2, 80, r"model 2 \('text'\).*'model_size' must be a number"),
    ([{"name": "x", "model_size": 1, "slo": 1}], 2, 80, r"model 0 \('x'\).*missing field 'req_rate'"),
    ([m(70, 1, 1), m(70, 1, 1), m(70, 1, 1)], 2, 80, r"total size 210 GB is above the total GPU memory 160 GB"),
    (OK, 0, 80, r"gpus must be an integer from 1 to 1000000, got 0"),
    (OK, 2, [80, -1], r"gpu_mem\[1\] must be > 0, got -1"),
    (OK, 2, [80, 80, 80], r"gpu_mem gives 3 values for 2 GPUs"),
])
def test_invalid_input_is_refused(models, gpus, gpu_mem, pattern):
    with pytest.raises(InvalidInstance, match=pattern):
        kvgpu.solve(models, gpus, gpu_mem=gpu_mem)


def test_invalid_instance_is_a_value_error():
    assert issubclass(InvalidInstance, ValueError)


@pytest.mark.parametrize("field, value, pattern", [
    ("sizes", -1.0, r"instance 1, model 2: model_size must be >= 0"),
    ("sizes", np.nan, r"instance 1, model 2: model_size must be finite"),
    ("sizes", 95.0, r"instance 1, model 2: model_size 95.0 GB is larger than every GPU"),
    ("demand", -0.5, r"instance 1, model 2: demand \(req_rate/slo\) must be >= 0"),
    ("gpu_mem", 0.0, r"instance 1, gpu 2: GPU memory must be a positive finite"),
])
def test_solve_batch_names_instance_and_model(field, value, pattern):
    arrays = {"sizes": np.full((3, 4), 10.0), "demand": np.ones((3, 4)), "gpu_mem": np.full((3, 3), 80.0)}
    arrays[field][1, 2] = value
    with pytest.raises(InvalidInstance, match=pattern):
        kvgpu.solve_batch(arrays["sizes"], arrays["demand"], arrays["gpu_mem"])


def test_solve_batch_checks_total_memory_and_gpus():
    with pytest.raises(InvalidInstance, match=r"instance 0: total size 300.0 GB"):
        kvgpu.solve_batch(np.full((1, 4), 75.0), np.ones((1, 4)), np.full((1, 3), 80.0))
    with pytest.raises(InvalidInstance, match=r"instance 1: no GPUs"):
        kvgpu.solve_batch(np.ones((2, 2)), np.ones((2, 2)), np.full((2, 2), 80.0),
                          gpu_mask=np.array([[True, True], [False, False]]))


def test_models_as_objects_dicts_and_arrays_agree():
    rows = [[24, 8, 9], [16, 3, 7], [20, 8, 9], [13, 8, 7], [11, 8, 8], [15, 2, 8]]
    objs = [SimpleNamespace(model_name=f"m{i}", model_size=s, req_rate=r, slo=o) for i, (s, r, o) in enumerate(rows)]
    dicts = [{"size": s, "req_rate": r, "slo": o} for s, r, o in rows]
    a = kvgpu.solve(np.array(rows, float), 3).assignment
    assert (kvgpu.solve(objs, 3).assignment == a).all()
    assert (kvgpu.solve(dicts, 3).assignment == a).all()


def test_infinite_kvpr_is_legal_but_avoided_when_possible():
    # a model that fills a GPU exactly has infinite KVPR unless its demand is 0
    p = kvgpu.solve([m(80, 1, 1, "full")], 1)
    assert p.max_kvpr == math.inf
    # A + B fill a GPU exactly (memory allows it, KVPR would be inf); the finite optimum splits them
    p = kvgpu.solve([m(50, 1, 1, "A"), m(30, 1, 1, "B"), m(10, 1, 1, "C")], 2)
    assert math.isfinite(p.max_kvpr)
    assert p.assignment[0] != p.assignment[1]
    assert p.max_kvpr == pytest.approx(0.05)
    # a GPU filled exactly while carrying demand is never chosen if another GPU can take it
    p = kvgpu.solve([m(40, 1, 1, "a"), m(40, 1, 1, "b")], 2)
    assert math.isfinite(p.max_kvpr) and p.assignment[0] != p.assignment[1]


def _build_peak(n, G, **kw):
    """NumPy/Python peak bytes of :func:`kvgpu.problem.build_problem` on ``n`` plain models."""
    import tracemalloc

    from kvgpu.problem import build_problem

    models = np.column_stack([np.full(n, 0.01), np.ones(n), np.ones(n)])
    tracemalloc.start()
    try:
        prob = build_problem(models, G, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, prob


def test_plain_problem_memory_grows_with_models_plus_gpus_not_their_product():
    """(fleet case problem_memory_models_x_gpus.py) No rule restricts a GPU: no row of allowed
    GPUs per model.  4,000 models on 8,000 GPUs instead of 400: a dense models x GPUs table
    would add 30 MB (bool); the problem adds a few bytes per GPU."""
    small, _ = _build_peak(4000, 400)
    big, prob = _build_peak(4000, 8000)
    assert prob.allowed.shape == (0, 0) and not prob.has_rules
    assert big - small < 200 * (8000 - 400), (small, big)


def test_a_forbid_still_restricts_every_item_of_its_model():
    """Rows of allowed GPUs come back as soon as one model forbids a GPU (the others: all)."""
    from kvgpu.problem import build_problem

    models = [dict(model_size=10.0, req_rate=1.0, slo=1.0, forbid=[1]), dict(model_size=10.0, req_rate=1.0, slo=1.0,
                                                                            tp=2)]
    prob = build_problem(models, 3)
    assert prob.allowed.tolist() == [[1, 0, 1], [1, 1, 1], [1, 1, 1]]
    with pytest.raises(InvalidInstance, match="forbid names GPU 5"):
        build_problem([dict(model_size=10.0, req_rate=1.0, slo=1.0, forbid=[5])], 3)
