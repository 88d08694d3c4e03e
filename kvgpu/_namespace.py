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
