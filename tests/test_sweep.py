"""Sweeps: grid expansion, Parquet parts, resume after a killed run, Dask = local, plots, CLI."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

import kvgpu
from kvgpu import plot, sweep

SPEC = {"gpus": [5, 8], "models_per_gpu": [2, 3], "sizes": ["uniform", "llm"], "popularity": ["uniform", "zipf"],
        "seeds": 2, "mode": ["seed", "search"], "effort": 3, "batch_size": 5}
N_ROWS = 2 * 2 * 2 * 2 * 2 * 2


def _norm(df):
    return df.drop(columns="time_s").sort_values("key").reset_index(drop=True)


def test_grid_rows_and_deterministic_instances():
    rows = sweep.expand(sweep.load_spec(SPEC))
    assert len(rows) == N_ROWS == len({r["key"] for r in rows})
    a, b = sweep.instance(rows[3]), sweep.instance(dict(rows[3]))
    assert (a.sizes == b.sizes).all() and (a.demand == b.demand).all()
    assert a.n_gpus == rows[3]["gpus"] and a.n_models == round(rows[3]["gpus"] * rows[3]["models_per_gpu"])


@pytest.mark.parametrize("bad, message", [
    ({"gpu": [4]}, "unknown key(s) ['gpu']"), ({"sizes": "huge"}, "'gpus' is required"),
    ({"gpus": [4], "sizes": "huge"}, "sizes 'huge' unknown"), ({"gpus": [0]}, "gpus must be positive integers"),
    ({"gpus": 4, "mode": "fast"}, "mode 'fast' unknown"), ({"gpus": 4, "batch_size": 0}, "batch_size must be"),
])
def test_bad_specs_name_the_key(bad, message):
    with pytest.raises(kvgpu.InvalidInstance, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        sweep.load_spec(bad)


def test_sweep_on_a_dask_local_cluster_equals_the_local_sweep(tmp_path):
    local = sweep.run(SPEC, tmp_path / "local.parquet", progress=False)
    assert len(local) == N_ROWS and (local["lower_bound"] <= local["max_kvpr"] * (1 + 1e-12)).all()
    search, seed = local[local["mode"] == "search"], local[local["mode"] == "seed"]
    merged = search.merge(seed, on=[k for k in sweep.GRID if k not in ("mode", "effort")])
    assert (merged["max_kvpr_x"] <= merged["max_kvpr_y"] * (1 + 1e-12)).all()  # search never worse
    client = sweep.dask_client(local_workers=2)
    try:
        remote = sweep.run(SPEC, tmp_path / "dask.parquet", client=client, progress=False)
    finally:
        client.close()
    assert _norm(local).equals(_norm(remote))


def test_resume_after_a_killed_sweep(tmp_path):
    spec = {"gpus": [16], "models_per_gpu": [3], "seeds": 60, "mode": "search", "effort": 20, "batch_size": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "res.parquet"
    cmd = [sys.executable, "-m", "kvgpu.cli", "sweep", str(tmp_path / "spec.yaml"), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert 3 <= len(parts) < 60, "the sweep must be killed midway for this test to mean anything"
    done = pd.read_parquet(out)
    df = sweep.run(tmp_path / "spec.yaml", out, progress=False)
    assert len(df) == 60 and df["key"].is_unique
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet") if p.name in parts} == parts  # kept as written
    assert set(done["key"]) <= set(df["key"])
    assert not list(out.glob(".part-*"))  # a half-written part of the killed run is cleared


def test_cli_sweep_and_plots(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "seeds": 1}))
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "sweep", str(tmp_path / "spec.yaml"), "--out",
                          str(tmp_path / "r.parquet"), "--plot", str(tmp_path / "sweep.png"), "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{N_ROWS // 2} rows in" in out.stdout and "gap_mean" in out.stdout
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "demo", "--plot", str(tmp_path / "demo.png")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "kvgpu.cli", "sweep", str(tmp_path / "nope.yaml"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml: cannot read" in bad.stderr


def test_plot_placement_writes_an_image(tmp_path):
    import matplotlib.image

    p = kvgpu.solve([[30, 5, 1], [20, 1, 1], [10, 1, 1]], 3)
    plot.placement(p, tmp_path / "p.png")
    img = matplotlib.image.imread(tmp_path / "p.png")
    assert img.shape[0] > 300 and img.shape[1] > 300
