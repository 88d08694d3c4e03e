"""CUDA kernels of the whole solve: one thread block per instance.

Each block runs an instance's seed pipeline (:func:`kvgpu.kernels.cpu.seed_instance_core`) or
its search (:func:`kvgpu.kernels.search.improve_instance_core`) -- the very Python source the
numba CPU backend compiles, compiled again as CUDA device functions by
:func:`kvgpu.kernels.jit.device`.  The figures the engine reports -- per-GPU KVPR, max KVPR and
lower bound (:func:`kvgpu.kernels.bound.finish_core`) -- are serial per instance: that kernel
(:func:`finish`) runs one thread per instance, a warp of instances per block.  The threads of
the block share the scans of a step (the move and swap deltas of ``improve_local``, the
donations of ``refine_peak``, the moves and exchanges of the repair search and of
``polish_second``) and reduce them to the choice the serial CPU loop makes; thread 0 applies it
between barriers.  A block is one warp, or more for big instances (:func:`threads`).  An instance's
working memory (per-GPU loads, KVPRs, lists, a step's values) lives in the block's shared
memory where it fits (:data:`SHARED_BYTES`), else in global memory: one row per instance of two
arrays allocated once per launch (:func:`work_arrays`).

Arrays stay where they are: CuPy arrays on a device (numba reads them through
``__cuda_array_interface__``), NumPy arrays under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
which is how the tests run these kernels on machines without a GPU.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from numba import cuda, float64, int64

from kvgpu import cuda_cache
from kvgpu.kernels import bound, cpu, search
from kvgpu.kernels.jit import device

#: Threads per block on a device: one warp, or more warps for big instances (:func:`threads`);
#: the simulator runs a few (every thread is a Python thread there).
THREADS = 32
MAX_THREADS = 256
SIM_THREADS = 4
#: Candidates per thread below which more threads do not pay (:func:`threads`).
MIN_PER_THREAD = 4
#: Bytes of dynamic shared memory a block may take without opting in (48 KiB on every CUDA
#: device; numba-cuda has no public way to opt in to more): an instance's working memory -- its
#: per-GPU loads, KVPRs, GPU lists, the step's values -- goes there when it fits, else it stays
#: in its global row (:func:`shared_bytes`).  The search of an ADRS-shaped instance takes 8 KiB,
#: of 40 models on 16 GPUs 22 KiB; the seed keeps 60 candidate placements and needs 53 KiB
#: already at 18 models on 9 GPUs, so it runs from global memory (cached in L1/L2).
SHARED_BYTES = 48 * 1024

_seed = device(cpu.seed_instance_core)
_improve = device(search.improve_instance_core)
_finish = device(bound.finish_core)


def threads(n_models: int = 0, n_gpus: int = 0) -> int:
    """Threads per block for a batch whose largest instance has ``n_models`` models and
    ``n_gpus`` GPUs (a pure function of the batch's shape): one warp (:data:`THREADS`) for small
    instances, up to :data:`MAX_THREADS` (a power of two) for big ones; :data:`SIM_THREADS`
    under the simulator.

    Why by ``n_models + n_gpus``: a step's scans are split among the threads between two
    barriers, and the narrowest of the scans that run step after step are about that wide --
    a row of ``polish_second`` (``n + G`` exchanges), ``improve_local``'s moves (the worst
    GPU's models times ``G``, at least ``G`` and about ``n`` when GPUs hold ``n / G`` each), a
    repair step (the overflowing GPU's models times ``n + G``).  The extra warps of a bigger
    block only shorten that strided evaluation; a barrier across warps (and thread 0's serial
    walk of the values, which more threads do not shorten) costs about as much as a few
    evaluations, so a block grows only while every thread gets at least
    :data:`MIN_PER_THREAD` candidates of the narrow scans: 32 threads up to ``n + G = 255``,
    64 from 256, 128 from 512, 256 from 1024.  The steps run by fewer threads stay as they
    are (the seed's packs on :data:`kvgpu.kernels.cpu.PACK_LANES` lanes, ``refine_peak``'s
    at most ``2 REFINE_TOP_K`` donations).  Working memory barely grows with the threads
    (:func:`kvgpu.kernels.cpu.seed_work`, :func:`kvgpu.kernels.search.improve_work`: a few
    entries per thread), so the choice needs no memory check."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return SIM_THREADS
    nt = THREADS
    while nt < MAX_THREADS and 2 * nt * MIN_PER_THREAD <= n_models + n_gpus:
        nt *= 2
    return nt


def shared_bytes(nf: int, ni: int) -> int:
    """Dynamic shared memory for a block whose working memory is ``nf`` floats and ``ni`` ints
    (8 bytes each): all of it when it fits in :data:`SHARED_BYTES`, else 0 (global rows)."""
    need = 8 * (max(1, int(nf)) + max(1, int(ni)))
    return need if need <= SHARED_BYTES else 0


@cuda.jit(device=True)
def _work(fw, iw, b, nf, ni):
    """Block ``b``'s working memory: the first ``nf`` floats and the next ``ni`` ints of the
    block's dynamic shared memory when ``nf > 0`` (the launch gave it), else its rows of the
    global ``fw``, ``iw``."""
    if nf > 0:
        f_sh = cuda.shared.array(0, float64)
        i_sh = cuda.shared.array(0, int64)  # the same bytes: the ints start after the floats
        return f_sh[:nf], i_sh[nf:nf + ni]
    return fw[b], iw[b]


@cuda.jit
def _seed_kernel(sizes, demand, gpu_mem, n_models, n_gpus, assign, pos, ok, fw, iw, nf, ni, e_u8, e_i2, e_i, e_f,
                 used):
    """Block ``b``: the seed pipeline of compacted instance ``b`` (no rules: the ``e_*`` are
    empty arrays that make the rule tuples, ``used`` (B, 2) their budget bookkeeping); working
    memory in shared memory (``nf`` floats, ``ni`` ints) or, with ``nf = 0``, in ``fw``, ``iw``."""
    b = cuda.blockIdx.x
    n, G = n_models[b], n_gpus[b]
    rules = (e_u8, e_i, e_i, e_i, e_i2, e_i, e_i, e_f, np.int64(-1), np.inf, e_i)
    rstate = (e_i2, e_i, e_i, e_i, used[b])
    fwb, iwb = _work(fw, iw, b, nf, ni)
    r = _seed(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], assign[b, :n], pos[b, :n], rules, rstate, fwb, iwb,
              cuda.threadIdx.x, cuda.blockDim.x)
    if cuda.threadIdx.x == 0:
        ok[b] = r


@cuda.jit
def _improve_kernel(sizes, demand, gpu_mem, n_models, n_gpus, active, lb, effort, patience, seed, assign, pos, fw, iw,
                    nf, ni, rng, e_u8, e_i2, e_i, e_f, used):
    """Block ``b``: ``effort`` search rounds of compacted instance ``b`` from ``assign``/``pos``
    (no rules, working memory: see :func:`_seed_kernel`), ``rng`` (B,) uint64 its random state;
    nothing where ``active[b]`` is 0 (an instance without a placement)."""
    b = cuda.blockIdx.x
    if not active[b]:  # the whole block leaves: no barrier waits for it
        return
    n, G = n_models[b], n_gpus[b]
    rules = (e_u8, e_i, e_i, e_i, e_i2, e_i, e_i, e_f, np.int64(-1), np.inf, e_i)
    rstate = (e_i2, e_i, e_i, e_i, used[b])
    fwb, iwb = _work(fw, iw, b, nf, ni)
    _improve(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], lb[b], assign[b, :n], pos[b, :n], effort, patience, seed,
             rules, rstate, fwb, iwb, rng[b:b + 1], cuda.threadIdx.x, cuda.blockDim.x)


