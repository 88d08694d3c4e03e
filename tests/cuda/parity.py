"""Parity helpers of the CUDA tier (``tests/cuda/test_sim_kernels.py``): the one-block-per-instance
kernels of :mod:`kvgpu.kernels.device` (the ``cuda`` backend) against the numba CPU backend.

Under ``NUMBA_ENABLE_CUDASIM=1`` the kernels run on NumPy arrays in numba's CUDA simulator; on a
device (``bench/gpu_check.sh``) on CuPy arrays.  Every function returns counts or flags that the
tests assert; none prints.
"""

import numpy as np
from numba import cuda

from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like, varied


def _compacted(n_inst: int, seed: int):
    """``(host arrays, device arrays)`` of ``n_inst`` ADRS-shaped instances, compacted
    (:func:`kvgpu.numba_engine.compacted`)."""
    from kvgpu import numba_engine
    from kvgpu.cuda_engine import array_module

    xp = array_module()
    rng = np.random.default_rng(seed)
    arrays, _, _ = numba_engine.compacted(batch_from_instances([adrs_like(rng) for _ in range(n_inst)]))
    return arrays, tuple(xp.asarray(x) for x in arrays), xp


def seed_parity(n_inst: int, nt: int) -> int:
    """Instances of ``n_inst`` ADRS-shaped ones whose seed placement by the device kernel
    (``nt`` threads a block) equals the numba CPU kernel's (each solved alone on the CPU: no
    batch kernel compiles)."""
    from kvgpu.kernels import cpu, device

    arrays, dev, xp = _compacted(n_inst, 11)
    a_cpu = np.full(arrays[0].shape, -1, np.int64)
    p_cpu = a_cpu.copy()
    for b in range(n_inst):
        n, G = int(arrays[3][b]), int(arrays[4][b])
        assert cpu.seed_instance(arrays[0][b, :n], arrays[1][b, :n], arrays[2][b, :G], a_cpu[b, :n], p_cpu[b, :n])
    a_dev, p_dev, ok = device.seed(xp, *dev, nt=nt)
    a_dev, p_dev = _host(a_dev), _host(p_dev)
    assert bool(_host(ok).all())
    return sum(bool((a_dev[b] == a_cpu[b]).all() and (p_dev[b] == p_cpu[b]).all()) for b in range(n_inst))


def search_parity(n_inst: int, nt: int, effort: int = 2, patience: int = 2, seed: int = 7):
    """``(equal, moved)``: instances whose search by the device kernel (``nt`` threads a block)
    from a first-fit packing ends where the numba CPU search ends, and instances that search
    moved (a first-fit start is far from a good placement, so that it moves)."""
    from kvgpu.kernels import device, search
    from kvgpu.kernels.rules import no_rules

    arrays, dev, xp = _compacted(n_inst, 11)
    a_ff, p_ff = first_fit(arrays, n_inst)
    a_s, p_s = a_ff.copy(), p_ff.copy()
    for b in range(n_inst):
        n, G = int(arrays[3][b]), int(arrays[4][b])
        search.improve_instance(arrays[0][b, :n], arrays[1][b, :n], arrays[2][b, :G], 0.0, a_s[b, :n], p_s[b, :n],
                                effort, patience, seed, no_rules())
    a_d, p_d = xp.array(a_ff), xp.array(p_ff)  # copies: the kernel works in place
    device.improve(xp, *dev, xp.zeros(n_inst), effort, patience, seed, a_d, p_d, nt=nt)
    a_d, p_d = _host(a_d), _host(p_d)
    moved = sum(bool((a_s[b] != a_ff[b]).any()) for b in range(n_inst))
    equal = sum(bool((a_d[b] == a_s[b]).all() and (p_d[b] == p_s[b]).all()) for b in range(n_inst))
    return equal, moved


