"""The device kernels compiled without a device: PTX from numba-cuda, machine code from ``ptxas``.

What CI checks about the CUDA kernels before any GPU sees them (``tests/test_cuda_compile.py``,
``bash bench/gpu_check.sh --compile``):

* every kernel of :mod:`kvgpu.kernels.device` (and the probe of :mod:`kvgpu.kernels.cuda_probe`)
  compiles to PTX for a compute capability (``numba.cuda.compile_ptx``: NVVM, no driver), with
  the argument types the engine launches it with (:func:`kvgpu.kernels.device.recorded`);
* ``ptxas`` assembles that PTX (``ptxas -v``): registers a thread, spill stores and loads, the
  stack frame and static shared memory of each kernel (:func:`assemble`);
* the theoretical occupancy those figures allow (:func:`occupancy`);
* every fused multiply-add of the PTX, and every product ``ptxas`` could still fuse with a sum
  (:func:`fma_report`): a CUDA compiler contracts ``a * b + c`` into one FMA rounded once,
  which can change a comparison the CPU makes with two roundings.  An FMA whose product is
  exact (a factor 0 or 1) rounds alike; every other product whose sum decides something is
  written :func:`kvgpu.kernels.deltas.fmul`, a ``mul.rn`` that is never fused.

The toolkit is the pip one (``numba-cuda[cu12]`` brings ``nvidia-cuda-nvcc-cu12``: NVVM and
``ptxas``); :func:`toolkit` finds it or says why not.  Needs numba's CUDA target, not the
simulator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

#: Compute capabilities CI compiles for: A100 and H100.
CCS = ((8, 0), (9, 0))

#: Per-SM limits of the occupancy arithmetic (:func:`occupancy`), from NVIDIA's CUDA C
#: Programming Guide, "Compute Capabilities" table, and the occupancy calculator's allocation
#: rules: registers 64 Ki a SM, allocated per warp in units of 256; at most 64 warps (2,048
#: threads) and 32 blocks a SM; shared memory 164 KiB (8.0) / 228 KiB (9.0) a SM, of which the
#: driver reserves 1 KiB per block.
SM_LIMITS = {
    (8, 0): dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=164 * 1024, smem_reserved=1024),
    (9, 0): dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=228 * 1024, smem_reserved=1024),
}


class Figures(NamedTuple):
    """``ptxas -v`` figures of one kernel: registers a thread; bytes of stack frame, spill
    stores, spill loads and static shared memory a thread (the last a block)."""

    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared: int


def toolkit() -> tuple[str | None, str]:
    """``(path of ptxas or None, why not)``: the pip toolkit's ``ptxas``
    (``nvidia-cuda-nvcc-cu12``), else one on ``PATH``; and numba-cuda must be installed (the
    CUDA target the gpu extra pins, not numba's built-in one) and compile (NVVM found), not
    simulate."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return None, "NUMBA_ENABLE_CUDASIM=1: the simulator compiles nothing"
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:  # numba's built-in CUDA target is not what the engine runs on
        return None, "numba-cuda is not installed (the test and gpu extras install numba-cuda[cu12])"
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()
    except Exception as e:  # noqa: BLE001 -- any failure means: no NVVM to compile with
        return None, f"numba cannot load NVVM ({type(e).__name__}: {e}); install the test extra (numba-cuda[cu12])"
    ptxas = _pip_ptxas() or shutil.which("ptxas")
    if ptxas is None:
        return None, "no ptxas (install nvidia-cuda-nvcc-cu12, which numba-cuda[cu12] brings)"
    return ptxas, ""


def _pip_ptxas() -> str | None:
    try:
        import nvidia.cuda_nvcc as pkg
    except ImportError:
        return None
    for root in getattr(pkg, "__path__", []):
        p = Path(root) / "bin" / "ptxas"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def kernels() -> dict:
    """``{name: (Python function, numba argument types, threads a block, dynamic shared bytes)}``
    of every kernel the cuda backend launches -- as recorded from a solve of ADRS-shaped
    instances (:func:`kvgpu.kernels.device.recorded`) -- and the probe kernel."""
    import numba
    import numpy as np

    from kvgpu.kernels import cuda_probe, device

    out = {}
    for name, ln in device.recorded().items():
        out[name] = (ln.kernel.py_func, tuple(numba.typeof(a) for a in ln.args), ln.threads, ln.shared)
    out["probe"] = (cuda_probe.fill.py_func, (numba.typeof(np.zeros(1, np.int64)),), 32, 0)
    return out


def compile_ptx(pyfunc, sig, cc) -> str:
    """The PTX of kernel ``pyfunc`` for argument types ``sig`` and compute capability ``cc``
    (a pair), as the engine's launch compiles it.

    numba-cuda compiles the *device functions* a kernel calls for "the current device"
    (``numba.cuda.dispatcher.get_current_device().compute_capability``) and keeps them by
    argument types only, whatever the capability; without a device that call fails.  So
    here it answers ``cc``, and one process compiles for one capability (:func:`main`)."""
    import types as pytypes

    from numba import cuda
    from numba.cuda import dispatcher

    global _CC
    if _CC not in (None, tuple(cc)):
        raise RuntimeError(f"this process compiled for sm_{_CC[0]}{_CC[1]} already: one capability a process")
    _CC = tuple(cc)
    fake = pytypes.SimpleNamespace(compute_capability=_CC)
    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: fake
    try:
        ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=_CC)
    finally:
        dispatcher.get_current_device = real
    return ptx


