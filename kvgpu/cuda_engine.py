"""The ``cuda`` backend: the whole solve of every instance in numba CUDA kernels, one thread
block per instance (:mod:`kvgpu.kernels.device`).

A batch is compacted on the host (real models and GPUs first, as for the numba backend) and
copied to the device once (:class:`DeviceBatch`); there the seed pipeline, the reported figures
(per-GPU KVPR, max KVPR, lower bound), the search and the figures again run in one launch each,
and the results come back once.  The host looks at the device only for the seed's ``ok`` flags
(instances the seed cannot pack go to the CPU's exact packing) and for the results: a fixed
number of synchronisations per solve, whatever the batch size, mode or effort.  The kernels are
the numba CPU backend's own source compiled for the device, and the figures are computed in the
order the CPU engine computes them, so both give the same placements and the same figures, bit
for bit, for the same seed.  CuPy holds the arrays on a device; under the CUDA simulator
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


class DeviceBatch:
    """A batch's compacted copy on the device and the state of its solve there.

    Parameters
    ----------
    host : Batch
        The batch, NumPy arrays in its own padded slots (``B`` instances, ``N`` model and ``G``
        GPU slots).  Compacted (:func:`kvgpu.numba_engine.compacted`: ``N'``, ``G'`` real slots
        at most) and copied to the device here, once.

    Attributes (device arrays of :func:`array_module`, compact ids): ``assign``, ``pos`` (B, N')
    int64 the placement (after :meth:`seed` or :meth:`place`); ``kv`` (B, G') float64 per-GPU
    KVPR, ``m``, ``lo``, ``lb`` (B,) float64 max KVPR, lower bound before the last search, and
    the reported bound ``min(lo, m)``, NaN until :meth:`finish` fills an instance's; ``active``
    (B,) uint8 the instances with a placement that the kernels work on.
    """

    def __init__(self, host: Batch):
        if not config.ENABLE_CUDASIM:  # a process's first device solve: the kernels, cached or compiled (once)
            from numba import cuda

            from kvgpu.kernels import device

            device.prepare(cuda.get_current_device().compute_capability)
        self.host = host
        arrays, self.pm, self.pg = compacted(host)
        self.xp = xp = array_module()
        self.arrays = tuple(xp.ascontiguousarray(xp.asarray(x)) for x in arrays)
        B, N = arrays[0].shape
        G = arrays[2].shape[1]
        self.assign = xp.full((B, N), -1, xp.int64)
        self.pos = xp.full((B, N), -1, xp.int64)
        self.kv = xp.full((B, G), np.nan)
        self.m, self.lo, self.lb = (xp.full(B, np.nan) for _ in range(3))
        self.active = xp.ones(B, xp.uint8)

    def seed(self) -> np.ndarray:
        """The seed pipeline of every instance, one launch; returns (B,) bool (NumPy), which
        instances it packed -- the one look the host takes before the results."""
        from kvgpu.kernels import device

        self.assign, self.pos, ok = device.seed(self.xp, *self.arrays)
        return _host(ok)

    def place(self, rows: np.ndarray, assign: np.ndarray, pos: np.ndarray) -> None:
        """Put placements made elsewhere (the CPU) on the device: instances ``rows`` (k,) int64,
        ``assign``/``pos`` (k, N) int64 in the batch's slots (-1 for padding)."""
        if not rows.size:
            return
        pm = None if self.pm is None else self.pm[rows]
        pg = None if self.pg is None else self.pg[rows]
        a, p = compact_placement(self.host.take(rows), assign, pos, pm, pg)
        width = self.assign.shape[1]
        full_a, full_p = np.full((rows.size, width), -1, np.int64), np.full((rows.size, width), -1, np.int64)
        full_a[:, :a.shape[1]], full_p[:, :p.shape[1]] = a, p
        idx = self.xp.asarray(rows)
        self.assign[idx] = self.xp.asarray(full_a)
        self.pos[idx] = self.xp.asarray(full_p)

    def set_active(self, active: np.ndarray) -> None:
        """The instances the next kernels work on: ``active`` (B,) bool (NumPy)."""
        self.active = self.xp.asarray(active.astype(np.uint8))

    def finish(self, with_bound: bool) -> None:
        """The reported figures of the active instances, one launch
        (:func:`kvgpu.kernels.device.finish`): with ``with_bound`` the lower bound below the max
        KVPR (after the start), else the bound before kept (after a search)."""
        from kvgpu.kernels import device

        device.finish(self.xp, *self.arrays, self.active, self.assign, self.pos, with_bound, self.kv, self.m,
                      self.lo, self.lb)

    def improve(self, effort: int, patience: int, seed: int, lb=None) -> None:
        """``effort`` search rounds of the active instances from their placements, one launch;
        ``lb`` (B,) float64 the lower bounds the search stops at (default: :attr:`lo`)."""
        from kvgpu.kernels import device

        lb = self.lo if lb is None else lb
        device.improve(self.xp, *self.arrays, lb, int(effort), int(patience), int(seed), self.assign, self.pos,
                       active=self.active)

    def placement(self):
        """``(assign, pos)`` (B, N) int64 NumPy arrays in the batch's slots: one copy back."""
        ap = _host(self.xp.stack([self.assign, self.pos]))
        return expand(self.host, ap[0], ap[1], self.pm, self.pg)

    def results(self):
        """``(assign, pos (B, N) int64, kv (B, G), m, lo, lb (B,) float64)``, NumPy arrays in the
        batch's slots (KVPR NaN on padded GPUs, figures NaN for inactive instances): two copies
        back, the integers and the floats."""
        xp = self.xp
        assign, pos = self.placement()
        figs = _host(xp.concatenate([self.kv, xp.stack([self.m, self.lo, self.lb], axis=1)], axis=1))
        G = self.kv.shape[1]
        kv = np.full(self.host.gpu_mem.shape, np.nan)
        if self.pg is None:  # front-packed: compact GPU ids are the batch's own
            kv[:, :G] = figs[:, :G]
        else:  # a compact GPU beyond an instance's own is one of its padded slots: NaN there
            np.put_along_axis(kv, self.pg, figs[:, :G], axis=1)
        return assign, pos, kv, figs[:, G], figs[:, G + 1], figs[:, G + 2]


def solve_seed(batch: Batch):
    """Same contract as :func:`kvgpu.numba_engine.solve_seed`: ``(assign, pos)`` (B, N) NumPy
    arrays in the batch's slots; raises :class:`kvgpu.NoPlacementFound` naming the instances no
    candidate packs.  ``batch`` may hold NumPy or CuPy arrays."""
    dev = DeviceBatch(_on_host(batch))
    ok = dev.seed()
    if not ok.all():
        bad = np.nonzero(~ok)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}", bad)
    return dev.placement()


def improve(batch: Batch, assign, pos, lb, effort: int, patience: int, seed: int, exact_work: int = 0):
    """Same contract as :func:`kvgpu.numba_engine.improve`: ``effort`` search rounds per
    instance on the device from ``assign``/``pos`` (B, N), then the proof (``exact_work > 0``)
    on the CPU.  Returns ``(assign, pos, lb)`` as NumPy arrays."""
    from kvgpu import numba_engine

    host = _on_host(batch)
    assign, pos = _host(assign), _host(pos)
    lo = np.array(_host(lb), dtype=float)
    if effort > 0 and host.shape[0]:
        dev = DeviceBatch(host)
        dev.place(np.arange(host.shape[0]), assign, pos)
        dev.improve(effort, patience, seed, lb=dev.xp.asarray(lo))
        assign, pos = dev.placement()
    if exact_work > 0:
        assign, pos, lo = numba_engine.improve(host, assign, pos, lo, 0, patience, seed, exact_work)
    return assign, pos, lo
