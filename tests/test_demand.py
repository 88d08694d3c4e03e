"""Demand over time (kvgpu.demand): request logs and long tables read into (n_models, W) rates,
with errors naming file, line and field; req_rate from a log on the command line; a placement
evaluated window by window; the bursty families of kvgpu.generate."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest

import kvgpu
from kvgpu import demand as dm
from kvgpu.cli import main
from kvgpu.errors import InvalidInstance, KvgpuWarning
from kvgpu.generate import bursty

NAMES = ["a", "b", "c"]
T0 = 1_796_601_600  # 2026-12-07T00:00:00Z, a multiple of 3600
# (seconds after T0, model): a 2, b 1 in hour 0; nothing in hour 1; a 1, b 3 in hour 2; c never
REQUESTS = [(0, "a"), (10, "a"), (3599, "b"), (7200, "a"), (7300, "b"), (7301, "b"), (10799, "b")]
COUNTS = np.array([[2, 0, 1], [1, 0, 3], [0, 0, 0]])


def _iso(sec):
    return pd.Timestamp(sec, unit="s", tz="UTC").isoformat().replace("+00:00", "Z")


def write_log(path, rows, iso=False, extra=None):
    """Write ``rows`` of (epoch seconds, model[, slo]) as CSV, Parquet or JSONL by suffix."""
    df = pd.DataFrame({"timestamp": [_iso(t) if iso else t for t, *_ in rows], "model": [r[1] for r in rows]})
    if rows and len(rows[0]) > 2:
        df["slo"] = [r[2] for r in rows]
    for k, v in (extra or {}).items():
        df[k] = v
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
@pytest.mark.parametrize("iso", [False, True], ids=["epoch", "iso"])
def test_log_counts_per_window(tmp_path, suffix, iso):
    log = write_log(tmp_path / f"log{suffix}", [(T0 + t, m) for t, m in REQUESTS], iso)
    with pytest.warns(KvgpuWarning, match=r"no request: rate 0 in every window \(c\)"):
        d = dm.read_requests(log, NAMES, window="1h", end=T0 + 10800)  # 3 whole hours
    assert d.rates.shape == (3, 3) and d.rates.dtype == np.float64
    np.testing.assert_array_equal(d.rates, COUNTS / 3600.0)  # the empty hour is 0, c is 0 throughout
    assert d.windows == ("2026-12-07T00:00:00Z", "2026-12-07T01:00:00Z", "2026-12-07T02:00:00Z")
    assert d.window_s == 3600.0 and d.start_s.tolist() == [T0, T0 + 3600, T0 + 7200]
    assert d.models == tuple(NAMES) and d.slo is None and any("(c)" in n for n in d.notes)


def test_log_window_lengths_and_offsets(tmp_path):
    log = write_log(tmp_path / "log.csv", [(T0 + t, m) for t, m in REQUESTS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvgpuWarning)
        d = dm.read_requests(log, NAMES, window="30min", end=_iso(T0 + 10800))
        # ISO times with an offset mean the same instants
        iso = tmp_path / "off.csv"
        pd.DataFrame({"time": [pd.Timestamp(T0 + t, unit="s", tz="UTC").tz_convert("Europe/Paris").isoformat()
                               for t, _ in REQUESTS], "model_name": [m for _, m in REQUESTS]}).to_csv(iso, index=False)
        d2 = dm.read_requests(iso, NAMES, window=1800, start=T0, end=T0 + 10800)
    assert d.n_windows == 6 and d.window_s == 1800
    np.testing.assert_array_equal(d.rates * 1800, [[2, 0, 0, 0, 1, 0], [0, 1, 0, 0, 2, 1], [0] * 6])
    np.testing.assert_array_equal(d2.rates, d.rates)
    assert dm.window_seconds("15min") == 900 and dm.window_seconds("60s") == 60 and dm.window_seconds("1h") == 3600


def test_log_slo_column_and_pick(tmp_path):
    rows = [(T0 + t, m, {"a": 2.0, "b": 8.0}[m]) for t, m in REQUESTS]
    log = write_log(tmp_path / "log.jsonl", rows)
    with pytest.warns(KvgpuWarning):
        d = dm.read_requests(log, NAMES, window="1h", end=T0 + 10800)
    assert d.slo[:2].tolist() == [2.0, 8.0] and np.isnan(d.slo[2])
    # busiest = largest sum(rate / slo): hour 0 has 2/2 + 1/8, hour 2 has 1/2 + 3/8 (more requests, less demand)
    assert d.busiest(slo=1.0) == 0
    np.testing.assert_array_equal(d.pick("busiest", slo=1.0), COUNTS[:, 0] / 3600)
    np.testing.assert_array_equal(d.pick("peak"), COUNTS.max(axis=1) / 3600)
    np.testing.assert_array_equal(d.pick("mean"), COUNTS.mean(axis=1) / 3600)
    np.testing.assert_array_equal(d.pick(2), COUNTS[:, 2] / 3600)
    for bad in (3, -1):  # a negative index is refused, not read as counting from the end
        with pytest.raises(InvalidInstance, match=f"window {bad} out of range: 3 windows"):
            d.pick(bad)
    with pytest.raises(InvalidInstance, match="model 'c' has no slo"):
        d.busiest()


def _table(tmp_path, text, name="demand.csv"):
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.mark.parametrize("kind, text, message", [
    ("unknown model", "model,window,req_rate\na,0,1\nd,0,2\n", r"demand.csv, line 3, field 'model': model 'd' is not"),
    ("unsorted", "model,window,req_rate\na,0,1\nb,0,1\na,2,1\na,1,1\nb,1,1\nb,2,1\n",
     r"demand.csv, line 5, field 'window': model 'a': unsorted windows: window 1 after window 2"),
    ("overlapping", "model,window,req_rate\na,0,1\na,0,2\n",
     r"demand.csv, line 3, field 'window': model 'a': overlapping windows: window 0 given twice"),
    ("negative", "model,window,req_rate\na,0,1\na,1,-2\n",
     r"demand.csv, line 3, field 'req_rate': req_rate must be a finite number >= 0, got '-2'"),
    ("missing", "model,window,req_rate\na,0,1\n\na,1,\n", r"demand.csv, line 4, field 'req_rate': no req_rate"),
    ("non-finite", "model,window,req_rate\na,0,inf\n", r"demand.csv, line 2, field 'req_rate': .*got 'inf'"),
    ("not a number", "model,window,req_rate\na,0,lots\n", r"line 2, field 'req_rate': req_rate must be a number"),
    ("bad window", "model,window,req_rate\na,0.5,1\n", r"line 2, field 'window': a window is an integer index"),
    ("bad time", "model,window,req_rate\na,2026-12-07T00:00Z,1\na,yesterday,1\n",
     r"line 3, field 'window': bad timestamp 'yesterday'"),
    ("indexes and times", "model,window,req_rate\na,2026-12-07T00:00Z,1\na,7,1\n",
     r"line 3, field 'window': window '7' is an index, but other rows give start times"),
    ("window missing for a model", "model,window,req_rate\na,0,1\nb,0,1\nb,1,1\n",
     r"model 'a' has no row for window 1"),
    ("slo varies", "model,window,req_rate,slo\na,0,1,2\na,1,1,3\n", r"line 3, field 'slo': slo 3 differs from 2"),
    ("unknown column", "model,window,req_rate,sol\na,0,1,2\n", r"unknown column 'sol' \(did you mean 'slo'\?\)"),
])
def test_bad_tables(tmp_path, kind, text, message):
    with pytest.raises(InvalidInstance, match=message):
        dm.read_table(_table(tmp_path, text), NAMES)


def test_overlapping_time_windows(tmp_path):
    f = _table(tmp_path, "model,window,req_rate\na,2026-12-07T00:00:00Z,1\na,2026-12-07T00:30:00Z,1\n")
    with pytest.raises(InvalidInstance, match=r"line 3, field 'window': overlapping windows: window "
                       r"2026-12-07T00:30:00Z starts 1800 s after .* less than the window length 3600 s"):
        dm.read_table(f, NAMES, window="1h")
    with pytest.warns(KvgpuWarning, match=r"have no row: rate 0 in every window \(b, c\)"):
        assert dm.read_table(f, NAMES).window_s == 1800  # default: the gap between starts


@pytest.mark.parametrize("kind, rows, message", [
    ("unknown model", [(T0, "a"), (T0 + 1, "chatt")], r"line 3, field 'model': model 'chatt' is not in the models"),
    ("bad timestamp", [(T0, "a"), ("7 Dec", "a")], r"line 3, field 'timestamp': bad timestamp '7 Dec'"),
    ("missing model", [(T0, "a"), (T0 + 1, "")], r"line 3, field 'model': no model"),
    ("missing timestamp", [(T0, "a"), ("", "b")], r"line 3, field 'timestamp': bad timestamp"),
    ("milliseconds", [(T0 * 1000, "a")], r"line 2, field 'timestamp': timestamp '1796601600000' is after the year "
     r"5000 in epoch seconds: milliseconds"),
])
def test_bad_logs(tmp_path, kind, rows, message):
    log = tmp_path / "log.csv"
    pd.DataFrame({"timestamp": [r[0] for r in rows], "model": [r[1] for r in rows]}).to_csv(log, index=False)
    with pytest.raises(InvalidInstance, match="log.csv, " + message):
        dm.read_requests(log, NAMES)


def test_bad_log_lines_jsonl_and_parquet(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"timestamp": 1, "model": "a"}\n\n{"timestamp": "x", "model": "a"}\n')
    with pytest.raises(InvalidInstance, match=r"log.jsonl, line 3, field 'timestamp': bad timestamp 'x'"):
        dm.read_requests(log, NAMES)
    pq = write_log(tmp_path / "log.parquet", [(T0, "a"), (T0, "zz")])
    with pytest.raises(InvalidInstance, match=r"log.parquet, row 2, field 'model': model 'zz'"):
        dm.read_requests(pq, NAMES)
    with pytest.raises(InvalidInstance, match=r"x.csv: no column 'when' \(timestamp\); columns: timestamp, model"):
        dm.read_requests(write_log(tmp_path / "x.csv", [(T0, "a")]), NAMES, timestamp="when")
    (tmp_path / "y.csv").write_text("when,model\n1,a\n")
    with pytest.raises(InvalidInstance, match="y.csv: no timestamp column .*; columns: when, model"):
        dm.read_requests(tmp_path / "y.csv", NAMES)
    with pytest.raises(InvalidInstance, match="window 'soon'"):
        dm.read_requests(log, NAMES, window="soon")
    stray = write_log(tmp_path / "stray.csv", [(T0, "a"), (5, "b")])  # a timestamp of 1970
    with pytest.raises(InvalidInstance, match=r"stray.csv: the log spans .* windows of 60 s .*from 1970-01-01T00:00:05Z"):
        dm.read_requests(stray, NAMES, window="60s")


def _steady_log(path, lo, hours, every=(10, 20)):
    """A log from ``lo`` for ``hours``: model a every ``every[0]`` s, b every ``every[1]`` s, each
    request in the middle of its slot (so any window of whole slots holds an exact count)."""
    rows = [(lo + (k + 0.5) * dt, m) for m, dt in zip("ab", every) for k in range(int(hours * 3600 / dt))]
    return write_log(path, sorted(rows))


def test_log_partial_windows_not_diluted(tmp_path):
    lo = T0 + 1800  # 00:30: windows start at the log's start, not on the hour
    log = _steady_log(tmp_path / "log.csv", lo, 4.5)
    with pytest.warns(KvgpuWarning, match=r"1 window\(s\) of 3600 s only in part: 2026-12-07T04:30:00Z \(1800 s\)"):
        d = dm.read_requests(log, NAMES, window="1h", start=lo, end=lo + 4.5 * 3600)
    assert d.n_windows == 5 and d.start_s[0] == lo and d.covered_s.tolist() == [3600] * 4 + [1800]
    np.testing.assert_allclose(d.rates[:2], [[0.1] * 5, [0.05] * 5], rtol=1e-12)  # the half window too
    np.testing.assert_allclose(d.pick("mean"), [0.1, 0.05, 0], rtol=1e-12)
    assert not d.partial(0) and d.partial(4)
    # a window longer than the log: one window, the log's own rate (not diluted 10h / 4.5h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvgpuWarning)
        long = dm.read_requests(log, NAMES, window="10h", start=lo, end=lo + 4.5 * 3600)
        default = dm.read_requests(log, NAMES, window="15min")  # span: first to last request
    np.testing.assert_allclose(long.rates[:2, 0], [0.1, 0.05], rtol=1e-12)
    assert default.start_s[0] == lo + 5 and default.n_windows == 18
    np.testing.assert_allclose(default.pick("mean")[:2], [0.1, 0.05], rtol=1e-3)


def test_log_mean_weighted_by_time_covered():
    # window 0: 3600 s at 1 req/s; window 1: 600 s at 2 req/s -> 4800 requests in 4200 s
    d = dm.Demand(np.array([[1.0, 2.0]]), ("a",), ("0", "1"), 3600.0, None, None, (), "d", np.array([3600, 600.0]))
    assert d.pick("mean")[0] == pytest.approx(4800 / 4200)
    with pytest.raises(InvalidInstance, match="covered_s must be one number > 0"):
        dm.Demand(np.array([[1.0]]), ("a",), ("0",), 60.0, covered_s=np.array([0.0]))


def test_log_span_errors(tmp_path):
    log = write_log(tmp_path / "log.csv", [(T0 + 10, "a"), (T0 + 20, "b")])
    with pytest.raises(InvalidInstance, match=r"log.csv, line 2: request at 2026-12-07T00:00:10Z is outside the log's"):
        dm.read_requests(log, NAMES, start=T0 + 15)
    with pytest.raises(InvalidInstance, match=r"log.csv, line 3: request at .* outside"):
        dm.read_requests(log, NAMES, end="2026-12-07T00:00:15Z")
    one = write_log(tmp_path / "one.csv", [(T0, "a")])
    with pytest.raises(InvalidInstance, match=r"one.csv: the log covers no time .*give the time it covers"):
        dm.read_requests(one, NAMES)
    with pytest.raises(InvalidInstance, match="log start 'dawn'"):
        dm.read_requests(log, NAMES, start="dawn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvgpuWarning)
        d = dm.read_requests(one, NAMES, window="1h", end=T0 + 3600)
    assert d.rates[0, 0] == 1 / 3600
    pq = tmp_path / "ms.parquet"  # numbers print as numbers, not np.int64(...)
    pd.DataFrame({"timestamp": [T0 * 1000], "model": ["a"]}).to_parquet(pq)
    with pytest.raises(InvalidInstance, match=r"timestamp 1796601600000 is after the year 5000"):
        dm.read_requests(pq, NAMES)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json", ".jsonl"])
def test_long_table_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(3)
    d = dm.Demand(rng.uniform(0, 9, (3, 5)), tuple(NAMES), tuple(_iso(T0 + 900 * k) for k in range(5)), 900.0,
                  T0 + 900.0 * np.arange(5), np.array([2.0, 5.0, 1.5]), (), "x")
    d.write(tmp_path / f"t{suffix}")
    back = dm.read_table(tmp_path / f"t{suffix}", NAMES)
    np.testing.assert_array_equal(back.rates, d.rates)  # bit for bit
    assert back.windows == d.windows and back.window_s == 900 and back.slo.tolist() == d.slo.tolist()
    # the same table as a DataFrame, and models in another order
    again = dm.as_demand(d.to_frame(), ["c", "a", "b"])
    np.testing.assert_array_equal(again.rates, d.rates[[2, 0, 1]])


def test_indexed_table_and_array(tmp_path):
    f = _table(tmp_path, "model,window,req_rate\nb,0,1\nb,1,2.5\na,0,0\na,1,4\n")
    with pytest.warns(KvgpuWarning, match=r"\(c\)"):
        d = dm.read_table(f, NAMES)
    np.testing.assert_array_equal(d.rates, [[0, 4], [1, 2.5], [0, 0]])
    assert d.windows == ("0", "1") and d.window_s is None and d.start_s is None
    arr = dm.as_demand(d.rates, [{"name": n, "size": 1, "req_rate": 0, "slo": 1} for n in NAMES])
    np.testing.assert_array_equal(arr.rates, d.rates)
    with pytest.raises(InvalidInstance, match=r"shape \(n_models, W\) = \(3, W\)"):
        dm.as_demand(np.ones(3), NAMES)
    with pytest.raises(InvalidInstance, match="model 'b', window 1: req_rate must be a finite number >= 0"):
        dm.as_demand(np.array([[0, 1], [0, -1], [0, 0.0]]), NAMES)
    with pytest.raises(InvalidInstance, match="no windows"):
        dm.as_demand(np.ones((3, 0)), NAMES)
    with pytest.raises(InvalidInstance, match="slo must be one number > 0"):
        dm.Demand(np.ones((3, 1)), tuple(NAMES), ("0",), slo=np.array([1.0, 0.0, 2.0]))
    with pytest.raises(InvalidInstance, match="model 1: has no name"):
        dm.as_demand(np.ones((2, 2)), [{"name": "a"}, {"size": 1}])


# ----------------------------------------------------------------------------- the command line

MODELS_CSV = "name,size,slo,tp,replicas\na,20,5,1,1\nb,30,2,2,1\nc,10,4,1,2\n"


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _expected_models(log, how, window="1h"):
    specs, _ = kvgpu.io.read_models(log.parent / "models.csv", defaults={"req_rate": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvgpuWarning)
        d = dm.read_requests(log, specs, window=window)
    return dm.with_rates(specs, d.pick(how, slo=d.slo_of([s.slo for s in specs])), d.slo)


@pytest.mark.parametrize("how", ["busiest", "peak", "mean", "2"])
def test_cli_solve_requests_same_as_api(tmp_path, capsys, how):
    (tmp_path / "models.csv").write_text(MODELS_CSV)
    log = write_log(tmp_path / "log.parquet", [(T0 + t, m) for t, m in REQUESTS], iso=True)
    code, out, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--pick", how, "--gpus", 4,
                          "--json")
    assert code == 0, err
    models = _expected_models(log, int(how) if how.isdigit() else how)
    api = kvgpu.solve(models, 4)
    got = json.loads(out)
    assert got["assignment"] == api.assignment.tolist() and got["max_kvpr"] == api.max_kvpr
    assert [g["demand"] for g in got["gpus"]] == api.demand.tolist()
    assert "req_rate from" in err and "no request: rate 0 in every window (c)" in err


def test_cli_size_requests_same_as_api(tmp_path, capsys):
    (tmp_path / "models.csv").write_text(MODELS_CSV)
    rows = [(T0 + 60 * k, "a" if k % 3 else "b") for k in range(600)]  # 10 hours, about 1/180 req/s each
    log = write_log(tmp_path / "log.csv", rows)
    code, out, err = _cli(capsys, "size", tmp_path / "models.csv", "--requests", log, "--max-kvpr", "1e-4", "--json")
    assert code == 0, err
    api = kvgpu.size(_expected_models(log, "busiest"), 1e-4)
    assert json.loads(out) == json.loads(json.dumps(api.to_dict()))


@pytest.mark.parametrize("cmd", ["certify", "replan", "headroom"])
def test_cli_requests_on_every_entry_point(tmp_path, capsys, cmd):
    (tmp_path / "models.csv").write_text("name,size,slo,cur_gpu_id\na,20,5,0\nb,30,2,1\nc,10,4,-1\n"
                                         if cmd == "replan" else MODELS_CSV)
    log = write_log(tmp_path / "log.csv", [(T0 + t, m) for t, m in REQUESTS])
    argv = {"certify": ["certify"], "replan": ["replan", "--max-moves", "1"],
            "headroom": ["size", "--headroom", "--max-kvpr", "1e-5"]}[cmd]
    code, out, err = _cli(capsys, *argv, tmp_path / "models.csv", "--requests", log, "--gpus", 4, "--json")
    assert code == 0, err
    models = _expected_models(log, "busiest")
    api = {"certify": lambda: kvgpu.solve(models, 4, exact=True).to_dict(),
           "replan": lambda: kvgpu.replan(models, 4, max_moves=1).to_dict(),
           "headroom": lambda: kvgpu.headroom(models, 4, max_kvpr=1e-5).to_dict()}[cmd]()
    assert json.loads(out) == json.loads(json.dumps(api))


def test_cli_requests_slo_from_log_and_default(tmp_path, capsys):
    (tmp_path / "models.csv").write_text("name,size\na,20\nb,30\nc,10\n")  # neither rates nor SLOs
    log = write_log(tmp_path / "log.csv", [(T0 + t, m) for t, m in REQUESTS])
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--gpus", 2)
    assert code == 2 and "field 'slo'" in err  # nobody gives an SLO: refused, not guessed
    code, out, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--gpus", 2, "--slo", 4,
                          "--json", "--log-end", T0 + 10800)
    assert code == 0, err
    assert sum(g["demand"] for g in json.loads(out)["gpus"]) == pytest.approx(4 / 3600 / 4)  # hour 2: 4 requests
    slo_log = write_log(tmp_path / "slo.csv", [(T0 + t, m, {"a": 1.0, "b": 3.0}[m]) for t, m in REQUESTS])
    code, out, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", slo_log, "--gpus", 2, "--json")
    assert code == 0, err  # busiest by demand: hour 0 (2/1 + 1/3) over hour 2 (1/1 + 3/3)
    assert sum(g["demand"] for g in json.loads(out)["gpus"]) == pytest.approx((2 + 1 / 3) / 3600)


def test_cli_requests_window_longer_than_log(tmp_path, capsys):
    """A 15-minute log gives the same req_rate with --window 15min and 1h (not 4x lower)."""
    (tmp_path / "models.csv").write_text(MODELS_CSV)
    log = _steady_log(tmp_path / "log.csv", T0, 0.25)
    got = {}
    for w in ("15min", "1h"):
        code, out, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--window", w, "--gpus", 4,
                              "--json", "--log-start", T0, "--log-end", _iso(T0 + 900))
        assert code == 0, err
        got[w] = json.loads(out)["gpus"]
    assert [g["demand"] for g in got["1h"]] == [g["demand"] for g in got["15min"]]
    assert "which the log covers for 900 s only" in err and "of 3600 s only in part" in err
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--log-end", T0, "--gpus", 2)
    assert code == 2 and "--log-end is for --requests LOG" in err
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--pick", "-1", "--gpus", 2)
    assert code == 2 and "window -1 out of range" in err


def test_cli_requests_errors(tmp_path, capsys):
    (tmp_path / "models.csv").write_text(MODELS_CSV.replace(",slo,", ",req_rate,slo,").replace("a,20,", "a,20,1,")
                                         .replace("b,30,", "b,30,1,").replace("c,10,", "c,10,1,"))
    bad = write_log(tmp_path / "log.csv", [(T0, "a"), (T0 + 5, "x")])
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", bad, "--gpus", 2)
    assert code == 2 and "log.csv, line 3, field 'model': model 'x' is not in the models file" in err
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--pick", "mean", "--gpus", 2)
    assert code == 2 and "--pick is for --requests LOG" in err
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", bad, "--pick", "most", "--gpus", 2)
    assert code == 2 and "--pick 'most': choose busiest, mean, peak or a window index" in err


# ----------------------------------------------------------------------------- evaluation

def _placement():
    models = [{"name": "a", "size": 20, "req_rate": 3, "slo": 5}, {"name": "b", "size": 30, "req_rate": 2, "slo": 2,
                                                                   "tp": 2},
              {"name": "c", "size": 10, "req_rate": 1, "slo": 4, "replicas": 2}, {"name": "d", "size": 8,
                                                                                  "req_rate": 5, "slo": 1}]
    return models, kvgpu.solve(models, 4, gpu_mem=[40, 80, 40, 80])


def test_kvpr_by_window_equals_hand_loop():
    models, p = _placement()
    rates = np.random.default_rng(5).uniform(0, 10, (4, 7))
    rates[:, 3] = 0  # a quiet window
    got = dm.kvpr_by_window(p, rates)
    assert got.shape == (7, 4) and got.dtype == np.float64
    for w in range(7):  # by hand: each model's demand split over its tp x replicas items
        load = np.zeros(4)
        for i, g in enumerate(p.assignment.tolist()):
            m = models[int(p.model_of[i])]
            load[g] += rates[int(p.model_of[i]), w] / m["slo"] / (m.get("tp", 1) * m.get("replicas", 1))
        free = np.array([40, 80, 40, 80.0]) - p.used
        np.testing.assert_allclose(got[w], load / free, rtol=1e-13)
    # one window of the solved rates gives the placement's own KVPR, bit for bit
    same = dm.kvpr_by_window(p, np.array([[m["req_rate"]] for m in models], float))
    np.testing.assert_array_equal(same[0], p.kvpr)
    ev = dm.evaluate(p, rates)
    assert ev.worst == got.max() and ev.max_by_window.tolist() == got.max(axis=1).tolist()
    assert ev.busiest_window.tolist() == np.argmax(got, axis=0).tolist() and ev.max_by_window[3] == 0
    assert ev.quantile(1.0) == ev.worst and ev.quantile(0.5) == np.sort(got.max(axis=1))[3]


def test_mean_and_peak_comparison():
    b = bursty(np.random.default_rng(2), 4, windows=24, groups=3)
    d = dm.as_demand(b.rates, b.models)
    chosen = dm.mean_and_peak(b.models, 4, d, effort=4)
    assert [label for label, _ in chosen] == ["mean", "peak"]
    mean, peak = (p for _, p in chosen)
    np.testing.assert_allclose(mean.demand.sum(), (b.rates.mean(axis=1) / [m["slo"] for m in b.models]).sum())
    evals = dm.compare(chosen + [("given", peak)], d)  # any (label, placement): a robust one joins here
    table = dm.summary(evals)
    assert list(table.index) == ["mean", "peak", "given"]
    for e in evals:
        assert table.loc[e.label, "worst_kvpr"] == dm.kvpr_by_window(e.placement, d).max()
    assert dm.timeline(evals).shape == (24, 5)


def test_cli_evaluate(tmp_path, capsys):
    (tmp_path / "models.csv").write_text(MODELS_CSV)
    log = write_log(tmp_path / "log.csv", [(T0 + t, m) for t, m in REQUESTS])
    code, _, err = _cli(capsys, "solve", tmp_path / "models.csv", "--requests", log, "--gpus", 4, "--out",
                        tmp_path / "p.json")
    assert code == 0, err
    table = tmp_path / "d.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvgpuWarning)
        dm.read_requests(log, NAMES, end=T0 + 10800).write(table)
    code, out, err = _cli(capsys, "evaluate", tmp_path / "models.csv", "--demand", table, "--placement",
                          tmp_path / "p.json", "--gpus", 4, "--json", "--plot", tmp_path / "w.png")
    assert code == 0, err
    got = json.loads(out)
    assert [p["label"] for p in got["placements"]] == ["p", "robust", "mean", "peak"] and len(got["windows"]) == 3
    specs, _ = kvgpu.io.read_models(tmp_path / "models.csv", defaults={"req_rate": 0.0})
    p = dm.read_placement(tmp_path / "p.json", kvgpu.build_problem(specs, 4))
    assert got["placements"][0]["max_kvpr_by_window"] == dm.kvpr_by_window(p, COUNTS / 3600).max(axis=1).tolist()
    assert (tmp_path / "w.png").stat().st_size > 0
    # the cluster's fields count: reserve_gb leaves less KV memory, so every window's KVPR rises
    code, out, err = _cli(capsys, "evaluate", tmp_path / "models.csv", "--demand", table, "--placement",
                          tmp_path / "p.json", "--gpus", 4, "--reserve-gb", 10, "--json")
    assert code == 0, err
    reserved = json.loads(out)["placements"]
    p10 = dm.read_placement(tmp_path / "p.json", kvgpu.build_problem(specs, 4, reserve_gb=10))
    assert reserved[0]["max_kvpr_by_window"] == dm.kvpr_by_window(p10, COUNTS / 3600).max(axis=1).tolist()
    assert reserved[0]["worst_kvpr"] > got["placements"][0]["worst_kvpr"]
    assert all(e["worst_kvpr"] > 0 for e in reserved)
    code, out, err = _cli(capsys, "evaluate", tmp_path / "models.csv", "--requests", log, "--gpus", 4,
                          "--no-compare", "--placement", tmp_path / "p.json")
    assert code == 0, err
    assert "max KVPR per window (3 windows of 3600 s" in out and "busiest window per GPU (p)" in out
    code, _, err = _cli(capsys, "evaluate", tmp_path / "models.csv", "--gpus", 4)
    assert code == 2 and "--demand TABLE" in err
    code, _, err = _cli(capsys, "evaluate", tmp_path / "models.csv", "--demand", table, "--placement",
                        tmp_path / "p.json", "--gpus", 3)
    assert code == 2 and "must be a GPU id 0..2" in err
    (tmp_path / "other.csv").write_text(MODELS_CSV.replace("a,20", "x,20"))  # same shapes, another model
    code, _, err = _cli(capsys, "evaluate", tmp_path / "other.csv", "--demand", table.with_name("o.csv"),
                        "--placement", tmp_path / "p.json", "--gpus", 4)
    assert code == 2 and "o.csv" in err  # no such table
    dm.Demand(COUNTS / 3600.0, ("x", "b", "c"), ("0", "1", "2")).write(tmp_path / "o.csv")
    code, _, err = _cli(capsys, "evaluate", tmp_path / "other.csv", "--demand", tmp_path / "o.csv",
                        "--placement", tmp_path / "p.json", "--gpus", 4, "--no-compare")
    assert code == 2 and "written for other models?" in err


# ----------------------------------------------------------------------------- bursty families

def test_bursty_reproducible_and_documented():
    a, b = bursty(np.random.default_rng(7), 8), bursty(np.random.default_rng(7), 8)
    np.testing.assert_array_equal(a.rates, b.rates)
    assert a.models == b.models and a.rates.shape == (len(a.models), 96)
    assert not np.array_equal(bursty(np.random.default_rng(8), 8).rates[:3, :3], a.rates[:3, :3])
    assert sorted(set(a.group.tolist())) == list(range(6))  # every group has models
    assert sum(m["size"] for m in a.models) <= 0.7 * 80 * 8
    # hot models are replicated (within fill + 0.15 of the memory), the hottest first
    copies = np.array([m.get("replicas", 1) for m in a.models])
    assert copies.max() > 1 and sum(m["size"] * c for m, c in zip(a.models, copies)) <= 0.85 * 80 * 8
    assert all("replicas" not in m for m in bursty(np.random.default_rng(7), 8, replicate=False).models)
    np.testing.assert_allclose([m["req_rate"] for m in a.models], a.rates.mean(axis=1))
    # the groups' peaks fall in distinct windows, spread over the day
    peaks = np.argmax(a.activity, axis=1)
    assert len(set(peaks.tolist())) == 6 and np.all(np.diff(peaks) > 0)
    assert a.activity.max() == pytest.approx(1.0) and a.activity.min() >= 0.15 - 1e-12
    kvgpu.solve(a.models, 8, effort=2)  # the models are a valid instance


def test_bursty_smooth_and_tail():
    s = bursty(np.random.default_rng(1), 16, windows=48, groups=4, burstiness=0.0, tail=1.5)
    per_model_peak = s.rates.max(axis=1)
    # without bursts: each model follows its group's curve; popularity is Zipf(1.5) over ranks
    np.testing.assert_allclose(s.rates / per_model_peak[:, None], s.activity[s.group] / s.activity[s.group].max(
        axis=1, keepdims=True))
    ranked = np.sort(per_model_peak)[::-1]
    np.testing.assert_allclose(ranked, 100.0 / np.arange(1, len(ranked) + 1) ** 1.5 * ranked[0] / 100.0)
    totals = np.stack([s.rates[s.group == g].sum(axis=0) for g in range(4)])
    assert len(set(np.argmax(totals, axis=1).tolist())) == 4  # groups do not peak together
    # bursts raise some windows above the smooth curve
    b = bursty(np.random.default_rng(1), 16, windows=48, groups=4, burstiness=1.0, tail=1.5)
    assert (b.rates.max(axis=1) > per_model_peak * 1.5).any()
    with pytest.raises(ValueError, match="windows >= 2 x groups"):
        bursty(np.random.default_rng(1), 4, windows=6, groups=4)


def test_table_windows_sit_on_one_grid(tmp_path):
    """A window no model has a row for is a quiet window (rate 0, named in a note), so that
    positions and labels agree and every-k-windows counts time; starts off the grid of the
    window length and negative indexes are refused by line."""
    import pandas as pd

    names = ["a", "b"]
    rows = [{"model": n, "window": w, "req_rate": 1.0 + w} for w in (0, 2, 3) for n in names]
    f = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(f, index=False)
    with pytest.warns(kvgpu.KvgpuWarning, match=r"1 window\(s\) without any row \(1\)"):
        d = dm.read_table(f, names)
    assert d.windows == ("0", "1", "2", "3") and d.rates[:, 1].tolist() == [0.0, 0.0]
    assert d.rates[:, 2].tolist() == [3.0, 3.0]
    iso = [{"model": n, "window": t, "req_rate": 2.0} for t in ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z",
                                                                 "2026-01-01T03:00:00Z") for n in names]
    pd.DataFrame(iso).to_csv(f, index=False)
    with pytest.warns(kvgpu.KvgpuWarning, match="2026-01-01T02:00:00"):
        d = dm.read_table(f, names)
    assert d.n_windows == 4 and d.rates[:, 2].tolist() == [0.0, 0.0] and d.window_s == 3600
    off = iso[:4] + [{"model": n, "window": "2026-01-01T02:30:00Z", "req_rate": 1.0} for n in names]
    pd.DataFrame(off).to_csv(f, index=False)
    with pytest.raises(kvgpu.InvalidInstance, match=r"line 6.*whole number of windows"):
        dm.read_table(f, names)
    pd.DataFrame([{"model": "a", "window": -1, "req_rate": 1.0}]).to_csv(f, index=False)
    with pytest.raises(kvgpu.InvalidInstance, match=r"line 2.*negative"):
        dm.read_table(f, ["a"])


def test_a_robust_answer_names_its_windows_as_the_table_does(tmp_path):
    """solve(demand=TABLE) with start times: the worst window is printed with its start, the
    JSON carries every label, and positions stay positions."""
    names = [f"m{i}" for i in range(4)]
    models = [{"name": n, "size": 20 + 5 * i, "slo": 1} for i, n in enumerate(names)]
    t0 = pd.Timestamp("2026-12-01T00:00:00Z")
    rows = [{"model": n, "window": (t0 + pd.Timedelta(hours=w)).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "req_rate": float((i + w) % 3 + 1)} for w in range(3) for i, n in enumerate(names)]
    p = kvgpu.solve(models, 2, demand=pd.DataFrame(rows))
    w = p.worst_window
    assert p.to_dict()["window_labels"][w] == (t0 + pd.Timedelta(hours=w)).strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    assert f"worst window {w} ({p.window_labels[w]})" in str(p)
