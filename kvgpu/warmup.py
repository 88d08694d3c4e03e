"""Compiling the numba kernels: ahead of time (``kvgpu warmup``), or on a first run, saying so.

numba compiles kvgpu's kernels on first use and caches them on disk, so later processes load
them in well under a second.  The first compile takes a while, so:

* the kernels come in groups (:data:`GROUPS`), and a call compiles only the groups it uses
  (:func:`ensure`): the seed pipeline, the search, the exact search, the start under rules,
  and the parallel batch kernels -- a single instance never needs the batch kernels;
* before compiling, one line on stderr says so and how long it takes;
* a group is made of compile units (:data:`UNITS`) that other groups share; the cold units
  are handed out to one process per CPU core (:func:`plan`), each unit once its callees are
  cached by another process, so the big kernels compile once and two cores share the wait;
* a stamp per unit (:func:`_stamp`) remembers that it is cached for this kvgpu, numba,
  Python and CPU, so a warm call costs a few file checks.  A stale stamp costs nothing worse
  than numba compiling on first use, as it would anyway.
"""

from __future__ import annotations

import functools
import math
import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

#: Compile groups: what each is for, and the compile units it needs.
GROUPS = {
    "seed": ("the seed pipeline for one instance", ("core", "candidates", "seed")),
    "search": ("search beyond the seed for one instance", ("core", "repair", "polish", "search")),
    "exact": ("exact search and proofs", ("core", "polish", "exact")),
    "start": ("first placements under rules and budgets", ("core", "repair", "start")),
    "batch": ("the parallel batch kernels (many instances at once)",
              ("core", "candidates", "seed", "bound", "repair", "polish", "search", "exact", "batch_seed",
               "batch_bound", "batch_search", "batch_exact")),
    "fleet": ("the repair between the groups of a decomposed cluster", ("core", "repair", "fleet")),
    # what a batch of several instances adds to a group (``batch_of``): only the kernels it runs
    "seed_batch": ("the seed pipeline, many instances at once", ("core", "candidates", "seed", "batch_seed")),
    "bound_batch": ("the lower bound, many instances at once", ("bound", "batch_bound")),
    "search_batch": ("search, many instances at once", ("core", "repair", "polish", "search", "batch_search")),
    "exact_batch": ("proofs, many instances at once", ("core", "polish", "exact", "batch_exact")),
}


def batch_of(groups) -> list[str]:
    """The groups a batch of several instances needs beyond the single-instance ``groups``
    (seed, search, exact): their parallel batch kernels, so that a batch compiles only what it
    runs."""
    return [f"{g}_batch" for g in groups if f"{g}_batch" in GROUPS]

#: Compile units, in the order they are handed out: (units whose kernels it calls, about how
#: many seconds it takes cold on this project's 2-core reference machine).  A unit compiles
#: its callees too, unless another process has cached them first -- which is what the order
#: and :func:`plan` arrange; a unit started early only compiles something twice.
UNITS = {
    "core": ((), 14),            # improve_local, refine_peak, the score: under every mode
    "repair": ((), 6),          # the bin-packing repair at a target
    "polish": ((), 8),          # the second-largest KVPR's polish (rows walked by thread 0, filled by the block)
    "candidates": ((), 11),     # the seed's candidate packings
    "seed": (("core", "candidates"), 6),
    "bound": ((), 4),           # the reported lower bound (kvgpu.kernels.bound)
    "search": (("core", "repair", "polish"), 10),
    "exact": (("core", "polish"), 9),
    "start": (("core", "repair"), 6),
    # the parallel batch kernels, one unit each so that the processes share them
    "batch_seed": (("seed",), 13),
    "batch_bound": (("bound",), 3),
    "batch_search": (("search",), 15),
    "batch_exact": (("exact",), 12),
    "fleet": (("repair",), 5),
}

#: Seconds a process spends on its first compile before any unit's own work (numba and LLVM
#: starting, the rule bookkeeping every unit calls).
PROCESS_START = 4


def _example():
    import numpy as np

    from kvgpu.kernels import rules

    s, w, M = np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 3.0]), np.array([80.0, 80.0])
    return s, w, M, np.array([0, 1, 1], np.int64), np.arange(3, dtype=np.int64), rules.no_rules()


