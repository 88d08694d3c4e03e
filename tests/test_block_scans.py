"""The scans a thread block shares, checked on the CPU: ``polish_second``'s rows evaluated by any
number of threads and walked by thread 0 make the serial scan's choice; the threads per block
follow the batch's size; the search's random stream and tie keys are the reference hashes
(wrapping 64-bit arithmetic, silent where kernels run as Python).  The kernels themselves run
by blocks of 1-4 threads under the simulator in tests/test_cuda_sim.py."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgpu.kernels import cpu, search, u64
from kvgpu.kernels.rules import new_state, no_rules

MASK = (1 << 64) - 1


def _row_indices(tri, src, slot, pbase):
    """The value indices a row fills: every slot but ``src``'s, or ``src``'s pairs left out."""
    if not tri:
        return np.flatnonzero(slot != src)
    return np.concatenate([np.arange(pbase[d], pbase[d + 1]) for d in range(pbase.shape[0] - 1) if d != src])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(3, 28), st.integers(3, 7), st.integers(2, 5))
def test_polish_rows_filled_by_threads_walk_to_the_serial_choice(seed, n, G, nt):
    """Every row of polish_second's scan (singles, two for one, one for two): ``nt`` threads fill
    exactly the row's exchanges, and thread 0's walk of those values takes the chain of choices
    the one-thread walk (evaluating as it goes) takes, from the real best and from (inf, inf),
    where nearly every exchange is taken in turn."""
    rng = np.random.default_rng(seed)
    s, w = rng.integers(1, 8, n).astype(float), rng.integers(1, 9, n).astype(float)
    assign = rng.integers(0, G, n)
    M = np.bincount(assign, weights=s, minlength=G) * rng.uniform(1.0, 1.6, G) + rng.uniform(0.0, 4.0, G)
    pos = rng.permutation(n).astype(np.int64)
    S, W = cpu.list_loads(assign, pos, s, w, G)
    kv = cpu.kvprs(S, W, M)
    v, ix = np.empty(4), np.empty(4, np.int64)
    search._top4(kv, v, ix)
    lst, start = np.empty(n, np.int64), np.empty(G + 1, np.int64)
    cpu.gpu_lists_into(assign, np.arange(n), lst, start)
    slot, pbase = np.empty(n + G, np.int64), np.empty(G + 1, np.int64)
    search._polish_slots(start, slot, pbase)
    rules = no_rules()
    rs = new_state(rules, assign, G)
    half = search.polish_values(n, G, nt) // 2
    for k in range(2):
        src = ix[k]
        for p in range(start[src], start[src + 1]):
            for q in range(p, start[src + 1]):
                x1, x2 = lst[p], (lst[q] if q > p else -1)
                for tri in ((False, True) if q == p else (False,)):
                    m1s, m2s = np.full(half, -1.0), np.full(half, -1.0)
                    for t in range(nt):
                        search._polish_fill(S, W, M, s, w, v, ix, assign, lst, start, slot, pbase, src, x1, x2, tri,
                                            m1s, m2s, t, nt)
                    filled = np.zeros(half, bool)
                    filled[_row_indices(tri, src, slot, pbase)] = True
                    assert (m1s[filled] != -1.0).all() and (m1s[~filled] == -1.0).all()
                    for b1, b2 in ((v[0], v[1]), (np.inf, np.inf)):
                        best = (float(b1), float(b2), -1, -1, -1, -1, -1, -1)
                        args = (S, W, M, s, w, v, ix, lst, start, pbase, src, x1, x2, tri, best, m1s, m2s, rules, rs)
                        assert search._polish_row(*args, nt) == search._polish_row(*args, 1)


def _xorshift_star(x):
    """xorshift64* on Python integers: the next state and its uniform float."""
    x ^= x >> 12
    x ^= (x << 25) & MASK
    x ^= x >> 27
    return x, (((x * 2685821657736338717) & MASK) >> 11) / 2.0 ** 53


def _splitmix(salt, cand):
    """The tie key on Python integers (splitmix64's finaliser, halved)."""
    z = (salt + cand * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) >> 1


def test_random_stream_and_tie_keys_are_the_reference_hashes():
    """The compiled stream and keys equal the hashes computed on exact integers, and the values
    the kernels gave before their arithmetic went through kvgpu.kernels.u64."""
    state = np.array([12345], np.uint64)
    x = 12345
    draws = []
    for _ in range(200):
        x, want = _xorshift_star(x)
        draws.append(search.rand_uniform(state))
        assert draws[-1] == want and int(state[0]) == x
    assert draws[:3] == [0.5950924872394683, 0.7531544145408081, 0.07656564459726423]
    for salt in (0, 1, 2 ** 52 - 1, 987654321, 2 ** 52 + 12345):
        for cand in (0, 1, 7, 10 ** 6, 2 ** 40, 2 ** 62 + 3):
            assert search._tie_key(salt, cand) == _splitmix(salt, cand)
    assert [search._tie_key(0, c) for c in (0, 1, 7)] == [0, 8147104208329303767, 1603648013000153456]


def test_wrapping_arithmetic_on_numpy_scalars_is_silent_and_wraps():
    """Where kernels run as Python (the CUDA simulator), the u64 forms wrap like the machine
    and warn of nothing -- NumPy's own product warns."""
    a, b = np.uint64(2 ** 63 + 12345), np.uint64(0x9E3779B97F4A7C15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_mul, got_add = u64.wrap_mul(a, b), u64.wrap_add(a, a)
        with pytest.raises(RuntimeWarning, match="overflow"):
            _ = a * b
    with np.errstate(over="ignore"):
        assert got_mul == a * b and got_add == a + a
    assert isinstance(got_mul, np.uint64) and isinstance(got_add, np.uint64)


def test_threads_per_block_follow_the_batch_size():
    """One warp for small instances; more warps (powers of two, at most 256) as ``n + G`` grows,
    never fewer for a bigger batch; the working memory grows by a few entries per thread."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        pytest.skip("the simulator runs SIM_THREADS")
    from kvgpu.kernels import device

    assert device.threads() == device.threads(18, 9) == 32  # ADRS-shaped
    assert [device.threads(n, 0) for n in (255, 256, 511, 512, 1023, 1024, 10 ** 6)] == [32, 64, 64, 128, 128, 256,
                                                                                           256]
    assert device.threads(200, 60) == 64 and device.threads(900, 128) == 256
    shapes = [(n, g) for n in (1, 10, 100, 300, 700, 2000, 5000) for g in (1, 8, 64, 512)]
    for n, g in shapes:
        nt = device.threads(n, g)
        assert nt in (32, 64, 128, 256)
        assert nt <= device.threads(n + 50, g) and nt <= device.threads(n, g + 50)
        for work in (cpu.seed_work, search.improve_work):
            f1, i1 = work(n, g, 32)
            f2, i2 = work(n, g, nt)
            assert 0 <= f2 - f1 <= nt and 0 <= i2 - i1 <= 8 * nt


def test_working_memory_goes_to_shared_memory_only_when_it_fits():
    """A block's working memory is put in dynamic shared memory when all of it fits in
    ``SHARED_BYTES`` (ADRS-shaped instances, with room to spare), else in global rows (a
    64-GPU, 160-model instance's search keeps a value per move)."""
    from kvgpu.kernels import device

    assert device.shared_bytes(10, 20) == 8 * 30
    assert device.shared_bytes(device.SHARED_BYTES // 8 - 1, 1) == device.SHARED_BYTES
    assert device.shared_bytes(device.SHARED_BYTES // 8, 1) == 0
    nbytes = device.shared_bytes(*search.improve_work(18, 9, 32))  # the search of an ADRS-shaped instance
    assert 0 < nbytes <= device.SHARED_BYTES // 4
    assert device.shared_bytes(*search.improve_work(160, 64, device.threads(160, 64))) == 0
    # the seed keeps its 60 candidate placements: beyond 48 KiB already at 18 models
    assert device.shared_bytes(*cpu.seed_work(18, 9, 32)) == 0
    fw, iw, nf, ni, nbytes = device.block_memory(np, 5, search.improve_work(18, 9, 32))
    assert nbytes == 8 * (nf + ni) and fw.shape == iw.shape == (1, 1)  # placeholders: nothing per instance
    fw, iw, nf, ni, nbytes = device.block_memory(np, 5, search.improve_work(160, 64, 64))
    assert (nf, ni, nbytes) == (0, 0, 0) and fw.shape[0] == iw.shape[0] == 5