@cuda.jit
def _finish_kernel(sizes, demand, gpu_mem, n_models, n_gpus, active, real, assign, pos, with_bound, kv, m, lo, lb, fw,
                   iw):
    """Thread ``b``: the figures of compacted instance ``b`` (:func:`kvgpu.kernels.bound.finish_core`)
    into ``kv[b, :G]``, ``m[b]``, ``lo[b]`` and ``lb[b] = min(lo[b], m[b])``, where ``active[b]``."""
    b = cuda.grid(1)
    if b >= sizes.shape[0] or not active[b]:
        return
    n, G = n_models[b], n_gpus[b]
    mb, lob = _finish(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], real, assign[b, :n], pos[b, :n], kv[b, :G], lo[b],
                      with_bound, fw[b], iw[b])
    m[b] = mb
    lo[b] = lob
    lb[b] = min(lob, mb)


for _k in (_seed_kernel, _improve_kernel, _finish_kernel):
    cuda_cache.enable(_k)  # compiled once per machine, keyed by every kernel source (kvgpu.cuda_cache)

#: Seconds the three kernels take to compile cold on a device host, as the issue's audit found
#: (numba-cuda 0.30.4; 2-core CI machines take about 5 minutes for both capabilities'
#: PTX): the "first run" line's estimate.
COLD_COMPILE_S = 150