#: The capability this process compiled device functions for (:func:`compile_ptx`).
_CC = None


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def assemble(ptx: str, cc, ptxas: str) -> Figures:
    """``ptxas -v`` on ``ptx`` (one kernel) for ``sm_XY``: its :class:`Figures`.  Raises
    RuntimeError with ptxas's message when it does not assemble."""
    arch = f"sm_{cc[0]}{cc[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"-arch={arch}", "-o", str(Path(tmp) / "k.cubin"), str(src)],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return parse_ptxas(r.stderr + r.stdout)


def parse_ptxas(text: str) -> Figures:
    """The :class:`Figures` of the one entry function ``ptxas -v`` reports in ``text``."""
    if len(_ENTRY.findall(text)) != 1:
        raise ValueError(f"expected one entry function in the ptxas report, got: {text[-2000:]}")
    st, used = _STACK.search(text), _USED.search(text)
    if st is None or used is None:
        raise ValueError(f"unrecognised ptxas report: {text[-2000:]}")
    return Figures(int(used[1]), int(st[1]), int(st[2]), int(st[3]), int(used[2] or 0))


def occupancy(fig: Figures, threads: int, dyn_shared: int, cc=(9, 0)) -> float:
    """Theoretical occupancy (resident warps / the SM's maximum, 0-1) of blocks of ``threads``
    threads with ``fig``'s registers and static shared memory plus ``dyn_shared`` bytes of
    dynamic shared memory, by the occupancy calculator's rules (:data:`SM_LIMITS`): blocks a SM
    are the fewest allowed by warps, the block cap, registers (a warp's registers rounded up
    to the allocation unit) and shared memory (with the per-block reservation)."""
    lim = SM_LIMITS[tuple(cc)]
    warps = -(-threads // 32)
    per_warp = -(-max(1, fig.registers) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // per_warp) // warps
    smem = fig.shared + dyn_shared + lim["smem_reserved"]
    by_smem = lim["smem"] // smem
    blocks = min(lim["warps"] // warps, lim["blocks"], by_regs, by_smem)
    return blocks * warps / lim["warps"]


#: Immediates a product by which is exact (``x * 0``, ``x * 1``, ``x * -1``): a fused add of such
#: a product rounds once either way.
_EXACT = {"0d0000000000000000", "0d8000000000000000", "0d3FF0000000000000", "0dBFF0000000000000"}
_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+([^;]*);", re.M)


class FmaReport(NamedTuple):
    """The multiply-adds of a PTX module (:func:`fma_report`): ``fused``, the ``fma`` of it;
    ``exact``, those of them whose product is exact (a factor 0 or +-1, an immediate or a
    select between such: ``mem_unit``'s ``(M < 1.0) * M``); ``risky``, the instructions that
    can round differently from the CPU -- an ``fma`` with an inexact product, or a product
    without a rounding modifier that feeds a sum without one (``ptxas`` may fuse those two in
    machine code, which PTX allows)."""

    fused: int
    exact: int
    risky: list


def fma_report(ptx: str) -> FmaReport:
    """Find the fused and fusable double multiply-adds of ``ptx`` (:class:`FmaReport`) by
    following its virtual registers (each written by the instructions that define it)."""
    instrs = [(op, [x.strip() for x in args.split(",")]) for op, args in _INSTR.findall(ptx)]
    defs: dict = {}
    for op, args in instrs:
        if args and args[0].startswith("%"):
            defs.setdefault(args[0], []).append((op, args[1:]))

    def exact(x):
        if x in _EXACT:
            return True
        got = defs.get(x, [])
        return bool(got) and all((op.startswith("selp.") and all(a in _EXACT for a in args[:2]))
                                 or (op.startswith("mov.") and args[0] in _EXACT) for op, args in got)

    fused = exact_n = 0
    risky = []
    fusable = {args[0] for op, args in instrs if op in ("mul.f64", "mul.f32") and not any(map(exact, args[1:3]))}
    for op, args in instrs:
        if op.startswith("fma.") and op.endswith(("f64", "f32")):
            fused += 1
            if any(map(exact, args[1:3])):
                exact_n += 1
            else:
                risky.append(f"{op} {', '.join(args)}")
        elif op in ("add.f64", "sub.f64", "add.f32", "sub.f32") and fusable.intersection(args[1:3]):
            risky.append(f"{op} {', '.join(args)} (of an unrounded product)")
    return FmaReport(fused, exact_n, risky)


def check(cc) -> dict:
    """Compile every kernel (:func:`kernels`) for ``cc`` and assemble it: ``{name: figures}``,
    each ``{"ok", "error", "registers", "stack", "spill_stores", "spill_loads", "shared",
    "threads", "dyn_shared", "occupancy", "fused", "exact_fused", "risky"}`` (the figures
    absent where it failed).  Raises RuntimeError without a toolkit (:func:`toolkit`)."""
    ptxas, why = toolkit()
    if ptxas is None:
        raise RuntimeError(why)
    out = {}
    for name, (pyfunc, sig, threads, dyn) in kernels().items():
        try:
            ptx = compile_ptx(pyfunc, sig, cc)
            fig = assemble(ptx, cc, ptxas)
        except Exception as e:  # noqa: BLE001 -- reported per kernel, the others still compile
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
            continue
        fma = fma_report(ptx)
        out[name] = {"ok": True, "error": "", **fig._asdict(), "threads": threads, "dyn_shared": dyn,
                     "occupancy": occupancy(fig, threads, dyn, cc), "fused": fma.fused, "exact_fused": fma.exact,
                     "risky": fma.risky}
    return out


SUMMARY = "gpu-compile: kernels {k}/{n}, max registers {R}, spill bytes {S}, stack bytes {T}, occupancy {O}%"


def summary(results: dict) -> str:
    """The one line of ``bash bench/gpu_check.sh --compile`` from ``{cc: check(cc)}``: kernels
    compiled and assembled over all capabilities; the largest registers a thread, spill bytes
    (stores + loads) and stack frame of any kernel; and the lowest theoretical occupancy of a
    kernel on sm_90 (else the newest capability checked) at the engine's launch shape for
    ADRS-shaped instances (:func:`occupancy`; ``n/a`` where none assembled)."""
    rows = [r for res in results.values() for r in res.values()]
    good = [r for r in rows if r["ok"]]
    cc = (9, 0) if (9, 0) in results else max(results) if results else None
    occ = [r["occupancy"] for r in results.get(cc, {}).values() if r["ok"]]
    fmt = (lambda v: v) if good else (lambda v: "n/a")
    return SUMMARY.format(k=len(good), n=len(rows), R=fmt(max([r["registers"] for r in good], default=0)),
                          S=fmt(max([r["spill_stores"] + r["spill_loads"] for r in good], default=0)),
                          T=fmt(max([r["stack"] for r in good], default=0)),
                          O=f"{100 * min(occ):.1f}" if occ else "n/a")


def main(argv=None) -> int:
    """``python -m kvgpu.kernels.cuda_build --cc 9.0 [--json PATH]``: :func:`check` for one
    capability a process (:func:`compile_ptx`), a line per kernel, the figures as JSON; exit 1
    if a kernel failed, 3 without a toolkit.  ``--summary JSON...``: the line of :func:`summary`."""
    import argparse

    ap = argparse.ArgumentParser(description="compile the cuda backend's kernels without a device")
    ap.add_argument("--cc", help="compute capability, e.g. 9.0")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--summary", type=Path, nargs="+", default=None,
                    help="print the summary line of these --json files instead (a missing one counts as nothing)")
    a = ap.parse_args(argv)
    if a.summary:
        loaded = [json.loads(f.read_text()) for f in a.summary if f.is_file()]
        print(summary({tuple(d["cc"]): d["kernels"] for d in loaded}))
        return 0
    if not a.cc:
        ap.error("--cc or --summary is required")
    cc = tuple(int(x) for x in a.cc.split("."))
    if cc not in SM_LIMITS:
        ap.error(f"--cc {a.cc}: choose from {', '.join(f'{x}.{y}' for x, y in SM_LIMITS)}")
    try:
        res = check(cc)
    except RuntimeError as e:
        print(f"gpu-compile: no toolkit: {e}")
        return 3
    for name, r in res.items():
        if r["ok"]:
            print(f"sm_{cc[0]}{cc[1]} {name}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
                  f"{r['spill_loads']} B spill loads, {r['stack']} B stack, {r['shared']} B static shared; "
                  f"{r['threads']} threads, {r['dyn_shared']} B dynamic shared -> occupancy "
                  f"{100 * r['occupancy']:.1f}%; {r['fused']} FMA ({r['exact_fused']} exact), "
                  f"{len(r['risky'])} that can change a decision")
        else:
            print(f"sm_{cc[0]}{cc[1]} {name}: FAILED {r['error']}")
    if a.json:
        a.json.write_text(json.dumps({"cc": list(cc), "kernels": res}, indent=1))
    return 0 if all(r["ok"] for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
