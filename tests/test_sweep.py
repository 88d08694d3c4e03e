"""Sweeps: grid expansion, spec validation, rows without a placement, Parquet parts, resume after
a killed run, Dask = local, the CLI."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import kvgpu
from kvgpu import cli, generate, sweep

from conftest import DATA

SPEC = {"gpus": [5, 8], "models_per_gpu": [2, 3], "sizes": ["uniform", "llm"], "popularity": ["uniform", "zipf"],
        "seeds": 2, "mode": ["seed", "search"], "effort": 3, "batch_size": 5}
N_ROWS = 2 * 2 * 2 * 2 * 2 * 2
CASE_09 = DATA / "09_sweep_aborts_on_one_instance.yaml"


def _norm(df):
    return df.drop(columns="time_s").sort_values("key").reset_index(drop=True)


def _packs(sizes, mem) -> bool:
    """Brute force: can the models be packed into the GPUs at all (depth-first search, largest
    model first, GPUs of the same free space tried once)?"""
    sizes = sorted(sizes, reverse=True)
    free = list(mem)

    def place(i):
        if i == len(sizes):
            return True
        seen = set()
        for g in range(len(free)):
            if free[g] >= sizes[i] and free[g] not in seen:
                seen.add(free[g])
                free[g] -= sizes[i]
                if place(i + 1):
                    return True
                free[g] += sizes[i]
        return False

    return place(0)


# ----------------------------------------------------------------------------- the grid and its instances

def test_grid_rows_and_instances_depend_on_their_parameters_only():
    rows = sweep.expand(sweep.load_spec(SPEC))
    assert len(rows) == N_ROWS == len({r["key"] for r in rows})
    a, b = sweep.instance(rows[3]), sweep.instance(dict(rows[3]))
    assert (a.sizes == b.sizes).all() and (a.demand == b.demand).all()
    assert a.n_gpus == rows[3]["gpus"] and a.n_models == round(rows[3]["gpus"] * rows[3]["models_per_gpu"])
    # the solver's mode and effort do not change the instance; its seed does
    other_mode = {**rows[3], "mode": "seed" if rows[3]["mode"] == "search" else "search", "effort": 7}
    assert (sweep.instance(other_mode).sizes == a.sizes).all()
    assert not np.array_equal(sweep.instance({**rows[3], "seed": rows[3]["seed"] + 1}).sizes, a.sizes)


def test_spec_values_are_normalised_and_old_spellings_still_work():
    s = sweep.load_spec({"gpus": 4, "models_per_gpu": 3, "gpu_mem": 80, "seeds": [7, 2.0], "mode": "seed",
                         "effort": 30.0})
    rows = sweep.expand(s)
    assert [r["seed"] for r in rows] == [7, 2]
    assert all(r["models_per_gpu"] == 3.0 and isinstance(r["models_per_gpu"], float) and r["effort"] == 0
               for r in rows)  # seed mode ignores effort
    assert rows[0]["key"] == ("gpus=4|gpu_mem=80.0|models_per_gpu=3.0|sizes=uniform|popularity=uniform|seed=7|"
                              "mode=seed|effort=0|exact=false")  # seed mode: no proof unless asked


@settings(max_examples=40, deadline=None)
@given(gpus=st.integers(1, 40), per_gpu=st.floats(0.1, 6), sizes=st.sampled_from(sorted(generate.SIZES)),
       popularity=st.sampled_from(sorted(generate.POPULARITY)), mem=st.sampled_from([1.0, 20.0, 80.0, 141.0]),
       seed=st.integers(0, 2**32))
def test_fixed_count_instances_obey_their_parameters(gpus, per_gpu, sizes, popularity, mem, seed):
    n = max(1, round(per_gpu * gpus))
    inst = generate.fixed_count(np.random.default_rng(seed), gpus, n, sizes=sizes, popularity=popularity,
                                gpu_mem=mem, max_fill=0.95)
    assert inst.n_models == n and inst.n_gpus == gpus and (inst.gpu_mem == mem).all()
    assert (inst.sizes > 0).all() and (inst.sizes <= mem).all()
    assert inst.sizes.sum() <= 0.95 * mem * gpus * (1 + 1e-12)
    assert (inst.demand > 0).all() and (inst.demand <= 100 / 5).all()  # rates <= 100 (zipf rank 1), SLO >= 5 s


# ----------------------------------------------------------------------------- bad specs

def _case_19_specs():
    lines = [ln.split("#")[0].strip() for ln in (DATA / "19_bad_sweep_specs.txt").read_text().splitlines()]
    return [yaml.safe_load(ln) for ln in lines if ln.startswith("{")]


CASE_19_KEYS = ["models_per_gpu", "seeds", "gpu_mem", "gpu_mem", "seeds", "effort", "gpus"]


def test_case_19_lines_are_the_ones_this_test_expects():
    assert len(_case_19_specs()) == len(CASE_19_KEYS)


@pytest.mark.parametrize("spec, key", list(zip(_case_19_specs(), CASE_19_KEYS)))
def test_case_19_bad_values_are_refused_naming_the_key(spec, key):
    with pytest.raises(kvgpu.InvalidInstance, match=rf"\b{key}: must be"):
        sweep.load_spec(spec)


@pytest.mark.parametrize("bad, message", [
    ({"gpu": [4]}, "unknown key 'gpu'; did you mean 'gpus'?"),
    ({"gpus": 4, "seed": 3}, "unknown key 'seed'; did you mean 'seeds'?"),
    ({"gpus": 4, 1: 2}, "unknown key 1; known keys: gpus, gpu_mem"),
    ({"sizes": "huge"}, "'gpus' is required"),
    ({"gpus": [4], "sizes": "huge"}, "sizes: must be one of 'llm', 'small', 'uniform', got 'huge'"),
    ({"gpus": [0]}, "gpus: must be an integer from 1 to"),
    ({"gpus": [4], "popularity": []}, "popularity: an empty list gives no rows"),
    ({"gpus": [4], "seeds": []}, "seeds: an empty list gives no rows"),
    ({"gpus": [4], "seeds": 0}, "seeds: must be a count of seeds from 1"),
    ({"gpus": 10**12}, "gpus: must be an integer from 1 to 100000, got 1000000000000"),
    ({"gpus": 4, "seeds": 10**12}, "seeds: must be a count of seeds"),
    ({"gpus": 4, "effort": 10**20}, "effort: must be an integer from 0 to"),
    ({"gpus": 4, "gpu_mem": 10**400}, "gpu_mem: is too large, got an integer of about 401 digits"),
    ({"gpus": 4, "gpu_mem": float("inf")}, "gpu_mem: must be finite, got inf"),
    ({"gpus": 4, "models_per_gpu": 0}, "models_per_gpu: must be > 0 and <= 1000000"),
    ({"gpus": 4, "models_per_gpu": True}, "models_per_gpu: must be a number, got True (a boolean)"),
    ({"gpus": [4, False]}, "gpus: must be an integer, got False (a boolean"),
    ({"gpus": 4, "mode": "fast"}, "mode: must be one of 'search', 'seed', got 'fast'"),
    ({"gpus": 4, "batch_size": 0}, "batch_size: must be an integer from 1"),
    ({"gpus": 4, "batch_size": [8, 16]}, "batch_size: takes one value, not a list"),
    ({"gpus": 4, "backend": "gpu"}, "backend: must be one of 'auto', 'numpy', 'numba', 'cuda', got 'gpu'"),
    ({"gpus": [50_000], "models_per_gpu": 100}, "instances of 5e+06 models; at most 1000000"),
    ({"gpus": list(range(1, 101)), "seeds": 20_000}, "the grid has 2000000 rows"),
])
def test_bad_specs_name_the_key(bad, message):
    with pytest.raises(kvgpu.InvalidInstance) as e:
        sweep.load_spec(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_files_name_the_line_and_refuse_a_key_given_twice(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("gpus: [4]\nseeds: 1\neffort: -5\n")
    with pytest.raises(kvgpu.InvalidInstance, match=r"s\.yaml, line 3: effort: must be"):
        sweep.load_spec(f)
    f.write_text("gpus: [4]\nseeds: 1\ngpus: 8\n")
    with pytest.raises(kvgpu.InvalidInstance, match=r"s\.yaml, line 3: key 'gpus' given twice \(first on line 1\)"):
        sweep.load_spec(f)
    f.write_text("- gpus\n")
    with pytest.raises(kvgpu.InvalidInstance, match="a sweep spec is a mapping"):
        sweep.load_spec(f)


def _cli(argv, capsys):
    t0 = time.perf_counter()
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err, time.perf_counter() - t0


def test_cli_refuses_every_case_19_spec_with_one_line(tmp_path, capsys):
    for k, (spec, key) in enumerate(zip(_case_19_specs(), CASE_19_KEYS)):
        f = tmp_path / f"s{k}.yaml"
        f.write_text(yaml.safe_dump(spec))
        code, out, err, _ = _cli(["sweep", str(f), "--out", str(tmp_path / "o.parquet"), "--no-progress"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"kvgpu: error: {f}, line ") and f"{key}: must be" in err
    assert not (tmp_path / "o.parquet").exists()  # nothing created for a spec that was refused


@pytest.mark.parametrize("n", ["-1", "0", "257"])
def test_cli_refuses_a_local_cluster_without_workers(tmp_path, capsys, n):
    (tmp_path / "s.yaml").write_text("gpus: 4\nseeds: 1\n")
    code, _, err, secs = _cli(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o.parquet"),
                               "--dask-local", n], capsys)
    assert code == 2 and err == f"kvgpu: error: --dask-local must be an integer from 1 to {sweep.MAX_LOCAL_WORKERS}, " \
                                f"got '{n}'\n"
    assert secs < 5 and not (tmp_path / "o.parquet").exists()


def test_cli_fails_quickly_and_cleanly_on_an_unreachable_scheduler(tmp_path, capsys):
    """Must finish in under 10 s (the connect timeout is 5 s)."""
    (tmp_path / "s.yaml").write_text("gpus: 4\nseeds: 1\n")
    code, _, err, secs = _cli(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o.parquet"),
                               "--dask", "tcp://127.0.0.1:1"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("kvgpu: error: cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 5 s")
    assert secs < 10
    assert not (tmp_path / "o.parquet").exists()  # a run that wrote nothing leaves no folder it made
    (tmp_path / "o.parquet").mkdir()
    code, _, err, _ = _cli(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o.parquet"),
                            "--dask", "nonsense"], capsys)
    assert (tmp_path / "o.parquet").is_dir()  # but a folder the user had stays
    assert code == 2 and err.startswith("kvgpu: error: Dask scheduler address 'nonsense': ") and err.count("\n") == 1


def test_cli_refuses_outputs_it_cannot_write_before_solving(tmp_path, capsys, monkeypatch):
    (tmp_path / "s.yaml").write_text("gpus: 4\nseeds: 1\n")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(sweep, "solve_rows", lambda *a, **k: pytest.fail("solved before checking the output"))
    for out, plot, says in [(tmp_path / "a-file" / "o.parquet", None, "cannot create"),
                            (tmp_path / "missing" / "o.parquet", None, f"{tmp_path / 'missing'} does not exist"),
                            (tmp_path / "a-file", None, "sweep output is a folder of Parquet parts; this is a file"),
                            (tmp_path / "o.parquet", tmp_path / "missing" / "s.png", "cannot write the image"),
                            (tmp_path / "o.parquet", tmp_path / "s.nope", "cannot draw into a .nope file")]:
        argv = ["sweep", str(tmp_path / "s.yaml"), "--out", str(out)] + (["--plot", str(plot)] if plot else [])
        code, _, err, _ = _cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    # the real folder /proc refuses new entries
    if os.path.isdir("/proc"):
        code, _, err, _ = _cli(["sweep", str(tmp_path / "s.yaml"), "--out", "/proc/x.parquet"], capsys)
        assert code == 2 and err.startswith("kvgpu: error: /proc/x.parquet: cannot create") and err.count("\n") == 1


# ----------------------------------------------------------------------------- rows without a placement

def test_case_09_unplaceable_instances_are_rows_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "r.parquet"
    df = sweep.run(CASE_09, out, progress=False)
    spec = sweep.load_spec(CASE_09)
    assert len(df) == len(sweep.expand(spec)) == 12 and df["key"].is_unique
    assert set(df["status"]) <= {sweep.OK, sweep.INFEASIBLE, sweep.NOT_FOUND}
    failed = df[df["status"] != sweep.OK]
    assert len(failed) >= 1, "case 09 has instances the seed pipeline cannot pack"
    assert failed[["max_kvpr", "lower_bound", "gap"]].isna().all().all()
    ok = df[df["status"] == sweep.OK]
    assert np.isfinite(ok[["max_kvpr", "lower_bound", "gap"]]).all().all()
    # each row's status is its instance's own: solved alone, it fails exactly where the row failed,
    # and where it is placed it gets the row's objective
    for row in df.to_dict("records"):
        inst = sweep.instance(row)
        models = np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], axis=1)
        if row["status"] == sweep.OK:
            p = kvgpu.solve(models, inst.n_gpus, gpu_mem=inst.gpu_mem, mode=row["mode"], effort=row["effort"])
            assert p.max_kvpr == row["max_kvpr"]
        else:
            with pytest.raises(kvgpu.NoPlacementFound):
                kvgpu.solve(models, inst.n_gpus, gpu_mem=inst.gpu_mem, mode=row["mode"], effort=row["effort"])
        if row["status"] == sweep.INFEASIBLE:
            assert not _packs(inst.sizes, inst.gpu_mem)
    # resuming redoes nothing: no solver call, the parts as they were
    parts = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    again = sweep.run(CASE_09, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == parts
    pd.testing.assert_frame_equal(again, df)


def test_search_mode_leaves_out_only_instances_that_do_not_pack(tmp_path):
    spec = {**yaml.safe_load(CASE_09.read_text()), "mode": ["search"], "effort": 2}
    df = sweep.run(spec, tmp_path / "r.parquet", progress=False)
    assert len(df) == 12
    for row in df.to_dict("records"):
        inst = sweep.instance(row)
        assert (row["status"] == sweep.OK) == _packs(inst.sizes, inst.gpu_mem), row["key"]


def test_every_instance_of_a_batch_failing_still_gives_rows(monkeypatch):
    rows = sweep.expand(sweep.load_spec({"gpus": 3, "gpu_mem": 20, "models_per_gpu": 2.5, "seeds": 2,
                                         "mode": "seed"}))

    def nothing_fits(sizes, *a, **k):  # what solve_batch(..., infeasible="mark") returns then
        B = len(sizes)
        nan = np.full(B, np.nan)
        return kvgpu.BatchResult(np.full(sizes.shape, -1), np.full((B, 3), np.nan), nan, nan, backend="numba",
                                 status=np.full(B, sweep.INFEASIBLE, dtype=object))

    monkeypatch.setattr(kvgpu.api, "solve_batch", nothing_fits)
    out = sweep.solve_rows(rows)
    assert [r["status"] for r in out] == [sweep.INFEASIBLE] * 2
    assert all(math.isnan(r["max_kvpr"]) for r in out) and all(r["backend"] for r in out)


# ----------------------------------------------------------------------------- local = Dask, resume

def test_sweep_on_a_dask_local_cluster_equals_the_local_sweep(tmp_path):
    local = sweep.run(SPEC, tmp_path / "local.parquet", progress=False)
    local09 = sweep.run(CASE_09, tmp_path / "local09.parquet", progress=False)
    assert len(local) == N_ROWS and (local["status"] == sweep.OK).all()
    assert (local["lower_bound"] <= local["max_kvpr"] * (1 + 1e-12)).all()
    search, seed = local[local["mode"] == "search"], local[local["mode"] == "seed"]
    merged = search.merge(seed, on=[k for k in sweep.GRID if k not in ("mode", "effort")])
    assert (merged["max_kvpr_x"] <= merged["max_kvpr_y"] * (1 + 1e-12)).all()  # search never worse
    client = sweep.dask_client(local_workers=2)
    try:
        remote = sweep.run(SPEC, tmp_path / "dask.parquet", client=client, progress=False)
        remote09 = sweep.run(CASE_09, tmp_path / "dask09.parquet", client=client, progress=False)
    finally:
        client.close()
    assert _norm(local).equals(_norm(remote))
    assert _norm(local09).equals(_norm(remote09))  # rows without a placement too


def test_batches_hold_one_shape_so_time_is_per_cluster_size():
    rows = sweep.expand(sweep.load_spec(SPEC))
    for b in sweep.batches(rows, 5):
        assert len({(r["mode"], r["effort"], r["gpus"], r["models_per_gpu"], r["gpu_mem"]) for r in b}) == 1
    assert sorted(r["key"] for b in sweep.batches(rows, 5) for r in b) == sorted(r["key"] for r in rows)


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


def test_cli_sweep_prints_gap_in_percent_and_counts_failed_rows(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "seeds": 1}))
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "sweep", str(tmp_path / "spec.yaml"), "--out",
                          str(tmp_path / "r.parquet"), "--plot", str(tmp_path / "sweep.png"), "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{N_ROWS // 2} rows in" in out.stdout and "gap_mean_%" in out.stdout
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = sweep.read(tmp_path / "r.parquet")
    summary = cli._sweep_summary(df, sweep.OK)
    first = df[(df["gpus"] == 5) & (df["mode"] == "seed")]
    # one row per cluster size, mode, effort and proof setting (seed mode proves nothing unless asked)
    assert summary.loc[(5, "seed", 0, "false"), "gap_mean_%"] == pytest.approx(100 * first["gap"].mean())
    assert summary.loc[(5, "seed", 0, "false"), "proven"] == int(first["proven"].sum())
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "sweep", str(CASE_09), "--out",
                          str(tmp_path / "f.parquet"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    failed = int((sweep.read(tmp_path / "f.parquet")["status"] != sweep.OK).sum())
    assert f"12 rows in {tmp_path / 'f.parquet'} ({failed} without a placement: see column 'status')" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "kvgpu.cli", "sweep", str(tmp_path / "nope.yaml"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml: cannot read" in bad.stderr and bad.stderr.count("\n") == 1