def compile_all(cc) -> list:
    """Compile (or load from :mod:`kvgpu.cuda_cache`) the seed, improve and finish kernels for
    the argument types the engine launches them with (:func:`recorded`) on the current device
    of compute capability ``cc``, and mark them cached; returns the kernels' names."""
    import numba

    got = recorded()
    for ln in got.values():
        ln.kernel.compile(tuple(numba.typeof(a) for a in ln.args))
    cuda_cache.mark(cc)
    return list(got)


def prepare(cc, announce: bool = True) -> bool:
    """Before a process's first device solve: where the kernels are not cached for ``cc``,
    say so on stderr (``announce``) and compile them all now (:func:`compile_all`).  Returns
    True if they had to be compiled."""
    import sys

    if cuda_cache.cached(cc):
        return False
    if announce:
        print(f"kvgpu: compiling CUDA kernels (seed, search, figures) for sm_{cc[0]}{cc[1]}, first run only, about "
              f"{COLD_COMPILE_S} s ('kvgpu warmup --cuda' does it ahead of time)", file=sys.stderr, flush=True)
    compile_all(cc)
    return True


def _empties(xp, B):
    """The empty rule arrays of the kernels, and ``used`` (B, 2)."""
    return (xp.zeros((0, 0), xp.uint8), xp.zeros((0, 0), xp.int64), xp.zeros(0, xp.int64), xp.zeros(0),
            xp.zeros((B, 2)))


def work_arrays(xp, B, sizes):
    """One row of working memory per instance: ``(fw (B, nf) float64, iw (B, ni) int64)``."""
    nf, ni = sizes
    return xp.empty((B, max(1, int(nf)))), xp.empty((B, max(1, int(ni))), xp.int64)


def block_memory(xp, B, sizes):
    """Working memory of a one-block-per-instance launch: ``(fw, iw, nf, ni, shared bytes)`` --
    in shared memory when an instance's fits (:func:`shared_bytes`; ``fw``, ``iw`` are then
    placeholders and ``nf``, ``ni`` its sizes), else global rows (:func:`work_arrays`, ``nf = ni
    = 0``)."""
    nf, ni = max(1, int(sizes[0])), max(1, int(sizes[1]))
    nbytes = shared_bytes(nf, ni)
    if nbytes:
        return xp.empty((1, 1)), xp.empty((1, 1), xp.int64), nf, ni, nbytes
    return (*work_arrays(xp, B, sizes), 0, 0, 0)


#: Where :func:`recorded` collects the launches instead of running them (None: launch).
_RECORDING = None


def _launch(kern, B, nt, *args, shared=0):
    if _RECORDING is not None:
        _RECORDING.append(Launch(kern, B, nt, args, shared))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _performance_warning())  # small batches leave most of a GPU idle
        kern[B, nt, 0, shared](*args)


class Launch(NamedTuple):
    """One kernel launch as the engine makes it: ``kernel[blocks, threads, 0, shared](*args)``."""

    kernel: object
    blocks: int
    threads: int
    args: tuple
    shared: int


