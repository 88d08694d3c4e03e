"""Pictures (matplotlib, the ``plot`` extra): a placement, and a sweep's quality and time.

Every image is written to a temporary file in the target folder and renamed when complete, so a
failed run leaves the previous image untouched.  The format follows the file's suffix (PNG, SVG,
PDF, ...).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from kvgpu.io import atomic_output
from kvgpu.results import plural, printable

#: KVPR's unit: demand (req_rate / slo, requests/s per second of SLO) per GB of KV cache.
KVPR_UNIT = "req/s per s of SLO per GB"
KVPR_LABEL = f"KVPR: demand per GB of KV cache\n({KVPR_UNIT})"
#: Clusters with more GPUs are drawn as distributions over the GPUs, not one bar per GPU.
BARS_UP_TO = 64

_WEIGHTS, _FREE, _OK, _WORST, _INF = "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c1c13"
_DPI = 110
#: Legends go above their axes, outside the plotting area: never over a bar.
_ABOVE = dict(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False, borderaxespad=0.2)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def check_target(path: str | Path) -> str:
    """The image format of ``path`` (its suffix); raises ``OSError`` with a one-line message if
    its folder does not exist or cannot be written, ``ValueError`` if matplotlib cannot write
    that format.  Cheap: call it before a long computation whose result is to be drawn."""
    path = Path(path)
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise ValueError(f"{path}: cannot draw into a {path.suffix or 'suffix-less'} file; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    folder = path.parent
    if not folder.is_dir():
        raise OSError(f"{path}: cannot write the image: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"{path}: cannot write the image: folder {folder} is not writable")
    if path.is_dir():
        raise OSError(f"{path}: cannot write the image: this path is a folder")
    return fmt


def _save(fig, path: str | Path) -> None:
    plt = _pyplot()
    path = Path(path)
    try:
        fmt = check_target(path)
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- a placement

def _kv_free(p) -> np.ndarray:
    """(G,) GB left for the KV cache per GPU."""
    free = getattr(p, "kv_free", None)
    return np.asarray(free if free is not None else p.instance.gpu_mem - p.used, dtype=float)


#: The segments of a GPU's memory bar, bottom to top: together they are the whole memory.
_SEGMENTS = (("weights", "model weights", dict(color=_WEIGHTS)),
             ("moved", "weights moved here (re-placement)", dict(color=_WEIGHTS, hatch="//", edgecolor="white")),
             ("new", "new model weights (re-placement)", dict(color="#64b5cd")),
             ("overhead", "engine overhead (overhead_gb)", dict(color="#8172b3")),
             ("kv_free", "left for KV cache", dict(color=_FREE, alpha=0.6)),
             ("reserve", "reserved (reserve_gb)", dict(color="#bbbbbb", hatch="..", edgecolor="#777777")))


def _memory_segments(p) -> dict:
    """(G,) GB per GPU of each of :data:`_SEGMENTS`: model weights (``size / tp``), the
    engines' ``overhead_gb``, what is left for the KV cache (at least 0) and ``reserve_gb``;
    they add up to the GPU's whole memory (less any overfill of a full GPU)."""
    prob = p.problem
    G = prob.n_gpus
    per_item = np.array([prob.specs[m].overhead_gb for m in prob.model_of.tolist()], dtype=float)
    overhead = np.bincount(p.assignment, weights=per_item, minlength=G) if per_item.size else np.zeros(G)
    moved, new = _arrivals(p)
    return {"weights": np.asarray(p.used, float) - overhead - moved - new, "moved": moved, "new": new,
            "overhead": overhead, "kv_free": np.maximum(_kv_free(p), 0.0), "reserve": np.asarray(prob.reserve, float)}


def _arrivals(p) -> tuple[np.ndarray, np.ndarray]:
    """(G,) GB of weights a re-placement copies onto each GPU, and (G,) GB of new models it
    loads there; zeros for a placement from scratch.  A model's shards are interchangeable: on
    the GPUs it did not run on, as many shards as its kept running copies left are copies (the
    running copies beyond its shards stop), the others new loads."""
    prob = p.problem
    G = prob.n_gpus
    moved, new = np.zeros(G), np.zeros(G)
    if not prob.is_replan:
        return moved, new
    for m, spec in enumerate(prob.specs):
        items = prob.items_of(m)
        was = set(prob.running[m])
        now = [int(g) for g in p.assignment[items]]
        copies = min(len(items), len(was)) - len(was & set(now))
        for g in (g for g in now if g not in was):
            (moved if copies > 0 else new)[g] += spec.size / spec.tp
            copies -= 1
    return moved, new


