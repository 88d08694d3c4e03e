"""A NumPy stand-in for CuPy, strict where CuPy is strict and counting what costs on a GPU.

Used with numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) to run kvgpu's ``cuda`` path end
to end on a machine without a GPU (``tests/test_cuda_sim.py``, ``bench/gpu_check.py
--simulate``).  :func:`install` puts it in ``sys.modules["cupy"]`` before kvgpu imports CuPy.

What it keeps from CuPy:

* arrays (:class:`ndarray`) live "on the device": NumPy may not read them implicitly --
  ``np.asarray(x)`` raises CuPy's ``TypeError: Implicit conversion to a NumPy array is not
  allowed`` -- and CuPy functions and operators refuse NumPy arrays as operands (only
  :func:`asarray` / :func:`array` copy host data in, and indices may be host arrays);
* reductions return 0-d device arrays, not Python scalars.

What it counts (:data:`COUNTS`, reset with :func:`reset`):

* ``syncs``: each point where real CuPy waits for the device and copies to the host --
  :func:`asnumpy`, ``.get()``, ``.item()``, ``.tolist()``, ``int()`` / ``float()`` / ``bool()``
  / ``operator.index`` of a device array, :func:`nonzero` (and ``flatnonzero``, ``argwhere``,
  ``unique``), boolean-mask indexing (its size is data), ``copy_to_host`` of a numba device
  array under the simulator, and a kernel launched on a host NumPy array (numba copies it back
  after the kernel);
* ``launches``: numba CUDA kernel launches (device functions called from kernels do not count);
* ``calls``: CuPy functions and array methods called (each one a kernel or more on a GPU).

Kernels receive the NumPy buffer behind a device array (the simulator's "device memory"), so
what they write is what the caller's device array holds.
"""

from __future__ import annotations

import operator
import sys
import types

import numpy as np

COUNTS = {"syncs": 0, "launches": 0, "calls": 0}

#: CuPy functions whose output size depends on the data: CuPy synchronises to learn it.
_SYNCING = {"nonzero", "flatnonzero", "argwhere", "unique"}


def reset() -> dict:
    """Zero the counters; returns the counts before."""
    before = dict(COUNTS)
    for k in COUNTS:
        COUNTS[k] = 0
    return before


def _refuse_host(x, what):
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {what}: a NumPy array where a device array is "
                        f"expected (cupy.asarray copies it to the device)")


def _unwrap(x, what="a CuPy function"):
    """Device arrays to their buffers, recursively in lists and tuples; host arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, what) for v in x)
    _refuse_host(x, what)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):  # CuPy reductions give 0-d arrays
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _sync():
    COUNTS["syncs"] += 1


class ndarray:  # noqa: N801 -- CuPy's name
    """A device array: a NumPy buffer that NumPy may not read implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    # -- what makes it a device array ---------------------------------------------------------
    @property
    def __cuda_array_interface__(self):
        ai = self._a.__array_interface__
        return {"shape": ai["shape"], "typestr": ai["typestr"], "data": ai["data"], "strides": ai["strides"],
                "version": 3}

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        COUNTS["calls"] += 1
        out = getattr(ufunc, method)(*_unwrap(inputs, ufunc.__name__),
                                     **{k: _unwrap(v, ufunc.__name__) for k, v in kwargs.items()})
        return _wrap(out)

    def __array_function__(self, func, types_, args, kwargs):
        return getattr(_module, func.__name__)(*args, **kwargs)

    # -- host synchronisations ----------------------------------------------------------------
    def get(self):
        _sync()
        return self._a.copy()

    def item(self):
        _sync()
        return self._a.item()

    def tolist(self):
        _sync()
        return self._a.tolist()

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __float__(self):
        _sync()
        return float(self._a)

    def __index__(self):
        _sync()
        return operator.index(self._a)

    def nonzero(self):
        _sync()
        COUNTS["calls"] += 1
        return _wrap(self._a.nonzero())

    # -- plain attributes and methods ---------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __repr__(self):
        return f"fake_cupy.ndarray({self._a!r})"

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ / __array_struct__: NumPy would read the buffer
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            COUNTS["calls"] += 1
            return _wrap(attr(*_unwrap(args, name), **{k: _unwrap(v, name) for k, v in kwargs.items()}))
        return method

    # -- indexing: host index arrays are allowed, as in CuPy ----------------------------------
    @staticmethod
    def _index(key):
        def one(k):
            if isinstance(k, ndarray):
                return k._a
            return k
        key = tuple(one(k) for k in key) if isinstance(key, tuple) else one(key)
        masks = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, np.ndarray) and k.dtype == np.bool_ for k in masks):
            _sync()  # the result's size is the mask's count
        return key

    def __getitem__(self, key):
        COUNTS["calls"] += 1
        return _wrap(self._a[self._index(key)])

    def __setitem__(self, key, value):
        COUNTS["calls"] += 1
        k = key
        k = tuple(v._a if isinstance(v, ndarray) else v for v in k) if isinstance(k, tuple) else (
            k._a if isinstance(k, ndarray) else k)
        self._a[k] = value._a if isinstance(value, ndarray) else value


