"""Which engines can run here, and running the seed pipeline on the chosen one.

``numpy``  the array engine (:mod:`kvgpu.batch`), always available.
``numba``  compiled CPU kernels (:mod:`kvgpu.kernels.cpu`), one instance per thread.
``cuda``   CuPy arrays + numba CUDA kernels (:mod:`kvgpu.cuda_engine`); needs the ``gpu`` extra and a
           CUDA device.
``auto``   cuda if usable, else numba if importable, else numpy; never raises.

The probe is cached and exception-safe: a broken optional install makes a backend
unavailable (with the reason), never breaks ``import kvgpu``.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

from kvgpu.errors import BackendUnavailable

BACKENDS = ("auto", "numpy", "numba", "cuda")


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
    """Usable only with a real device, CuPy and numba's CUDA target; any failure says why.
    Under the CUDA simulator ``numba.cuda.is_available()`` is True but there is no device, and
    without a driver CuPy imports but its calls raise, so each step is tried, not assumed."""
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
        importlib.import_module("kvgpu.kernels.gpu")
    except Exception as e:  # noqa: BLE001
        return False, (f"numba's CUDA target is not usable ({type(e).__name__}: {e}); install the gpu extra "
                       f"(pip install -e '.[gpu]' in the kvgpu checkout)")
    return True, f"{name}, cupy {cupy.__version__}"


def resolve(backend: str) -> str:
    """The concrete backend for ``backend``; raises :class:`BackendUnavailable` for an explicit
    request that cannot run here, ``ValueError`` for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {BACKENDS}")
    avail = probe()
    if backend == "auto":
        return next(b for b in ("cuda", "numba", "numpy") if avail[b][0])
    usable, reason = avail[backend]
    if not usable:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    return backend


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
    the achieved max KVPRs: compiled (:mod:`kvgpu.kernels.bound`, the same values) when the
    numba backend runs, else the array code, so the numpy backend never compiles anything."""
    if backend == "numba":
        from kvgpu.numba_engine import lower_bound as run

        return run(batch, hi)
    from kvgpu.bounds import lower_bound as run

    return run(batch, hi)


def info() -> str:
    """A readable report of the backends (``kvgpu info``)."""
    lines = [f"{name:<6} {'yes' if ok else 'no ':<4} {why}" for name, (ok, why) in probe().items()]
    return "\n".join(["backend usable  detail"] + lines + [f"auto -> {resolve('auto')}"])
