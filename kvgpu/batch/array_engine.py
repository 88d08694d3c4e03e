"""The array engine a batch solve runs on: the array namespace and the compiled steps, as one
immutable value passed through the batch functions (as scikit-learn passes ``xp``).

Two steps of the batch engine can be handed to compiled kernels: ``transfers``, the move / swap /
donation scans of a local-search step (:meth:`kvgpu.batch.local.LaneState.eval_transfers`), and
``choose``, the per-step GPU choice of the candidate packs (:func:`kvgpu.batch.pack._choose`).
``None`` runs the engine's own array expressions; a caller may pass functions that take the same
arguments and return the same values (the tests pass spies).  The ``cuda`` backend does not run
this engine: it runs whole solves in the kernels of :mod:`kvgpu.kernels.device`.

The engine is chosen once per solve and handed down, never stored in a module: two threads
solving at once on different engines do not see each other's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ArrayEngine:
    """Where and how the batch engine computes.

    Parameters
    ----------
    xp : module
        The array namespace of the batch (``numpy``, or ``cupy`` for a batch on a GPU).
    transfers : callable or None
        ``transfers(xp, S, W, M, sizes, demand, lanes, t3, src, dst, a, b) -> (new (L', ...)
        float64, fits (L', ...) bool)``, the contract of
        :meth:`kvgpu.batch.local.LaneState.eval_transfers`; None: the array code.
    choose : callable or None
        ``choose(xp, St, Wt, loadt, kvt, Mt, M_total, n_gpus, T, policy, nmf, k, s, w) -> (g (L,)
        int64, any fits (L,) bool)``, the contract of :func:`kvgpu.batch.pack._choose`; None: the
        array code.
    """

    xp: ModuleType = np
    transfers: Callable | None = None
    choose: Callable | None = None

    def __post_init__(self):
        for name in ("transfers", "choose"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"ArrayEngine.{name} must be a function or None, got {type(fn).__name__}")


#: The plain NumPy engine (every step in array code).
NUMPY = ArrayEngine(np)


def engine_for(batch, engine: ArrayEngine | None) -> ArrayEngine:
    """``engine``, or the plain array engine of the batch's namespace when None; refuses an
    engine whose namespace is not the batch's (a NumPy batch cannot run on CuPy kernels)."""
    xp = batch.xp
    if engine is None:
        return NUMPY if xp is np else ArrayEngine(xp)
    if not isinstance(engine, ArrayEngine):
        raise TypeError(f"engine must be a kvgpu.batch.array_engine.ArrayEngine, got {type(engine).__name__}")
    if engine.xp is not xp:
        raise TypeError(f"the engine computes with {engine.xp.__name__} but the batch holds "
                        f"{xp.__name__} arrays; move the batch first")
    return engine
