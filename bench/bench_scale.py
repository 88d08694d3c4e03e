"""Fleet scale: GPUs, models, time, peak memory and gap to the lower bound, 256 to 16,384 GPUs.

Three families (:mod:`kvgpu.generate`): ``uniform`` (10-30 GB models, 92% of memory), ``llm``
(realistic checkpoint sizes, Zipf popularity, 85%) and ``tight`` (``uniform``'s models 97% full,
where a packing easily leaves a GPU with no KV memory: the ``full`` column counts such GPUs,
which must be 0), one instance per size, solved through
:func:`kvgpu.solve_batch` with the numba backend at default effort -- search mode (big clusters
decomposed, :mod:`kvgpu.decompose`) and seed mode beside it where it finishes within
``--seed-limit`` seconds.  Each run is a fresh process, so its peak memory (max RSS) is its own
and the time of loading its compiled kernels (compiled once, first) is measured apart, on a
small instance.  Also: 5,000
small models on 2 GPUs (seed and search mode); ``tp`` clusters (:func:`kvgpu.generate.tp_cluster`:
tensor-parallel and replicated models in nodes of 8, 80% full) through :func:`kvgpu.solve`,
decomposed (:mod:`kvgpu.decompose_rules`, mode column ``search``) and whole (``whole``, within
``--seed-limit`` seconds); and the fitted exponent of time against the
number of models (least squares on log-log, search rows of each family).  Figures go to
``bench/results/scale.json``.

    python bench/bench_scale.py                   # 256, 1,024, 4,096, 16,384 GPUs
    python bench/bench_scale.py --gpus 256 1024   # fewer sizes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def _instance(family: str, gpus: int):
    from kvgpu.generate import fixed_count, llm, tight, uniform

    rng = np.random.default_rng(2026 + gpus)
    if family == "uniform":
        return uniform(rng, gpus, 0.92)
    if family == "llm":
        return llm(rng, gpus, 0.85)
    if family == "tight":
        return tight(rng, gpus, 0.97)
    return fixed_count(rng, gpus, 5000)  # "many": 5,000 models on `gpus` GPUs


def _run_tp(gpus, mode, out):
    """A tp cluster: decomposed (``mode`` "search") or whole ("whole"), as :func:`_run`."""
    import warnings

    import kvgpu
    from kvgpu.generate import tp_cluster

    warnings.simplefilter("ignore")  # GPUs left with little KV memory are in the figures
    models, opts = tp_cluster(np.random.default_rng(2026 + gpus), gpus, 0.8)
    small, small_opts = tp_cluster(np.random.default_rng(1), 16, 0.8)
    decompose = mode == "search"
    t0 = time.perf_counter()
    kvgpu.solve(small, decompose=decompose, effort=2, **small_opts)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = kvgpu.solve(models, decompose=decompose, objective="seed", **opts)
    wall = time.perf_counter() - t0
    out.put({"models": len(models), "wall_s": wall, "load_s": load, "max_kvpr": p.max_kvpr,
             "lower_bound": p.lower_bound, "decomposed": p.decomposed, "full_gpus": int(np.isinf(p.kvpr).sum()),
             "note": "", "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run(family, gpus, mode, out):
    if family == "tp":
        return _run_tp(gpus, mode, out)
    import kvgpu
    from kvgpu.batch.state import batch_from_instances

    inst = _instance(family, gpus)
    b = batch_from_instances([inst])
    small = batch_from_instances([_instance("uniform", 8)])
    t0 = time.perf_counter()  # load the compiled kernels this run uses (compiled before, by warmup)
    kvgpu.solve_batch(small.sizes, small.demand, small.gpu_mem, backend="numba", mode=mode,
                      **({} if mode == "seed" else {"decompose": gpus >= 8}))
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, backend="numba", mode=mode)
    wall = time.perf_counter() - t0
    out.put({"models": inst.n_models, "wall_s": wall, "load_s": load, "max_kvpr": float(r.max_kvpr[0]),
             "lower_bound": float(r.lower_bound[0]), "decomposed": bool(r.decomposed[0]),
             "full_gpus": int(np.isinf(r.kvpr[0]).sum()), "note": str(r.note[0]),
             "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(family, gpus, mode, limit_s):
    """One solve in a fresh process; None when it does not finish within ``limit_s``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(family, gpus, mode, q))
    p.start()
    try:
        res = q.get(timeout=limit_s)
    except queue.Empty:
        p.kill()
        res = None
    p.join()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="*", default=[256, 1024, 4096, 16384])
    ap.add_argument("--families", nargs="*", default=["uniform", "llm", "tight", "tp"])
    ap.add_argument("--seed-limit", type=float, default=300.0, help="seconds a seed-mode run may take")
    ap.add_argument("--limit", type=float, default=1800.0, help="seconds a search run may take")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    from kvgpu.warmup import warmup

    warmup(["batch", "fleet"])
    rows = []
    print(f"{'family':<8} {'GPUs':>6} {'models':>7} {'mode':<7} {'time s':>9} {'peak MB':>8} {'gap %':>8} {'full':>5}  "
          f"note (+ s to load the kernels)")

    def row(family, gpus, mode, limit):
        r = measure(family, gpus, mode, limit)
        if r is None:
            print(f"{family:<8} {gpus:>6} {'':>7} {mode:<7} {'> %g' % limit:>9} {'':>8} {'':>8}  did not finish")
            rows.append({"family": family, "gpus": gpus, "mode": mode, "finished": False, "limit_s": limit})
            return None
        gap = r["max_kvpr"] / r["lower_bound"] - 1
        note = ("decomposed" if r["decomposed"] else "whole") + f" (+{r['load_s']:.1f})" + (
            f"; {r['note']}" if r["note"] else "")
        print(f"{family:<8} {gpus:>6} {r['models']:>7} {mode:<7} {r['wall_s']:>9.2f} {r['peak_mb']:>8.0f} "
              f"{100 * gap:>8.3f} {r['full_gpus']:>5}  {note}", flush=True)
        rows.append({"family": family, "gpus": gpus, "mode": mode, "finished": True, "gap": gap, **r})
        return r

    whole = {}  # tp rows: the whole-cluster max KVPR, for the decomposition's distance to it
    for family in args.families:
        for g in args.gpus:
            r = row(family, g, "search", args.limit)
            if family != "tp":
                row(family, g, "seed", args.seed_limit)
                continue
            w = row(family, g, "whole", args.seed_limit)
            if r is not None and w is not None:
                whole[g] = r["max_kvpr"] / w["max_kvpr"] - 1
                print(f"tp {g:>6}: decomposed max KVPR {100 * whole[g]:+.2f}% against the whole cluster's", flush=True)
    for mode in ("seed", "search"):
        row("many", 2, mode, args.limit)
    fits = {}
    for family in args.families:
        done = [r for r in rows if r["family"] == family and r["mode"] == "search" and r["finished"]]
        for what, rs in (("every search row", done), ("decomposed rows", [r for r in done if r["decomposed"]])):
            if len(rs) >= 2:
                slope = float(np.polyfit(np.log([r["models"] for r in rs]), np.log([r["wall_s"] for r in rs]), 1)[0])
                fits[f"{family}, {what}"] = slope
                print(f"{family}: search time ~ models^{slope:.2f} ({what}, {rs[0]['gpus']} to {rs[-1]['gpus']} GPUs)")
    result = {"machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": mp.cpu_count()},
              "rows": rows, "time_exponent_in_models": fits, "tp_decomposed_vs_whole": whole}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
