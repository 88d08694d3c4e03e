"""Pictures: a placement (small, with an infinite GPU, 200 GPUs), a sweep with a failed row;
legends off the data, units on the KVPR axis, bounded widths, atomic writes."""
import math

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import kvgpu
from kvgpu import generate, plot, sweep
from kvgpu.results import BOUND_CLOSED_FORM, BOUND_EXACT

PNG = b"\x89PNG\r\n\x1a\n"


def _models(inst):
    return np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], axis=1)


@pytest.fixture
def small():
    return kvgpu.solve([[30, 5, 1], [20, 1, 1], [10, 1, 1]], 3)


@pytest.fixture
def with_infinite_gpu():
    """An 80 GB model with demand fills its 80 GB GPU: that GPU's KVPR is infinite."""
    p = kvgpu.solve([[80, 1, 2], [20, 1, 1], [30, 2, 1], [10, 3, 1]], 3)
    assert np.isinf(p.kvpr).sum() == 1 and np.isfinite(p.kvpr).sum() == 2
    return p


def _legends_clear_of_axes(fig):
    """Every legend's box lies outside its axes' plotting area (so never over a bar)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        lb, ab = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert lb.y0 >= ab.y1 - 1 or lb.x0 >= ab.x1 - 1 or lb.y1 <= ab.y0 + 1, ax.get_ylabel()


def _kvpr_axis(fig):
    return next(ax for ax in fig.axes if ax.get_ylabel().startswith("KVPR"))


def test_small_placement_image(tmp_path, small):
    plot.placement(small, tmp_path / "p.png")
    img = matplotlib.image.imread(tmp_path / "p.png")
    assert 300 < img.shape[0] < 1200 and 300 < img.shape[1] < 1500
    assert not [f for f in tmp_path.iterdir() if f.name != "p.png"]  # no temporary file left
    fig = plot.placement_figure(small)
    try:
        _legends_clear_of_axes(fig)
        ax = _kvpr_axis(fig)
        assert plot.KVPR_UNIT in ax.get_ylabel() and "per GB of KV cache" in ax.get_ylabel()
        heights = sorted(r.get_height() for r in ax.patches)
        assert heights == pytest.approx(sorted(small.kvpr.tolist()))  # one bar per GPU, its KVPR
        red = [r for r in ax.patches if r.get_facecolor()[:3] == matplotlib.colors.to_rgb(plot._WORST)]
        assert [r.get_height() for r in red] == pytest.approx([small.max_kvpr])
        bound = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert bound and bound[0].get_ydata()[0] == pytest.approx(small.lower_bound)
        assert f"{100 * small.gap:.2f}%" in fig.get_suptitle() or small.proven_optimal
    finally:
        matplotlib.pyplot.close(fig)


def test_an_infinite_gpu_is_marked(tmp_path, with_infinite_gpu):
    p = with_infinite_gpu
    plot.placement(p, tmp_path / "inf.png")
    assert (tmp_path / "inf.png").read_bytes()[:8] == PNG
    fig = plot.placement_figure(p)
    try:
        _legends_clear_of_axes(fig)
        ax = _kvpr_axis(fig)
        top = ax.get_ylim()[1]
        finite_max = float(p.kvpr[np.isfinite(p.kvpr)].max())
        assert finite_max < top < 2 * finite_max  # the finite GPUs set the scale, not the bound
        hatched = [r for r in ax.patches if r.get_hatch()]
        g = int(np.argmax(np.isinf(p.kvpr)))
        assert len(hatched) == 1 and hatched[0].get_height() == pytest.approx(top)
        assert hatched[0].get_x() + hatched[0].get_width() / 2 == pytest.approx(g)
        assert [t.get_text() for t in ax.texts] == ["inf"]
        assert "no memory left for the KV cache" in fig.get_suptitle()
    finally:
        matplotlib.pyplot.close(fig)


def test_a_200_gpu_placement_is_drawn_as_distributions_of_bounded_width(tmp_path):
    inst = generate.cluster(np.random.default_rng(0), 200, 600)
    m = np.vstack([_models(inst)[:-2], [[80.0, 1.0, 1.0]] * 2])  # two GPUs full: infinite KVPR
    p = kvgpu.solve(m, 200, mode="seed")
    n_inf = int(np.isinf(p.kvpr).sum())
    assert n_inf >= 2
    plot.placement(p, tmp_path / "big.png")
    img = matplotlib.image.imread(tmp_path / "big.png")
    assert img.shape[1] <= 1200 and img.shape[0] <= 1000
    fig = plot.placement_figure(p)
    try:
        _legends_clear_of_axes(fig)
        ax = _kvpr_axis(fig)
        assert len(ax.patches) < 20  # a curve and the infinite block, not 200 bars
        assert any(f"{n_inf} GPU(s) with infinite KVPR" in t.get_text() for t in ax.get_legend().get_texts())
        hist = next(a for a in fig.axes if a is not ax)
        assert sum(r.get_height() for r in hist.patches) == 200  # every GPU in the histogram
    finally:
        matplotlib.pyplot.close(fig)


def _sweep_frame():
    rows = []
    for gpus, gaps in ((8, [0.02, 0.04, math.nan]), (16, [0.01, 0.03, 0.05])):
        for seed, gap in enumerate(gaps):
            ok = not math.isnan(gap)
            rows.append({"gpus": gpus, "mode": "search", "effort": 30, "seed": seed, "key": f"{gpus}|{seed}",
                         "status": sweep.OK if ok else sweep.NOT_FOUND, "gap": gap,
                         "max_kvpr": 1 + gap if ok else math.nan, "time_s": 0.01 * gpus if ok else 99.0})
    return pd.DataFrame(rows)


def test_sweep_plot_leaves_failed_rows_out_and_counts_them(tmp_path):
    df = _sweep_frame()
    plot.sweep(df, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG
    fig = plot.sweep_figure(df)
    try:
        quality, timing = fig.axes[:2]
        mean = quality.lines[0]
        assert list(mean.get_xdata()) == [8, 16]
        assert mean.get_ydata() == pytest.approx([3.0, 3.0])  # percent, the failed row left out
        assert quality.lines[1].get_ydata() == pytest.approx([4.0, 5.0])  # worst
        assert timing.lines[0].get_ydata() == pytest.approx([0.08, 0.16])  # per cluster size, placed rows
        assert "1 without a placement" in fig.get_suptitle()
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["search (effort 30), proofs false: gap to the closed-form bound, 1 of 6 without a placement"]
        assert "(%)" in quality.get_ylabel()
    finally:
        matplotlib.pyplot.close(fig)


def test_sweep_plot_says_which_bound_each_gap_measures():
    df = _sweep_frame()
    placed = df["status"].eq(sweep.OK)
    proved = df.assign(exact="auto", bound=[BOUND_EXACT if ok and k % 2 else BOUND_CLOSED_FORM if ok else None
                                             for k, ok in enumerate(placed)])
    both = pd.concat([proved, df.assign(exact="false", bound=BOUND_CLOSED_FORM)], ignore_index=True)
    fig = plot.sweep_figure(both)
    try:
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        k = int(proved["bound"].eq(BOUND_EXACT).sum())
        assert labels == [f"search (effort 30), proofs auto: gap to the exact search on {k} of 5, else closed-form "
                          f"bound, 1 of 6 without a placement",
                          "search (effort 30), proofs false: gap to the closed-form bound, 1 of 6 without a placement"]
    finally:
        matplotlib.pyplot.close(fig)


def test_a_failed_write_leaves_the_previous_image(tmp_path, small, monkeypatch):
    target = tmp_path / "p.png"
    plot.placement(small, target)
    before = target.read_bytes()

    def broken(self, fname, **kw):
        open(fname, "wb").write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot.placement(small, target)
    assert target.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["p.png"]


def test_targets_that_cannot_be_written_are_refused_in_one_line(tmp_path, small):
    with pytest.raises(OSError, match="folder .*missing does not exist"):
        plot.placement(small, tmp_path / "missing" / "p.png")
    with pytest.raises(ValueError, match=r"cannot draw into a \.xyz file; use one of .*\.png"):
        plot.check_target(tmp_path / "p.xyz")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OSError, match="this path is a folder"):
        plot.check_target(tmp_path / "d.png")
    assert plot.check_target(tmp_path / "p.svg") == "svg"
