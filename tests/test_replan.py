"""Re-placement: at most K moved models, K=0 keeps the current placement, never worse than now."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu.generate import uniform


def _kv(inst, a):
    S = np.bincount(a, weights=inst.sizes, minlength=inst.n_gpus)
    W = np.bincount(a, weights=inst.demand, minlength=inst.n_gpus)
    with np.errstate(divide="ignore"):
        return np.where(W > 0, W / (inst.gpu_mem - S), 0.0).max()


@pytest.fixture(scope="module")
def drifted():
    """A cluster placed for yesterday's demand; today the demand has drifted."""
    inst = uniform(np.random.default_rng(1), 16, 0.85)
    m = np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], 1)
    cur = kvgpu.solve(m, 16, mode="seed").assignment
    m[:, 1] *= np.random.default_rng(0).uniform(0.5, 2.0, len(m))
    return m, cur


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 40), st.integers(0, 3))
def test_never_more_than_k_moves_and_never_worse(drifted, K, seed):
    m, cur = drifted
    p = kvgpu.solve(m, 16, current=cur, max_moves=K, seed=seed, effort=5)
    moved = int((p.assignment != cur).sum())
    assert moved <= K and len(p.moves) == moved
    assert {(mv.src, mv.dst) for mv in p.moves} <= {(int(a), int(b)) for a, b in zip(cur, p.assignment)}
    assert p.max_kvpr <= _kv(p.instance, cur) * (1 + 1e-12)
    assert (p.used <= p.instance.gpu_mem + 1e-9).all()


def test_zero_moves_is_the_identity_and_more_moves_help(drifted):
    m, cur = drifted
    p0 = kvgpu.solve(m, 16, current=cur, max_moves=0)
    assert p0.assignment.tolist() == cur.tolist() and p0.moves == []
    p = kvgpu.solve(m, 16, current=cur, max_moves=20)
    assert p.max_kvpr < 0.9 * p0.max_kvpr
    free = kvgpu.solve(m, 16, current=cur, max_moves=len(m))
    assert free.max_kvpr <= p.max_kvpr


def test_new_models_are_placed_without_costing_moves():
    models = [{"name": "a", "model_size": 30, "req_rate": 9, "slo": 1, "cur_gpu_id": 0},
              {"name": "b", "model_size": 30, "req_rate": 9, "slo": 1, "cur_gpu_id": 0},
              {"name": "c", "model_size": 10, "req_rate": 1, "slo": 1, "cur_gpu_id": 1},
              {"name": "new", "model_size": 12, "req_rate": 2, "slo": 1, "cur_gpu_id": -1}]
    p0 = kvgpu.replan(models, 2, max_moves=0)
    assert p0.assignment[:3].tolist() == [0, 0, 1] and p0.assignment[3] == 1 and p0.moves == []
    p1 = kvgpu.replan(models, 2, max_moves=1)
    assert len(p1.moves) == 1 and p1.moves[0].model in ("a", "b") and p1.max_kvpr < p0.max_kvpr


@pytest.mark.parametrize("current, message", [
    ([0, 0, 5], "model 2 ('c'): cur_gpu_id names GPU 5, not one of 0..1"),
    ([0, 0], "current gives 2 entries for 3 models"),
    ([0, 0, 0], "current placement: GPU 0 holds 90 GB of models, more than its 80 GB"),
])
def test_bad_current_placements_are_named(current, message):
    models = [{"name": n, "model_size": 30, "req_rate": 1, "slo": 1} for n in "abc"]
    with pytest.raises(kvgpu.InvalidInstance, match=re.escape(message)):
        kvgpu.solve(models, 2, current=current, max_moves=1)


def test_replan_cli_end_to_end(tmp_path):
    f = tmp_path / "cluster.csv"
    f.write_text("name,size,req_rate,slo,cur_gpu_id\na,30,9,1,0\nb,30,9,1,0\nc,10,1,1,1\nd,12,2,1,-1\n")
    out = tmp_path / "placement.json"
    r = subprocess.run([sys.executable, "-m", "kvgpu.cli", "replan", str(f), "--gpus", "2", "--max-moves", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "plan (1 model(s) moved, in this order): " in r.stdout
    d = json.loads(out.read_text())
    assert d["replan"]["moved_models"] == 1 and d["mode"] == "search"
    assert [s["from"] for s in d["replan"]["plan"]].count(-1) == 1  # d, the new model, is loaded