def first_fit(arrays, count):
    """``(assign, pos)`` (B, N) int64: the first ``count`` instances of the compacted ``arrays``
    packed first-fit by size (far from a good placement, so that searches move), -1 elsewhere."""
    from kvgpu.kernels import cpu

    a = np.full(arrays[0].shape, -1, np.int64)
    p = a.copy()
    for b in range(count):
        n, G = int(arrays[3][b]), int(arrays[4][b])
        s, w, M = arrays[0][b, :n], arrays[1][b, :n], arrays[2][b, :G]
        P = cpu.mem_prefix(M)
        assert cpu.pack(s, w, M, P, cpu.model_orders(s, w, P), 0.0, np.int64(cpu.SIZE_ORDER), np.int64(cpu.FIRST_FIT),
                        np.int64(0), a[b, :n], p[b, :n])
    return a, p


def _step_kernel():
    """A kernel running ``refine_peak`` (``step`` 0) or ``polish_second`` (1) on one instance a
    block, from ``assign``/``pos``, without rules (the device kernels' convention).  ``cuda`` is
    this module's global: the simulator swaps a kernel's ``cuda`` global for its own."""
    from kvgpu.kernels import cpu, search
    from kvgpu.kernels.jit import device

    refine, polish = device(cpu.refine_peak_core), device(search.polish_second_core)
    passes, top_k, iters = cpu.REFINE_PASSES, cpu.REFINE_TOP_K, search.POLISH_ITERS

    @cuda.jit
    def kern(sizes, demand, gpu_mem, n_models, n_gpus, assign, pos, step, fw, iw, e_u8, e_i2, e_i, e_f, used):
        b = cuda.blockIdx.x
        n, G = n_models[b], n_gpus[b]
        rules = (e_u8, e_i, e_i, e_i, e_i2, e_i, e_i, e_f, np.int64(-1), np.inf, e_i)
        rstate = (e_i2, e_i, e_i, e_i, used[b])
        s, w, M, a, p = sizes[b, :n], demand[b, :n], gpu_mem[b, :G], assign[b, :n], pos[b, :n]
        if step == 0:
            refine(s, w, M, a, p, passes, top_k, rules, rstate, fw[b], iw[b], cuda.threadIdx.x, cuda.blockDim.x)
        else:
            polish(s, w, M, a, p, iters, rules, rstate, fw[b], iw[b], cuda.threadIdx.x, cuda.blockDim.x)
    return kern


def step_parity(n_inst: int, threads):
    """``refine_peak`` and ``polish_second`` run by a block of each of ``threads`` threads
    against their CPU entries, from first-fit packings of ``n_inst`` ADRS-shaped instances: a
    list of ``(threads, refine equal, polish equal)``, and how many instances each CPU step
    moved."""
    from kvgpu.kernels import cpu, device, search
    from kvgpu.kernels.rules import new_state, no_rules

    arrays, dev, xp = _compacted(n_inst, 13)
    a_ff, p_ff = first_fit(arrays, n_inst)
    want, moved = [], []
    for step in (cpu.refine_peak, search.polish_second):
        a, p = a_ff.copy(), p_ff.copy()
        for b in range(n_inst):
            n, G = int(arrays[3][b]), int(arrays[4][b])
            rules = no_rules()
            args = (arrays[0][b, :n], arrays[1][b, :n], arrays[2][b, :G], a[b, :n], p[b, :n])
            extra = (cpu.REFINE_PASSES, cpu.REFINE_TOP_K) if step is cpu.refine_peak else (search.POLISH_ITERS,)
            step(*args, *extra, rules, new_state(rules, a[b, :n], G))
        want.append((a, p))
        moved.append(sum(bool((a[b] != a_ff[b]).any()) for b in range(n_inst)))
    kern = _step_kernel()
    N, G = arrays[0].shape[1], arrays[2].shape[1]
    out = []
    for nt in threads:
        eq = []
        for step in (0, 1):
            sizes = cpu.refine_work(N, G, cpu.REFINE_TOP_K, nt) if step == 0 else search.polish_work(N, G, nt)
            fw, iw = device.work_arrays(xp, n_inst, sizes)
            a, p = xp.array(a_ff), xp.array(p_ff)
            device._launch(kern, n_inst, nt, *dev, a, p, step, fw, iw, *device._empties(xp, n_inst))
            a, p = _host(a), _host(p)
            eq.append(sum(bool((a[b] == want[step][0][b]).all() and (p[b] == want[step][1][b]).all())
                          for b in range(n_inst)))
        out.append((nt, *eq))
    return out, moved


