"""Run under ``NUMBA_ENABLE_CUDASIM=1`` (tests/test_cuda_sim.py starts it in a subprocess, so the
simulator never leaks into other tests; ``bench/gpu_check.sh`` runs it on a real GPU too).

Checks, on small batches: the transfer kernel returns the values of the array evaluator; the
packing-choice kernel the decisions of the array packs; and the whole seed pipeline with both
kernels installed makes the NumPy engine's placements, decision for decision.  With
``--device`` the batch lives on the GPU as CuPy arrays (the cuda backend's path).
"""

import sys

import numpy as np

from kvgpu.batch import local, pipeline
from kvgpu.batch.arrays import top3
from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like, varied
from kvgpu.kernels import gpu


def instances(n_adrs, n_varied, seed=3):
    rng = np.random.default_rng(seed)
    return ([adrs_like(rng) for _ in range(n_adrs)]
            + [varied(rng, g_range=(5, 8), per_gpu=(1, 2), tight_share=0.5) for _ in range(n_varied)])


def check_transfer_scan(b, xp):
    """Every move and swap of every model on every GPU of a seed placement."""
    assign, pos = pipeline.solve_seed(b)
    st = local.LaneState(b, assign, pos)
    L, N, G = b.shape
    lanes = xp.arange(L)
    kv = st.kv(lanes)
    t3 = top3(xp, kv, b.gpu_mask)
    a = xp.broadcast_to(xp.arange(N)[None, :, None, None], (L, N, G, N + 1))
    src = xp.where(assign >= 0, assign, 0)[:, :, None, None]
    dst = xp.arange(G)[None, None, :, None]
    other = xp.concatenate([xp.full((1,), -1), xp.arange(N)])[None, None, None, :]
    want = st.eval_transfers(lanes, t3, src, dst, a, other)
    got = gpu.eval_transfers(xp, st.S, st.W, b.gpu_mem, b.sizes, b.demand, lanes, t3, src, dst, a, other)
    valid = (b.model_mask[:, :, None, None] & b.gpu_mask[:, None, :, None] & (src != dst)
             & xp.concatenate([xp.ones((L, 1), bool), b.model_mask], axis=1)[:, None, None, :])
    assert bool((got[1] == want[1])[valid].all()), "fit flags differ"
    same = (got[0] == want[0]) | (xp.isnan(got[0]) & xp.isnan(want[0]))
    assert bool(same[valid].all()), "new max KVPR differs"
    return int(valid.sum())


def check_pipeline(b, xp):
    want = pipeline.solve_seed(b)
    got = pipeline.solve_seed(b, gpu.engine(xp))
    assert bool((got[0] == want[0]).all()) and bool((got[1] == want[1]).all()), "placements differ"


def main(device: bool, n_adrs: int, n_varied: int):
    insts = instances(n_adrs, n_varied)
    b = batch_from_instances(insts)
    xp = np
    if device:
        import cupy as xp
        from kvgpu.cuda_engine import to_device
        b = to_device(b)
    evaluated = check_transfer_scan(b, xp)
    check_pipeline(b, xp)
    print(f"cuda kernels: {evaluated} transfers equal, seed pipeline equal on {len(insts)} instances "
          f"({'device' if device else 'simulator'})")


if __name__ == "__main__":
    args = sys.argv[1:]
    dev = "--device" in args
    nums = [int(a) for a in args if a.isdigit()] or [2, 2]
    main(dev, *nums)
