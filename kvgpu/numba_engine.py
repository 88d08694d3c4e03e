"""The ``numba`` backend: compacts a batch and runs :func:`kvgpu.kernels.cpu.seed_batch`."""

from __future__ import annotations

import numpy as np

from kvgpu.batch.pipeline import compact, scatter_back
from kvgpu.batch.state import Batch
from kvgpu.problem import NoPlacementFound


def solve_seed(batch: Batch, effort: int = 0, seed: int = 0):
    """Same contract as :func:`kvgpu.batch.pipeline.solve_seed` (NumPy arrays in and out).

    ``effort > 0`` adds that many rounds of iterated local search per instance after the seed
    pipeline (:mod:`kvgpu.kernels.search`), deterministic for a given ``seed``."""
    from kvgpu.kernels import cpu, search  # compile on first use (then cached on disk)

    B, N, _ = batch.shape
    sub, pm, pg = compact(batch)
    n_models = sub.n_models.astype(np.int64)
    n_gpus = sub.n_gpus.astype(np.int64)
    a = np.full(sub.sizes.shape, -1, np.int64)
    p = np.full(sub.sizes.shape, -1, np.int64)
    ok = np.zeros(B, bool)
    arrays = (np.ascontiguousarray(sub.sizes), np.ascontiguousarray(sub.demand), np.ascontiguousarray(sub.gpu_mem),
              n_models, n_gpus)
    if effort > 0:
        search.search_batch(*arrays, int(effort), int(seed), a, p, ok)
    else:
        cpu.seed_batch(*arrays, a, p, ok)
    if not ok.all():
        bad = np.nonzero(~ok)[0].tolist()
        raise NoPlacementFound(f"no candidate packing fits the models in GPU memory for instance(s) {bad[:10]}")
    assign = np.full((B, N), -1, np.int64)
    pos = np.full((B, N), -1, np.int64)
    scatter_back(np, assign, pos, np.arange(B), a, p, pm, pg)
    return assign, pos