def _headline(p) -> str:
    count = p.count()
    lb = p.lower_bound
    if not math.isfinite(p.max_kvpr):
        verdict = "a GPU has demand but no memory left for the KV cache"
    elif p.proven_optimal:
        verdict = "optimal (proven)"
    elif math.isfinite(p.gap):
        verdict = f"gap {p.gap_words} (an upper limit on the distance from the optimum)"
    else:
        verdict = "gap unbounded (lower bound 0)"
    head = (f"{count} on {plural(p.instance.n_gpus, 'GPU')}\n"
            f"max KVPR {p.max_kvpr:.4g}, lower bound {lb:.4g}: {verdict}")
    if p.problem.is_replan:
        moves = p.moves
        head += (f"\nre-placement: {p.moved_models} model(s) moved, {sum(m.size_gb for m in moves):.4g} GB copied"
                 + (f" ({_steps(moves)})" if moves else "") + f"; max KVPR before {p.start_kvpr:.4g}")
    return head


def _steps(moves, shown: int = 4) -> str:
    """``a 0->1, b 2->0, ... (+3 more)``: the first migrations of a plan, names escaped."""
    text = ", ".join(f"{printable(m.model)} {m.src}->{m.dst}" for m in moves[:shown])
    return text + (f", ... (+{len(moves) - shown} more)" if len(moves) > shown else "")


def _kvpr_top(kv: np.ndarray, lb: float) -> float:
    """The top of the KVPR axis: room above the finite values, and above the bound unless a GPU
    is infinite (then the bound can be any size; the finite GPUs set the scale).  1 if all are 0."""
    finite = kv[np.isfinite(kv)]
    top = float(finite.max()) if finite.size else 0.0
    if math.isfinite(lb) and finite.size == kv.size:
        top = max(top, lb)
    return 1.18 * top if top > 0 else 1.0


def _bound_line(ax, lb: float, top: float) -> None:
    """The lower bound as a dashed line, or only in the legend when it is above the axis."""
    if not math.isfinite(lb) or lb > top:
        ax.plot([], [], color="black", linestyle="--", linewidth=1, label=f"lower bound {lb:.4g} (above the axis)")
    else:
        ax.axhline(lb, color="black", linestyle="--", linewidth=1, label=f"lower bound {lb:.4g}")


def placement(p, path: str | Path) -> None:
    """Draw a :class:`kvgpu.Placement` to ``path`` (see :func:`placement_figure`)."""
    _save(placement_figure(p), path)


def placement_figure(p):
    """The picture of a :class:`kvgpu.Placement` as a matplotlib Figure (close it when done).

    Up to :data:`BARS_UP_TO` GPUs, one bar per GPU: its memory split into model weights and the
    GB left for the KV cache (top), and its KVPR with the lower bound as a line (bottom); the
    worst GPU in red, a GPU with infinite KVPR (no memory left while it has demand) as a hatched
    bar to the top of the axis marked "inf".  Larger clusters as distributions: the per-GPU
    KVPR sorted (top) and a histogram of the GB left for the KV cache (bottom), so the image
    keeps its width.  Legends sit above the axes, never over the data.
    """
    plt = _pyplot()
    kv = np.asarray(p.kvpr, dtype=float)
    fig = _bars(plt, p, kv) if kv.shape[0] <= BARS_UP_TO else _distributions(plt, p, kv)
    fig.suptitle(_headline(p), x=0.01, ha="left", fontsize=10)
    return fig


