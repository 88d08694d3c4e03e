"""Demand over time: request rates per model over ``W`` windows, read from files, and a
placement evaluated window by window.

A :class:`Demand` holds ``rates``, an ``(n_models, W)`` float64 array of request rates (req/s),
one row per model in the order of the models file, one column per window.  It is read from

* a **long table** (:func:`read_table`): one row per model and window, columns ``model``,
  ``window``, ``req_rate`` and optionally ``slo`` (CSV, Parquet, JSON or JSON lines, or a
  pandas DataFrame).  ``window`` is a window's index (an integer) or its start (an ISO 8601
  time); rows of one model are in increasing window order;
* a **request log** (:func:`read_requests`): one row per request, a timestamp column (epoch
  seconds, or ISO 8601 times; naive times are UTC) and a model column (CSV, Parquet, JSON lines),
  counted into windows of a chosen length (``window="15min"``) from the log's start: the rate of a
  window is its count divided by the time the log covers in it (its first to last request, or
  ``start``/``end``), so a window the log covers only in part is not diluted.  A window without requests has rate 0; a model of the models file that
  no request names has rate 0 in every window (a note and a :class:`kvgpu.KvgpuWarning` say so).

Every refusal is a :class:`kvgpu.InvalidInstance` naming the file, the line (CSV: the line of
the file, header = line 1; JSON lines: the line; JSON and Parquet: the record, from 1) and the
field.  :func:`as_demand` also takes an ``(n_models, W)`` array or a DataFrame of the long table.

:meth:`Demand.pick` turns the windows into one rate per model for today's single-demand solves
(the busiest window, the mean, each model's peak, or one window).  :func:`evaluate` gives a
placement's KVPR in every window (``(W, G)``), its worst window and the busiest window of each
GPU; :func:`mean_and_peak` solves on the mean and on the per-model peak rates, and
:func:`compare` sets any list of ``(label, placement)`` side by side over the windows.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kvgpu.errors import InvalidInstance, KvgpuWarning
from kvgpu.kernels.deltas import EPS, mem_unit, safe_div_array

#: Files read by suffix: CSV, Parquet, JSON (a list of records), JSON lines.
TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".json", ".jsonl", ".ndjson")
#: Columns of a long table; ``slo`` is optional.
TABLE_COLUMNS = ("model", "window", "req_rate", "slo")
#: Column names tried, in order, for a request log's timestamp and model (or give them).
TIME_COLUMNS = ("timestamp", "time", "ts", "arrival_time")
MODEL_COLUMNS = ("model", "model_name", "name")
#: Ways :meth:`Demand.pick` makes one rate per model.
PICKS = ("busiest", "mean", "peak")
#: Epoch seconds beyond this (the year 5138) are refused: such a log counts milliseconds or finer.
MAX_EPOCH_S = 1e11
#: Most windows a request log is counted into (a stray timestamp must not allocate gigabytes).
MAX_WINDOWS = 100_000
#: A window covered for less than this share of its length is named in a note (partly covered).
FULL_COVER = 0.99
#: Share of windows :func:`evaluate`'s quantile covers (the worst KVPR met in 95% of windows).
QUANTILE = 0.95


# ----------------------------------------------------------------------------- the record

@dataclass(frozen=True)
class Demand:
    """Request rates of ``n`` models over ``W`` windows.

    Attributes
    ----------
    rates : ndarray (n, W) float64 -- requests per second of each model in each window.
    models : tuple of str -- the models, in the order of the models file (rows of ``rates``).
    windows : tuple of str -- a label per window: its ISO 8601 start (UTC) or its index.
    window_s : float or None -- window length in seconds (None: windows given by index only).
    start_s : ndarray (W,) float64 or None -- each window's start, epoch seconds (None: by index).
    slo : ndarray (n,) float64 or None -- SLO (s) per model from the file, NaN where it gives
        none; None where the file has no ``slo`` column.
    covered_s : ndarray (W,) float64 or None -- seconds of each window that the source covers
        (a request log's first and last windows may be partly covered: their rates are requests
        / covered seconds); None: every window is covered for its whole length.
    notes : tuple of str -- what an operator should know about the reading (models without
        requests, columns not read).
    source : str -- where it was read from (for messages).
    """

    rates: np.ndarray
    models: tuple
    windows: tuple
    window_s: float | None = None
    start_s: np.ndarray | None = None
    slo: np.ndarray | None = None
    notes: tuple = ()
    source: str = "demand"
    covered_s: np.ndarray | None = None

    def __post_init__(self):
        r = np.asarray(self.rates, dtype=np.float64)
        if r.ndim != 2 or r.shape[0] != len(self.models) or r.shape[1] != len(self.windows):
            raise InvalidInstance(f"{self.source}: rates must have shape (models, windows) = "
                                  f"({len(self.models)}, {len(self.windows)}), got {r.shape}")
        if r.shape[1] == 0:
            raise InvalidInstance(f"{self.source}: no windows")
        _check_rates(r, self.source, self.models, self.windows)
        object.__setattr__(self, "rates", r)
        if self.slo is not None:
            slo = np.asarray(self.slo, dtype=np.float64)
            bad = np.nonzero(~(np.isnan(slo) | (np.isfinite(slo) & (slo > 0))))[0] if slo.shape == r.shape[:1] else [0]
            if len(bad):
                raise InvalidInstance(f"{self.source}: slo must be one number > 0 (or NaN: not given) per model, "
                                      f"got {self.slo!r}")
            object.__setattr__(self, "slo", slo)
        if self.covered_s is not None:
            c = np.asarray(self.covered_s, dtype=np.float64)
            if c.shape != (r.shape[1],) or not (np.isfinite(c) & (c > 0)).all():
                raise InvalidInstance(f"{self.source}: covered_s must be one number > 0 (s) per window, got "
                                      f"{self.covered_s!r}")
            object.__setattr__(self, "covered_s", c)

    @property
    def n_models(self) -> int:
        return self.rates.shape[0]

    @property
    def n_windows(self) -> int:
        return self.rates.shape[1]

    def partial(self, w: int) -> bool:
        """Whether window ``w`` is covered for less than :data:`FULL_COVER` of its length."""
        return self.covered_s is not None and self.window_s is not None and \
            bool(self.covered_s[w] < FULL_COVER * self.window_s)

    def slo_of(self, slo=None) -> np.ndarray:
        """(n,) SLO per model: the file's where it gives one, else ``slo`` (one number or one
        per model); NaN where neither does."""
        out = np.full(self.n_models, np.nan) if self.slo is None else self.slo.astype(float).copy()
        if slo is not None:
            other = np.broadcast_to(np.asarray(slo, float), (self.n_models,))
            out = np.where(np.isnan(out), other, out)
        return out

    def totals(self, slo=None) -> np.ndarray:
        """(W,) total demand ``sum(rate / slo)`` per window (``slo`` as :meth:`slo_of`)."""
        s = self.slo_of(slo)
        if np.isnan(s).any():
            m = self.models[int(np.nonzero(np.isnan(s))[0][0])]
            raise InvalidInstance(f"{self.source}: model {m!r} has no slo: the busiest window weighs rates by "
                                  f"1/slo (give an slo column, the models file's slo, or a default)")
        return (self.rates / s[:, None]).sum(axis=0)

    def busiest(self, slo=None) -> int:
        """Index of the window with the largest total demand ``sum(rate / slo)`` (first of ties)."""
        return int(np.argmax(self.totals(slo)))

    def pick(self, how: str | int = "busiest", slo=None) -> np.ndarray:
        """(n,) one request rate per model, for a single-demand solve.

        Parameters
        ----------
        how : "busiest", "mean", "peak" or int
            ``busiest``: the window of largest total demand ``sum(rate / slo)``; ``mean``: each
            model's mean over the windows, weighted by the time each window covers
            (``covered_s``: for a request log, its requests / the time it spans); ``peak``:
            each model's largest rate (peaks of different models may fall in different
            windows); an int: that window (0-based; a negative index is refused, not counted
            from the end).
        slo : float or array (n,), optional
            SLO where the file gives none (``busiest`` only).
        """
        if isinstance(how, (int, np.integer)) and not isinstance(how, bool):
            if not 0 <= how < self.n_windows:
                raise InvalidInstance(f"{self.source}: window {how} out of range: {self.n_windows} windows "
                                      f"(0..{self.n_windows - 1})")
            return self.rates[:, int(how)].copy()
        if how == "busiest":
            return self.rates[:, self.busiest(slo)].copy()
        if how == "mean":
            return np.average(self.rates, axis=1, weights=self.covered_s)
        if how == "peak":
            return self.rates.max(axis=1)
        raise InvalidInstance(f"pick {how!r}: choose {', '.join(PICKS)} or a window index")

    def to_frame(self):
        """The long table (``model, window, req_rate[, slo]``) as a pandas DataFrame, rows by
        model then window; :func:`read_table` reads it back."""
        import pandas as pd

        n, W = self.rates.shape
        cols = {"model": np.repeat(np.array(self.models, dtype=object), W),
                "window": np.tile(np.array(self._window_values(), dtype=object), n),
                "req_rate": self.rates.reshape(-1)}
        if self.slo is not None:
            cols["slo"] = np.repeat(self.slo, W)
        return pd.DataFrame(cols)

    def _window_values(self) -> list:
        return [int(w) for w in self.windows] if self.start_s is None else list(self.windows)

    def write(self, path: str | Path) -> None:
        """Write the long table (:meth:`to_frame`) as CSV, Parquet, JSON or JSON lines, by suffix."""
        from kvgpu.io import atomic_output

        suffix = Path(path).suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise InvalidInstance(f"{path}: demand tables are written as {', '.join(TABLE_SUFFIXES)}")
        df = self.to_frame()
        if self.covered_s is not None and any(self.partial(w) for w in range(self.n_windows)):
            _warn((f"{path}: a long table holds rates only: the partly covered windows of {self.source} count as "
                   f"whole windows in a mean read from it",))
        with atomic_output(path) as tmp:
            if suffix == ".csv":
                df.to_csv(tmp, index=False)
            elif suffix in (".parquet", ".pq"):
                df.to_parquet(tmp, index=False)
            else:  # json's float repr is exact (pandas' to_json rounds to 15 digits)
                recs = df.to_dict("records")
                with open(tmp, "w", encoding="utf-8") as f:
                    if suffix == ".json":
                        json.dump(recs, f, indent=0)
                    else:
                        f.writelines(json.dumps(r) + "\n" for r in recs)


def _check_rates(r: np.ndarray, source: str, models, windows) -> None:
    bad = ~np.isfinite(r) | (r < 0)
    if bad.any():
        i, w = (int(x[0]) for x in np.nonzero(bad))
        raise InvalidInstance(f"{source}: model {models[i]!r}, window {windows[w]}: req_rate must be a finite "
                              f"number >= 0, got {r[i, w]!r}")


# ----------------------------------------------------------------------------- models and files

def model_names(models: Any) -> list[str]:
    """The names of ``models`` (names, dicts, :class:`kvgpu.ModelSpec` or objects with a
    ``name``), in order; every model needs a name, and names must be distinct (demand names
    models)."""
    names = []
    for i, m in enumerate(models):
        name = m if isinstance(m, str) else (m.get("name", m.get("model_name")) if isinstance(m, dict)
                                             else getattr(m, "name", None))
        if not isinstance(name, str) or not name:
            raise InvalidInstance(f"model {i}: has no name; demand files name their models, so every model "
                                  f"needs a 'name'")
        names.append(name)
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise InvalidInstance(f"model {i}: name {n!r} is also model {seen[n]}'s: demand files name their models, "
                                  f"so names must be distinct")
        seen[n] = i
    return names


class Rows:
    """A table read from a file or given as a DataFrame (what :func:`load` returns; the readers
    take one as ``source``): ``frame`` (every cell as read), the ``source`` name and ``where(i)``
    naming row ``i`` of the frame as the user sees it."""

    def __init__(self, frame, source: str, where: Callable[[int], str]):
        self.frame, self.source, self.where = frame, source, where

    def at(self, i: int, field_: str) -> str:
        return f"{self.where(i)}, field {field_!r}"


def load(source: Any, name: str | None = None) -> Rows:
    """The rows of a CSV / Parquet / JSON / JSON lines file, or of a DataFrame.

    CSV and JSON text may be in any encoding :func:`kvgpu.io.read_text` reads; blank lines are
    skipped but counted, so a message's line is the file's.
    """
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        label = name or "demand table"
        return Rows(source.reset_index(drop=True), label, lambda i: f"{label}, row {i + 1}")
    path = Path(source)
    label = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InvalidInstance(f"{label}: demand is read from {', '.join(TABLE_SUFFIXES)} files, "
                              f"not {suffix or 'a file without a suffix'!r}")
    if path.is_dir():
        raise InvalidInstance(f"{label}: is a folder; give a {', '.join(TABLE_SUFFIXES)} file")
    if suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except OSError as e:
            raise InvalidInstance(f"{label}: cannot read ({e})") from None
        except Exception as e:  # pyarrow's errors for a file that is not Parquet
            raise InvalidInstance(f"{label}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return Rows(frame, label, lambda i: f"{label}, row {i + 1}")
    from kvgpu.io import read_text

    text = read_text(path)
    if suffix == ".csv":
        return _csv(text, label)
    if suffix == ".json":
        return _json(text, label)
    return _json_lines(text, label)


def _csv(text: str, label: str) -> Rows:
    import pandas as pd

    try:  # every cell as text: numbers are checked here, with the line of a bad one
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InvalidInstance(f"{label}: not a readable CSV file ({' '.join(str(e).split())})") from None
    lead = len(text) - len(text.lstrip("\r\n"))  # blank lines above the header (pandas skips those)
    first = text[:lead].count("\n") + 2
    blank = frame.apply(lambda c: c.isna() | (c.astype(str).str.strip() == "")).all(axis=1)
    lines = np.arange(len(frame)) + first
    frame = frame[~blank.to_numpy()].reset_index(drop=True)
    kept = lines[~blank.to_numpy()]
    return Rows(frame, label, lambda i: f"{label}, line {int(kept[i])}")


def _json(text: str, label: str) -> Rows:
    import pandas as pd

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInstance(f"{label}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InvalidInstance(f"{label}: expected a JSON list of records ({{\"model\": ..., ...}})")
    return Rows(pd.DataFrame.from_records(data), label, lambda i: f"{label}, record {i + 1}")


def _json_lines(text: str, label: str) -> Rows:
    import pandas as pd

    records, lines = [], []
    for k, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInstance(f"{label}, line {k}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InvalidInstance(f"{label}, line {k}: expected one JSON object per line, got {type(rec).__name__}")
        records.append(rec)
        lines.append(k)
    return Rows(pd.DataFrame.from_records(records), label, lambda i: f"{label}, line {lines[i]}")


def _column(rows: Rows, given: str | None, options: Sequence[str], what: str) -> str:
    cols = [str(c) for c in rows.frame.columns]
    if given is not None:
        if given not in cols:
            raise InvalidInstance(f"{rows.source}: no column {given!r} ({what}); columns: {', '.join(cols)}")
        return given
    found = next((c for c in options if c in cols), None)
    if found is None:
        raise InvalidInstance(f"{rows.source}: no {what} column (one of {', '.join(options)}); columns: "
                              f"{', '.join(cols) or 'none'}")
    return found


def _missing(v) -> bool:
    """An empty cell: None, NaN, NA, NaT or blank text."""
    import pandas as pd

    if isinstance(v, str):
        return not v.strip()
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # a list or dict in a JSON cell: not missing, refused later
        return False


def _model_index(rows: Rows, col: str, names: list[str]) -> np.ndarray:
    """(N,) index in ``names`` of each row's model; refuses a missing or unknown one (the first,
    by its line).  Vectorised: a log has millions of rows."""
    cells = rows.frame[col]
    text = cells.astype("string").str.strip()
    found = text.map({n: i for i, n in enumerate(names)}).astype("Float64")
    bad = np.nonzero(found.isna().to_numpy())[0]
    if bad.size:
        i = int(bad[0])
        v = cells.iloc[i]
        if _missing(v):
            raise InvalidInstance(f"{rows.at(i, col)}: no model")
        key = str(text.iloc[i])
        guess = difflib.get_close_matches(key, names, 1, 0.6)
        raise InvalidInstance(f"{rows.at(i, col)}: model {key!r} is not in the models file" + (
            f" (did you mean {guess[0]!r}?)" if guess else f" ({len(names)} models: "
            f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"))
    return found.to_numpy(dtype=np.float64).astype(np.int64)


def _numbers(rows: Rows, col: str, lo: float, lo_open: bool, what: str) -> np.ndarray:
    """(N,) float64 of a numeric column; refuses a missing, non-numeric, non-finite or out of
    range cell (naming its line)."""
    out = np.empty(len(rows.frame))
    for i, v in enumerate(rows.frame[col].tolist()):
        if _missing(v):
            raise InvalidInstance(f"{rows.at(i, col)}: no {what} (an empty cell)")
        try:
            x = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise InvalidInstance(f"{rows.at(i, col)}: {what} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(x) or x < lo or (lo_open and x == lo):
            raise InvalidInstance(f"{rows.at(i, col)}: {what} must be a finite number {'>' if lo_open else '>='} "
                                  f"{lo:g}, got {v!r}")
        out[i] = x
    return out


def _times(rows: Rows, col: str) -> np.ndarray:
    """(N,) float64 epoch seconds of a column of epoch seconds or ISO 8601 times (naive: UTC)."""
    import pandas as pd

    s = rows.frame[col]
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):  # epoch seconds (fast path)
        secs = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(secs)
    elif pd.api.types.is_datetime64_any_dtype(s):  # Parquet timestamps
        bad = s.isna().to_numpy()
        t = s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")
        secs = (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    else:  # text (CSV cells, JSON strings), maybe mixed with numbers
        is_text = s.map(lambda v: isinstance(v, str)).to_numpy(bool)
        stripped = s.where(~is_text, s.astype("string").str.strip())
        usable = s.map(lambda v: not isinstance(v, bool)).to_numpy(bool)
        secs = pd.to_numeric(stripped.where(usable), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan,
                                                                              copy=True)
        text = np.isnan(secs) & is_text
        if text.any():
            iso = pd.to_datetime(stripped[text], utc=True, format="ISO8601", errors="coerce")
            secs[text] = (iso - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
        bad = ~np.isfinite(secs)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise InvalidInstance(f"{rows.at(i, col)}: bad timestamp {_plain(s.iloc[i])!r} (epoch seconds, or an ISO 8601 "
                              f"time such as 2026-12-07T09:30:00Z)")
    late = np.nonzero(secs > MAX_EPOCH_S)[0]
    if late.size:  # milliseconds (or finer) read as seconds would stretch every window a thousandfold
        i = int(late[0])
        raise InvalidInstance(f"{rows.at(i, col)}: timestamp {_plain(s.iloc[i])!r} is after the year 5000 in epoch seconds: "
                              f"milliseconds or finer? give seconds (divide by 1000) or ISO 8601 times")
    return secs


def _plain(v: Any) -> Any:
    """A cell as Python prints it to a user: ``1765000000000``, not ``np.int64(1765000000000)``."""
    return v.item() if isinstance(v, np.generic) else v


def window_seconds(window: Any) -> float:
    """Seconds of a window length: a number of seconds, or text such as ``"60s"``, ``"15min"``,
    ``"1h"``, ``"1d"`` (pandas' Timedelta words)."""
    import pandas as pd

    try:
        sec = float(window)
    except (TypeError, ValueError):
        try:
            sec = pd.Timedelta(str(window).strip()).total_seconds()
        except (ValueError, TypeError):
            raise InvalidInstance(f"window {window!r}: give a length such as 60s, 15min, 1h or a number of "
                                  f"seconds") from None
    if not math.isfinite(sec) or sec <= 0:
        raise InvalidInstance(f"window {window!r}: the length must be positive and finite")
    return sec


def _iso(sec: float) -> str:
    import pandas as pd

    return pd.Timestamp(sec, unit="s", tz="UTC").isoformat().replace("+00:00", "Z")


def _slo_column(rows: Rows, col: str | None, model: np.ndarray, n: int) -> np.ndarray | None:
    """(n,) SLO per model from the ``slo`` column (NaN for models without rows); one per model."""
    if col is None:
        return None
    vals = _numbers(rows, col, 0.0, True, "slo")
    out = np.full(n, np.nan)
    first = np.full(n, -1, np.int64)
    for i, (m, v) in enumerate(zip(model.tolist(), vals.tolist())):
        if first[m] < 0:
            out[m], first[m] = v, i
        elif v != out[m]:
            raise InvalidInstance(f"{rows.at(i, col)}: slo {v:g} differs from {out[m]:g} given for the same model "
                                  f"at {rows.where(int(first[m]))}: one SLO per model")
    return out


def _absent_note(names: list[str], present: np.ndarray, source: str, what: str) -> tuple:
    absent = [names[i] for i in np.nonzero(~present)[0].tolist()]
    if not absent:
        return ()
    return (f"{source}: {len(absent)} model(s) of the models file have no {what}: rate 0 in every window "
            f"({', '.join(absent[:8])}{', ...' if len(absent) > 8 else ''})",)


def _warn(notes: tuple) -> tuple:
    """Each note as a :class:`kvgpu.KvgpuWarning` too (the CLI prints them), and returned."""
    for note in notes:
        warnings.warn(note, KvgpuWarning, stacklevel=3)
    return notes


# ----------------------------------------------------------------------------- request logs

def read_requests(source: Any, models: Any, *, window: Any = "1h", timestamp: str | None = None,
                  model: str | None = None, name: str | None = None, start: Any = None,
                  end: Any = None) -> Demand:
    """Count a request log into windows: the rate of a window is its requests / the time the
    log covers in it.

    Parameters
    ----------
    source : path or DataFrame
        One row per request (CSV, Parquet, JSON lines; or a DataFrame): a timestamp column
        (``timestamp``, ``time``, ``ts`` or ``arrival_time``, or ``timestamp=``; epoch seconds or
        ISO 8601, naive times read as UTC), a model column (``model``, ``model_name`` or
        ``name``, or ``model=``) and optionally ``slo`` (seconds, one per model).  Other columns
        are not read (a note lists them).
    models : sequence
        The models (names, dicts, :class:`kvgpu.ModelSpec`), in the order of the result's rows.
    window : str or float
        Window length (:func:`window_seconds`): ``"60s"``, ``"15min"``, ``"1h"`` (default).
    start, end : float or str, optional
        The time the log covers (epoch seconds or ISO 8601): default its first and last
        request.  Requests outside it are refused.  Windows start at ``start`` (give a start on
        the hour for windows on the hour); the last one ends at ``end`` and may be partly
        covered, as may every window of a log shorter than ``window``: such a window's rate is
        its requests / the seconds it covers (``Demand.covered_s``), and a note says so.
    name : str, optional
        How messages name the source (default: the path).

    Returns
    -------
    Demand
        ``rates`` (n_models, W) req/s; ``covered_s`` (W,) s; ``slo`` from the log's column if it
        has one.
    """
    names = model_names(models)
    window_s = window_seconds(window)
    rows = source if isinstance(source, Rows) else load(source, name)
    if len(rows.frame) == 0:
        raise InvalidInstance(f"{rows.source}: no requests")
    tcol = _column(rows, timestamp, TIME_COLUMNS, "timestamp")
    mcol = _column(rows, model, MODEL_COLUMNS, "model")
    scol = "slo" if "slo" in rows.frame.columns else None
    t = _times(rows, tcol)
    m = _model_index(rows, mcol, names)
    slo = _slo_column(rows, scol, m, len(names))
    lo, hi = _log_span(rows, t, start, end)
    W = max(1, int(math.ceil((hi - lo) / window_s - 1e-9)))
    if W > MAX_WINDOWS:
        raise InvalidInstance(f"{rows.source}: the log spans {W} windows of {window_s:g} s (more than "
                              f"{MAX_WINDOWS}): from {_iso(lo)} to {_iso(hi)}; a stray timestamp, or a longer "
                              f"--window?")
    begin = lo + window_s * np.arange(W)
    covered = np.minimum(begin + window_s, hi) - begin  # (W,) > 0: every window starts before hi
    k = np.minimum(np.floor((t - lo) / window_s).astype(np.int64), W - 1)  # the closing instant: last window
    counts = np.bincount(m * W + k, minlength=len(names) * W).reshape(len(names), W)
    present = np.bincount(m, minlength=len(names)) > 0
    labels = tuple(_iso(s) for s in begin)
    notes = _absent_note(names, present, rows.source, "request") + _partial_note(rows.source, labels, covered,
                                                                                window_s, lo, hi)
    other = [str(c) for c in rows.frame.columns if c not in (tcol, mcol, scol)]
    if other:
        notes += (f"{rows.source}: columns not read: {', '.join(other)}",)
    return Demand(counts / covered, tuple(names), labels, window_s, begin, slo, _warn(notes), rows.source,
                  covered)


def _log_span(rows: Rows, t: np.ndarray, start: Any, end: Any) -> tuple[float, float]:
    """(lo, hi) epoch seconds the log covers: ``start``/``end`` where given (every request
    inside), else its first and last request; refuses a span of no time."""
    lo = float(t.min()) if start is None else _instant(start, "start")
    hi = float(t.max()) if end is None else _instant(end, "end")
    outside = np.nonzero((t < lo) | (t > hi))[0]
    if outside.size:
        i = int(outside[0])
        raise InvalidInstance(f"{rows.where(i)}: request at {_iso(t[i])} is outside the log's time {_iso(lo)} to "
                              f"{_iso(hi)} (--log-start/--log-end)")
    if not hi > lo:
        raise InvalidInstance(f"{rows.source}: the log covers no time ({_iso(lo)} to {_iso(hi)}): a rate needs a "
                              f"duration; give the time it covers (--log-start/--log-end, or start=/end=)")
    return lo, hi


def _instant(v: Any, what: str) -> float:
    """Epoch seconds of ``v``: a number of epoch seconds or an ISO 8601 time (naive: UTC)."""
    import pandas as pd

    x = _number(v) if not isinstance(v, bool) else None
    if x is None:
        try:
            ts = pd.Timestamp(v.strip() if isinstance(v, str) else v)
        except (ValueError, TypeError):
            ts = pd.NaT
        if ts is pd.NaT:
            raise InvalidInstance(f"log {what} {v!r}: give epoch seconds or an ISO 8601 time such as "
                                  f"2026-12-07T09:00:00Z")
        x = ((ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")) - pd.Timestamp(0, tz="UTC")
             ).total_seconds()
    if not math.isfinite(x) or x > MAX_EPOCH_S:
        raise InvalidInstance(f"log {what} {v!r}: give epoch seconds (not milliseconds) or an ISO 8601 time")
    return float(x)


def _partial_note(source: str, labels: tuple, covered: np.ndarray, window_s: float, lo: float, hi: float) -> tuple:
    """A note naming the windows the log covers only in part (their rates: requests / covered s)."""
    part = np.nonzero(covered < FULL_COVER * window_s)[0].tolist()
    if not part:
        return ()
    which = ", ".join(f"{labels[w]} ({covered[w]:g} s)" for w in part[:4]) + (", ..." if len(part) > 4 else "")
    return (f"{source}: the log covers {_iso(lo)} to {_iso(hi)} ({hi - lo:g} s): {len(part)} window(s) of "
            f"{window_s:g} s only in part: {which}; their rates are requests / seconds covered",)


# ----------------------------------------------------------------------------- long tables

def read_table(source: Any, models: Any, *, window: Any = None, name: str | None = None) -> Demand:
    """Read a long table ``model, window, req_rate[, slo]`` (one row per model and window).

    Parameters
    ----------
    source : path or DataFrame
        CSV, Parquet, JSON (a list of records) or JSON lines; or a DataFrame.  ``window`` is a
        window's index (an integer) or start (an ISO 8601 time, or a datetime column); the rows
        of each model in increasing window order; every model that has rows has one for every
        window.  ``req_rate``: req/s, finite, >= 0.  ``slo`` (optional): seconds, one per model.
        No other column is allowed.
    models : sequence
        The models (names, dicts, :class:`kvgpu.ModelSpec`): the order of the result's rows.  A
        model without rows has rate 0 in every window (a note says so).
    window : str or float, optional
        Window length (:func:`window_seconds`); windows closer than this overlap and are
        refused.  Default: the smallest gap between window starts (times), None (indexes).

    Returns
    -------
    Demand
    """
    names = model_names(models)
    rows = source if isinstance(source, Rows) else load(source, name)
    if len(rows.frame) == 0:
        raise InvalidInstance(f"{rows.source}: no rows (columns model, window, req_rate[, slo])")
    cols = [str(c) for c in rows.frame.columns]
    for c in cols:
        if c not in TABLE_COLUMNS:
            guess = difflib.get_close_matches(c, TABLE_COLUMNS, 1, 0.6)
            raise InvalidInstance(f"{rows.source}: unknown column {c!r}" + (
                f" (did you mean {guess[0]!r}?)" if guess else f" (columns: {', '.join(TABLE_COLUMNS)})"))
    for c in TABLE_COLUMNS[:3]:
        if c not in cols:
            raise InvalidInstance(f"{rows.source}: no column {c!r} (a long table has model, window, req_rate[, slo])")
    m = _model_index(rows, "model", names)
    key, by_time = _window_keys(rows)
    rate = _numbers(rows, "req_rate", 0.0, False, "req_rate")
    slo = _slo_column(rows, "slo" if "slo" in cols else None, m, len(names))
    _check_order(rows, m, key, names, by_time)
    starts = np.unique(key)
    window_s = _table_window(rows, key, starts, window, by_time)
    starts, filled = _whole_grid(rows, key, starts, window_s, by_time)
    col = np.searchsorted(starts, key)
    rates = np.zeros((len(names), len(starts)))
    rates[m, col] = rate
    present = np.bincount(m, minlength=len(names))
    rowed = np.unique(col)  # the windows that have rows (the others, filled in, have none at all)
    for i in np.nonzero((present > 0) & (present < rowed.size))[0].tolist():
        have = set(col[m == i].tolist())
        w = next(w for w in rowed.tolist() if w not in have)
        raise InvalidInstance(f"{rows.source}: model {names[i]!r} has no row for window "
                              f"{_label(starts[w], by_time)} (every model with rows needs one per window; "
                              f"give req_rate 0 for a quiet window)")
    notes = _absent_note(names, present > 0, rows.source, "row") + filled
    labels = tuple(_label(s, by_time) for s in starts)
    return Demand(rates, tuple(names), labels, window_s, starts.astype(float) if by_time else None, slo,
                  _warn(notes), rows.source)


def _label(key, by_time: bool) -> str:
    return _iso(float(key)) if by_time else str(int(key))


def _window_keys(rows: Rows) -> tuple[np.ndarray, bool]:
    """(N,) each row's window: int64 indexes, or float64 epoch-second starts (``by_time``)."""
    import pandas as pd

    s = rows.frame["window"]
    vals = s.tolist()
    if pd.api.types.is_datetime64_any_dtype(s) or any(isinstance(v, str) and _number(v) is None for v in vals
                                                      if not _missing(v)):
        index = next((i for i, v in enumerate(vals) if not _missing(v) and _number(v) is not None), None)
        if index is not None and not pd.api.types.is_datetime64_any_dtype(s):  # never read 3 as 1970-01-01T00:00:03
            raise InvalidInstance(f"{rows.at(index, 'window')}: window {vals[index]!r} is an index, but other rows "
                                  f"give start times: give every window as an ISO 8601 time, or every one as an index")
        return _times(rows, "window"), True
    out = np.empty(len(vals), np.int64)
    for i, v in enumerate(vals):
        if _missing(v) or isinstance(v, bool) or not _is_int(v):
            raise InvalidInstance(f"{rows.at(i, 'window')}: a window is an integer index or an ISO 8601 start "
                                  f"time, got {v!r}")
        out[i] = int(float(v))
        if out[i] < 0:
            raise InvalidInstance(f"{rows.at(i, 'window')}: window {out[i]} is negative: a window index counts "
                                  f"from 0")
    return out, False


def _number(v) -> float | None:
    """``v`` as a float (a number, or text of one), else None."""
    try:
        return float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        return None


def _is_int(v) -> bool:
    x = _number(v)
    return x is not None and math.isfinite(x) and x == int(x) and abs(x) < 2**62


def _check_order(rows: Rows, m: np.ndarray, key: np.ndarray, names: list[str], by_time: bool) -> None:
    """Each model's rows in strictly increasing window order: a repeat overlaps, a step back is
    unsorted."""
    last: dict[int, int] = {}
    for i, (mi, k) in enumerate(zip(m.tolist(), key.tolist())):
        j = last.get(mi)
        if j is not None and k <= key[j]:
            what = "overlapping windows: window {} given twice" if k == key[j] else \
                "unsorted windows: window {} after window " + _label(key[j], by_time)
            raise InvalidInstance(f"{rows.at(i, 'window')}: model {names[mi]!r}: " + what.format(_label(k, by_time))
                                  + f" (previous row: {rows.where(j)})")
        last[mi] = i


def _first_row(rows: Rows, key, window) -> str:
    """Where the first row of ``window`` is (file, line, field), for an error about it."""
    return rows.at(int(np.nonzero(key == window)[0][0]), "window")


def _table_window(rows: Rows, key, starts: np.ndarray, window, by_time: bool) -> float | None:
    """The window length (s): given (then starts closer than it overlap), else the smallest gap."""
    gaps = np.diff(starts.astype(float))
    if window is None:
        return float(gaps.min()) if by_time and gaps.size else None
    sec = window_seconds(window)
    unit = sec if not by_time else 1.0  # indexes are windows of the given length
    close = np.nonzero(gaps * unit < sec * (1 - 1e-12))[0]
    if close.size:
        late = starts[close[0] + 1]
        raise InvalidInstance(f"{_first_row(rows, key, late)}: overlapping windows: window {_label(late, by_time)} starts "
                              f"{gaps[close[0]]:g} s after window {_label(starts[close[0]], by_time)}, less than the "
                              f"window length {sec:g} s")
    return sec


def _whole_grid(rows: Rows, key, starts: np.ndarray, window_s: float | None, by_time: bool) -> tuple:
    """``(starts, notes)``: the table's windows on one grid of the window length (indexes: steps
    of 1), a window no model has a row for put back with rate 0 and named in a note -- so that
    positions, labels and replay's every-k-windows count time, not rows; starts that are not a
    whole number of windows apart are refused (file, line, field)."""
    step = window_s if by_time else 1.0
    if step is None or starts.size < 2:
        return starts, ()
    n = np.diff(starts.astype(float)) / step
    k = np.rint(n)
    off = np.nonzero(np.abs(n - k) > 1e-9 * np.maximum(k, 1))[0]
    if off.size:
        late = starts[off[0] + 1]
        raise InvalidInstance(f"{_first_row(rows, key, late)}: window {_label(late, by_time)} starts {n[off[0]]:g} windows "
                              f"after window {_label(starts[off[0]], by_time)}: window starts must be a whole number "
                              f"of windows ({step:g} {'s' if by_time else 'index'}) apart")
    if (k <= 1).all():
        return starts, ()
    grid = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    full = starts[0] + np.arange(int(grid[-1]) + 1) * (step if by_time else 1)
    full = full.astype(starts.dtype)
    missing = np.setdiff1d(np.arange(full.size), grid)
    shown = ", ".join(_label(full[w], by_time) for w in missing[:4]) + (", ..." if missing.size > 4 else "")
    return full, (f"{rows.source}: {missing.size} window(s) without any row ({shown}): rate 0 for every model "
                  f"there (a quiet period; give rows if it is missing data)",)


# ----------------------------------------------------------------------------- API inputs

def as_demand(demand: Any, models: Any, *, window: Any = None, name: str = "demand") -> Demand:
    """A :class:`Demand` from a Demand (its models checked against ``models``), a DataFrame of
    the long table (:func:`read_table`), a path to one, or an ``(n_models, W)`` array of rates
    (req/s) in the order of ``models``."""
    import pandas as pd

    names = model_names(models)
    if isinstance(demand, Demand):
        if list(demand.models) != names:
            raise InvalidInstance(f"{demand.source}: its models ({', '.join(demand.models[:4])}, ...) are not the "
                                  f"models given, in order")
        return demand
    if isinstance(demand, (pd.DataFrame, str, Path)):
        return read_table(demand, names, window=window, name=None if not isinstance(demand, pd.DataFrame) else name)
    r = np.asarray(demand, dtype=float)
    if r.ndim != 2 or r.shape[0] != len(names):
        raise InvalidInstance(f"{name}: an array of demand must have shape (n_models, W) = ({len(names)}, W), "
                              f"got {r.shape}")
    ws = None if window is None else window_seconds(window)
    return Demand(r, tuple(names), tuple(str(w) for w in range(r.shape[1])), ws, None, None, (), name)


def with_rates(specs: Sequence, rates: np.ndarray, slo=None) -> list:
    """The :class:`kvgpu.ModelSpec` records ``specs`` with ``req_rate`` = ``rates`` (n,) and,
    where ``slo`` (n,) is not NaN, that SLO."""
    out = []
    for i, s in enumerate(specs):
        kw = {"req_rate": float(rates[i])}
        if slo is not None and not math.isnan(float(slo[i])):
            kw["slo"] = float(slo[i])
        out.append(dataclasses.replace(s, **kw))
    return out


# ----------------------------------------------------------------------------- evaluation

@dataclass
class WindowEvaluation:
    """A placement's KVPR in every window of a :class:`Demand`.

    Attributes
    ----------
    label : str -- the placement's name in tables and plots.
    kvpr : ndarray (W, G) float64 -- KVPR of each GPU in each window (``inf`` where a GPU with
        demand has no KV memory).
    windows : tuple of str -- the window labels.
    """

    label: str
    kvpr: np.ndarray
    windows: tuple
    placement: Any = field(default=None, repr=False)

    @property
    def max_by_window(self) -> np.ndarray:
        """(W,) the largest KVPR of each window: the timeline."""
        return self.kvpr.max(axis=1)

    @property
    def worst_gpu(self) -> np.ndarray:
        """(W,) int64 the GPU with the largest KVPR in each window (first of ties)."""
        return np.argmax(self.kvpr, axis=1)

    @property
    def busiest_window(self) -> np.ndarray:
        """(G,) int64 the window in which each GPU's KVPR is largest (first of ties)."""
        return np.argmax(self.kvpr, axis=0)

    @property
    def worst(self) -> float:
        """The worst window's max KVPR."""
        return float(self.max_by_window.max())

    @property
    def worst_window(self) -> int:
        return int(np.argmax(self.max_by_window))

    def quantile(self, q: float = QUANTILE) -> float:
        """The smallest KVPR that the max KVPR stays at or below in a share ``q`` of the windows."""
        return float(np.quantile(self.max_by_window, q, method="inverted_cdf"))


def window_demand(problem, demand: Demand | np.ndarray) -> np.ndarray:
    """(W, n_items) float64: each item's demand ``rate / slo / (tp * replicas)`` in each window,
    with the SLOs of ``problem``'s models (what the placement was solved with)."""
    rates = demand.rates if isinstance(demand, Demand) else np.asarray(demand, float)
    n = len(problem.specs)
    if rates.ndim != 2 or rates.shape[0] != n:
        raise InvalidInstance(f"demand has shape {rates.shape}; the placement has {n} models: (n_models, W) needed")
    slo = np.array([s.slo for s in problem.specs], float)
    k = np.bincount(problem.model_of, minlength=n)
    per_model = rates / slo[:, None]  # (n, W)
    return (per_model[problem.model_of] / k[problem.model_of][:, None]).T


def kvpr_by_window(placement, demand: Demand | np.ndarray) -> np.ndarray:
    """(W, G) float64: KVPR of each GPU of ``placement`` in each window of ``demand`` (memory is
    the placement's; demand per window).  The rows of ``demand`` are the placement's models."""
    items = window_demand(placement.problem, demand)
    G = placement.problem.n_gpus
    loads = np.stack([np.bincount(placement.assignment, weights=row, minlength=G) for row in items]) \
        if items.shape[0] else np.zeros((0, G))
    return safe_div_array(loads, placement.kv_free[None, :], np)


def evaluate(placement, demand: Demand | np.ndarray, label: str = "placement") -> WindowEvaluation:
    """The placement over every window: :class:`WindowEvaluation`."""
    windows = demand.windows if isinstance(demand, Demand) else tuple(str(w) for w in range(np.shape(demand)[1]))
    return WindowEvaluation(label, kvpr_by_window(placement, demand), windows, placement)


def compare(placements: Sequence[tuple[str, Any]], demand: Demand | np.ndarray) -> list[WindowEvaluation]:
    """Each ``(label, placement)`` evaluated over every window of ``demand`` (for example the
    placements of :func:`mean_and_peak`, and a placement robust over the windows)."""
    return [evaluate(p, demand, label) for label, p in placements]


def mean_and_peak(models: Sequence, gpus: int, demand: Demand, **solve_kwargs) -> list[tuple[str, Any]]:
    """Today's single-demand solves: ``[("mean", p), ("peak", p)]``, placed with each model's
    mean rate over the windows and with its largest rate (:meth:`Demand.pick`); ``models`` are
    :class:`kvgpu.ModelSpec` (or anything :func:`kvgpu.model_specs` reads) in the demand's
    order, their ``slo`` overridden by the demand's where it has one; other keywords go to
    :func:`kvgpu.solve`."""
    from kvgpu.api import solve
    from kvgpu.schema import model_specs

    specs = model_specs(models)
    demand = as_demand(demand, specs)
    return [(how, solve(with_rates(specs, demand.pick(how), demand.slo), gpus, **solve_kwargs))
            for how in ("mean", "peak")]


def summary(evaluations: Sequence[WindowEvaluation], q: float = QUANTILE):
    """A DataFrame, one row per placement: worst window's max KVPR, the window, the ``q``
    quantile and the mean of the max KVPR over the windows."""
    import pandas as pd

    return pd.DataFrame([{"placement": e.label, "worst_kvpr": e.worst, "worst_window": e.windows[e.worst_window],
                          f"q{round(100 * q)}_kvpr": e.quantile(q), "mean_kvpr": float(e.max_by_window.mean())}
                         for e in evaluations]).set_index("placement")


def timeline(evaluations: Sequence[WindowEvaluation]):
    """A DataFrame, one row per window: the max KVPR of each placement (columns by label) and,
    for the first placement, the GPU where it occurs."""
    import pandas as pd

    first = evaluations[0]
    cols = {"window": list(first.windows)}
    cols.update({e.label: e.max_by_window for e in evaluations})
    cols[f"worst_gpu ({first.label})"] = first.worst_gpu
    return pd.DataFrame(cols)


def placement_from_assignment(problem, assignment: Sequence[int], where: str = "placement"):
    """A :class:`kvgpu.Placement` of ``problem`` with a given ``assignment`` (one GPU id per
    item, as a placement's ``assignment`` lists them), for evaluation; refuses a wrong length,
    an unknown GPU id or a GPU over its memory.  Its ``lower_bound`` is 0 (nothing proven)."""
    from kvgpu.results import Placement

    n, G = problem.items.n_models, problem.n_gpus
    a = list(assignment)
    if len(a) != n:
        raise InvalidInstance(f"{where}: assignment has {len(a)} entries; the models give {n} items "
                              f"(shards and replicas)")
    for i, g in enumerate(a):
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 0 <= g < G:
            raise InvalidInstance(f"{where}: assignment[{i}] ({problem.items.names[i]}) must be a GPU id 0..{G - 1}, "
                                  f"got {g!r}")
    arr = np.asarray(a, np.int64)
    used = np.bincount(arr, weights=problem.items.sizes, minlength=G)
    free = problem.items.gpu_mem - used
    over = np.nonzero(free < -EPS * mem_unit(problem.items.gpu_mem))[0]
    if over.size:
        g = int(over[0])
        raise InvalidInstance(f"{where}: GPU {g} holds {used[g]:g} GB of models, more than its "
                              f"{problem.items.gpu_mem[g]:g} GB: not a placement of these models on this cluster")
    kv = safe_div_array(np.bincount(arr, weights=problem.items.demand, minlength=G), free, np)
    return Placement(problem, arr, kv, 0.0, bound_scope="nothing (read from a file, not solved)")


def read_placement(path: str | Path, problem):
    """A placement written by ``kvgpu solve --out FILE.json`` (its ``assignment``), for the
    models and cluster of ``problem`` (:func:`placement_from_assignment`)."""
    from kvgpu.io import read_text

    name = str(path)
    if Path(path).suffix.lower() != ".json":
        raise InvalidInstance(f"{name}: give a placement as the .json that kvgpu solve --out writes")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidInstance(f"{name}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("assignment"), list):
        raise InvalidInstance(f"{name}: no 'assignment' list (a placement as kvgpu solve --out FILE.json writes it)")
    placement = placement_from_assignment(problem, data["assignment"], name)
    _same_models(placement, data.get("gpus"), name)
    return placement


def _same_models(placement, gpus: Any, name: str) -> None:
    """The file's models per GPU (``gpus[g]["models"]``) are those of the models file: a
    placement of other models with as many items is refused, not evaluated."""
    if not isinstance(gpus, list) or len(gpus) != placement.problem.n_gpus:
        raise InvalidInstance(f"{name}: its 'gpus' list does not have the cluster's {placement.problem.n_gpus} GPUs "
                              f"(written for another cluster?)")
    mine: list[list[str]] = [[] for _ in gpus]
    for i, g in enumerate(placement.assignment.tolist()):
        n = placement.problem.items.names[i]
        mine[g].append(n if n is not None else f"#{i}")
    for g, row in enumerate(gpus):
        theirs = row.get("models") if isinstance(row, dict) else None
        if not isinstance(theirs, list) or sorted(map(str, theirs)) != sorted(mine[g]):
            raise InvalidInstance(f"{name}: GPU {g} holds {theirs!r} there, but its assignment puts "
                                  f"{sorted(mine[g])!r} of the models file there: written for other models?")