def recorded(B: int = 2, seed_: int = 3) -> dict:
    """The launches of a whole search-mode solve of ``B`` ADRS-shaped instances
    (:func:`kvgpu.generate.adrs_like`, NumPy arrays), recorded, not run: ``{name: Launch}`` for
    ``seed``, ``improve`` and ``finish`` -- the kernels, their argument values (whose numba
    types are the signatures the engine compiles), threads a block and dynamic shared bytes.
    Needs numba's CUDA target, no device: what compile checks and caches start from."""
    global _RECORDING
    from kvgpu.batch.state import batch_from_instances
    from kvgpu.generate import adrs_like
    from kvgpu.numba_engine import compacted

    rng = np.random.default_rng(seed_)
    arrays, _, _ = compacted(batch_from_instances([adrs_like(rng) for _ in range(B)]))
    B, N = arrays[0].shape
    G = arrays[2].shape[1]
    got = []
    _RECORDING = got
    try:
        assign, pos, _ = seed(np, *arrays)
        lb = np.zeros(B)
        active = np.ones(B, np.uint8)
        improve(np, *arrays, lb, 1, 1, 0, assign, pos, active=active)
        finish(np, *arrays, active, assign, pos, True, np.zeros((B, G)), np.zeros(B), np.zeros(B), lb)
    finally:
        _RECORDING = None
    return dict(zip(("seed", "improve", "finish"), got))


def seed(xp, sizes, demand, gpu_mem, n_models, n_gpus, nt=None):
    """The seed pipeline of a compacted batch (real models and GPUs first; sizes, demand (B, N),
    gpu_mem (B, G) float64, n_models, n_gpus (B,) int64), one block per instance, in one launch.
    Returns ``(assign, pos (B, N) int64, ok (B,) bool)`` as arrays of ``xp``."""
    B, N = sizes.shape
    G = gpu_mem.shape[1]
    nt = nt or threads(N, G)
    assign = xp.full((B, N), -1, xp.int64)
    pos = xp.full((B, N), -1, xp.int64)
    ok = xp.zeros(B, xp.uint8)
    if B:
        fw, iw, nf, ni, nbytes = block_memory(xp, B, cpu.seed_work(N, G, nt))
        _launch(_seed_kernel, B, nt, sizes, demand, gpu_mem, n_models, n_gpus, assign, pos, ok, fw, iw, nf, ni,
                *_empties(xp, B), shared=nbytes)
    return assign, pos, ok.astype(bool)


def improve(xp, sizes, demand, gpu_mem, n_models, n_gpus, lb, effort, patience, seed_, assign, pos, nt=None,
            active=None):
    """:func:`kvgpu.kernels.search.improve_batch` on the device: ``assign``/``pos`` (B, N) int64
    are improved in place, one block per instance, in one launch; ``lb`` (B,) float64 the lower
    bounds; ``active`` (B,) uint8 the instances to search (None: all)."""
    B, N = sizes.shape
    G = gpu_mem.shape[1]
    nt = nt or threads(N, G)
    if B and effort > 0:
        fw, iw, nf, ni, nbytes = block_memory(xp, B, search.improve_work(N, G, nt))
        rng = xp.zeros(B, xp.uint64)
        active = xp.ones(B, xp.uint8) if active is None else active
        _launch(_improve_kernel, B, nt, sizes, demand, gpu_mem, n_models, n_gpus, active, lb, int(effort),
                int(patience), int(seed_), assign, pos, fw, iw, nf, ni, rng, *_empties(xp, B), shared=nbytes)


def finish(xp, sizes, demand, gpu_mem, n_models, n_gpus, active, assign, pos, with_bound, kv, m, lo, lb):
    """The reported figures of the placed instances of a compacted batch, in one launch (one
    thread per instance): per-GPU KVPR into ``kv`` (B, G) float64 (compact GPU ids; columns
    beyond an instance's GPUs are left as they are), max KVPR into ``m`` (B,) float64, with
    ``with_bound`` the lower bound below it into ``lo`` (B,) float64 (else ``lo`` is read, the
    bound before a search), and ``min(lo, m)`` into ``lb`` (B,) float64 -- only where ``active``
    (B,) uint8 is set.  The arrays are ``xp``'s, on the device."""
    B, N = sizes.shape
    G = gpu_mem.shape[1]
    if not B:
        return
    nt = threads()
    fw, iw = work_arrays(xp, B, bound.bound_work(N, G))
    real = xp.ones(max(N, G), xp.bool_)
    _launch(_finish_kernel, (B + nt - 1) // nt, nt, sizes, demand, gpu_mem, n_models, n_gpus, active, real, assign,
            pos, bool(with_bound), kv, m, lo, lb, fw, iw)


def _performance_warning():
    from kvgpu.backends import performance_warning

    return performance_warning()
