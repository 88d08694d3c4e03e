"""Quality bench: how close each mode gets, measured in one run on the same instances.

For adrs50 (proven optima) and four families (:mod:`kvgpu.generate`: uniform 10-30 GB at 92%
memory, realistic LLM sizes with Zipf popularity, many small models, heterogeneous 40/80/141 GB
GPUs) at 16, 64 and 256 GPUs: seed mode, search mode at three efforts, and -- for adrs50 --
the exact proof; then tensor-parallel clusters with nodes (rules) and re-placement under move
budgets (gain per allowed move).  Per row: mean and worst gap to the best lower bound known for each instance
(the largest over all runs, so every mode is measured against the same bound), and the time per
instance (numba backend, one batch per row, kernels compiled before timing).

    python bench/bench_quality.py            # the full table (about 5 minutes on 2 cores)
    python bench/bench_quality.py --quick    # 16 and 64 GPUs only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import kvgpu
from kvgpu.batch.state import batch_from_instances
from kvgpu.engine import DEFAULT_EFFORT
from kvgpu.generate import FAMILIES, tp_cluster, uniform
from kvgpu.problem import make_instance

HERE = Path(__file__).parent
ADRS50 = HERE.parent / "tests" / "data" / "adrs50.json"
EFFORTS = (10, DEFAULT_EFFORT, 100)
#: Instances per (family, GPU count): fewer on bigger clusters.
COUNT = {16: 8, 64: 3, 256: 1}


def run(insts, mode, effort=0, exact=False):
    b = batch_from_instances(insts)
    t0 = time.perf_counter()
    r = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask,
                          backend="numba", mode=mode, effort=effort, exact=exact)
    return r, (time.perf_counter() - t0) / len(insts)


def table(name, insts, opt=None, with_exact=False):
    runs = [("seed", 0, False)] + [("search", e, False) for e in EFFORTS]
    if with_exact:
        runs.append(("search", DEFAULT_EFFORT, True))
    results = [(m, e, x, *run(insts, m, e, x)) for m, e, x in runs]
    best_lb = np.max([r.lower_bound for *_, r, _ in results], axis=0)
    rows = []
    n = np.mean([i.n_models for i in insts])
    for mode, effort, exact, r, t in results:
        gap = r.max_kvpr / best_lb - 1
        row = {"set": name, "instances": len(insts), "gpus": insts[0].n_gpus, "models_mean": float(n),
               "mode": mode + ("+exact" if exact else ""), "effort": effort, "gap_mean": float(gap.mean()),
               "gap_worst": float(gap.max()), "s_per_instance": t, "proven_optimal": int(r.proven_optimal.sum())}
        line = (f"{name:<9} {insts[0].n_gpus:>4} {n:>6.0f} {row['mode']:<13} {effort:>4}  gap mean "
                f"{100 * row['gap_mean']:6.2f}%  worst {100 * row['gap_worst']:6.2f}%  {t:9.4f} s/inst  "
                f"proven {row['proven_optimal']}/{len(insts)}")
        if opt is not None:
            at = int(np.isclose(r.max_kvpr, opt, rtol=1e-7, atol=0).sum())
            row["at_proven_optimum"] = at
            line += f"  at optimum {at}/{len(insts)}"
        print(line, flush=True)
        rows.append(row)
    return rows


def rules_table(gpus: int = 64, count: int = 3):
    """Tensor-parallel clusters with nodes of 8 (:func:`kvgpu.generate.tp_cluster`): search at
    three efforts, one instance at a time (rule instances are solved one by one), and the same
    items without the rules (anti-affinity, nodes) as a reference point for the bound."""
    rng = np.random.default_rng(7)
    clusters = [tp_cluster(rng, gpus) for _ in range(count)]
    rows = []
    for effort in EFFORTS:
        t0 = time.perf_counter()
        ps = [kvgpu.solve(m, **o, effort=effort, exact=False) for m, o in clusters]
        t = (time.perf_counter() - t0) / count
        rows.append(_rule_row("tp-nodes", ps, "search", effort, t, gpus))
    items = [p.problem.items for p in ps]
    r, t = run(items, "search", DEFAULT_EFFORT)
    gap = r.max_kvpr / np.array([p.lower_bound for p in ps]) - 1
    print(f"{'tp-nodes':<9} {gpus:>4} {np.mean([i.n_models for i in items]):>6.0f} {'no rules':<13} "
          f"{DEFAULT_EFFORT:>4}  gap mean {100 * gap.mean():6.2f}%  worst {100 * gap.max():6.2f}%  {t:9.4f} s/inst"
          f"  (the same shards with no anti-affinity and no nodes)", flush=True)
    rows.append({"set": "tp-nodes", "instances": count, "gpus": gpus, "mode": "items without rules",
                 "effort": DEFAULT_EFFORT, "gap_mean": float(gap.mean()), "gap_worst": float(gap.max()),
                 "s_per_instance": t})
    return rows


def _rule_row(name, ps, mode, effort, t, gpus):
    gap = np.array([p.gap for p in ps])
    n = np.mean([p.problem.items.n_models for p in ps])
    row = {"set": name, "instances": len(ps), "gpus": gpus, "models_mean": float(n), "mode": mode, "effort": effort,
           "gap_mean": float(gap.mean()), "gap_worst": float(gap.max()), "s_per_instance": t,
           "proven_optimal": int(sum(p.proven_optimal for p in ps))}
    print(f"{name:<9} {gpus:>4} {n:>6.0f} {mode:<13} {effort:>4}  gap mean {100 * gap.mean():6.2f}%  worst "
          f"{100 * gap.max():6.2f}%  {t:9.4f} s/inst  proven {row['proven_optimal']}/{len(ps)}", flush=True)
    return row


def replan_table(gpus: int = 64, budgets=(0, 2, 8, 32, None)):
    """Re-placement of a running cluster (uniform 10-30 GB, 85% full) after its demand drifted
    (x0.5-2 per model) and 4 new models arrived: for each move budget, the max KVPR, the gain
    over the baseline (new models placed, nothing moved), the gain per allowed move, and time."""
    rng = np.random.default_rng(11)
    inst = uniform(rng, gpus, 0.85)
    m = [{"name": f"m{i}", "size": float(s), "req_rate": float(w), "slo": 1.0}
         for i, (s, w) in enumerate(zip(inst.sizes, inst.demand))]
    cur = kvgpu.solve(m, gpus, exact=False).assignment
    for x, g in zip(m, cur.tolist()):
        x["cur_gpu_id"] = g
        x["req_rate"] *= float(rng.uniform(0.5, 2.0))
    m += [{"name": f"new{k}", "size": float(rng.integers(10, 20)), "req_rate": float(rng.integers(1, 10)),
           "slo": 1.0, "cur_gpu_id": -1} for k in range(4)]
    rows = []
    for K in budgets:
        t0 = time.perf_counter()
        p = kvgpu.replan(m, gpus, max_moves=K, exact=False)
        t = time.perf_counter() - t0
        gain = p.gain if p.gain is not None else float("nan")
        per = gain / K if K else float("nan")
        label = "no limit" if K is None else f"{K}"
        print(f"replan    {gpus:>4} {len(m):>6} max_moves {label:<8} max KVPR {p.max_kvpr:.5f}  gain {100 * gain:6.2f}%  "
              f"per allowed move {100 * per:6.3f}%  moved {p.moved_models:>3}  gap {100 * p.gap:6.2f}%  {t:7.2f} s",
              flush=True)
        rows.append({"set": "replan", "gpus": gpus, "models": len(m), "max_moves": K, "max_kvpr": p.max_kvpr,
                     "gain": gain, "gain_per_allowed_move": per, "moved": p.moved_models, "gap": p.gap, "s": t})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    kvgpu.warmup()  # compile / load every kernel before timing
    print(f"{'set':<9} {'GPUs':>4} {'models':>6} {'mode':<13} {'eff':>4}")
    cases = json.loads(ADRS50.read_text())["cases"]
    rows = table("adrs50", [make_instance(c["models"], c["gpu_num"]) for c in cases],
                 opt=np.array([c["optimal_max_kvpr"] for c in cases]), with_exact=True)
    for gpus in (16, 64) if args.quick else (16, 64, 256):
        for fam, make in FAMILIES.items():
            rng = np.random.default_rng(1000 + gpus)
            rows += table(fam, [make(rng, gpus) for _ in range(COUNT[gpus])])
    rows += rules_table()
    rows += replan_table()
    out = HERE / "results" / "quality.json"
    out.write_text(json.dumps({"machine": "2-core CPU", "backend": "numba", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