def _compile(unit: str) -> None:
    """Compile (or load) the kernels of ``unit`` with the argument types the engine uses."""
    import numpy as np

    from kvgpu.kernels import rules as r

    s, w, M, a, p, rules = _example()
    rstate = r.new_state(rules, a, M.shape[0])
    if unit == "core":
        from kvgpu.kernels import cpu

        cpu.improve_local(s, w, M, a.copy(), p.copy(), 1, rules, rstate)
        cpu.refine_peak(s, w, M, a.copy(), p.copy(), 1, 1, rules, rstate)
        cpu.score_of(s, w, M, a, p, np.empty(3))
    elif unit == "repair":
        from kvgpu.kernels import search

        search.repair(s, w, M, a.copy(), p.copy(), 1.0, 1, np.ones(1, np.uint64), search.new_scratch(3, 2),
                      rules, rstate)
    elif unit == "polish":
        from kvgpu.kernels import search

        search.polish_second(s, w, M, a.copy(), p.copy(), 1, rules, rstate)
    elif unit == "candidates":
        from kvgpu.kernels import cpu

        P = cpu.mem_prefix(M)
        orders = cpu.model_orders(s, w, P)
        cpu.search_T(s, w, M, P, orders)
        cpu.pack(s, w, M, P, orders, 1.0, np.int64(0), np.int64(0), np.int64(0), a.copy(), p.copy())
        cpu.regret_insertion(s, w, M, a.copy(), p.copy())
    elif unit == "seed":
        from kvgpu.kernels import cpu

        cpu.seed_instance(s, w, M, a.copy(), p.copy())
    elif unit == "bound":
        from kvgpu.kernels import bound

        bound.instance_bound(s, w, np.ones(3, np.bool_), M, np.ones(2, np.bool_), 1.0)
    elif unit == "search":
        from kvgpu.kernels import search

        search.improve_instance(s, w, M, 0.01, a.copy(), p.copy(), 1, 1, 0, rules)
    elif unit == "exact":
        from kvgpu.kernels import exact

        exact.certify_instance(s, w, M, 0.01, a.copy(), p.copy(), 100, rules, np.empty(0, np.int64))
        exact.feasible(s, np.zeros(3), M, np.inf, 100, a.copy(), rules, np.empty(0, np.int64))
    elif unit == "start":
        from kvgpu.kernels import start

        start.solve_start(s, w, M, rules, 0, a.copy(), p.copy())
    elif unit == "fleet":
        from kvgpu.kernels import fleet

        B = lambda x: np.ascontiguousarray(x[None])  # noqa: E731
        fleet.repair_batch(B(s), B(w), B(M), np.array([3]), np.array([2]), np.array([1.0]), 1, np.zeros(1, np.int64),
                           B(a), B(p), np.zeros(1, np.bool_))
    elif unit.startswith("batch_"):
        from kvgpu.kernels import bound, cpu, exact, search

        B = lambda x: np.ascontiguousarray(x[None])  # noqa: E731
        n, G = np.array([3]), np.array([2])
        if unit == "batch_seed":
            cpu.seed_batch(B(s), B(w), B(M), n, G, B(a), B(p), np.zeros(1, np.bool_))
        elif unit == "batch_bound":
            bound.lower_bound_batch(B(s), B(w), np.ones((1, 3), np.bool_), B(M), np.ones((1, 2), np.bool_),
                                    np.ones(1), np.empty(1))
        elif unit == "batch_search":
            search.improve_batch(B(s), B(w), B(M), n, G, np.array([0.01]), 1, 1, 0, B(a), B(p))
        elif unit == "batch_exact":
            exact.certify_batch(B(s), B(w), B(M), n, G, np.array([0.01]), np.array([100]), B(a), B(p),
                               np.zeros(1, np.int64))
            exact.pack_memory_batch(B(s), B(M), n, G, 100, B(a), B(p), np.zeros(1, np.int64))
        else:
            raise ValueError(f"unknown compile unit {unit!r}; choose from {sorted(UNITS)}")
    else:
        raise ValueError(f"unknown compile unit {unit!r}; choose from {sorted(UNITS)}")


