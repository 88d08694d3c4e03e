"""The one compile decorator of kvgpu's numba kernels, for both targets: CPU and CUDA.

CPU: ``numba.njit`` compiles a function called from compiled code once per *type* of its
arguments -- and a constant argument (``-1``, ``4000``) has a type of its own, a literal, so a
helper called with ``-1`` in one place and a variable in another is compiled twice, its callers
with it.  That doubled and tripled the first-run compile time of the kernels.  :func:`kernel`
makes compiled calls see constants as plain ``int64``, so each kernel is compiled once per
array layout, the way the kernels are written to be used.  Compiled code is cached on disk
(``cache=True``), as with ``numba.njit``, but stale when any kernel module changed (numba
looks at the kernel's own file only); ``NUMBA_DISABLE_JIT=1`` leaves the Python functions
(for debugging).

CUDA: every function decorated with :func:`kernel` is registered, and :func:`device` compiles
its Python source again as a CUDA device function whose calls to other registered kernels go
to *their* device versions -- found from the function's own global names, so no module
declares or patches anything: one source, two targets.  A kernel may name a device
implementation of its own (``kernel(device=factory)``) where the targets must differ: the
thread barrier (:func:`barrier`), the product that must not fuse into an FMA
(:func:`kvgpu.kernels.deltas.fmul`), and the wrapping ``uint64`` arithmetic that must not warn
where kernels run as Python (:mod:`kvgpu.kernels.u64`).
On the CPU a kernel run by "thread ``tid`` of ``nt``" is called with ``(0, 1)``.
"""

from __future__ import annotations

import hashlib
import types as _pytypes
from pathlib import Path

import numpy as np
from numba.core import config, types
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher
from numba.extending import overload

from kvgpu.kernels import deltas, u64

#: id of every registered Python function -> (function, device implementation factory or None)
_REGISTRY: dict = {}
#: id of a registered Python function -> its compiled device function (built once)
_DEVICE: dict = {}


def _sources_key() -> str:
    """A hash of every kernel module's source (this folder's ``*.py``)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


#: What a cached kernel depends on besides its own file: the sources of all kernel modules.
SOURCES_KEY = _sources_key()


class _KernelCache(FunctionCache):
    """numba's on-disk cache of one kernel, stale when *any* kernel module changed.  numba
    stamps a kernel's cache with its own file only, so a kernel whose callee in another module
    changed (the layout of the rules tuple, say) would load machine code compiled against the
    old callee -- wrong answers or a crash."""

    def __init__(self, py_func):
        super().__init__(py_func)
        index = getattr(self, "_cache_file", None)  # numba's index of the cached overloads
        if index is None or not hasattr(index, "_source_stamp"):
            raise RuntimeError("kvgpu: this numba keeps its kernel cache index elsewhere; the kernel cache cannot "
                               "be keyed on the kernels' sources (update kvgpu.kernels.jit._KernelCache)")
        index._source_stamp = (index._source_stamp, SOURCES_KEY)


class _Dispatcher(CPUDispatcher):
    """numba's CPU dispatcher, with constant argument types widened in compiled calls, cached
    by :class:`_KernelCache`."""

    def enable_caching(self):
        self._cache = _KernelCache(self.py_func)

    def get_call_template(self, args, kws):
        return super().get_call_template(tuple(types.unliteral(a) for a in args),
                                         {k: types.unliteral(v) for k, v in kws.items()})


def kernel(func=None, *, inline: bool = False, parallel: bool = False, device=None):
    """``numba.njit(cache=True)`` (``inline="always"`` with ``inline``, ``parallel=True`` with
    ``parallel``), compiled once per argument types, never per constant (module doc).

    ``device``: a callable returning the Python function to compile for CUDA instead of this
    one (or None to use this one), for the few primitives whose targets must differ."""
    def wrap(f):
        _REGISTRY[id(f)] = (f, device)
        if config.DISABLE_JIT:
            return f
        opts = {"nopython": True}
        if inline:
            opts["inline"] = "always"
        if parallel:
            opts["parallel"] = True
        disp = _Dispatcher(py_func=f, locals={}, targetoptions=opts)
        disp.enable_caching()
        return disp
    return wrap(func) if func is not None else wrap


def _py(obj):
    """The registered Python function behind ``obj`` (a dispatcher or a function), or None."""
    f = getattr(obj, "py_func", obj)
    return f if id(f) in _REGISTRY and _REGISTRY[id(f)][0] is f else None


def _names(code):
    """Every global name ``code`` and the code objects nested in it may load."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, _pytypes.CodeType):
            out |= _names(c)
    return out


