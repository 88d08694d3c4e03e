"""The readable reference reproduces the seed exactly (SPEC.md reference data)."""
import pytest

from conftest import close
from kvgpu import reference as R
from kvgpu.problem import make_instance


def _start(case):
    return make_instance(case["models"], case["gpu_num"]), R.placement_of(case["start"], case["gpu_num"])


@pytest.mark.parametrize("fn", ["refine_peak", "improve_local", "refine_peak_then_polish"])
def test_functions_match_seed_assignments(seed_functions, fn):
    for k, case in enumerate(seed_functions):
        inst, start = _start(case)
        if fn == "refine_peak":
            plc = R.refine_peak(start, inst)
        elif fn == "improve_local":
            plc = R.improve_local(start, inst, 4000)
        else:
            plc = R.improve_local(R.refine_peak(start, inst), inst, 1500)
        assert R.assignment_of(plc, inst.n_models) == case[fn]["assignment"], (k, fn)
        assert all(close(a, b) for a, b in zip(R.score(plc, inst), case[fn]["score"])), (k, fn)


def test_pipeline_matches_seed_score_tuples(seed_cases):
    for k, case in enumerate(seed_cases):
        inst = make_instance(case["models"], case["gpu_num"])
        trace = {}
        R.seed_pipeline(inst, trace)
        for stage in ("selected", "after_refine_peak", "final"):
            assert all(close(a, b) for a, b in zip(trace[stage], case[stage])), (k, stage)


def test_adrs50_seed_values_and_contract(adrs50):
    class M:
        def __init__(self, s, r, o):
            self.model_size, self.req_rate, self.slo = s, r, o

    for case in adrs50:
        models = [M(*m) for m in case["models"]]
        out = R.compute_model_placement(case["gpu_num"], models)
        assert sorted(out) == list(range(case["gpu_num"]))
        placed = [m for ms in out.values() for m in ms]
        assert sorted(map(id, placed)) == sorted(map(id, models))
        kv = [sum(m.req_rate / m.slo for m in ms) / (80 - sum(m.model_size for m in ms)) for ms in out.values()]
        assert close(max(kv), case["seed_pipeline_max_kvpr"])


def test_donors_are_top_demand_then_top_size():
    # worst GPU 0 holds 8 models, demand falling and size rising with the index
    models = [[i + 1, 10 - i, 1] for i in range(8)] + [[1, 0, 1]]
    inst = make_instance(models, 2)
    st = R._Gpus([list(range(8)), [8]], inst)
    # 6 by demand, then max(1, 12 - 6) = 6 by size, duplicates dropped (first kept)
    assert R.donors(st, 0) == [0, 1, 2, 3, 4, 5, 7, 6]
    assert R.donors(st, 0, top_k=4) == [0, 1, 7, 6]
