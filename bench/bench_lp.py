"""The configuration LP's bound and dive on the bench's tensor-parallel family.

For ``tp_cluster(default_rng(seed), GPUS)`` (nodes of 8 x 80 GB), seeds 0-2: the search's
answer (``exact=False``: the search and the node-level replica moves), then ``exact=True`` --
the proof, the configuration LP bound and the dive on the LP's configurations
(:mod:`kvgpu.lp_dive`) -- with its answer, its bound, the gap between them and the time of
each.  Every answer is checked against the rules (:func:`kvgpu.rule_check.rule_breach`).

    python bench/bench_lp.py             # 64 GPUs, seeds 0-2 (a few minutes on 2 shared cores)
    python bench/bench_lp.py --gpus 16   # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kvgpu
from kvgpu.generate import tp_cluster
from kvgpu.rule_check import rule_breach


def row(seed: int, gpus: int) -> str:
    models, o = tp_cluster(np.random.default_rng(seed), gpus)
    t0 = time.perf_counter()
    plain = kvgpu.solve(models, **o, exact=False)
    t1 = time.perf_counter()
    lp = kvgpu.solve(models, **o, exact=True)
    t2 = time.perf_counter()
    for p in (plain, lp):
        breach = rule_breach(p.problem, p.assignment)
        assert breach is None, f"seed {seed}: the answer breaks a rule ({breach})"
    gain = 1.0 - lp.max_kvpr / plain.max_kvpr
    return (f"{seed:>4} {len(plain.problem.items.sizes):>6} {plain.max_kvpr:>9.4f} {t1 - t0:>6.1f} "
            f"{lp.max_kvpr:>9.4f} {100 * gain:>5.1f}% {lp.lower_bound:>8.4f} {100 * lp.gap:>5.1f}% "
            f"{t2 - t1:>6.1f}  {lp.bound_source}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = ap.parse_args()
    print(f"tensor-parallel family, {args.gpus} GPUs (nodes of 8)")
    print("seed shards    search  time s   exact+LP  gain     bound   gap  time s  bound source")
    for seed in args.seeds:
        print(row(seed, args.gpus), flush=True)


if __name__ == "__main__":
    main()
