"""Demand over time: one placement for a whole day of bursty demand.

On bursty families of 16 and 64 GPUs (80 GB) with 24 to 96 demand windows, three placements
are evaluated over every window: the robust one (``kvgpu.solve(..., demand=D)``, the CPU NumPy
engine of :mod:`kvgpu.robust`), today's placement on each model's mean rate, and today's on each
model's peak rate.  Printed per case: the worst window's KVPR of each, how much lower the robust
one is, its lower bound (and which bound), and the time per solve; for the ``--size`` cluster
sizes also the GPUs needed to keep the worst window at the robust placement's KVPR, sizing on
per-model peaks (``kvgpu.size``) against the fewest the robust engine meets it on.  Figures go to
``bench/results/bench_time.json``.

The family is :func:`kvgpu.generate.bursty` (groups of models active together on daily curves
with distinct peaks, bursts, Zipf popularity, hot models replicated), default parameters.

    python bench/bench_time.py                  # 16 and 64 GPUs, 24 and 96 windows; a replay of 64 x 96
    python bench/bench_time.py --gpus 16 --windows 24
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def evaluate(models, gpus, assign, D) -> float:
    """The worst window's max KVPR of ``assign`` (plain models) over the rates ``D`` (n, W)."""
    from kvgpu import robust
    from kvgpu.problem import build_problem

    prob = build_problem(models, gpus)
    return float(robust.window_kvpr(prob.items.sizes, robust.item_demand(prob, D), prob.items.gpu_mem,
                                    assign).max())


def case(gpus: int, windows: int, seed: int, sizing: bool = False) -> dict:
    import kvgpu

    from kvgpu import generate

    day = generate.bursty(np.random.default_rng(seed), gpus, windows=windows)
    models, D = day.models, day.rates
    row = {"gpus": gpus, "windows": windows, "models": len(models), "seed": seed}
    for name, rates in (("mean", D.mean(axis=1)), ("peak", D.max(axis=1))):
        t0 = time.perf_counter()
        p = kvgpu.solve([dict(m, req_rate=float(r)) for m, r in zip(models, rates)], gpus)
        row[f"{name}_s"] = time.perf_counter() - t0
        row[name] = evaluate(models, gpus, p.assignment, D)
    t0 = time.perf_counter()
    p = kvgpu.solve(models, gpus, demand=D)
    row["robust_s"] = time.perf_counter() - t0
    row["robust"] = p.max_kvpr
    row["bound"] = p.lower_bound
    row["bound_source"] = p.bound_source
    row["vs_mean"] = 1 - row["robust"] / row["mean"]
    row["vs_peak"] = 1 - row["robust"] / row["peak"]
    if sizing:
        row.update(gpus_for_target(models, D, gpus, row["robust"]))
    return row


def gpus_for_target(models, D, gpus: int, target: float) -> dict:
    """GPUs needed to keep the worst window at or below ``target``: sizing on each model's peak
    rate (``kvgpu.size``), against the fewest GPUs on which the robust solve meets it (found by
    bisection between the memory's minimum and ``gpus``: ``kvgpu.size`` does not take demand
    over windows yet, so this is what the robust engine reaches, not a proven minimum)."""
    import kvgpu

    t0 = time.perf_counter()
    peak = kvgpu.size([dict(m, req_rate=float(r)) for m, r in zip(models, D.max(axis=1))], target).gpus
    t_peak = time.perf_counter() - t0
    lo = int(np.ceil(sum(m["size"] * m.get("replicas", 1) for m in models) / 80.0)) - 1  # lo fails, gpus meets
    hi = gpus
    t0 = time.perf_counter()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            meets = kvgpu.solve(models, mid, demand=D).max_kvpr <= target
        except kvgpu.NoPlacementFound:  # too few GPUs for the models (or their replicas) at all
            meets = False
        if meets:
            hi = mid
        else:
            lo = mid
    return {"target": target, "gpus_peak_sizing": peak, "gpus_robust": hi, "fewer_gpus": 1 - hi / peak,
            "size_peak_s": t_peak, "size_robust_s": time.perf_counter() - t0}


