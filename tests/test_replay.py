"""kvgpu.replay: policies replayed over a demand trace, checked window by window against an
independent evaluation of the placements, the budgets and the policies' schedules."""

import json
import subprocess
import sys

import numpy as np
import pytest

import kvgpu
from kvgpu.problem import build_problem
from kvgpu.policy import Policy, replay

from conftest import check_placement


def trace(seed=0, n=8, G=3, W=6):
    rng = np.random.default_rng(seed)
    models = [{"name": f"m{i}", "model_size": float(rng.integers(5, 25)), "req_rate": 1.0,
               "slo": float(rng.integers(1, 4))} for i in range(n)]
    D = rng.uniform(0.5, 2.0, (n, W))
    for t in range(W):  # a different pair of models is busy in each window
        D[rng.choice(n, 2, replace=False), t] *= 6
    return models, G, D


def served(prob, assign, rates):
    """Max KVPR of ``assign`` under one window's rates (independent of kvgpu.robust)."""
    slo = np.array([m.slo for m in prob.specs])
    w = rates / slo
    S = np.bincount(assign, weights=prob.items.sizes, minlength=prob.n_gpus)
    L = np.bincount(assign, weights=w, minlength=prob.n_gpus)
    return float((L / (prob.items.gpu_mem - S)).max())


def test_policies_window_by_window():
    models, G, D = trace()
    prob = build_problem(models, G)
    pols = [Policy("static"), Policy("replan"), Policy("replan", every=2, max_moves=1),
            Policy("replan", min_gain=1.0)]
    r = replay(models, G, D, pols, effort=10)
    W = D.shape[1]
    assert r.max_kvpr.shape == (4, W) and r.moved.shape == (4, W)
    for k in range(4):
        for t in range(W):
            a = r.assignments[k][t]
            assert r.max_kvpr[k, t] == pytest.approx(served(prob, a, D[:, t]), rel=1e-12)
            changed = a != r.assignments[k][t - 1] if t else np.zeros(len(models), bool)
            assert r.moved[k, t] == changed.sum()
            assert r.migrated_gb[k, t] == pytest.approx(prob.items.sizes[changed].sum())
    robust = kvgpu.solve(models, G, demand=D, effort=10)
    assert np.array_equal(r.assignments[0][0], robust.assignment) and r.moved[0].sum() == 0
    assert np.allclose(r.max_kvpr[0], robust.kvpr_by_window.max(axis=1))
    assert r.max_kvpr[0].max() == pytest.approx(robust.max_kvpr)
    assert r.moved[2][1::2].sum() == 0 and (r.moved[2] <= 1).all()  # decisions at 0, 2, 4 only; one model each
    assert r.moved[3].sum() == 0  # min_gain 100%: nothing that runs ever moves
    # re-placing for every window's own demand is never worse there than the window's start placement
    assert (r.max_kvpr[1][1:] <= np.array([served(prob, r.assignments[1][t - 1], D[:, t]) for t in range(1, W)])
            * (1 + 1e-9)).all()
    s = r.summary()
    assert [row["policy"] for row in s] == [p.label for p in pols]
    assert s[0]["worst_kvpr"] == pytest.approx(r.max_kvpr[0].max()) and s[1]["moves"] == r.moved[1].sum()
    assert len(r.rows()) == 4 * W and "static (robust)" in str(r)


def test_rules_hold_in_every_window():
    models, G, D = trace(1)
    models[0]["tp"] = 2
    models[1]["pin"] = [2]
    prob = build_problem(models, G)
    r = replay(models, G, D, ["static", "replan"], effort=10)
    for k in range(2):
        for t in range(D.shape[1]):
            check_placement(prob, type("P", (), {"assignment": r.assignments[k][t]})())


@pytest.mark.parametrize("bad, word", [({"name": "static", "every": 2}, "static"), ({"name": "prism"}, "prism"),
                                       ({"name": "replan", "evry": 2}, "evry"),
                                       ({"name": "replan", "max_moves": -1}, "max_moves")])
