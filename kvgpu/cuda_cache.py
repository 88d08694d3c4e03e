"""The device kernels' disk cache: compiled once per machine, reused by every later process.

numba-cuda caches a ``cuda.jit`` kernel (``cache=True``) by the kernel's *own* bytecode and its
file's time stamp -- not by the device functions it calls, which for kvgpu's kernels
(:mod:`kvgpu.kernels.device`) are the numba CPU kernels' source in other files
(:func:`kvgpu.kernels.jit.device`): a change there would load a stale kernel, silently.  So the
kernels get a cache of their own here: numba-cuda's machinery (an index per kernel, one entry
per argument types and compute capability), in a folder named by :func:`key` -- a hash of every
kernel source file, numba, numba-cuda, the NVVM toolkit and Python -- whose entries also carry
that key as their source stamp.  A cache that cannot be read or written costs a compile, never
an error (:class:`_KernelCache`).

:func:`cached` tells whether this machine's kernels for a compute capability are compiled (a
marker written once all of them are: :func:`mark`, by :func:`kvgpu.kernels.device.prepare` and
``kvgpu warmup --cuda``); ``auto`` uses it to choose (:func:`kvgpu.backends.resolve`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

#: The kvgpu package folder (kernel sources under ``kernels/``).
_PKG = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def key() -> str:
    """16 hex digits naming this build of the device kernels: the bytes of every
    ``kvgpu/kernels/*.py`` (the device functions the kernels call live there), numba and
    numba-cuda versions, the NVVM version and Python's."""
    return source_key({f.name: f.read_bytes() for f in sorted((_PKG / "kernels").glob("*.py"))}, _toolchain())


def source_key(sources: dict, toolchain: str) -> str:
    """The hash of :func:`key` for ``sources`` ``{file name: bytes}`` and a ``toolchain``
    description (a pure function: tested with made-up sources)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update(toolchain.encode())
    return h.hexdigest()[:16]


def _toolchain() -> str:
    import numba

    parts = [f"numba {numba.__version__}", f"python {sys.version}"]
    try:
        import numba_cuda

        parts.append(f"numba-cuda {numba_cuda.__version__}")
    except ImportError:
        parts.append("numba built-in cuda")
    try:
        from numba.cuda.cudadrv import nvvm

        parts.append(f"nvvm {nvvm.NVVM().get_version()}")
    except Exception:  # noqa: BLE001 -- only a part of the key (no toolkit: nothing compiles anyway)
        parts.append("nvvm ?")
    return "; ".join(parts)


def directory() -> Path:
    """``<base>/cuda-<key>``: the base is ``NUMBA_CACHE_DIR`` if set, else ``kvgpu/kernels/__pycache__``
    where writable (beside numba's CPU cache), else ``~/.cache/kvgpu``."""
    custom = os.environ.get("NUMBA_CACHE_DIR")
    base = Path(custom) if custom else _PKG / "kernels" / "__pycache__"
    if not custom:
        try:
            base.mkdir(parents=True, exist_ok=True)
            if not os.access(base, os.W_OK):
                base = Path.home() / ".cache" / "kvgpu"
        except OSError:
            base = Path.home() / ".cache" / "kvgpu"
    return base / f"cuda-{key()}"


def _marker(cc) -> Path:
    return directory() / f"sm_{cc[0]}{cc[1]}.ready"


def cached(cc) -> bool:
    """Are the device kernels compiled and cached here for compute capability ``cc`` (a pair)?"""
    return _marker(cc).is_file()


def mark(cc) -> None:
    """Record that every device kernel is cached for ``cc`` (a read-only place: nothing; the
    next process says "compiling" again and loads whatever numba-cuda could keep)."""
    try:
        _marker(cc).parent.mkdir(parents=True, exist_ok=True)
        _marker(cc).write_text("ok\n")
    except OSError:
        pass


def enable(dispatcher) -> None:
    """Give the ``cuda.jit`` kernel ``dispatcher`` the keyed cache (a no-op under the
    simulator, which compiles nothing, and with numba's built-in CUDA target, whose cache
    classes differ: the gpu extra installs numba-cuda)."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return
    try:
        cls = _cache_class()
    except ImportError:  # numba's built-in CUDA target (not numba-cuda): no keyed cache, a compile a process
        return
    dispatcher._cache = cls(dispatcher.py_func)


@functools.lru_cache(maxsize=None)
def _cache_class():
    """numba-cuda's kernel cache, located in :func:`directory` and stamped with :func:`key`;
    built on first use (it needs numba-cuda's internals, pinned to the release of the extras)."""
    from numba.cuda.core.caching import _CacheLocator
    from numba.cuda.dispatcher import CUDACache, CUDACacheImpl

    class _Locator(_CacheLocator):
        def __init__(self, py_func, py_file):
            self._lineno = py_func.__code__.co_firstlineno
            self._path = str(directory())

        def get_cache_path(self):
            return self._path

        def get_source_stamp(self):
            return key()  # any kernel source change invalidates the index

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                return None
            return self

    class _Impl(CUDACacheImpl):
        _locator_classes = [_Locator]

    class _KernelCache(CUDACache):
        _impl_class = _Impl

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception as e:  # noqa: BLE001 -- an unreadable entry is a miss: compile
                warnings.warn(f"kvgpu: CUDA kernel cache not read ({type(e).__name__}: {e}); compiling")
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception as e:  # noqa: BLE001 -- an unwritable cache costs the next process a compile
                warnings.warn(f"kvgpu: CUDA kernel cache not written ({type(e).__name__}: {e})")

    return _KernelCache
