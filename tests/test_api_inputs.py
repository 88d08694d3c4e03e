"""Bad input through the API, as users pass it: every case of the inputs set ends in
kvgpu.InvalidInstance naming the field, or in a correct answer -- never another exception."""
import math
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest

import kvgpu

INPUTS = Path(__file__).parent / "data" / "inputs"


def _case_20():
    """The API calls of case 20, by their labels (the file prints instead of asserting)."""
    code = (INPUTS / "20_api_non_invalidinstance.py").read_text()
    code = code[:code.index("for k, f in cases.items():")]
    return runpy._run_code(compile(code, "case20", "exec"), {})["cases"]


ACCEPTED = {"current=[None, 1]", "current=[nan, 1]", "DataFrame, NaN cur_gpu_id"}  # None / NaN: a new model


@pytest.mark.parametrize("label", list(_case_20()))
def test_case_20_api_inputs_are_refused_or_read_right(label):
    call = _case_20()[label]
    if label in ACCEPTED:
        p = call()
        check = p.problem
        assert check.is_replan and sorted(check.cur.tolist()) in ([-1, 0], [-1, 1])  # one new, one running
        return
    if label == "solve_batch N=0":  # no model slots: a valid batch of empty clusters
        r = call()
        assert r.assignment.shape == (2, 0) and (r.max_kvpr == 0).all() and r.proven_optimal.all()
        return
    with pytest.raises(kvgpu.InvalidInstance) as e:
        call()
    field = label.split("=")[0].split(" ")[-1].strip("'(")
    assert field.split("[")[0] in str(e.value) or "models" in str(e.value) or "field 'size'" in str(e.value)


def test_a_generator_of_models_keeps_every_model():
    out = runpy.run_path(str(INPUTS / "02_generator_models_dropped.py"), run_name="case02")
    p = out["p"]
    assert p.assignment.shape == (4,) and sum(len(v) for v in p.by_gpu().values()) == 4
    models = [{"name": f"m{i}", "size": 10 + i, "req_rate": 1 + i, "slo": 1} for i in range(4)]
    assert kvgpu.solve(iter(models), gpus=2).max_kvpr == pytest.approx(kvgpu.solve(models, 2).max_kvpr)


def test_one_gpu_filled_by_rounding_is_answered_not_a_crash():
    m = [{"name": "a", "size": 0.1, "req_rate": 1, "slo": 1}, {"name": "b", "size": 0.2, "req_rate": 1, "slo": 1}]
    with pytest.warns(kvgpu.KvgpuWarning, match="GPU 0 is left with 0 GB"):
        p = kvgpu.solve(m, 1, gpu_mem=0.3)
    assert p.max_kvpr == math.inf and p.proven_optimal


def test_slack_is_relative_for_tiny_units():
    tiny = [{"name": f"e{i}", "size": 1e-12, "req_rate": 1, "slo": 1} for i in range(3)]
    with pytest.raises(kvgpu.InvalidInstance, match="total size 3e-12 GB is above the total GPU memory 2e-12 GB"):
        kvgpu.solve(tiny, 2, gpu_mem=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvgpu.KvgpuWarning)
        p = kvgpu.solve(tiny[:2], 2, gpu_mem=1e-12)
    assert (p.used <= 1e-12 * (1 + 1e-9)).all()
    scale = kvgpu.solve([dict(m, size=m["size"] * 1e12) for m in tiny[:2]], 2, gpu_mem=1.0)
    assert p.assignment.tolist() == scale.assignment.tolist()


def test_every_option_is_checked_whatever_the_path():
    m = [{"name": "a", "size": 10, "req_rate": 1, "slo": 1, "tp": 2}]
    for kw, field in (({"effort": -1}, "effort"), ({"patience": 0}, "patience"), ({"seed": -1}, "seed"),
                      ({"exact": "yes"}, "exact"), ({"backend": "gpu"}, "backend"), ({"mode": "fast"}, "mode"),
                      ({"reserve_gb": -1}, "reserve_gb"), ({"reserve_gb": 80}, "reserve_gb"),
                      ({"max_moves": -1}, "max_moves"), ({"max_migrated_gb": "x"}, "max_migrated_gb")):
        for models in (m, [dict(m[0], tp=1)]):
            with pytest.raises(kvgpu.InvalidInstance, match=field):
                kvgpu.solve(models, 2, **kw)
    with pytest.raises(kvgpu.InvalidInstance, match="infeasible"):
        kvgpu.solve_batch(np.ones((1, 2)), np.ones((1, 2)), np.full((1, 2), 80.0), infeasible="skip")