def engine_parity():
    """:mod:`kvgpu.cuda_engine` against :mod:`kvgpu.numba_engine` through their common contract
    (batch slots, padding), on a one-instance batch: True if seed and search agree."""
    from kvgpu import cuda_engine, numba_engine

    rng = np.random.default_rng(5)
    b = batch_from_instances([adrs_like(rng)])
    a1, p1 = cuda_engine.solve_seed(b)
    a2, p2 = numba_engine.solve_seed(b)
    lb = np.zeros(1)
    r1 = cuda_engine.improve(b, a1, p1, lb, 2, 2, 3)
    r2 = numba_engine.improve(b, a2, p2, lb, 2, 2, 3)
    return bool((a1 == a2).all() and (p1 == p2).all() and all((x == y).all() for x, y in zip(r1, r2)))


#: An instance none of the seed's packings fits (sizes GB, demands; three 100 GB GPUs) though an
#: exact packing does: the cuda path packs it on the CPU and places it on the device.
UNSEEDED = ([11.0, 49.0, 47.0, 53.0, 18.0, 14.0, 54.0, 11.0, 38.0],
            [1.7, 0.84, 1.65, 0.63, 1.44, 1.14, 0.94, 1.35, 0.13], [100.0] * 3)
#: Three 50 GB models on two 80 GB GPUs: each fits alone, no two together (proven infeasible).
INFEASIBLE = ([50.0] * 3, [1.0] * 3, [80.0] * 2)


def mixed_batch(seed=5):
    """A batch that takes every branch of the cuda path: ADRS-shaped and varied instances, one
    the seed cannot pack (:data:`UNSEEDED`), one infeasible (:data:`INFEASIBLE`), with the
    padding moved inside the rows (not front-packed: the compaction permutes)."""
    from kvgpu.batch.state import make_batch
    from kvgpu.problem import make_instance

    rng = np.random.default_rng(seed)
    extra = [make_instance(np.stack([s, w, np.ones(len(s))], axis=1), len(M), M) for s, w, M in (UNSEEDED, INFEASIBLE)]
    b = batch_from_instances([adrs_like(rng) for _ in range(2)] + [varied(rng, g_range=(3, 5), per_gpu=(1, 2))]
                             + extra)
    B, N, G = b.shape
    order_m = np.stack([rng.permutation(N) for _ in range(B)])  # a random layout per row, real ones
    order_g = np.stack([rng.permutation(G) for _ in range(B)])  # in their order (stable: sorted slots)
    out = []
    for x, mask, order in ((b.sizes, b.model_mask, order_m), (b.demand, b.model_mask, order_m),
                           (b.gpu_mem, b.gpu_mask, order_g)):
        y, m = np.zeros_like(x), np.zeros_like(mask)
        for i in range(B):
            slots = np.sort(order[i][:mask[i].sum()])
            y[i, slots], m[i, slots] = x[i, mask[i]], True
        out.append((y, m))
    return make_batch(out[0][0], out[1][0], out[2][0], out[0][1], out[2][1])


def solve_parity(**kw):
    """``solve_batch_plain`` with backend 'cuda' against 'numba' on :func:`mixed_batch` with the
    options ``kw`` (``infeasible='mark'``): True if assignment, kvpr, max_kvpr, lower_bound and
    status are equal (NaN where equal), and the backend names say cuda ran."""
    import dataclasses

    from kvgpu import engine

    b = mixed_batch()
    opts = engine.options("numba", **kw)
    want = engine.solve_batch_plain(b, opts, "mark")
    got = engine.solve_batch_plain(b, dataclasses.replace(opts, backend="cuda"), "mark")
    same = [np.array_equal(getattr(got, f), getattr(want, f), equal_nan=f != "assignment")
            for f in ("assignment", "kvpr", "max_kvpr", "lower_bound")]
    statuses = list(got.status) == list(want.status)
    unseeded_placed = got.status[3] == "ok" if kw.get("mode") != "seed" else got.status[3] != "ok"
    return all(same) and statuses and unseeded_placed and got.status[4] != "ok" and got.backend.startswith("cuda")


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)
