"""The device kernels' disk cache (:mod:`kvgpu.cuda_cache`), the "first run" line and
``kvgpu warmup --cuda``, as far as they can be checked without a device.  (``auto``'s device
policy, with fake device descriptions, is in ``tests/test_backends.py``.)"""

import importlib.util

import pytest

from kvgpu import cuda_cache


def test_key_changes_with_any_kernel_source_or_the_toolchain():
    src = {"cpu.py": b"def f(): return 1\n", "device.py": b"k = 1\n"}
    k = cuda_cache.source_key(src, "numba 0.68")
    assert k == cuda_cache.source_key(dict(reversed(list(src.items()))), "numba 0.68")  # order-free
    assert k != cuda_cache.source_key({**src, "cpu.py": b"def f(): return 2\n"}, "numba 0.68")  # a callee's file
    assert k != cuda_cache.source_key({**src, "new.py": b""}, "numba 0.68")
    assert k != cuda_cache.source_key(src, "numba 0.69")
    assert len(k) == 16 and len(cuda_cache.key()) == 16


def test_cache_lives_in_a_folder_named_by_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert cuda_cache.directory() == tmp_path / f"cuda-{cuda_cache.key()}"
    assert not cuda_cache.cached((9, 0))
    cuda_cache.mark((9, 0))
    assert cuda_cache.cached((9, 0)) and not cuda_cache.cached((8, 0))


def _device_module():
    """:mod:`kvgpu.kernels.device` where numba's CUDA target imports here (not the simulator)."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("under the simulator nothing is compiled or cached")
    try:
        from kvgpu.kernels import device
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"numba's CUDA target does not import here ({type(e).__name__}: {e})")
    return device


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="numba-cuda is not installed (the test and gpu extras install it)")
def test_device_kernels_use_the_keyed_cache(tmp_path, monkeypatch):
    """Every kernel the engine launches has numba-cuda's kernel cache, located in the keyed
    folder and stamped with the key (not its file's time: a change in a callee's file
    invalidates it)."""
    from numba.cuda.dispatcher import CUDACache

    device = _device_module()
    for k in (device._seed_kernel, device._improve_kernel, device._finish_kernel):
        assert isinstance(k._cache, CUDACache)
        assert k._cache._impl.locator.get_source_stamp() == cuda_cache.key()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    fresh = type(device._seed_kernel._cache)(device._seed_kernel.py_func)
    assert fresh.cache_path == str(cuda_cache.directory())


def test_first_device_solve_says_it_compiles_once(tmp_path, monkeypatch, capsys):
    """Cold: one line on stderr naming the capability and ``kvgpu warmup --cuda``, the kernels
    compiled (here: none recorded, nothing to compile without a device) and marked; warm:
    nothing said."""
    device = _device_module()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "recorded", lambda: {})
    assert device.prepare((9, 0)) is True
    err = capsys.readouterr().err
    assert "compiling CUDA kernels" in err and "sm_90, first run only" in err and "kvgpu warmup --cuda" in err
    assert cuda_cache.cached((9, 0))
    assert device.prepare((9, 0)) is False
    assert capsys.readouterr().err == ""


def test_recorded_launches_are_the_engines_kernels():
    """The signatures compiled ahead of time (warmup, CI) are recorded from the engine's own
    launches: seed, improve and finish, one warp a block, the search's working memory in
    shared memory for ADRS-shaped instances."""
    device = _device_module()
    got = device.recorded()
    assert list(got) == ["seed", "improve", "finish"]
    assert got["seed"].kernel is device._seed_kernel and got["improve"].kernel is device._improve_kernel
    assert all(ln.threads == device.THREADS for ln in got.values())
    assert got["improve"].shared > 0 and got["seed"].shared == 0


def test_warmup_cuda_without_a_device_is_refused(monkeypatch, capsys):
    from kvgpu import backends, cli

    monkeypatch.setattr(backends, "probe", lambda: {"numpy": (True, ""), "numba": (True, ""),
                                                    "cuda": (False, "no CUDA device")})
    assert cli.main(["warmup", "--cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "kvgpu warmup --cuda: backend 'cuda' is not available: no CUDA device"
