"""The ``cuda`` backend: the whole solve of every instance in numba CUDA kernels, one thread
block per instance (:mod:`kvgpu.kernels.device`).

The batch is compacted on the host (real models and GPUs first, as for the numba backend),
copied to the device once, solved there in one launch per stage -- the seed pipeline
(:func:`solve_seed`), the search (:func:`improve`) -- and the placements come back once.  The
kernels are the numba CPU backend's own source compiled for the device, so both give the same
placements for the same seed.  CuPy holds the arrays on a device; under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, no device) NumPy arrays are used, which is how the tests run it.
The optimality proof (``exact_work``) stays on the CPU (:mod:`kvgpu.numba_engine`).
"""

from __future__ import annotations

import numpy as np
from numba.core import config

from kvgpu.batch.state import Batch
from kvgpu.errors import NoPlacementFound
from kvgpu.numba_engine import compact_placement, compacted, expand


def array_module():
    """CuPy on a device; NumPy under the CUDA simulator."""
    if config.ENABLE_CUDASIM:
        return np
    import cupy

    return cupy


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def to_device(batch: Batch) -> Batch:
    """``batch`` with its arrays on the device (:func:`array_module`)."""
    xp = array_module()
    return Batch(*(xp.asarray(x) for x in (batch.sizes, batch.demand, batch.model_mask, batch.gpu_mem,
                                            batch.gpu_mask)))


def _on_host(batch: Batch) -> Batch:
    """``batch`` with NumPy arrays (copied from the device where they are CuPy's)."""
    return Batch(*(_host(x) for x in (batch.sizes, batch.demand, batch.model_mask, batch.gpu_mem, batch.gpu_mask)))


def _device_arrays(host: Batch):
    """``(device arrays for the kernels, model_perm, gpu_perm)`` of a host batch: compacted on the
    host (:func:`kvgpu.numba_engine.compacted`), copied to the device once."""
    arrays, pm, pg = compacted(host)
    xp = array_module()
    return tuple(xp.ascontiguousarray(xp.asarray(x)) for x in arrays), pm, pg


def solve_seed(batch: Batch):
    """Same contract as :func:`kvgpu.numba_engine.solve_seed`: ``(assign, pos)`` (B, N) NumPy
    arrays in the batch's slots; raises :class:`kvgpu.NoPlacementFound` naming the instances no
    candidate packs.  ``batch`` may hold NumPy or CuPy arrays."""
    from kvgpu.kernels import device

    host = _on_host(batch)
    arrays, pm, pg = _device_arrays(host)
    a, p, ok = device.seed(array_module(), *arrays)
    a, p, ok = _host(a), _host(p), _host(ok)
    if not ok.all():
        bad = np.nonzero(~ok)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}", bad)
    return expand(host, a, p, pm, pg)


def improve(batch: Batch, assign, pos, lb, effort: int, patience: int, seed: int, exact_work: int = 0):
    """Same contract as :func:`kvgpu.numba_engine.improve`: ``effort`` search rounds per
    instance on the device from ``assign``/``pos`` (B, N), then the proof (``exact_work > 0``)
    on the CPU.  Returns ``(assign, pos, lb)`` as NumPy arrays."""
    from kvgpu import numba_engine
    from kvgpu.kernels import device

    host = _on_host(batch)
    assign, pos = _host(assign), _host(pos)
    lo = np.array(_host(lb), dtype=float)
    if effort > 0 and host.shape[0]:
        xp = array_module()
        arrays, pm, pg = _device_arrays(host)
        a, p = compact_placement(host, assign, pos, pm, pg)
        a, p = xp.asarray(a), xp.asarray(p)
        device.improve(xp, *arrays, xp.asarray(lo), int(effort), int(patience), int(seed), a, p)
        assign, pos = expand(host, _host(a), _host(p), pm, pg)
    if exact_work > 0:
        assign, pos, lo = numba_engine.improve(host, assign, pos, lo, 0, patience, seed, exact_work)
    return assign, pos, lo