TWO = [{"name": "a", "size": 10, "req_rate": 1, "slo": 1, "tp": 2}, {"name": "b", "size": 20, "req_rate": 2, "slo": 1}]
PLAIN = [dict(m, tp=1) for m in TWO]


@pytest.mark.parametrize("kw", [{"effort": 100}, {"patience": 3}, {"seed": 5}])
def test_seed_mode_refuses_search_options(kw):
    with pytest.raises(kvgpu.InvalidInstance, match="steer search mode"):
        kvgpu.solve(PLAIN, 2, mode="seed", **kw)
    kvgpu.solve(PLAIN, 2, mode="seed", effort=0)  # no search asked for: consistent


@pytest.mark.parametrize("kw, field", [({"effort": -3}, "effort"), ({"seed": -1}, "seed"), ({"seed": 2**70}, "seed"),
                                       ({"effort": None}, "effort"), ({"effort": True}, "effort")])
def test_size_and_headroom_refuse_bad_options_as_such(kw, field):
    with pytest.raises(kvgpu.InvalidInstance, match=f"^{field} must be"):
        kvgpu.size(TWO, 0.1, **kw)
    with pytest.raises(kvgpu.InvalidInstance, match=f"^{field} must be"):
        kvgpu.headroom(TWO, 2, max_kvpr=0.1, **kw)


def test_nodes_empty_refused_and_uneven_gpus_per_node_said():
    with pytest.raises(kvgpu.InvalidInstance, match=r"nodes\[1\]: an empty node"):
        kvgpu.solve(TWO, 4, nodes=[[0, 1, 2, 3], []])
    with pytest.warns(kvgpu.KvgpuWarning, match="gpus_per_node=2 does not divide the 5 GPUs: the last node has 1"):
        p = kvgpu.solve(TWO, 5, gpus_per_node=2)
    assert sorted(p.gpus_of_models()[0]) in ([0, 1], [2, 3])  # the tp pair fills a node of two, not GPU 4


@pytest.mark.parametrize("infeasible", ["raise", "mark"])
def test_batch_errors_name_the_callers_instance_whatever_is_marked(infeasible):
    """With infeasible='mark' the instances too big for their GPUs are set aside before the
    others are checked; an error in another must still name it by the caller's number."""
    S = np.array([[100.0, 1.0], [10.0, 10.0], [10.0, 10.0]])  # instance 0: a model above every GPU
    W = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    M = np.full((3, 2), 80.0)
    with pytest.raises(kvgpu.InvalidInstance, match=r"instance 2, model 1: demand"):
        kvgpu.solve_batch(S, W, M, backend="numpy", infeasible=infeasible)
    gm = np.array([[True, True], [False, False], [False, False], [True, True]])
    mm = np.array([[True, True], [True, True], [False, False], [True, True]])
    S4, W4 = np.full((4, 2), 10.0), np.ones((4, 2))
    match = r"instance 1: no GPUs" if infeasible == "raise" else r"instance 2: no GPUs"  # 1 is marked: too big
    with pytest.raises(kvgpu.InvalidInstance, match=match):
        kvgpu.solve_batch(S4, W4, np.full((4, 2), 80.0), model_mask=mm, gpu_mask=gm, backend="numpy",
                          infeasible=infeasible)


def test_a_batch_without_gpu_columns_is_refused_clearly():
    with pytest.raises(kvgpu.InvalidInstance, match=r"no GPU at all"):
        kvgpu.solve_batch(np.ones((1, 2)), np.ones((1, 2)), np.zeros((1, 0)), infeasible="mark")
