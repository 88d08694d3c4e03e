"""Quality bench: how close each mode gets, measured in one run on the same instances.

For adrs50 (proven optima) and four families (:mod:`kvgpu.generate`: uniform 10-30 GB at 92%
memory, realistic LLM sizes with Zipf popularity, many small models, heterogeneous 40/80/141 GB
GPUs) at 16, 64 and 256 GPUs: seed mode, search mode at three efforts, and -- for adrs50 --
the exact proof.  Per row: mean and worst gap to the best lower bound known for each instance
(the largest over all runs, so every mode is measured against the same bound), and the time per
instance (numba backend, one batch per row, kernels compiled before timing).

    python bench/bench_quality.py            # the full table (about 10 minutes on 2 cores)
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
from kvgpu.generate import FAMILIES
from kvgpu.problem import make_instance

HERE = Path(__file__).parent
ADRS50 = HERE.parent / "tests" / "data" / "adrs50.json"
EFFORTS = (10, kvgpu.api.DEFAULT_EFFORT, 100)
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
        runs.append(("search", kvgpu.api.DEFAULT_EFFORT, True))
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    kvgpu.solve([[10, 1, 1], [20, 2, 1]], 2, exact=True)  # load / compile the kernels
    print(f"{'set':<9} {'GPUs':>4} {'models':>6} {'mode':<13} {'eff':>4}")
    cases = json.loads(ADRS50.read_text())["cases"]
    rows = table("adrs50", [make_instance(c["models"], c["gpu_num"]) for c in cases],
                 opt=np.array([c["optimal_max_kvpr"] for c in cases]), with_exact=True)
    for gpus in (16, 64) if args.quick else (16, 64, 256):
        for fam, make in FAMILIES.items():
            rng = np.random.default_rng(1000 + gpus)
            rows += table(fam, [make(rng, gpus) for _ in range(COUNT[gpus])])
    out = HERE / "results" / "quality.json"
    out.write_text(json.dumps({"machine": "2-core CPU", "backend": "numba", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
