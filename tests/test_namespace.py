import subprocess
import sys

import numpy as np

from kvgpu._namespace import get_namespace


def test_numpy_arrays_give_numpy():
    assert get_namespace(np.zeros(2), np.ones(3)) is np
    assert get_namespace(np.zeros(2), None) is np


def test_import_kvgpu_imports_neither_cupy_nor_numba_cuda():
    code = ("import sys, kvgpu; kvgpu.solve([[10, 1, 1], [20, 2, 2]], 2); "
            "bad = [m for m in ('cupy', 'numba.cuda') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cupy_arrays_detected_without_importing_cupy(monkeypatch):
    class FakeCupyArray:
        pass

    fake = type(sys)("cupy")
    fake.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert get_namespace(FakeCupyArray()) is fake
    assert get_namespace(np.zeros(1)) is np
    try:
        get_namespace(FakeCupyArray(), np.zeros(1))
    except TypeError as e:
        assert "mix" in str(e)
    else:
        raise AssertionError("mixing NumPy and CuPy arrays must raise")
