"""The one compile decorator of kvgpu's numba kernels.

``numba.njit`` compiles a function called from compiled code once per *type* of its arguments
-- and a constant argument (``-1``, ``4000``) has a type of its own, a literal, so a helper
called with ``-1`` in one place and a variable in another is compiled twice, its callers
with it.  That doubled and tripled the first-run compile time of the kernels.  :func:`kernel`
makes compiled calls see constants as plain ``int64``, so each kernel is compiled once per
array layout, the way the kernels are written to be used.  Compiled code is cached on disk
(``cache=True``), as with ``numba.njit``; ``NUMBA_DISABLE_JIT=1`` leaves the Python functions
(for debugging).
"""

from __future__ import annotations

from numba.core import config, types
from numba.core.registry import CPUDispatcher


class _Dispatcher(CPUDispatcher):
    """numba's CPU dispatcher, with constant argument types widened in compiled calls."""

    def get_call_template(self, args, kws):
        return super().get_call_template(tuple(types.unliteral(a) for a in args),
                                         {k: types.unliteral(v) for k, v in kws.items()})


def kernel(func=None, *, inline: bool = False, parallel: bool = False):
    """``numba.njit(cache=True)`` (``inline="always"`` with ``inline``, ``parallel=True`` with
    ``parallel``), compiled once per argument types, never per constant (module doc)."""
    def wrap(f):
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