def device(fn):
    """The CUDA device function compiled from the Python source of the kernel ``fn`` (a
    dispatcher from :func:`kernel`, or its Python function), its calls to other kernels bound
    to their device versions (built once each, callees first).  Needs numba's CUDA target; under
    the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the result runs as Python."""
    f = _py(fn)
    if f is None:
        raise TypeError(f"{fn!r} is not a kvgpu kernel (decorate it with kvgpu.kernels.jit.kernel)")
    got = _DEVICE.get(id(f))
    if got is not None:
        return got
    from numba import cuda

    factory = _REGISTRY[id(f)][1]
    src = (factory() if factory is not None else None) or f
    # only the names the code loads: a small namespace (the simulator scans it on every call)
    glb = {"__builtins__": src.__globals__.get("__builtins__", __builtins__)}
    for name in _names(src.__code__):
        if name not in src.__globals__:
            continue  # an attribute name, or a builtin
        obj = src.__globals__[name]
        callee = _py(obj)
        glb[name] = device(callee) if callee is not None and callee is not f else obj
    body = _pytypes.FunctionType(src.__code__, glb, src.__name__, src.__defaults__, src.__closure__)
    if config.ENABLE_CUDASIM and "cuda" not in glb:
        got = body  # the simulator's device wrapper only swaps a ``cuda`` global: plain Python is the same, faster
    else:
        got = cuda.jit(device=True)(body)
    _DEVICE[id(f)] = got
    return got


def _cuda_barrier():
    from kvgpu.kernels import cuda_prims

    return cuda_prims.barrier


@kernel(inline=True, device=_cuda_barrier)
def barrier():
    """The threads of a block wait for each other (``cuda.syncthreads``); on the CPU, where
    one thread runs a kernel, nothing."""
    return None


def _cuda_fmul():
    from kvgpu.kernels import cuda_prims

    return cuda_prims.FMUL


def register(f, device=None):
    """Register the plain Python function ``f`` (callable from kernels by other means, e.g.
    an ``overload``) so that :func:`device` binds calls to it, to ``device()`` if given."""
    _REGISTRY[id(f)] = (f, device)
    return f


@overload(deltas.fmul)
def _fmul_cpu(a, b):
    """CPU kernels call :func:`kvgpu.kernels.deltas.fmul` as a plain product (LLVM does not
    contract on the CPU)."""
    return lambda a, b: a * b


register(deltas.fmul, device=_cuda_fmul)


def _cuda_u64(name):
    def factory():
        from kvgpu.kernels import cuda_prims

        return getattr(cuda_prims, name)
    return factory


@overload(u64.wrap_mul)
def _wrap_mul_cpu(a, b):
    """CPU kernels call :func:`kvgpu.kernels.u64.wrap_mul` as the ``uint64`` product, which wraps."""
    return lambda a, b: np.uint64(a) * np.uint64(b)


@overload(u64.wrap_add)
def _wrap_add_cpu(a, b):
    """CPU kernels call :func:`kvgpu.kernels.u64.wrap_add` as the ``uint64`` sum, which wraps."""
    return lambda a, b: np.uint64(a) + np.uint64(b)


register(u64.wrap_mul, device=_cuda_u64("WRAP_MUL"))
register(u64.wrap_add, device=_cuda_u64("WRAP_ADD"))
