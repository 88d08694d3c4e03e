"""Pictures (matplotlib, the ``plot`` extra): a placement, and a sweep's quality and time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvgpu[plot]'") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def placement(p, path: str | Path) -> None:
    """Per GPU: memory split into model weights and the KV cache space left (top), and KVPR with
    the lower bound as a line (bottom); the worst GPU is marked.  Saved to ``path``."""
    plt = _pyplot()
    G = p.instance.n_gpus
    x = np.arange(G)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * G + 2), 6), sharex=True)
    ax1.bar(x, p.used, color="#4c72b0", label="model weights")
    ax1.bar(x, p.instance.gpu_mem - p.used, bottom=p.used, color="#dd8452", alpha=0.6, label="free for KV cache")
    ax1.set(ylabel="GB")
    ax1.set_title(f"{p._count()} on {G} GPUs", loc="left", fontsize=10)
    ax1.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    kv = np.where(np.isfinite(p.kvpr), p.kvpr, np.nan)
    worst = int(np.nanargmax(kv)) if np.isfinite(kv).any() else 0
    colors = ["#c44e52" if g == worst else "#55a868" for g in range(G)]
    ax2.bar(x, kv, color=colors)
    ax2.axhline(p.lower_bound, color="black", linestyle="--", linewidth=1,
                label=f"lower bound {p.lower_bound:.4g} (gap {100 * p.gap:.2f}%)")
    ax2.set(xlabel="GPU", ylabel="KV cache pressure", xticks=x)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(df, path: str | Path) -> None:
    """Gap to the lower bound and time per instance against cluster size, one line per mode
    (and effort); saved to ``path`` (PNG, SVG or PDF by suffix)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (mode, effort), grp in df.groupby(["mode", "effort"]):
        g = grp.groupby("gpus").agg(gap=("gap", "mean"), time=("time_s", "mean")).sort_index()
        label = mode if mode == "seed" else f"{mode} (effort {effort})"
        ax1.plot(g.index, 100 * g["gap"], marker="o", label=label)
        ax2.plot(g.index, g["time"], marker="o", label=label)
    ax1.set(xlabel="GPUs", ylabel="mean gap to the lower bound (%)", title="quality")
    ax2.set(yscale="log", xlabel="GPUs", ylabel="seconds per instance", title="time")
    sizes = sorted(df["gpus"].unique().tolist())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(g) for g in sizes])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