def replay_day(gpus: int, windows: int, seed: int, plot: str | None) -> dict:
    """Replay the policies over bursty days (:func:`kvgpu.replay`): print each table and its
    time, return the summary rows.  Two days: the family's default (hot models replicated) with
    static and replan policies, and the same family without replicas, where the greedy baseline
    (the seed pipeline, which has no rules) runs too -- there one hot model alone sets most
    windows' max, which no policy can lower."""
    import kvgpu
    from kvgpu import generate

    out = {"gpus": gpus, "windows": windows, "days": []}
    for replicate, pols in ((True, ["static", {"name": "replan", "every": 4, "max_moves": 8},
                                    {"name": "replan", "every": 1, "max_moves": 2}]),
                            (False, ["static", {"name": "replan", "every": 4, "max_moves": 8},
                                     {"name": "greedy", "every": 4}])):
        day = generate.bursty(np.random.default_rng(seed + gpus + windows), gpus, windows=windows,
                              replicate=replicate)
        t0 = time.perf_counter()
        res = kvgpu.replay(day.models, gpus, day.rates, pols)
        sec = time.perf_counter() - t0
        print(f"replay of {windows} windows on {gpus} GPUs ({len(day.models)} models, "
              f"{'hot models replicated' if replicate else 'no replicas'}): {sec:.1f} s")
        print(res)
        if plot and replicate:
            res.plot(plot)
        out["days"].append({"replicate": replicate, "seconds": sec, "summary": res.summary()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--windows", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--size", type=int, nargs="*", default=[16],
                    help="cluster sizes whose GPU count for the robust placement's KVPR is also found, robust vs "
                    "sizing on peaks (default 16: on 64 GPUs it takes minutes here)")
    ap.add_argument("--replay", type=int, nargs=2, default=[64, 96], metavar=("GPUS", "WINDOWS"),
                    help="also replay the policies (static, replan every 4 with 8 moves / every window with 2, "
                    "greedy every 4) over two days and time them (default 64 96; 0 0: no replay)")
    ap.add_argument("--replay-plot", help="draw the replay to this image file")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_time.json"))
    args = ap.parse_args()
    import kvgpu

    kvgpu.solve([{"model_size": 10, "req_rate": 1, "slo": 1}] * 3, 2, demand=np.ones((3, 2)))  # load the kernels
    rows = []
    head = (f"{'GPUs':>5} {'win':>4} {'models':>6} {'mean':>9} {'peak':>9} {'robust':>9} {'vs mean':>8} "
            f"{'vs peak':>8} {'bound':>9} {'t mean':>7} {'t peak':>7} {'t robust':>8}  bound source")
    print("worst window's max KVPR of each placement over every window (lower is better); times in s")
    print(head)
    for g in args.gpus:
        for w in args.windows:
            r = case(g, w, args.seed + g + w, sizing=g in args.size)
            rows.append(r)
            print(f"{g:>5} {w:>4} {r['models']:>6} {r['mean']:>9.4f} {r['peak']:>9.4f} {r['robust']:>9.4f} "
                  f"{100 * r['vs_mean']:>7.1f}% {100 * r['vs_peak']:>7.1f}% {r['bound']:>9.4f} {r['mean_s']:>7.2f} "
                  f"{r['peak_s']:>7.2f} {r['robust_s']:>8.2f}  {r['bound_source']}", flush=True)
    sized = [r for r in rows if "gpus_robust" in r]
    if sized:
        print("GPUs to keep the worst window at the robust placement's KVPR: sizing on per-model peaks (kvgpu.size) "
              "vs the fewest the robust engine meets it on (bisection)")
        for r in sized:
            print(f"{r['gpus']:>5} GPUs {r['windows']:>3} windows  target {r['target']:.4f}: peak sizing "
                  f"{r['gpus_peak_sizing']} GPUs ({r['size_peak_s']:.1f} s), robust {r['gpus_robust']} GPUs "
                  f"({r['size_robust_s']:.1f} s): {100 * r['fewer_gpus']:.1f}% fewer")
    replayed = replay_day(*args.replay, args.seed, args.replay_plot) if args.replay[0] else None
    Path(args.out).write_text(json.dumps({"rows": rows, "family": "kvgpu.generate.bursty",
                                          "replay": replayed}, indent=1))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
