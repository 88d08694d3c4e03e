"""Choose the array namespace (NumPy or CuPy) from the arrays themselves.

Like array-api-compat's ``array_namespace``, CuPy is detected through
``sys.modules``: if CuPy was never imported, no array can be a CuPy array, so
``import kvgpu`` never pays for (or fails on) importing CuPy.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np


def get_namespace(*arrays) -> ModuleType:
    """``cupy`` if any of ``arrays`` is a ``cupy.ndarray``, else ``numpy``; mixing raises ``TypeError``."""
    cp = sys.modules.get("cupy")
    if cp is None:
        return np
    on_gpu = [isinstance(a, cp.ndarray) for a in arrays if a is not None]
    if any(on_gpu):
        if not all(on_gpu):
            raise TypeError("arrays mix NumPy and CuPy; move them to one device first")
        return cp
    return np


def device_namespace(*arrays) -> ModuleType | None:
    """CuPy when the given arrays live on a GPU, None when they are host data (NumPy arrays,
    lists, scalars; ``None`` entries are skipped).

    A device array is one with ``__cuda_array_interface__``; CuPy is then taken from
    ``sys.modules`` (whoever made a CuPy array imported it) and asked with
    ``cupy.get_array_module``, so nothing is imported here.  Raises ``TypeError`` for device
    arrays that are not CuPy's (wrap them with ``cupy.asarray``, which does not copy) and for a
    mix of host and device arrays."""
    given = [a for a in arrays if a is not None]
    dev = [hasattr(a, "__cuda_array_interface__") for a in given]
    if not any(dev):
        return None
    cp = sys.modules.get("cupy")
    if cp is None or not all(cp.get_array_module(a) is cp for a, d in zip(given, dev) if d):
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a, d in zip(given, dev) if d})
        raise TypeError(f"device arrays must be CuPy arrays, got {', '.join(kinds)}; wrap them with cupy.asarray(x), "
                        f"which does not copy")
    if not all(dev):
        raise TypeError("some arrays are on the GPU (CuPy) and some on the host: pass sizes, demand, gpu_mem and the "
                        "masks all as CuPy arrays or all as NumPy arrays")
    return cp
