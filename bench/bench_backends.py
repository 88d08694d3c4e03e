"""Backend table, seed mode: reference, numpy, numba (and cuda when usable) on the same instances.

Each (workload, engine) runs in a fresh process, so its peak memory (max RSS) is its own;
instances are regenerated there from the same seed.  Printed per row: instances per second,
per-instance time, ratio to the reference, peak memory, and the share of instances whose
objective equals the reference's (or the numpy engine's where the reference is skipped).
numba kernels are compiled (or loaded from cache) on a warm-up instance first; that time is
reported apart.  Figures go to ``bench/results/backends.json``.

The rows ``solve_batch[numba]`` time what users call -- ``kvgpu.solve_batch(..., backend="numba",
mode="seed")``: validation, the seed pipeline, the objective and the reported lower bound -- in
the same run as the reference, and the CPU target of the GPU issue (>= 200x the reference per
instance on 10,000 ADRS-shaped instances) is printed from that row.

    python bench/bench_backends.py            # 10,000 ADRS-shaped; 100 x 64/160; 1 x 1024/4096
    python bench/bench_backends.py --quick    # 1,000; 10; 1 x 256/1024
    python bench/bench_backends.py --target   # only the CPU target: reference vs solve_batch[numba]
    python bench/bench_backends.py --proofs   # search mode, 10,000 ADRS-shaped: exact=False vs None

``--proofs`` solves the same batch in search mode without proofs and with ``solve_batch``'s
default ``exact=None`` (each instance of at most 24 models proven), alternating three times in one
process, and prints per setting the mean and worst reported gap, which bound it measures, the
instances proven optimal, and the median wall and CPU seconds with their ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def _instances(kind, count, seed):
    from kvgpu.generate import adrs_like, cluster

    rng = np.random.default_rng(seed)
    if kind == "adrs":
        return [adrs_like(rng) for _ in range(count)]
    g, n = kind
    return [cluster(rng, g, n, 0.85) for _ in range(count)]


def _run(kind, count, seed, engine, out):
    from kvgpu import backends
    from kvgpu import reference as R
    from kvgpu.batch.state import batch_from_instances, score

    insts = _instances(kind, count, seed)
    compile_s = 0.0
    if engine == "reference":
        t0 = time.perf_counter()
        obj = [R.score(R.seed_pipeline(i), i)[0] for i in insts]
        wall = time.perf_counter() - t0
    elif engine.startswith("solve_batch["):
        import kvgpu

        backend = engine[len("solve_batch["):-1]
        b = batch_from_instances(insts)
        arrays = (b.sizes, b.demand, b.gpu_mem)
        t0 = time.perf_counter()
        one = batch_from_instances(_instances("adrs", 2, 0))
        kvgpu.solve_batch(one.sizes, one.demand, one.gpu_mem, model_mask=one.model_mask, gpu_mask=one.gpu_mask,
                          backend=backend, mode="seed")
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = kvgpu.solve_batch(*arrays, model_mask=b.model_mask, gpu_mask=b.gpu_mask, backend=backend, mode="seed")
        wall = time.perf_counter() - t0
        obj = np.asarray(res.max_kvpr).tolist()
    else:
        b = batch_from_instances(insts)
        if engine != "numpy":
            t0 = time.perf_counter()
            backends.solve_seed(batch_from_instances(_instances("adrs", 1, 0)), engine)
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assign, pos = backends.solve_seed(b, engine)
        wall = time.perf_counter() - t0
        obj = score(b, assign, pos)[0].tolist()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put({"wall_s": wall, "compile_s": compile_s, "peak_mb": peak_mb, "objective": obj})


def measure(kind, count, seed, engine):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(kind, count, seed, engine, q))
    p.start()
    res = q.get()
    p.join()
    return res


def scaling_fit(gpus):
    """numba, one instance per size, 4 models per GPU at 85% memory: time against G and the
    exponent of a least-squares fit of log(time) on log(G)."""
    from kvgpu import backends
    from kvgpu.batch.state import batch_from_instances

    backends.solve_seed(batch_from_instances(_instances("adrs", 1, 0)), "numba")  # load the kernels
    times = []
    for g in gpus:
        b = batch_from_instances(_instances((g, 4 * g), 1, 11))
        t0 = time.perf_counter()
        backends.solve_seed(b, "numba")
        times.append(time.perf_counter() - t0)
    slope = float(np.polyfit(np.log(gpus), np.log(times), 1)[0])
    print("numba scaling (4 models per GPU): " + ", ".join(f"{g} GPUs {t:.2f}s" for g, t in zip(gpus, times))
          + f"; time ~ G^{slope:.2f}")
    return {"gpus": gpus, "seconds": times, "exponent": slope}


def proofs(count: int, out: str) -> None:
    """Batch proofs (issue: mean reported gap <= 0.05% on 10,000 ADRS-shaped instances, proofs
    within 2x of the batch time without them); see the module doc."""
    import kvgpu
    from kvgpu.batch.state import batch_from_instances

    b = batch_from_instances(_instances("adrs", count, 7))
    arrays = dict(sizes=b.sizes, demand=b.demand, gpu_mem=b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask)
    one = batch_from_instances(_instances("adrs", 2, 0))
    for exact in (False, None):  # compile / load the kernels of both settings first
        kvgpu.solve_batch(one.sizes, one.demand, one.gpu_mem, backend="numba", exact=exact)
    times = {False: [], None: []}
    res = {}
    for _ in range(3):
        for exact in (False, None):
            t0, c0 = time.perf_counter(), time.process_time()
            res[exact] = kvgpu.solve_batch(**arrays, backend="numba", exact=exact)
            times[exact].append((time.perf_counter() - t0, time.process_time() - c0))
    rows = []
    print(f"{'exact':<6} {'mean gap':>9} {'worst':>8} {'bound':<22} {'proven':>13} {'wall s':>7} {'CPU s':>7}")
    for exact, r in res.items():
        wall, cpu = np.median(np.array(times[exact]), axis=0)
        kinds = sorted(set(r.bound_source.tolist()))
        row = {"exact": str(exact), "instances": count, "mean_gap": float(np.mean(r.gap)),
               "worst_gap": float(np.max(r.gap)), "bound": kinds, "proven": int(r.proven_optimal.sum()),
               "wall_s": float(wall), "cpu_s": float(cpu)}
        rows.append(row)
        print(f"{str(exact):<6} {100 * row['mean_gap']:>8.4f}% {100 * row['worst_gap']:>7.3f}% "
              f"{', '.join(kinds):<22} {row['proven']:>6}/{count:<6} {wall:>7.2f} {cpu:>7.2f}")
    ratio_wall = rows[1]["wall_s"] / rows[0]["wall_s"]
    ratio_cpu = rows[1]["cpu_s"] / rows[0]["cpu_s"]
    print(f"batch proofs on {count:,} ADRS-shaped: mean reported gap {100 * rows[1]['mean_gap']:.4f}% "
          f"(target <= 0.05%), time with proofs {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU (target <= 2x)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"rows": rows, "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
                                     "cpus": mp.cpu_count()}, indent=1))
    print(f"saved {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target", action="store_true", help="only the CPU target row (10,000 ADRS-shaped)")
    ap.add_argument("--out", default=None, help="default: bench/results/backends.json (cpu_target.json with --target)")
    ap.add_argument("--proofs", action="store_true", help="search mode with and without batch proofs")
    args = ap.parse_args()
    if args.proofs:
        return proofs(1000 if args.quick else 10000, args.out or str(HERE / "results" / "batch_proofs.json"))
    args.out = args.out or str(HERE / "results" / ("cpu_target.json" if args.target else "backends.json"))
    from kvgpu import backends

    usable = [b for b in ("numpy", "numba", "cuda") if backends.probe()[b][0]]
    if args.target:
        workloads = [("adrs", 10000, "ADRS-shaped")]
    elif args.quick:
        workloads = [("adrs", 1000, "ADRS-shaped"), ((64, 160), 10, "64 GPUs / 160 models"),
                     ((256, 1024), 1, "256 GPUs / 1024 models")]
    else:
        workloads = [("adrs", 10000, "ADRS-shaped"), ((64, 160), 100, "64 GPUs / 160 models"),
                     ((1024, 4096), 1, "1024 GPUs / 4096 models")]
    rows = []
    print(f"{'workload':<24} {'engine':<19} {'inst':>6} {'inst/s':>10} {'ms/inst':>10} {'vs ref':>8} "
          f"{'peak MB':>8} {'same obj':>9}  note")
    for kind, count, label in workloads:
        big = kind != "adrs" and kind[0] >= 1024
        engines = (["reference"] if not big else []) + [e for e in usable if not (big and e == "numpy")]
        engines += ["solve_batch[numba]"] if "numba" in usable and not big else []
        if args.target:
            engines = ["reference", "solve_batch[numba]"]
        results = {e: measure(kind, count, 7, e) for e in engines}
        base = "reference" if "reference" in results else "numba"
        for e, r in results.items():
            per = r["wall_s"] / count
            ref_per = results["reference"]["wall_s"] / count if "reference" in results else None
            same = float(np.mean(np.isclose(r["objective"], results[base]["objective"], rtol=1e-9, atol=0)))
            note = f"compile/load {r['compile_s']:.1f}s" if r["compile_s"] else ""
            row = {"workload": label, "engine": e, "instances": count, "instances_per_s": count / r["wall_s"],
                   "s_per_instance": per, "ratio_to_reference": (ref_per / per) if ref_per else None,
                   "peak_mb": r["peak_mb"], "same_objective_as": base, "same_objective_share": same,
                   "compile_s": r["compile_s"]}
            rows.append(row)
            ratio = f"{ref_per / per:>7.1f}x" if ref_per else f"{'-':>8}"
            print(f"{label:<24} {e:<19} {count:>6} {count / r['wall_s']:>10.1f} {1e3 * per:>10.3f} {ratio} "
                  f"{r['peak_mb']:>8.0f} {100 * same:>8.2f}%  {note}")
        if "solve_batch[numba]" in results and "reference" in results:
            ratio = results["reference"]["wall_s"] / results["solve_batch[numba]"]["wall_s"]
            print(f"CPU target: kvgpu.solve_batch(backend='numba', mode='seed') on {count:,} {label}: "
                  f"{1e6 * results['solve_batch[numba]']['wall_s'] / count:.1f} us/instance, "
                  f"{ratio:.1f}x the reference per instance (target >= 200x)")
        if big:
            print(f"{'':<24} reference and numpy skipped at this size (the pure-Python pipeline needs hours; "
                  f"the numpy engine's per-step overhead makes it far slower than numba)")
    scaling = None if args.target else scaling_fit([64, 128, 256] if args.quick else [64, 128, 256, 512, 1024])
    result = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                          "cpus": mp.cpu_count()}, "mode": "seed",
              "backends": {k: list(v) for k, v in backends.probe().items()}, "rows": rows,
              "numba_scaling": scaling}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