def test_bad_policies_are_refused_by_name(bad, word):
    models, G, D = trace()
    with pytest.raises(kvgpu.InvalidInstance, match=word):
        replay(models, G, D, bad)


def test_budget_options_belong_to_policies():
    models, G, D = trace()
    with pytest.raises(kvgpu.InvalidInstance, match="max_moves is set per policy"):
        replay(models, G, D, "replan", max_moves=1)


def test_cli_replay(tmp_path):
    models, G, D = trace()
    f, d = tmp_path / "models.json", tmp_path / "rates.npy"
    f.write_text(json.dumps(models))
    np.save(d, D)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvgpu.cli", "replay", *a], capture_output=True,  # noqa
                                    text=True)
    out = run(str(f), "--demand", str(d), "--gpus", str(G), "--policy", "static", "--policy",
              "replan:every=2,max_moves=1", "--effort", "5", "--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert [s["policy"] for s in js["summary"]] == ["static (robust)", "replan every=2 max_moves=1"]
    assert len(js["windows"]) == 2 * D.shape[1]
    bad = run(str(f), "--demand", str(d), "--gpus", str(G), "--policy", "replan:every")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "KEY=VALUE" in bad.stderr
    short = tmp_path / "short.npy"
    np.save(short, D[:-1])
    bad = run(str(f), "--demand", str(short), "--gpus", str(G))
    assert bad.returncode == 2 and "must have shape (n_models, W)" in bad.stderr


def test_the_demand_reaches_every_command_as_a_table_or_a_log(tmp_path):
    """The same day as a long table (CSV), a .npy array and a request log: solve --demand,
    replay and evaluate read it alike; the table's answer is the API's, and evaluate puts the
    robust placement beside the mean and peak ones, never worse than them on the worst window."""
    import pandas as pd

    models, G, D = trace()
    f = tmp_path / "models.json"
    f.write_text(json.dumps(models))
    names = [m["name"] for m in models]
    table = tmp_path / "day.csv"
    pd.DataFrame([{"model": n, "window": w, "req_rate": D[i, w]} for w in range(D.shape[1])
                  for i, n in enumerate(names)]).to_csv(table, index=False)
    np.save(tmp_path / "day.npy", D)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvgpu.cli", *a, "--gpus", str(G), "--json"],  # noqa
                                    capture_output=True, text=True)
    api = kvgpu.solve(models, G, demand=D)
    for src in (table, tmp_path / "day.npy"):
        out = run("solve", str(f), "--demand", str(src))
        assert out.returncode == 0, out.stderr
        js = json.loads(out.stdout)
        assert js["max_kvpr"] == pytest.approx(api.max_kvpr) and js["assignment"] == api.assignment.tolist()
    rep = run("replay", str(f), "--demand", str(table), "--policy", "static", "--effort", "5")
    assert rep.returncode == 0, rep.stderr
    ev = run("evaluate", str(f), "--demand", str(table))
    assert ev.returncode == 0, ev.stderr
    worst = {e["label"]: e["worst_kvpr"] for e in json.loads(ev.stdout)["placements"]}
    assert set(worst) == {"robust", "mean", "peak"} and worst["robust"] <= min(worst["mean"], worst["peak"]) + 1e-12
    # a request log of the same day: one request per (model, window) where the rate is 1/3600 req/s
    log = tmp_path / "log.csv"
    rows = [{"timestamp": 3600 * w + 1 + i, "model": n} for w in range(D.shape[1]) for i, n in enumerate(names)]
    pd.DataFrame(rows).to_csv(log, index=False)
    out = run("replay", str(f), "--requests", str(log), "--log-start", "0", "--log-end", str(3600 * D.shape[1]),
              "--policy", "static", "--effort", "5")
    assert out.returncode == 0, out.stderr
    both = run("solve", str(f), "--demand", str(table), "--requests", str(log))
    assert both.returncode == 2 and "give the demand once" in both.stderr


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    models, G, D = trace()
    r = replay(models, G, D, effort=5)
    assert [p.label for p in r.policies] == ["static (robust)", "replan every=4 max_moves=8"]
    r.plot(tmp_path / "replay.png")
    assert (tmp_path / "replay.png").stat().st_size > 1000


