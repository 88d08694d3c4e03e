"""The ``numba`` backend: compacts a batch and runs :func:`kvgpu.kernels.cpu.seed_batch`."""

from __future__ import annotations

import numpy as np

from kvgpu.batch.pipeline import compact, scatter_back
from kvgpu.batch.state import Batch
from kvgpu.problem import NoPlacementFound


def solve_seed(batch: Batch):
    """Same contract as :func:`kvgpu.batch.pipeline.solve_seed` (NumPy arrays in and out)."""
    from kvgpu.kernels import cpu  # compiles on first use (then cached on disk)

    B, N, _ = batch.shape
    sub, pm, pg = compact(batch)
    n_models = sub.n_models.astype(np.int64)
    n_gpus = sub.n_gpus.astype(np.int64)
    a = np.full(sub.sizes.shape, -1, np.int64)
    p = np.full(sub.sizes.shape, -1, np.int64)
    ok = np.zeros(B, bool)
    cpu.seed_batch(np.ascontiguousarray(sub.sizes), np.ascontiguousarray(sub.demand),
                   np.ascontiguousarray(sub.gpu_mem), n_models, n_gpus, a, p, ok)
    if not ok.all():
        bad = np.nonzero(~ok)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}")
    assign = np.full((B, N), -1, np.int64)
    pos = np.full((B, N), -1, np.int64)
    scatter_back(np, assign, pos, np.arange(B), a, p, pm, pg)
    return assign, pos
