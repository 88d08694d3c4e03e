"""The Python steps of ``bench/gpu_check.sh`` (run one step per process, each under its own timeout).

    python bench/gpu_check.py STEP --work DIR [--simulate] [--instances N] [--big N]

Steps (each prints what it found and writes ``DIR/STEP.json`` for :func:`summary`):

``env``       versions and the backend probe (on a device the cuda backend must be usable).
``probe``     compile and launch the probe kernel of :mod:`kvgpu.kernels.cuda_probe`.
``seed``      seed parity: ``kvgpu.solve_batch(..., backend="cuda", mode="seed")`` given CuPy arrays
              against ``backend="numba"``, instance by instance: identical placements, per-GPU
              KVPR, max KVPR and lower bound.  With ``--simulate`` it also counts host
              synchronisations and kernel launches per ``solve_batch`` call (the NumPy stand-in
              for CuPy of ``tests/cuda/fake_cupy.py``) at several batch sizes (2, 8 and 32
              instances by default; :data:`COUNT_SIZES`), prints them per size, and fails when
              the host syncs grow with the batch size.
``search``    search parity: the same with ``mode="search"`` (effort :data:`SIM_EFFORT` under the
              simulator, the default on a device), counts likewise.
``timings``   (device) 100,000 ADRS-shaped instances in search mode end to end, and 1,000
              instances of 64 GPUs / 160 models, on cuda and on numba in one run, with ratios.
``summary``   the per-step figures and, last, the one line
              ``gpu-check: seed parity P/Q, search parity R/S, host syncs per solve_batch call H,
              kernel launches per call L``.

``--simulate`` runs the steps on a CPU: numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set by
the shell script before Python starts) and the stand-in for CuPy, with the cuda backend admitted
although the probe rightly refuses the simulator as a device.  Instances are kept small there:
the simulator runs each GPU thread as a Python thread.  Host syncs and launches are counted only
there (real CuPy cannot be instrumented); they are properties of the code path, not of the
device, so on a device the shell script takes them from a simulated run of the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Batch sizes at which ``--simulate`` counts syncs and launches (capped at ``--instances``).
COUNT_SIZES = (2, 8, 32)
#: Search rounds of the simulated search step: the simulator runs each GPU thread as a Python
#: thread, and the counts must not depend on the rounds anyway (checked at several sizes).
SIM_EFFORT = 4

LAST_LINE = ("gpu-check: seed parity {P}/{Q}, search parity {R}/{S}, host syncs per solve_batch call {H}, "
             "kernel launches per call {L}")


def _save(a, data: dict) -> None:
    """The step's figures as ``WORK/<step or --save-as>.json``."""
    (a.work / f"{a.save_as or a.step}.json").write_text(json.dumps(data, indent=1))