def test_greedy_baseline():
    """The greedy baseline: decisions at multiples of ``every``, taken only when they lower the
    window's max KVPR (by ``min_gain``); GPU renaming keeps what it can in place."""
    models, G, D = trace(2, n=9, G=3, W=8)
    prob = build_problem(models, G)
    r = replay(models, G, D, [Policy("greedy", every=2), Policy("greedy", min_gain=1.0)])
    for k in range(2):
        for t in range(D.shape[1]):
            a = r.assignments[k][t]
            assert r.max_kvpr[k, t] == pytest.approx(served(prob, a, D[:, t]), rel=1e-12)
            changed = a != r.assignments[k][t - 1] if t else np.zeros(len(models), bool)
            assert r.moved[k, t] == changed.sum()
    assert r.moved[0][1::2].sum() == 0 and r.moved[1].sum() == 0
    first = kvgpu.solve([dict(m, req_rate=float(x)) for m, x in zip(models, D[:, 0])], G, mode="seed")
    assert np.array_equal(r.assignments[0][0], first.assignment)
    with pytest.raises(kvgpu.InvalidInstance, match="greedy"):
        Policy("greedy", max_moves=2)
    models[0]["tp"] = 2
    with pytest.raises(kvgpu.InvalidInstance, match="policy 'greedy'.*shards"):
        replay(models, G, D, "greedy")


def test_match_gpus_keeps_the_most_in_place():
    from kvgpu.policy import _match_gpus

    models = [{"model_size": s, "req_rate": 1.0, "slo": 1.0} for s in (30, 20, 10, 5)]
    prob = build_problem(models, 3, [80.0, 80.0, 40.0])
    cur = np.array([0, 1, 2, 2])
    new = np.array([1, 0, 2, 1])  # the same as cur but GPUs 0 and 1 swapped, model 3 moved
    assert _match_gpus(new, cur, prob).tolist() == [0, 1, 2, 0]


def test_demand_gives_every_rate_and_the_quantiles_agree(tmp_path):
    """With demand over windows a model may leave req_rate out (API and CLI, as evaluate and
    replay already allowed); evaluate takes a .npy like solve and replay; the 95% figure of
    replay and evaluate is the same quantity (a window's own value)."""
    from kvgpu import demand as dm

    models, G, D = trace()
    bare = [{k: v for k, v in m.items() if k != "req_rate"} for m in models]
    assert kvgpu.solve(bare, G, demand=D).assignment.tolist() == kvgpu.solve(models, G, demand=D).assignment.tolist()
    f = tmp_path / "bare.json"
    f.write_text(json.dumps(bare))
    np.save(tmp_path / "d.npy", D)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvgpu.cli", *a, "--gpus", str(G), "--json"],  # noqa
                                    capture_output=True, text=True)
    out = run("solve", str(f), "--demand", str(tmp_path / "d.npy"))
    assert out.returncode == 0, out.stderr
    ev = run("evaluate", str(f), "--demand", str(tmp_path / "d.npy"), "--no-compare", "--placement",
             str(_written(tmp_path, out.stdout)))
    assert ev.returncode == 0, ev.stderr
    p = kvgpu.solve(models, G, demand=D)
    r = replay(models, G, D, ["static"], effort=kvgpu.engine.DEFAULT_EFFORT)
    q = dm.evaluate(p, D).quantile(0.95)
    assert r.summary()[0]["p95_kvpr"] == pytest.approx(q) and q in set(dm.evaluate(p, D).max_by_window.tolist())


def _written(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    return path
