"""The first-run compile: units handed out to processes, stamps, and the kernels' own sort."""

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgpu.kernels.sorting import argsort_stable, sorted_desc

warm = importlib.import_module("kvgpu.warmup")  # kvgpu.warmup the name is the function


@pytest.mark.parametrize("jobs", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("groups", [["seed"], ["seed", "search"], ["exact"], ["start", "search"], list(warm.GROUPS)])
def test_plan_hands_out_each_unit_once_after_its_callees(groups, jobs):
    units = {u for g in groups for u in warm.GROUPS[g][1]}
    lanes, est = warm.plan(units, jobs)
    flat = [u for lane in lanes for u in lane]
    assert sorted(flat) == sorted(units) and len(lanes) <= jobs
    # replay the schedule: a unit starts when its lane is free and its callees are done
    done, free = {}, [float(warm.PROCESS_START)] * len(lanes)
    pending = [list(lane) for lane in lanes]
    while any(pending):
        progressed = False
        for k, lane in enumerate(pending):
            if lane and all(d in done or d not in units for d in warm.UNITS[lane[0]][0]):
                u = lane.pop(0)
                free[k] = done[u] = max([free[k]] + [done.get(d, 0.0) for d in warm.UNITS[u][0]]) + warm.UNITS[u][1]
                progressed = True
        assert progressed, f"the plan waits on itself: {lanes}"
    assert max(free) == pytest.approx(est)
    sequential = warm.PROCESS_START + sum(warm.UNITS[u][1] for u in units)
    assert est <= sequential + 1e-9
    if jobs >= 2 and len(units) >= 3:
        assert est < sequential  # a second core is used


def test_groups_name_known_units_in_callee_order():
    for group, (_, units) in warm.GROUPS.items():
        for u in units:
            assert u in warm.UNITS, (group, u)
            assert all(d in units for d in warm.UNITS[u][0]), (group, u)  # a group holds its callees


def test_ensure_compiles_cold_units_once_and_stamps_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(warm, "_jit_disabled", lambda: False)
    compiled = []
    monkeypatch.setattr(warm, "_compile", compiled.append)
    assert warm.ensure(["seed"], jobs=1) == ["seed"]
    assert compiled == ["core", "candidates", "seed"]
    assert "compiling kernels (seed), first run only" in capsys.readouterr().err
    # search shares the core: only its own units are compiled, and nothing when warm
    assert warm.ensure(["seed", "search"], jobs=1) == ["search"]
    assert compiled[3:] == ["repair", "polish", "search"]
    assert warm.ensure(["seed", "search"], jobs=1) == [] and len(compiled) == 6
    assert capsys.readouterr().err.count("compiling") == 1
    assert warm.cached("seed") and warm.cached("search") and not warm.cached("exact")


def test_warmup_refuses_unknown_groups():
    with pytest.raises(ValueError, match="unknown kernel group 'sed'"):
        warm.warmup(["sed"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, np.inf, 1e-300]), max_size=80)
       | st.lists(st.floats(allow_nan=False, width=64), max_size=300))
def test_argsort_stable_is_numpys_stable_argsort(values):
    x = np.array(values, dtype=np.float64)
    np.testing.assert_array_equal(argsort_stable(x), np.argsort(x, kind="stable"))
    np.testing.assert_array_equal(sorted_desc(x), np.sort(x)[::-1])
    ints = np.floor(np.nan_to_num(x, posinf=9, neginf=-9) % 7).astype(np.int64)
    np.testing.assert_array_equal(argsort_stable(ints), np.argsort(ints, kind="stable"))


def test_a_process_never_waits_for_stamps_that_cannot_be_written(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setattr(warm, "_stamp_dir", lambda: ro)
    monkeypatch.setattr(warm.os, "access", lambda path, mode: False)  # as for a user without rights
    compiled = []
    monkeypatch.setattr(warm, "_compile", compiled.append)
    monkeypatch.setattr(warm.time, "sleep", lambda s: pytest.fail("waited for a stamp that cannot appear"))
    warm._child(["seed"])  # its callees (core, candidates) are compiled elsewhere, or by seed itself
    assert compiled == ["seed"]


def test_a_batch_compiles_only_the_batch_kernels_it_runs(tmp_path, monkeypatch):
    """A batch searched without a proof on the numba backend compiles the seed, search and
    bound batch kernels, not the proofs'; a cuda batch with a proof only the proofs' CPU kernels."""
    from kvgpu import engine

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(warm, "_jit_disabled", lambda: False)
    compiled = []
    monkeypatch.setattr(warm, "_compile", compiled.append)
    monkeypatch.setattr(warm.os, "cpu_count", lambda: 1)  # every unit in this process, where _compile is patched
    assert warm.batch_of(["seed", "search", "exact", "start"]) == ["seed_batch", "search_batch", "exact_batch"]
    engine._compile_first(engine.options(backend="numba", effort=5), B=4, n_items=50)
    assert sorted(compiled) == sorted(["core", "candidates", "seed", "repair", "polish", "search", "bound",
                                       "batch_seed", "batch_search", "batch_bound"])
    compiled.clear()
    monkeypatch.setattr(engine.backends, "probe", lambda: {"numba": (True, "")})
    engine._compile_first(engine.options(backend="numba", effort=5, exact=True), B=4, n_items=10)
    assert sorted(compiled) == ["batch_exact", "exact"]  # the rest is cached already