def _simulated():
    """The stand-in for CuPy, installed before kvgpu imports CuPy, and the cuda backend admitted
    on the simulator (the probe refuses it as a device, correctly, for every other use)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("--simulate needs NUMBA_ENABLE_CUDASIM=1 in the environment before Python starts")
    sys.path.insert(0, str(ROOT / "tests" / "cuda"))
    import fake_cupy

    cp = fake_cupy.install()
    from kvgpu import backends, cuda_engine

    backends._probe_cuda = lambda: (True, "numba CUDA simulator + NumPy stand-in for CuPy")
    backends.probe.cache_clear()
    if hasattr(cuda_engine, "array_module"):  # an engine that picks NumPy under the simulator gets the stand-in,
        cuda_engine.array_module = lambda: cp  # so that its host copies are seen (and refused when implicit)
    return cp


def _instances(n: int, simulate: bool, seed: int):
    """``n`` instances: ADRS-shaped and varied ones on a device; small varied ones (3-4 GPUs),
    and every fourth from the ninth on ADRS-shaped, under the simulator."""
    from kvgpu.generate import adrs_like, varied

    rng = np.random.default_rng(seed)
    if simulate:  # every fourth from the ninth ADRS-shaped: the simulator takes ~10x longer on those
        return [adrs_like(rng) if i >= 8 and i % 4 == 3 else varied(rng, g_range=(3, 4), per_gpu=(1, 2))
                for i in range(n)]
    k = (7 * n) // 10
    return [adrs_like(rng) for _ in range(k)] + [varied(rng, g_range=(5, 32)) for _ in range(n - k)]


def _args(batch, xp):
    to = xp.asarray
    return (to(batch.sizes), to(batch.demand), to(batch.gpu_mem)), dict(model_mask=to(batch.model_mask),
                                                                       gpu_mask=to(batch.gpu_mask))


def step_env(a):
    import numba

    import kvgpu
    from kvgpu import backends

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, numba {numba.__version__}, "
          f"kvgpu {kvgpu.__version__}")
    print(backends.info())
    ok, why = backends.probe()["cuda"]
    _save(a, {"cuda_usable": ok, "why": why})
    if not a.simulate and not ok:
        sys.exit(f"the cuda backend is not usable here: {why}")


def step_probe(a):
    from kvgpu.kernels import cuda_probe

    got = cuda_probe.run()
    print(f"probe kernel: {got} ({'as expected' if got == cuda_probe.EXPECTED else 'WRONG'})")
    _save(a, {"ok": got == cuda_probe.EXPECTED})
    if got != cuda_probe.EXPECTED:
        sys.exit(1)


def _same_figures(got, want, cp) -> np.ndarray:
    """(B,) bool: instances whose placement, per-GPU KVPR, max KVPR and lower bound are identical
    (NaN where both are NaN) between a cuda result ``got`` (CuPy arrays) and ``want`` (NumPy)."""
    same = np.ones(want.max_kvpr.shape[0], bool)
    for name in ("assignment", "kvpr", "max_kvpr", "lower_bound"):
        x, y = cp.asnumpy(getattr(got, name)), getattr(want, name)
        eq = (x == y) | (np.isnan(x) & np.isnan(y)) if y.dtype.kind == "f" else x == y
        same &= eq.reshape(eq.shape[0], -1).all(axis=1)
    return same


def _parity(a, mode: str, seed: int):
    """``solve_batch(backend="cuda", mode=mode)`` on CuPy arrays against ``backend="numba"``: the
    parity count of the whole batch and, under the simulator, the syncs and launches of one call
    at each of :data:`COUNT_SIZES` (the first instances of the batch).  Returns ``(equal,
    instances, counts)``; exits non-zero when the host syncs grow with the batch size."""
    cp = _simulated() if a.simulate else __import__("cupy")
    import kvgpu
    from kvgpu.batch.state import batch_from_instances

    kw = {"mode": mode}
    if mode == "search" and a.simulate:
        kw["effort"] = SIM_EFFORT
    b = batch_from_instances(_instances(a.instances, a.simulate, seed=seed))
    want = kvgpu.solve_batch(*_args(b, np)[0], **_args(b, np)[1], backend="numba", **kw)
    B = b.shape[0]
    sizes = sorted({min(k, B) for k in COUNT_SIZES} | {B}) if a.simulate else [B]
    counts, same = [], None
    for n in sizes:
        sub = b.take(np.arange(n))
        pos, kwa = _args(sub, cp)
        if a.simulate:
            cp.reset()
        t0 = time.perf_counter()
        res = kvgpu.solve_batch(*pos, **kwa, backend="cuda", **kw)
        wall = time.perf_counter() - t0
        c = dict(cp.COUNTS) if a.simulate else None  # before the comparison below copies results back
        assert isinstance(res.assignment, cp.ndarray), "CuPy in, CuPy out"
        same = _same_figures(res, want, cp) if n == B else same
        if a.simulate:
            counts.append({"instances": n, **c})
            print(f"solve_batch(cuda, {mode}) on {n} CuPy instances: {c['syncs']} host syncs, {c['launches']} kernel "
                  f"launches, {c['calls']} CuPy calls, {wall:.1f} s (simulator)")
        else:
            print(f"solve_batch(cuda, {mode}) on {n} CuPy instances: {wall:.2f} s")
    P = int(same.sum())
    effort = f", effort {kw['effort']}" if "effort" in kw else ""
    print(f"{mode} parity (cuda vs numba{effort}: identical placements, kvpr, max_kvpr, lower_bound): {P}/{B}; "
          f"backend names: cuda={res.backend!r}")
    if P < B:
        print(f"  differing instances: {np.nonzero(~same)[0][:20].tolist()}")
    if counts and max(c["syncs"] for c in counts) > counts[0]["syncs"]:
        print(f"FAILED: host syncs per solve_batch call grow with the batch size: "
              f"{[(c['instances'], c['syncs']) for c in counts]}")
        sys.exit(1)
    return P, B, counts


def _figures(counts, **parity):
    out = {**parity, "counts": counts}
    if counts:
        out["H"] = max(c["syncs"] for c in counts)
        out["L"] = max(c["launches"] for c in counts)
    return out


def step_seed(a):
    """Seed parity through solve_batch on CuPy input; counts per call under the simulator."""
    P, Q, counts = _parity(a, "seed", seed=2026)
    _save(a, _figures(counts, P=P, Q=Q))


def step_search(a):
    """Search parity through solve_batch on CuPy input; counts per call under the simulator."""
    R, S, counts = _parity(a, "search", seed=77)
    _save(a, _figures(counts, R=R, S=S))


def step_timings(a):
    """Device timings, cuda and numba measured in one run (figures of the GPU issue's targets)."""
    import kvgpu
    from kvgpu.batch.state import batch_from_instances
    from kvgpu.generate import adrs_like, cluster

    rng = np.random.default_rng(7)
    rows = []
    for label, insts, mode in [
            (f"{a.big:,} ADRS-shaped, search", [adrs_like(rng) for _ in range(a.big)], "search"),
            ("1,000 x 64 GPUs / 160 models, search", [cluster(rng, 64, 160, 0.85) for _ in range(1000)], "search")]:
        b = batch_from_instances(insts)
        pos, kw = _args(b, np)
        warm = b.take(np.arange(64))
        for e in ("cuda", "numba"):  # compile / load first, outside the timing
            kvgpu.solve_batch(*_args(warm, np)[0], **_args(warm, np)[1], backend=e, mode=mode)
        t = {}
        for e in ("cuda", "numba"):
            t0 = time.perf_counter()
            kvgpu.solve_batch(*pos, **kw, backend=e, mode=mode)
            t[e] = time.perf_counter() - t0
        ratio = t["numba"] / t["cuda"]
        print(f"{label}: cuda {t['cuda']:.2f} s, numba {t['numba']:.2f} s end to end -> cuda {ratio:.1f}x numba")
        rows.append({"workload": label, "cuda_s": t["cuda"], "numba_s": t["numba"], "ratio": ratio})
    print("targets on an H200: 100,000 ADRS-shaped in search mode < 2 s and >= 20x numba; 64/160 >= 20x numba")
    _save(a, {"rows": rows})


def summary(a):
    """Each step's figures, then the one-line summary (last line of the check)."""
    def load(step):
        f = a.work / f"{step}.json"
        return json.loads(f.read_text()) if f.exists() else None

    seed, search = load("seed"), load("search")
    # on a device the counts come from a simulated run of the same code (counts_seed, counts_search)
    counted = [c for c in (load("counts_seed") or seed, load("counts_search") or search) if c and "H" in c]
    status = a.work / "status.txt"
    if status.exists():
        print(status.read_text().rstrip())
    for name, c in zip(("seed", "search"), (load("counts_seed") or seed, load("counts_search") or search)):
        for row in (c or {}).get("counts", []):
            print(f"{name:<6} {row['instances']:>4} instances: {row['syncs']} host syncs, {row['launches']} launches")
    fig = {"P": seed["P"] if seed else 0, "Q": seed["Q"] if seed else 0,
           "R": search["R"] if search else 0, "S": search["S"] if search else 0,
           "H": max(c["H"] for c in counted) if counted else "n/a",
           "L": max(c["L"] for c in counted) if counted else "n/a"}
    print(LAST_LINE.format(**fig))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["env", "probe", "seed", "search", "timings", "summary"])
    ap.add_argument("--work", type=Path, required=True, help="folder of the steps' JSON results")
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--instances", type=int, default=None,
                    help="instances of the parity steps (default 32 simulated, 1000 on a device)")
    ap.add_argument("--big", type=int, default=100_000, help="ADRS-shaped instances of the timing step")
    ap.add_argument("--save-as", default=None, help="write the step's JSON under this name (e.g. counts)")
    a = ap.parse_args(argv)
    if a.instances is None:
        a.instances = max(COUNT_SIZES) if a.simulate else 1000
    if a.instances < 1:
        ap.error("--instances must be at least 1")
    a.work.mkdir(parents=True, exist_ok=True)
    {"env": step_env, "probe": step_probe, "seed": step_seed, "search": step_search, "timings": step_timings,
     "summary": summary}[a.step](a)


if __name__ == "__main__":
    main()
