"""Which engines can run here, and running the seed pipeline on the chosen one.

``numpy``  the array engine (:mod:`kvgpu.batch`), always available.
``numba``  compiled CPU kernels (:mod:`kvgpu.kernels.cpu`), one instance per thread.
``cuda``   CuPy arrays + numba CUDA kernels (:mod:`kvgpu.cuda_engine`); needs the ``gpu`` extra and a
           CUDA device.
``auto``   by the size of the job (:func:`resolve`): cuda for big batches when usable, else
           numba if importable, else numpy; never raises.

The probe is cached and exception-safe: a broken optional install makes a backend
unavailable (with the reason), never breaks ``import kvgpu``.  The cuda probe goes as far as
compiling and launching a tiny numba CUDA kernel, so ``auto`` never picks a cuda that would
then fail on its first launch.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

from kvgpu.errors import BackendUnavailable

BACKENDS = ("auto", "numpy", "numba", "cuda")

#: ``auto`` sends a job to the GPU only from this much work: the sum over its instances of
#: ``n_models * n_gpus`` (what one local-search step scans).  Why this size: the numba backend
#: solves an ADRS-shaped instance (14 models x 7 GPUs, work ~100) in ~0.1-0.2 ms on one core, so
#: below ~100,000 (about 1,000 such instances) a CPU is done within the tens of milliseconds that
#: a device solve spends on fixed costs (context, compile cache, launches, copies, syncs), and
#: the batch would hold fewer instances than an H200 has thread blocks resident (132 SMs x
#: several blocks each), leaving most of it idle.  One small instance or a tiny batch so stays on
#: the CPU; re-tune with ``bench/gpu_check.sh``'s device timings.
GPU_MIN_WORK = 100_000
#: ... and from this much where the device kernels are not compiled yet on this machine
#: (:func:`kvgpu.cuda_cache.cached`): a first compile takes 1-2.5 minutes, so the job must
#: take longer than that on the CPU.  Estimated, not measured on a device: numba on 16 cores
#: solves ~100,000 ADRS-shaped instances (work ~100 each) in search mode in ~25 s, so ~150 s
#: of CPU is ~600,000 of them, work ~6e7; re-tune with ``bench/gpu_check.sh``'s timings.
GPU_COLD_MIN_WORK = 50_000_000
#: Compute capabilities with float64 at half the float32 rate (data-centre parts: P100 6.0,
#: V100 7.0, A100 8.0, H100/H200 9.0, B200 10.0).  Every other capability runs float64 at
#: 1/32 to 1/64 of that, and the kernels compute in float64 throughout, so ``auto`` never
#: picks such a device (an explicit ``backend="cuda"`` still runs there).
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def work_of(n_models, n_gpus) -> int:
    """The work estimate of a job for :func:`resolve`: ``sum(n_models * n_gpus)``.

    Parameters
    ----------
    n_models, n_gpus : int or array-like of int, shape (B,)
        Real models and GPUs of each instance (a padded batch's mask sums).

    Returns
    -------
    int
    """
    n = np.asarray(n_models, dtype=np.int64)
    g = np.asarray(n_gpus, dtype=np.int64)
    if n.shape != g.shape:
        raise ValueError(f"n_models and n_gpus must have one shape, got {n.shape} and {g.shape}")
    if (n < 0).any() or (g < 0).any():
        raise ValueError("n_models and n_gpus must not be negative")
    return int((n * g).sum())


@functools.lru_cache(maxsize=None)
def probe() -> dict[str, tuple[bool, str]]:
    """``{backend: (usable, reason)}`` for numpy, numba and cuda (cached for the process)."""
    out = {"numpy": (True, f"numpy {np.__version__}")}
    try:
        numba = importlib.import_module("numba")
        out["numba"] = (True, f"numba {numba.__version__}")
    except Exception as e:  # noqa: BLE001 -- any failure to import means "not usable"
        out["numba"] = (False, f"numba is not importable ({type(e).__name__}: {e}); pip install numba")
    out["cuda"] = _probe_cuda()
    return out


def _probe_cuda() -> tuple[bool, str]:
    """Usable only with a real device, CuPy and numba's CUDA target that compiles and launches
    a kernel; any failure says why.  Under the CUDA simulator ``numba.cuda.is_available()`` is
    True but there is no device, and without a driver CuPy imports but its calls raise, so each
    step is tried, not assumed."""
    if os.environ.get("KVGPU_DISABLE_GPU") == "1":
        return False, "disabled by KVGPU_DISABLE_GPU=1"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1: numba's CUDA simulator is for tests, not a device"
    try:
        cupy = importlib.import_module("cupy")
    except Exception as e:  # noqa: BLE001
        return False, (f"cupy is not importable ({type(e).__name__}); install the gpu extra "
                       f"(pip install -e '.[gpu]' in the kvgpu checkout)")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device"
        int(cupy.arange(3).sum())  # a context and a kernel actually work
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:  # noqa: BLE001
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, ("numba's CUDA target finds no device (install the gpu extra: pip install -e '.[gpu]' in "
                           "the kvgpu checkout)")
        importlib.import_module("kvgpu.cuda_engine")
    except Exception as e:  # noqa: BLE001
        return False, (f"numba's CUDA target is not usable ({type(e).__name__}: {e}); install the gpu extra "
                       f"(pip install -e '.[gpu]' in the kvgpu checkout)")
    try:
        _launch_probe_kernel()
    except Exception as e:  # noqa: BLE001 -- a compile (NVVM, PTX version) or launch failure
        return False, (f"numba cannot compile or launch a CUDA kernel here ({type(e).__name__}: {e}); "
                       f"check the driver and the numba / numba-cuda pair of the gpu extra")
    return True, f"{name}, cupy {cupy.__version__}"


def _launch_probe_kernel() -> None:
    """Compile and launch :func:`kvgpu.kernels.cuda_probe.fill` on the device; raises if the
    kernel does not run or returns a wrong answer."""
    from kvgpu.kernels import cuda_probe

    got = cuda_probe.run()
    if got != cuda_probe.EXPECTED:
        raise RuntimeError(f"the probe kernel returned {got}, expected {cuda_probe.EXPECTED}")


def performance_warning() -> type[Warning]:
    """The class of numba's "this launch leaves the GPU idle" warning: numba-cuda's own
    (``numba.cuda.core.errors``, not a subclass of numba's) when numba-cuda is installed, else
    the one of numba's built-in CUDA target."""
    try:
        from numba.cuda.core.errors import NumbaPerformanceWarning  # numba-cuda
    except ImportError:
        try:
            from numba.core.errors import NumbaPerformanceWarning
        except ImportError:  # pragma: no cover - numba missing: nothing would warn
            return Warning
    return NumbaPerformanceWarning


def resolve(backend: str, work: int | None = None) -> str:
    """The concrete backend for ``backend``.

    Parameters
    ----------
    backend : str
        One of :data:`BACKENDS`.
    work : int or None
        The job's work estimate (:func:`work_of`).  ``auto`` picks cuda only when it is usable and
        ``work >= GPU_MIN_WORK``; ``None`` (unknown size) keeps the old choice, cuda when usable.

    Raises :class:`BackendUnavailable` for an explicit request that cannot run here,
    ``ValueError`` for an unknown name or a negative ``work``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {BACKENDS}")
    if work is not None and (isinstance(work, bool) or not isinstance(work, (int, np.integer)) or work < 0):
        raise ValueError(f"work must be a non-negative integer (see kvgpu.backends.work_of), got {work!r}")
    avail = probe()
    if backend == "auto":
        gpu = avail["cuda"][0] and device_policy(cuda_device(), work)[0]
        return next(b for b in ("cuda", "numba", "numpy") if avail[b][0] and (b != "cuda" or gpu))
    usable, reason = avail[backend]
    if not usable:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    return backend


def for_problem(problem, opts, asked: str):
    """Solver options (:class:`kvgpu.engine.Options`) for one :class:`kvgpu.problem.Problem`:
    where the caller ``asked`` for ``"auto"``, the backend chosen for the problem's size
    (``opts`` as given otherwise)."""
    import dataclasses

    if asked != "auto":
        return opts
    # rules run in numba kernels only: such a problem is a CPU job whatever its size
    work = 0 if problem.has_rules else work_of(problem.items.n_models, problem.n_gpus)
    return dataclasses.replace(opts, backend=resolve("auto", work))


@functools.lru_cache(maxsize=None)
def cuda_device() -> tuple[str, tuple[int, int]] | None:
    """``(name, compute capability)`` of the device the cuda backend runs on, or None where that
    backend is not usable (:func:`probe`)."""
    if not probe()["cuda"][0]:
        return None
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else str(name)), (int(props["major"]), int(props["minor"]))


def device_policy(device, work: int | None, cached: bool | None = None) -> tuple[bool, str]:
    """Does ``auto`` send a job of ``work`` (:func:`work_of`; None: unknown, taken as big) to
    ``device`` (``(name, (major, minor))`` or None)?  ``(yes, why)``: only a device with
    full-rate float64 (:data:`FULL_RATE_FP64`), and only from :data:`GPU_MIN_WORK` where its
    kernels are cached (``cached``; None: :func:`kvgpu.cuda_cache.cached`), else from
    :data:`GPU_COLD_MIN_WORK`."""
    if device is None:
        return False, "no usable device"
    name, cc = device
    if tuple(cc) not in FULL_RATE_FP64:
        return False, f"{name} (sm_{cc[0]}{cc[1]}) runs float64 at a fraction of its float32 rate"
    if cached is None:
        from kvgpu import cuda_cache

        cached = cuda_cache.cached(cc)
    need = GPU_MIN_WORK if cached else GPU_COLD_MIN_WORK
    state = "kernels cached" if cached else "kernels not compiled yet ('kvgpu warmup --cuda')"
    if work is not None and work < need:
        return False, f"{state}: the device from {need:,} units of work"
    return True, f"{state}: the device from {need:,} units of work"


def solve_seed(batch, backend: str):
    """The seed pipeline on ``batch`` with a concrete backend: ``(assign (B, N), pos (B, N))``."""
    if backend == "numba":
        from kvgpu.numba_engine import solve_seed as run
    elif backend == "cuda":
        from kvgpu.cuda_engine import solve_seed as run
    else:
        from kvgpu.batch.pipeline import solve_seed as run
    return run(batch)


def lower_bound(batch, hi, backend: str):
    """The reported lower bound (:func:`kvgpu.bounds.lower_bound`) of a NumPy batch, ``hi`` (B,)
    the achieved max KVPRs: compiled (:mod:`kvgpu.kernels.bound`, the same values) for a batch
    of several instances on the numba backend, else the array code -- so the numpy backend
    never compiles anything, and one instance (a few ms of array code, 50 ms at 4,096 GPUs)
    does not compile the bound on a first run (6 CPU-seconds)."""
    if backend == "numba" and batch.shape[0] > 1:
        from kvgpu.numba_engine import lower_bound as run

        return run(batch, hi)
    from kvgpu.bounds import lower_bound as run

    return run(batch, hi)


def info() -> str:
    """A readable report of the backends (``kvgpu info``)."""
    lines = [f"{name:<6} {'yes' if ok else 'no ':<4} {why}" for name, (ok, why) in probe().items()]
    why = device_policy(cuda_device(), None)[1] if probe()["cuda"][0] else f"from {GPU_MIN_WORK:,} units of work"
    return "\n".join(["backend usable  detail"] + lines + [
        f"auto -> {resolve('auto')} ({why}, sum of models x GPUs; {resolve('auto', 0)} below)"])