def _binary(op, reflected=False):
    def f(self, other):
        _refuse_host(other, op.__name__)
        o = other._a if isinstance(other, ndarray) else other
        COUNTS["calls"] += 1
        return _wrap(op(o, self._a) if reflected else op(self._a, o))
    return f


def _inplace(op):
    def f(self, other):
        _refuse_host(other, op.__name__)
        COUNTS["calls"] += 1
        op(self._a, other._a if isinstance(other, ndarray) else other)
        return self
    return f


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
              "matmul"):
    _op = getattr(operator, _name + ("_" if _name in ("and", "or") else ""))
    setattr(ndarray, f"__{_name}__", _binary(_op))
    setattr(ndarray, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in ("neg", "pos", "invert", "abs"):
    setattr(ndarray, f"__{_name}__", (lambda op: lambda self: _wrap(op(self._a)))(getattr(operator, _name)))
ndarray.__hash__ = None


# -- the module ---------------------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """Host data to the device (a copy), or a device array as it is (cast if ``dtype`` says)."""
    COUNTS["calls"] += 1
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else ndarray(a._a.astype(dtype))
    return ndarray(np.array(a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K"):
    COUNTS["calls"] += 1
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, copy=copy, order=order))
    return ndarray(np.array(a, dtype=dtype, order=order))


def asnumpy(a, stream=None, order="C", out=None):
    """Device to host: one synchronisation."""
    if isinstance(a, ndarray):
        _sync()
        return np.array(a._a, order=order)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return _module if any(isinstance(a, ndarray) for a in args) else np


def _function(name, fn):
    def f(*args, **kwargs):
        COUNTS["calls"] += 1
        if name in _SYNCING:
            _sync()
        return _wrap(fn(*_unwrap(args, name), **{k: _unwrap(v, name) for k, v in kwargs.items()}))
    f.__name__ = name
    return f


class _Module(types.ModuleType):
    """Everything not defined here is NumPy's function of that name, on device arrays."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            f = _function(name, attr)
            setattr(self, name, f)
            return f
        return attr


_module = _Module("cupy", __doc__)
_module.__version__ = "13.99.0+fake"
_module.__file__ = __file__
for _fn in (asarray, array, asnumpy, get_array_module):
    setattr(_module, _fn.__name__, _fn)
_module.ndarray = ndarray
_module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
    getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"fake device (numba CUDA simulator)"}))
_module.COUNTS, _module.reset = COUNTS, reset


def _count_launches():
    """Count numba CUDA kernel launches and give kernels the buffers behind device arrays (only
    under the simulator, where launches are Python calls that can be wrapped)."""
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray as sim_arrays

    if getattr(sim_kernel.FakeCUDAKernel, "_kvgpu_counted", False):
        return
    launch = sim_kernel.FakeCUDAKernel.__call__
    inside = [0]  # launches in progress: the simulator's own copies there are not the caller's

    def counted(self, *args):
        if self._device:
            return launch(self, *args)
        COUNTS["launches"] += 1
        # a host NumPy argument is copied to the device and back by numba, which waits for the
        # kernel: a sync on a GPU.  A device array is passed as its buffer: the simulator then
        # copies that in and out too, but a GPU would not, so those copies are not counted.
        COUNTS["syncs"] += sum(1 for a in args if isinstance(a, np.ndarray) and a.ndim > 0)
        args = tuple(a._a if isinstance(a, ndarray) else a for a in args)
        inside[0] += 1
        try:
            return launch(self, *args)
        finally:
            inside[0] -= 1

    copy_to_host = sim_arrays.FakeCUDAArray.copy_to_host

    def counted_copy(self, *args, **kwargs):
        if not inside[0]:
            _sync()
        return copy_to_host(self, *args, **kwargs)

    sim_kernel.FakeCUDAKernel.__call__ = counted
    sim_kernel.FakeCUDAKernel._kvgpu_counted = True
    sim_arrays.FakeCUDAArray.copy_to_host = counted_copy


def install():
    """Make ``import cupy`` give this module and count simulator launches; needs
    ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported).  Returns the module."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise RuntimeError("fake_cupy runs kernels on numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 before "
                           "starting Python")
    sys.modules["cupy"] = _module
    _count_launches()
    return _module


__all__ = ["install", "reset", "COUNTS", "ndarray", "asarray", "asnumpy"]
