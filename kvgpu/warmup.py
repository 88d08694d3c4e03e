"""Compiling the numba kernels: ahead of time (``kvgpu warmup``), or on a first run, saying so.

numba compiles kvgpu's kernels on first use and caches them on disk, so later processes load
them in well under a second.  The first compile takes a while, so:

* the kernels come in groups (:data:`GROUPS`), and a call compiles only the groups it uses
  (:func:`ensure`): the seed pipeline, the search, the exact search, the start under rules,
  and the parallel batch kernels -- a single instance never needs the batch kernels;
* before compiling, one line on stderr says so and how long it takes;
* groups that are not cached yet compile side by side in child processes, one per CPU core
  (they share nothing until the cache), which on two cores halves the wait;
* a stamp per group (:func:`_stamp`) remembers that a group is cached for this kvgpu, numba,
  Python and CPU, so a warm call costs one file check per group.  A stale stamp costs nothing
  worse than numba compiling on first use, as it would anyway.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

#: Compile groups: (what it is for, about how many seconds it takes cold on 2 cores).
GROUPS = {
    "seed": ("the seed pipeline for one instance", 24),
    "search": ("search beyond the seed for one instance", 24),
    "exact": ("exact search and proofs", 13),
    "start": ("first placements under rules and budgets", 11),
    "batch": ("the parallel batch kernels (many instances at once)", 40),
}


def _example():
    import numpy as np

    from kvgpu.kernels import rules

    s, w, M = np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 3.0]), np.array([80.0, 80.0])
    return s, w, M, np.array([0, 1, 1], np.int64), np.arange(3, dtype=np.int64), rules.no_rules()


def _compile(group: str) -> None:
    """Compile (or load) the kernels of ``group`` with the argument types the engine uses."""
    import numpy as np

    s, w, M, a, p, rules = _example()
    if group == "seed":
        from kvgpu.kernels import cpu

        cpu.seed_instance(s, w, M, a, p)
    elif group == "search":
        from kvgpu.kernels import search

        search.improve_instance(s, w, M, 0.01, a, p, 1, 1, 0, rules)
    elif group == "exact":
        from kvgpu.kernels import exact

        exact.certify_instance(s, w, M, 0.01, a, p, 100, rules, np.empty(0, np.int64))
        exact.feasible(s, np.zeros(3), M, np.inf, 100, a.copy(), rules, np.empty(0, np.int64))
    elif group == "start":
        from kvgpu.kernels import start

        start.solve_start(s, w, M, rules, 0, a, p)
    elif group == "batch":
        from kvgpu.kernels import cpu, exact, search

        B = lambda x: np.ascontiguousarray(x[None])  # noqa: E731
        n, G = np.array([3]), np.array([2])
        cpu.seed_batch(B(s), B(w), B(M), n, G, B(a), B(p), np.zeros(1, np.bool_))
        search.improve_batch(B(s), B(w), B(M), n, G, np.array([0.01]), 1, 1, 0, B(a), B(p))
        exact.certify_batch(B(s), B(w), B(M), n, G, np.array([0.01]), 100, B(a), B(p), np.zeros(1, np.int64))
        exact.pack_memory_batch(B(s), B(M), n, G, 100, B(a), B(p), np.zeros(1, np.int64))
    else:
        raise ValueError(f"unknown kernel group {group!r}; choose from {sorted(GROUPS)}")


@functools.lru_cache(maxsize=None)
def _key() -> str:
    """What the numba cache depends on: the kernels' source, kvgpu, numba, Python, the CPU."""
    import numba

    import kvgpu

    h = hashlib.sha256()
    for f in sorted((Path(__file__).parent / "kernels").glob("*.py")):
        h.update(f.read_bytes())
    try:
        from llvmlite import binding

        cpu = binding.get_host_cpu_name()
    except Exception:  # noqa: BLE001 -- only a part of the key
        cpu = platform.machine()
    h.update(f"{kvgpu.__version__} {numba.__version__} {sys.version} {cpu}".encode())
    return h.hexdigest()[:16]


def _stamp_dir() -> Path:
    """Where numba caches the kernels (beside them, or numba's user cache if read-only)."""
    custom = os.environ.get("NUMBA_CACHE_DIR")
    here = Path(__file__).parent / "kernels" / "__pycache__"
    if custom:
        return Path(custom)
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    return Path.home() / ".cache" / "kvgpu"


def _stamp(group: str) -> Path:
    return _stamp_dir() / f"kvgpu-warm-{group}-{_key()}"


def cached(group: str) -> bool:
    """Has ``group`` been compiled and cached for this kvgpu, numba, Python and CPU?"""
    return _stamp(group).exists()


def _mark(group: str) -> None:
    try:
        p = _stamp(group)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    except OSError:
        pass  # a read-only place: the next run says "compiling" again and loads from numba's cache


def _jit_disabled() -> bool:
    from numba.core import config

    return bool(config.DISABLE_JIT)


_FIRST_RUN = ", first run only, about {est} s ('kvgpu warmup' does it ahead of time)"


def ensure(groups, announce: bool | str = True, jobs: int | None = None) -> list[str]:
    """Make sure the kernel ``groups`` are compiled; returns those that had to be.  Cold groups
    compile side by side in child processes (at most ``jobs``, default the CPU count), after one
    line on stderr (``announce``); warm ones cost a file check each."""
    cold = [g for g in dict.fromkeys(groups) if not cached(g)]
    if not cold or _jit_disabled():
        return []
    jobs = max(1, min(len(cold), jobs or os.cpu_count() or 1))
    est = _estimate(cold, jobs)
    if announce:
        tail = announce if isinstance(announce, str) else _FIRST_RUN
        print(f"kvgpu: compiling kernels ({', '.join(cold)}){tail.format(est=est)}", file=sys.stderr, flush=True)
    if jobs == 1 or len(cold) == 1:
        for g in cold:
            _compile(g)
            _mark(g)
        return cold
    procs = {g: subprocess.Popen([sys.executable, "-c", f"from kvgpu.warmup import _child; _child({g!r})"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for g in cold}
    for g, proc in procs.items():
        if proc.wait() != 0:  # compile here instead, where an error is raised as usual
            _compile(g)
            _mark(g)
    return cold


def _child(group: str) -> None:
    _compile(group)
    _mark(group)


def _estimate(groups, jobs: int) -> int:
    """Seconds: the groups spread over ``jobs`` processes, longest first."""
    load = [0.0] * jobs
    for g in sorted(groups, key=lambda g: -GROUPS[g][1]):
        load[load.index(min(load))] += GROUPS[g][1]
    return int(round(max(load) / 5.0)) * 5 or 5


def warmup(groups=None, jobs: int | None = None, announce: bool = False) -> dict:
    """Compile the numba kernels ahead of time (all groups by default), so that no later call
    waits for the compiler.  Returns ``{group: seconds}`` (0 for groups already cached)."""
    groups = list(GROUPS) if groups is None else list(groups)
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown kernel group {g!r}; choose from {sorted(GROUPS)}")
    t0 = time.perf_counter()
    done = ensure(groups, announce=", about {est} s, once for this kvgpu, numba and CPU" if announce else False,
                  jobs=jobs)
    spent = time.perf_counter() - t0
    return {g: (round(spent, 1) if g in done else 0.0) for g in groups}
