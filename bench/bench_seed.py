"""Seed mode: the reference pipeline against the NumPy batch engine, measured in one run.

Prints, per workload: per-instance time of each engine, their ratio, and quality (how often the
batch engine reaches the reference's objective, mean/worst excess over it).  On adrs50 it also
checks the drop-in ``compute_model_placement``'s output form in seed mode and counts the cases at the
proven optimum.
Figures go to ``bench/results/seed_bench.json``.

    python bench/bench_seed.py            # 2,000 ADRS-shaped + 4 x (128 GPUs / 256 models) + adrs50
    python bench/bench_seed.py --quick    # 200 ADRS-shaped, 1 big instance
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import kvgpu
from kvgpu import reference as R
from kvgpu.batch.pipeline import solve_seed
from kvgpu.batch.state import batch_from_instances, score
from kvgpu.generate import adrs_like, cluster
from kvgpu.problem import make_instance

HERE = Path(__file__).parent
ADRS50 = HERE.parent / "tests" / "data" / "adrs50.json"


def compare(name, insts):
    t0 = time.perf_counter()
    ref = np.array([R.score(R.seed_pipeline(i), i)[0] for i in insts])
    t_ref = (time.perf_counter() - t0) / len(insts)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t0 = time.perf_counter()
        b = batch_from_instances(insts)
        assign, pos = solve_seed(b)
        t_batch = (time.perf_counter() - t0) / len(insts)
        got = score(b, assign, pos)[0]
    same = np.isclose(got, ref, rtol=1e-9, atol=0)
    excess = got / ref - 1
    row = {"workload": name, "instances": len(insts), "ref_s_per_instance": t_ref,
           "batch_s_per_instance": t_batch, "speedup": t_ref / t_batch,
           "same_objective_share": float(same.mean()), "not_same": np.nonzero(~same)[0].tolist(),
           "mean_excess_over_ref": float(excess.mean()), "worst_excess_over_ref": float(excess.max()),
           "best_excess_over_ref": float(excess.min())}
    print(f"{name:<28} {len(insts):>6} {1e3 * t_ref:>10.2f} {1e3 * t_batch:>10.2f} {t_ref / t_batch:>8.1f}x "
          f"{100 * same.mean():>8.2f}% {100 * excess.mean():>+9.4f}% {100 * excess.max():>+9.4f}%")
    return row


def adrs50_check():
    cases = json.loads(ADRS50.read_text())["cases"]
    at_opt, worse, excess = 0, 0, []
    backend = kvgpu.solve(cases[0]["models"], cases[0]["gpu_num"], mode="seed").backend  # warm-up: load kernels
    t0 = time.perf_counter()
    for c in cases:
        models = [SimpleNamespace(model_size=s, req_rate=r, slo=o) for s, r, o in c["models"]]
        out = kvgpu.solve(models, c["gpu_num"], mode="seed").by_gpu()  # compute_model_placement in seed mode
        used = {g: sum(m.model_size for m in ms) for g, ms in out.items()}
        assert sorted(map(id, (m for ms in out.values() for m in ms))) == sorted(map(id, models))
        assert max(used.values()) <= 80
        kv = max(sum(m.req_rate / m.slo for m in ms) / (80 - used[g]) for g, ms in out.items())
        at_opt += bool(np.isclose(kv, c["optimal_max_kvpr"], rtol=1e-7))
        worse += kv > c["seed_pipeline_max_kvpr"] * (1 + 1e-9)
        excess.append(kv / c["optimal_max_kvpr"] - 1)
    t = (time.perf_counter() - t0) / len(cases)
    # one batch of all 50, as a sweep would run them
    b = batch_from_instances([make_instance(c["models"], c["gpu_num"]) for c in cases])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t0 = time.perf_counter()
        solve_seed(b)
        t_batch = (time.perf_counter() - t0) / len(cases)
    mean_opt = float(np.mean([c["optimal_max_kvpr"] for c in cases]))
    mean_got = float(np.mean([(1 + e) * c["optimal_max_kvpr"] for e, c in zip(excess, cases)]))
    row = {"cases": len(cases), "at_proven_optimum": at_opt, "worse_than_seed": int(worse),
           "mean_excess_over_optimum": float(np.mean(excess)), "worst_excess_over_optimum": float(np.max(excess)),
           "adrs_score": 1 / mean_got, "adrs_score_optimum": 1 / mean_opt,
           "compute_model_placement_s_per_case": t, "compute_model_placement_backend": backend,
           "numpy_one_batch_s_per_case": t_batch}
    print(f"adrs50, seed mode, one by one: {at_opt}/50 at the proven optimum, {int(worse)} worse than the "
          f"seed, mean excess {100 * np.mean(excess):.3f}%, worst {100 * np.max(excess):.2f}%, "
          f"ADRS score {1 / mean_got:.4f} (optimum {1 / mean_opt:.4f}); {1e3 * t:.1f} ms/case one by one "
          f"(backend {backend}), {1e3 * t_batch:.2f} ms/case as one numpy batch")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "seed_bench.json"))
    args = ap.parse_args()
    n_adrs, n_big = (200, 1) if args.quick else (2000, 4)
    rng = np.random.default_rng(20261128)
    print(f"{'workload':<28} {'inst':>6} {'ref ms':>10} {'batch ms':>10} {'ratio':>9} {'same obj':>9} "
          f"{'mean exc':>10} {'worst exc':>10}")
    rows = [compare("adrs-shaped", [adrs_like(rng) for _ in range(n_adrs)]),
            compare("128 GPUs / 256 models", [cluster(rng, 128, 256, 0.85) for _ in range(n_big)])]
    result = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                          "processor": platform.processor() or platform.machine()},
              "backend": "numpy", "mode": "seed", "workloads": rows, "adrs50": adrs50_check()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
