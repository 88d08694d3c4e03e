"""The search's random stream and tie keys are the reference hashes (wrapping 64-bit
arithmetic, silent where kernels run as Python)."""
import warnings

import numpy as np
import pytest

from kvgpu.kernels import search, u64

MASK = (1 << 64) - 1


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
