"""Which engines can run here, and running the seed pipeline on the chosen one.

``numpy``  the array engine (:mod:`kvgpu.batch`), always available.
``numba``  compiled CPU kernels (:mod:`kvgpu.kernels.cpu`), one instance per thread.
``cuda``   CuPy arrays + numba CUDA kernels: not part of this version yet.
``auto``   cuda if usable, else numba if importable, else numpy; never raises.

The probe is cached and exception-safe: a broken optional install makes a backend
unavailable (with the reason), never breaks ``import kvgpu``.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

BACKENDS = ("auto", "numpy", "numba", "cuda")


class BackendUnavailable(ValueError):
    """The requested backend cannot run on this machine; the message says what is missing."""


@functools.lru_cache(maxsize=None)
def probe() -> dict[str, tuple[bool, str]]:
    """``{backend: (usable, reason)}`` for numpy, numba and cuda (cached for the process)."""
    out = {"numpy": (True, f"numpy {np.__version__}")}
    try:
        numba = importlib.import_module("numba")
        out["numba"] = (True, f"numba {numba.__version__}")
    except Exception as e:  # noqa: BLE001 -- any failure to import means "not usable"
        out["numba"] = (False, f"numba is not importable ({type(e).__name__}: {e}); pip install numba")
    if os.environ.get("KVGPU_DISABLE_GPU") == "1":
        out["cuda"] = (False, "disabled by KVGPU_DISABLE_GPU=1")
    else:
        out["cuda"] = (False, "the CUDA backend (CuPy + numba CUDA kernels) is not implemented in this version")
    return out


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
    else:
        from kvgpu.batch.pipeline import solve_seed as run
    return run(batch)


def info() -> str:
    """A readable report of the backends (``kvgpu info``)."""
    lines = [f"{name:<6} {'yes' if ok else 'no ':<4} {why}" for name, (ok, why) in probe().items()]
    return "\n".join(["backend usable  detail"] + lines + [f"auto -> {resolve('auto')}"])