def _bars(plt, p, kv):
    G = kv.shape[0]
    x = np.arange(G)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(min(max(7.0, 0.3 * G + 2.5), 22.0), 7.0), sharex=True,
                                   layout="constrained")
    seg = _memory_segments(p)
    bottom = np.zeros(G)
    for key, label, style in _SEGMENTS:
        if key in ("weights", "kv_free") or seg[key].any():  # a segment of 0 everywhere gets no legend entry
            ax1.bar(x, seg[key], bottom=bottom, label=label, **style)
        bottom = bottom + seg[key]
    ax1.set(ylabel="GPU memory (GB)")
    ax1.legend(**_ABOVE)

    top = _kvpr_top(kv, p.lower_bound)
    inf = ~np.isfinite(kv)
    finite = np.where(inf, np.nan, kv)
    worst = int(np.nanargmax(finite)) if np.isfinite(finite).any() else -1
    mark = worst if worst >= 0 and not inf.any() else -1  # an infinite GPU is the worst one
    rest = x != mark
    ax2.bar(x[rest], np.nan_to_num(finite[rest]), color=_OK, label="KVPR per GPU")
    if mark >= 0:
        ax2.bar([mark], [finite[mark]], color=_WORST, label="max KVPR")
    if inf.any():
        ax2.bar(x[inf], top, color="white", edgecolor=_INF, hatch="//", linewidth=1.2,
                label="infinite KVPR (no memory left for KV cache)")
        for g in x[inf]:
            ax2.text(g, top * 0.97, "inf", ha="center", va="top", fontsize=9, fontweight="bold", color=_INF,
                     bbox=dict(facecolor="white", edgecolor="none", pad=1))
    _bound_line(ax2, p.lower_bound, top)
    ax2.set_ylim(0, top)
    ax2.set(xlabel="GPU", ylabel=KVPR_LABEL)
    step = max(1, math.ceil(G / 32))
    ax2.set_xticks(x[::step])
    ax2.legend(**_ABOVE)
    return fig


def _distributions(plt, p, kv):
    G = kv.shape[0]
    free = _kv_free(p)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9.0, 7.0), layout="constrained")

    n_inf = int((~np.isfinite(kv)).sum())
    order = np.sort(np.where(np.isfinite(kv), kv, -np.inf))[::-1]  # inf first, as the largest
    top = _kvpr_top(kv, p.lower_bound)
    heights = np.where(np.isfinite(order), order, 0)
    ax1.fill_between(np.arange(G + 1), np.append(heights, heights[-1]), step="post", color=_OK, alpha=0.7,
                     label="KVPR per GPU, largest first")
    if n_inf:
        ax1.bar(0, top, width=n_inf, align="edge", color="white", edgecolor=_INF, hatch="//", linewidth=1.2,
                label=f"{n_inf} GPU(s) with infinite KVPR (no memory left for KV cache)")
        ax1.text(n_inf / 2, top * 0.97, "inf", ha="center", va="top", fontsize=9, fontweight="bold", color=_INF,
                 bbox=dict(facecolor="white", edgecolor="none", pad=1))
    _bound_line(ax1, p.lower_bound, top)
    ax1.set_xlim(0, G)
    ax1.set_ylim(0, top)
    ax1.set(xlabel=f"GPUs, sorted by KVPR (of {G})", ylabel=KVPR_LABEL)
    ax1.legend(**_ABOVE)

    ax2.hist(free, bins=min(40, max(10, G // 10)), color=_FREE, alpha=0.8, edgecolor="white",
             label="GPUs by GB left for KV cache")
    ax2.set(xlabel="GB left for the KV cache (GPU memory - model weights)", ylabel="GPUs")
    ax2.legend(**_ABOVE)
    return fig


# ----------------------------------------------------------------------------- a replay

def replay(res, path: str | Path) -> None:
    """Draw a replay (:class:`kvgpu.ReplayResult`) to ``path`` (see :func:`replay_figure`)."""
    _save(replay_figure(res), path)


def replay_figure(res):
    """A replay as a matplotlib Figure (close it when done): per window, the max KVPR of each
    policy's placement (top) and the models it moved before the window (bottom)."""
    plt = _pyplot()
    W = res.max_kvpr.shape[1]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    t = np.arange(W)
    width = 0.8 / len(res.policies)
    for k, row in enumerate(res.summary()):
        line, = ax1.step(t, res.max_kvpr[k], where="mid", label=f"{row['policy']}: worst {row['worst_kvpr']:.4g}, "
                         f"{row['moves']} moves, {row['migrated_gb']:.0f} GB")
        ax2.bar(t - 0.4 + (k + 0.5) * width, res.moved[k], width=width, color=line.get_color())
    ax1.set(ylabel="max KVPR over GPUs\n" + f"({KVPR_UNIT})")
    ax1.set_title(f"replay over {W} windows", loc="left")
    ax1.set_ylim(bottom=0)
    ax2.set(xlabel="window", ylabel="models moved")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(**{**_ABOVE, "ncol": 1})
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- a sweep

def sweep(df, path: str | Path) -> None:
    """Draw a sweep's rows (:func:`kvgpu.sweep.read`) to ``path`` (see :func:`sweep_figure`)."""
    _save(sweep_figure(df), path)


def sweep_figure(df):
    """A sweep's rows as a matplotlib Figure (close it when done): per cluster size (GPUs), the
    gap to the lower bound in percent (mean solid, worst dashed) and the time per instance of
    that size, one colour per mode, effort and proof setting; the legend says which bound each
    gap measures (the exact search's where it ran, else the closed-form bound).  Rows whose ``status`` is not ``ok`` (no
    placement) are left out of the figures and counted in the legend and the title."""
    plt = _pyplot()
    from kvgpu.sweep import OK

    from kvgpu.results import BOUND_EXACT

    df = df.assign(placed=df["status"].eq(OK) if "status" in df.columns else True)
    if "exact" not in df.columns:  # rows of a sweep written before proofs had a key
        df = df.assign(exact="false", bound=None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for (mode, effort, exact), grp in df.groupby(["mode", "effort", "exact"]):
        placed = grp[grp["placed"]]
        g = placed.groupby("gpus").agg(mean=("gap", "mean"), worst=("gap", "max"), time=("time_s", "mean"))
        failed = len(grp) - len(placed)
        proved = int(placed["bound"].eq(BOUND_EXACT).sum())
        label = (mode if mode == "seed" else f"{mode} (effort {effort})") + f", proofs {exact}: gap to the " + \
            (f"exact search on {proved} of {len(placed)}, else closed-form bound" if proved else
             "closed-form bound") + (f", {failed} of {len(grp)} without a placement" if failed else "")
        line, = ax1.plot(g.index, 100 * g["mean"], marker="o", label=label)
        ax1.plot(g.index, 100 * g["worst"], linestyle="--", marker=".", color=line.get_color())
        ax2.plot(g.index, g["time"], marker="o", color=line.get_color())
    ax1.set(xlabel="GPUs", ylabel="gap to the lower bound (%)\nsolid: mean, dashed: worst", title="quality")
    ax1.set_ylim(bottom=0)
    ax2.set(yscale="log", xlabel="GPUs", ylabel="seconds per instance (mean)", title="time")
    sizes = sorted(df["gpus"].unique().tolist())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(g) for g in sizes])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    n_failed = int((~df["placed"]).sum())
    fig.suptitle(f"{len(df) - n_failed} instances placed" +
                 (f"; {n_failed} without a placement, left out" if n_failed else ""), fontsize=10)
    fig.tight_layout()
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, len(labels)),
               frameon=False)
    return fig


