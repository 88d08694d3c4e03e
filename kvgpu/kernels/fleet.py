"""numba kernels of the decomposition of big clusters (:mod:`kvgpu.decompose`).

:func:`repair_batch` runs the repair search of :mod:`kvgpu.kernels.search` at a target ``T``
on every sub-cluster of a batch in parallel: each sub-cluster is a few GPUs above ``T`` drawn
together with GPUs that have room at ``T``, from all over the cluster.  A sub-cluster that
reaches "every GPU at KVPR <= T" keeps its new placement; one that does not is left exactly as
it was, so a failed draw never makes the cluster worse.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kvgpu.kernels.jit import kernel
from kvgpu.kernels.rules import new_state, no_rules
from kvgpu.kernels.search import new_scratch, repair_core, repair_memory

#: A lane's random stream starts from its seed, mixed (as :func:`kvgpu.kernels.search.improve_instance`).
_MIX_SEED, _MIX_LANE = np.uint64(6364136223846793005), np.uint64(1442695040888963407)


@kernel(parallel=True)
def repair_batch(sizes, demand, gpu_mem, n_models, n_gpus, T, steps, seeds, assign, pos, ok):
    """Repair every sub-cluster ``b`` of a compacted batch at its target ``T[b]``.

    Parameters
    ----------
    sizes, demand : (B, N) float64 -- GB and ``req_rate / slo`` of each sub-cluster's models.
    gpu_mem : (B, G) float64, GB.
    n_models, n_gpus : (B,) int64 -- real models / GPUs of each lane (the first ones).
    T : (B,) float64 -- target max KVPR of each lane.
    steps : int -- tabu steps of each attempt (:func:`kvgpu.kernels.search.repair`).
    seeds : (B,) int64 -- random stream of each lane (its own, so a lane's answer does not depend
        on the batch it is solved in: chunked over Dask workers it is the same).
    assign, pos : (B, N) int64 -- placements, in and out (lane-local GPU ids, list stamps).
    ok : (B,) bool, out -- the lane now has every GPU at KVPR <= ``T[b]``; where False, the lane's
        ``assign``/``pos`` are unchanged.
    """
    rules = no_rules()  # plain lanes: the empty rules tuple (co-location included)
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        a = assign[b, :n].copy()
        p = pos[b, :n].copy()
        state = np.empty(1, np.uint64)
        state[0] = np.uint64(seeds[b]) * _MIX_SEED + _MIX_LANE
        good = repair_core(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], a, p, T[b], steps, state, new_scratch(n, G),
                           rules, new_state(rules, a, G), *repair_memory(n), 0, 1)
        ok[b] = good
        if good:
            assign[b, :n] = a
            pos[b, :n] = p