def plan(units, jobs: int) -> tuple[list[list[str]], float]:
    """Hand ``units`` out to ``jobs`` processes (list scheduling): each time, the unit and process
    that can start first -- once the units it calls are done (:func:`_child` waits for them) --
    ties going to :data:`UNITS` order, then to the process that compiled one of its callees
    (they are in its memory).  Returns the unit list of each process and the estimated seconds
    until all are done."""
    left = [u for u in UNITS if u in set(units)]
    lanes = [[] for _ in range(max(1, jobs))]
    free = [float(PROCESS_START)] * len(lanes)
    done: dict[str, float] = {}
    while left:
        picks = []
        for i, u in enumerate(left):
            deps = UNITS[u][0]
            if any(d in left for d in deps):
                continue
            ready = max([0.0] + [done.get(d, 0.0) for d in deps])
            for k in range(len(lanes)):
                holds = any(d in lanes[k] for d in deps)
                picks.append((max(free[k], ready), i, not holds, k, u))
        start, _, _, k, u = min(picks)
        left.remove(u)
        lanes[k].append(u)
        free[k] = done[u] = start + UNITS[u][1]
    return [lane for lane in lanes if lane], max(free)


@functools.lru_cache(maxsize=None)
def _key() -> str:
    """What the numba cache depends on: the kernels' source, kvgpu, numba, Python, the CPU."""
    import numba

    import kvgpu

    from kvgpu.kernels.jit import SOURCES_KEY

    h = hashlib.sha256(SOURCES_KEY.encode())
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


def _stamp(unit: str) -> Path:
    return _stamp_dir() / f"kvgpu-warm-{unit}-{_key()}"


def cached(group: str) -> bool:
    """Has ``group`` been compiled and cached for this kvgpu, numba, Python and CPU?"""
    return all(_stamp(u).exists() for u in GROUPS[group][1])


def _mark(unit: str) -> None:
    try:
        p = _stamp(unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    except OSError:
        pass  # a read-only place: the next run says "compiling" again and loads from numba's cache


def _jit_disabled() -> bool:
    from numba.core import config

    return bool(config.DISABLE_JIT)


_FIRST_RUN = ", first run only, about {est} s ('kvgpu warmup' does it ahead of time)"


def ensure(groups, announce: bool | str = True, jobs: int | None = None) -> list[str]:
    """Make sure the kernel ``groups`` are compiled; returns those that had to be.  Their cold
    units compile side by side in child processes (at most ``jobs``, default the CPU count;
    :func:`plan`), after one line on stderr (``announce``); warm ones cost a file check each."""
    cold = [g for g in dict.fromkeys(groups) if not cached(g)]
    if not cold or _jit_disabled():
        return []
    units = [u for g in cold for u in GROUPS[g][1] if not _stamp(u).exists()]
    lanes, est = plan(units, jobs or os.cpu_count() or 1)
    if announce:
        tail = announce if isinstance(announce, str) else _FIRST_RUN
        est = 5 * math.ceil(est / 5.0)  # whole 5 s, rounded up: the run itself comes after
        print(f"kvgpu: compiling kernels ({', '.join(cold)}){tail.format(est=est)}", file=sys.stderr, flush=True)
    procs = [(lane, subprocess.Popen([sys.executable, "-c", f"from kvgpu.warmup import _child; _child({lane!r})"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for lane in lanes[1:]]
    _child(lanes[0])  # this process takes a share too: it has kvgpu imported already
    for lane, proc in procs:
        if proc.wait() != 0:  # compile here instead, where an error is raised as usual
            _child(lane)
    return cold


def _child(units) -> None:
    """Compile ``units`` in order, each once the units it calls are cached (by another process
    of :func:`ensure`) -- or, should that process fail, after a while by itself."""
    try:  # stamps that cannot be written would never appear: then nothing is waited for
        _stamp_dir().mkdir(parents=True, exist_ok=True)
        stamps = os.access(_stamp_dir(), os.W_OK)
    except OSError:
        stamps = False
    for u in units:
        deadline = time.monotonic() + 60 + 2 * sum(UNITS[d][1] for d in UNITS[u][0])
        while stamps and not all(_stamp(d).exists() for d in UNITS[u][0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        _compile(u)
        _mark(u)


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


def warmup_cuda(announce: bool = False) -> float:
    """Compile the ``cuda`` backend's kernels for this machine's device ahead of time (or find
    them cached: :mod:`kvgpu.cuda_cache`); returns the seconds spent compiling (0 if cached).
    Raises :class:`kvgpu.errors.BackendUnavailable` where the cuda backend cannot run."""
    from kvgpu import backends

    backends.resolve("cuda")  # raises, with the reason, where there is no usable device
    from numba import cuda

    from kvgpu.kernels import device

    t0 = time.perf_counter()
    compiled = device.prepare(cuda.get_current_device().compute_capability, announce=announce)
    return round(time.perf_counter() - t0, 1) if compiled else 0.0