# ----------------------------------------------------------------------------- demand over windows

def windows(evaluations, path: str | Path) -> None:
    """Draw the max KVPR per window of several placements to ``path`` (see :func:`windows_figure`)."""
    _save(windows_figure(evaluations), path)


def windows_figure(evaluations):
    """The max KVPR of each window, one line per placement (:class:`kvgpu.demand.WindowEvaluation`,
    e.g. of :func:`kvgpu.demand.compare`), the worst window of each marked; a Figure (close it).
    Infinite KVPRs (a GPU with demand and no KV memory) are drawn at the top of the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    labels = list(evaluations[0].windows) if evaluations else []
    x = np.arange(len(labels))
    finite = [v for e in evaluations for v in e.max_by_window.tolist() if math.isfinite(v)]
    top = max(finite, default=1.0) * 1.1 or 1.0
    for e in evaluations:
        y = e.max_by_window
        line, = ax.plot(x, np.where(np.isfinite(y), y, top), marker="." if len(x) <= 96 else None,
                        label=f"{printable(e.label)}: worst {e.worst:.4g}, q95 {e.quantile():.4g}")
        ax.plot([e.worst_window], [min(e.worst, top)], marker="o", color=line.get_color(), markersize=8)
    step = max(1, len(labels) // 12)
    ax.set_xticks(x[::step], [str(w) for w in labels[::step]], rotation=30, ha="right", fontsize=7)
    ax.set(xlabel="window", ylabel=KVPR_LABEL, title="max KVPR per window (circle: the worst window)")
    ax.set_ylim(0, top * 1.05)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    handles, names = ax.get_legend_handles_labels()  # below the figure: never over a line
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, len(names)), frameon=False)
    return fig
