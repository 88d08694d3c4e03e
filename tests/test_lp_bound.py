"""The configuration LP bound (kvgpu.lp_bound): never above the optimum (brute force over
every assignment, rules included), its pricing knapsack exact, and stronger than the closed-form
bounds where tensor-parallel shards pack lumpily."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvgpu
from conftest import brute_force_problem
from kvgpu import generate
from kvgpu.bounds import problem_bound
from kvgpu.lp_bound import UNITS, configuration_bound, impossible_at, knapsack
from test_rules import _problem_or_skip, cluster_problems


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cluster_problems())
def test_never_proves_a_reachable_target_impossible(draw):
    models, G, mem, kw = draw
    kw.pop("max_moves", None), kw.pop("max_migrated_gb", None)  # the LP bounds every placement, budget or not
    prob = _problem_or_skip([{k: v for k, v in m.items() if k != "cur_gpu_id"} for m in models], G, mem, kw)
    if prob is None:
        return
    opt, _ = brute_force_problem(prob)
    if not np.isfinite(opt) or opt <= 0:
        return
    for T in (opt * (1 + 1e-7), opt * 1.3):
        assert not impossible_at(prob, T), f"claims no placement reaches {T}, brute force reaches {opt}"
    lo = problem_bound(prob, opt)
    assert lo <= configuration_bound(prob, lo, 2 * opt) <= opt * (1 + 1e-9)


def _best_by_hand(profit, load, group, cap):
    best = 0.0
    for r in range(len(profit) + 1):
        for c in itertools.combinations(range(len(profit)), r):
            g = [group[i] for i in c if group[i] >= 0]
            if len(g) == len(set(g)) and sum(load[i] for i in c) <= cap:
                best = max(best, sum(profit[i] for i in c))
    return best


@given(st.lists(st.tuples(st.floats(0.01, 5), st.floats(0.5, 60), st.integers(-1, 3)), min_size=1, max_size=9),
       st.sampled_from([24.0, 80.0]))
def test_pricing_knapsack_brackets_the_best_configuration(items, cap):
    """Loads rounded down give an upper bound on the best configuration, rounded up a set that
    fits: together they bracket the optimum found by trying every subset."""
    items = sorted(items, key=lambda x: x[2])  # the knapsack takes items ordered by group
    profit = np.array([x[0] for x in items])
    load = np.array([x[1] for x in items])
    group = np.array([x[2] for x in items])
    new = np.ones(len(items), bool)
    new[1:] = (group[1:] != group[:-1]) | (group[1:] < 0)
    starts = np.append(np.nonzero(new)[0], len(items)).astype(np.int64)
    choice, dp = np.empty((starts.size - 1, UNITS + 1), np.int32), np.empty((2, UNITS + 1))
    scaled = load / cap * UNITS
    upper, _ = knapsack(profit, np.floor(scaled).astype(np.int64), starts, UNITS, choice, dp)
    _, take = knapsack(profit, np.ceil(scaled).astype(np.int64), starts, UNITS, choice, dp)
    best = _best_by_hand(profit.tolist(), load.tolist(), group.tolist(), cap)
    assert load[take].sum() <= cap
    assert len(set(group[take & (group >= 0)].tolist())) == int((take & (group >= 0)).sum())
    assert profit[take].sum() <= best + 1e-12 <= upper + 2e-12


def test_stronger_than_the_closed_form_bound_on_tensor_parallel_clusters():
    models, o = generate.tp_cluster(np.random.default_rng(0), 16)
    plain = kvgpu.solve(models, **o, exact=False)
    proved = kvgpu.solve(models, **o, exact=True)
    assert plain.bound_source == "closed-form bound" and proved.bound_source == "configuration LP"
    assert proved.lower_bound > plain.lower_bound * 1.05  # 0.0648 -> 0.0703 when written
    assert proved.lower_bound <= min(plain.max_kvpr, proved.max_kvpr) * (1 + 1e-9)
    assert "(configuration LP)" in str(proved) and proved.to_dict()["bound_source"] == "configuration LP"


def test_json_output_stays_json_when_the_lp_runs(tmp_path):
    """HiGHS prints a banner on the C-level stdout when its first model is made: kept out."""
    models, o = generate.tp_cluster(np.random.default_rng(0), 16)
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"gpus": o["gpus"], "gpu_mem": o["gpu_mem"], "gpus_per_node": o["gpus_per_node"],
                             "models": models}))
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "certify", str(f), "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["bound_source"] == "configuration LP"
