"""Simulation sweeps: a grid of cluster shapes x model distributions x seeds x modes, solved in
batches, one result row per instance, written as it goes so that nothing is lost and a re-run
resumes.

Spec (YAML or a dict); every grid entry may be one value or a list:

.. code-block:: yaml

    gpus: [16, 64]              # GPUs per cluster (required)
    gpu_mem: [80]               # GB per GPU
    models_per_gpu: [2, 4]      # models = round(models_per_gpu * gpus)
    sizes: [uniform, llm]       # uniform: 10-30 GB; llm: 3/6.5/14/16/26/28 GB; small: 1-8 GB
    popularity: [uniform, zipf] # req_rate 1-9, or Zipf(1.1) over a shuffled rank; SLO 5-9 s
    seeds: 5                    # instance seeds 0..4 (or a list)
    mode: [seed, search]
    effort: [30]                # search rounds (mode search)
    exact: [auto]               # proofs: auto (instances of <= 24 models, search mode), true, false
    exact_work: 2000000         # work of one instance's proof (exact search nodes / DP states)
    batch_size: 64              # instances per solve_batch call (one task on Dask)
    backend: auto

The instances are drawn by :func:`kvgpu.generate.fixed_count`, from a random generator seeded
by the row's parameters only, so a row is the same instance on every machine and in any batch.

Output: a Parquet dataset (a folder of part files, each batch written to a temporary name and
renamed, so a killed run leaves only whole parts); one row per instance with the parameters,
``key`` (the instance's identity), ``models``, ``status``, ``max_kvpr``, ``lower_bound``,
``gap`` (a fraction: ``max_kvpr / lower_bound - 1``), ``proven`` (optimal, proven by the exact
search or by the bound meeting the answer), ``bound`` (which bound ``lower_bound`` is: ``exact
search`` where the proof ran, so the gap is the interval it left open, else ``closed-form
bound``, whose gap can measure the bound more than the answer), ``time_s`` (the batch's wall
time over its instances; a batch holds instances of one shape) and ``backend``.  ``status`` is
:data:`OK`, or, for an instance whose models cannot be placed in GPU memory,
:data:`INFEASIBLE` (proven) or :data:`NOT_FOUND` (the solver gave up); such rows have NaN
figures and the sweep goes on.  Re-running with the same output skips the keys already there,
failed ones included.  Batches run locally or as tasks on a Dask cluster, with identical rows
(except ``time_s``).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kvgpu import generate
from kvgpu.errors import InvalidInstance
from kvgpu.io import read_text
from kvgpu.schema import OPTION_RANGES, choice, integer, number

GRID = ("gpus", "gpu_mem", "models_per_gpu", "sizes", "popularity", "seed", "mode", "effort", "exact")
#: ``exact`` values of a spec: as ``kvgpu.solve_batch``'s ``exact=None`` / True / False.
EXACT = {"auto": None, "true": True, "false": False}
DEFAULTS = {"gpu_mem": [80.0], "models_per_gpu": [3], "sizes": ["uniform"], "popularity": ["uniform"],
            "seeds": 3, "mode": ["search"], "effort": [30], "exact": ["auto"], "exact_work": None, "batch_size": 64,
            "backend": "auto"}
KEYS = ("gpus", *DEFAULTS)
#: Fields of a model file a sweep cannot honour (its instances are generated, plain): refused
#: by name, never dropped.
NOT_SWEPT = {"reserve_gb": "(GB kept off each GPU) is a cluster field of model files",
             "nodes": "(GPU ids per node) is a cluster field of model files",
             "gpus_per_node": "(nodes of consecutive GPUs) is a cluster field of model files",
             "overhead_gb": "(engine overhead per model) is a model field of model files",
             "out_of_service": "(GPUs no model may use) is a cluster field of model files",
             "colocate_with": "(an adapter beside its base model) is a model field of model files",
             "node": "(a model kept inside one node) is a model field of model files",
             "hf": "(a model read from its files) is a model field of model files",
             "kv_cache_dtype": "(the KV cache dtype of a model read from its files) is a model field of model files",
             "kv_bytes_per_token": "(KV cache bytes per token) is a model field of model files"}
#: Sizes are scaled down so that the models use at most this share of the cluster's memory.
MAX_FILL = 0.95

#: ``status`` of a row: placed; no placement exists (proven); none found (the solver gave up).
from kvgpu.engine import INFEASIBLE, NOT_FOUND  # noqa: E402 -- the statuses rows carry
OK = "ok"

# Limits that keep a typo (an extra zero, a GB value in MB) from allocating the machine away.
MAX_GPUS = 100_000
MAX_MODELS = 1_000_000  # per instance
MAX_GPU_MEM = 1e6  # GB
MAX_EFFORT = 100_000
MAX_BATCH = 100_000
MAX_ROWS = 1_000_000
MAX_SEED = 2**63 - 1
MAX_LOCAL_WORKERS = 256
#: Seconds to wait for a Dask scheduler before giving up.
CONNECT_TIMEOUT_S = 5

# Output columns and their Parquet types: every part has this schema, so the folder reads as one
# table whatever the rows of a part (all failed, models_per_gpu written as 3 or 3.5, ...).
_COLUMNS = {"gpus": "int64", "gpu_mem": "float64", "models_per_gpu": "float64", "sizes": "string",
            "popularity": "string", "seed": "int64", "mode": "string", "effort": "int64", "exact": "string",
            "key": "string", "models": "int64", "status": "string", "max_kvpr": "float64", "lower_bound": "float64",
            "gap": "float64", "proven": "bool", "bound": "string", "time_s": "float64", "backend": "string"}


@dataclass(frozen=True)
class Spec:
    """A checked sweep spec: ``grid`` holds one non-empty list of values per :data:`GRID` key."""

    grid: dict
    batch_size: int
    backend: str
    #: Work of one instance's proof (None: the solver's default for ``exact`` true / auto).
    exact_work: int | None = None


def _values(v, label: str, rule) -> list:
    """``rule(value, label)`` applied to one value or to each of a non-empty list of them (the
    value rules of :mod:`kvgpu.schema`, so a spec is checked as every other input is)."""
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if not vals:
        raise InvalidInstance(f"{label} an empty list gives no rows; give at least one value")
    return [rule(x, label) for x in vals]


def _seeds(v, label: str) -> list[int]:
    """``seeds: n`` means seeds 0 .. n-1; a list names them."""
    if isinstance(v, (list, tuple)):
        return _values(v, label, lambda x, lab: integer(x, lab, 0, MAX_SEED))
    try:
        return list(range(integer(v, label, 1, MAX_ROWS)))
    except InvalidInstance:
        raise InvalidInstance(f"{label} must be a count of seeds from 1 to {MAX_ROWS} (seeds 0 .. n-1) or a list "
                              f"of seeds, got {v!r}") from None


def _exact(v, label: str) -> str:
    """``auto`` (or null), ``true`` or ``false`` (YAML booleans or the words), as a word."""
    word = "auto" if v is None else str(v).lower() if isinstance(v, (bool, str)) else v
    if word not in EXACT:
        raise InvalidInstance(f"{label} must be one of 'auto', true, false, got {v!r}")
    return word


def _scalar(rule):
    def check(v, label):
        if isinstance(v, (list, tuple)):
            raise InvalidInstance(f"{label} takes one value, not a list, got {v!r}")
        return rule(v, label)
    return check


def _rules() -> dict:
    from kvgpu.backends import BACKENDS
    from kvgpu.engine import MODES

    def each(rule):
        return lambda v, label: _values(v, label, rule)

    return {"gpus": each(lambda x, lab: integer(x, lab, 1, MAX_GPUS)),
            "gpu_mem": each(lambda x, lab: number(x, lab, 0.0, MAX_GPU_MEM, lo_open=True)),
            "models_per_gpu": each(lambda x, lab: number(x, lab, 0.0, MAX_MODELS, lo_open=True)),
            "sizes": each(lambda x, lab: choice(x, lab, sorted(generate.SIZES))),
            "popularity": each(lambda x, lab: choice(x, lab, list(generate.POPULARITY))),
            "seeds": _seeds,
            "mode": each(lambda x, lab: choice(x, lab, MODES)),
            "effort": each(lambda x, lab: integer(x, lab, 0, MAX_EFFORT)),
            "exact": each(_exact),
            "exact_work": _scalar(lambda x, lab: None if x is None else integer(x, lab, *OPTION_RANGES["exact_work"])),
            "batch_size": _scalar(lambda x, lab: integer(x, lab, 1, MAX_BATCH)),
            "backend": _scalar(lambda x, lab: choice(x, lab, BACKENDS))}


# ----------------------------------------------------------------------------- reading a spec

def _read_yaml(path: Path) -> tuple[Any, dict]:
    """The YAML document of ``path`` and the line (1-based) of each top-level key; refuses
    a key given twice (YAML would keep the last one silently)."""
    import yaml

    text = read_text(path)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InvalidInstance(f"{path}{f', line {mark.line + 1}' if mark else ''}: invalid YAML "
                              f"({getattr(e, 'problem', None) or 'syntax'})") from None
    finally:
        loader.dispose()
    lines: dict = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if key.value in lines:
                raise InvalidInstance(f"{path}, line {key.start_mark.line + 1}: key {key.value!r} given twice "
                                      f"(first on line {lines[key.value]})")
            lines[key.value] = key.start_mark.line + 1
    return data, lines


def load_spec(spec: dict | str | Path) -> Spec:
    """The checked spec of a dict or a YAML file, defaults filled in.

    Raises :class:`kvgpu.InvalidInstance` naming the file and line (for a file) and the key of
    any bad value: unknown keys (with the closest known one), values of the wrong type
    (booleans are not numbers), out of range (negative, zero counts, huge values), empty lists,
    or a grid of more than :data:`MAX_ROWS` rows or instances of more than :data:`MAX_MODELS`.
    """
    if isinstance(spec, Spec):
        return spec
    lines: dict = {}
    where = "sweep spec"
    if not isinstance(spec, dict):
        where = str(spec)
        spec, lines = _read_yaml(Path(spec))
        if not isinstance(spec, dict):
            raise InvalidInstance(f"{where}: a sweep spec is a mapping of grid keys (gpus, sizes, ...)")

    def at(key) -> str:
        return f"{where}, line {lines[str(key)]}" if str(key) in lines else where

    for k in spec:
        if k in NOT_SWEPT:
            raise InvalidInstance(f"{at(k)}: {k!r} {NOT_SWEPT[k]}; a sweep draws plain instances (models of tp 1 on "
                                  f"GPUs of gpu_mem GB, all of it for models and KV cache): solve a model file to use "
                                  f"it, or give gpu_mem net of what it keeps off")
        if k not in KEYS:
            close = difflib.get_close_matches(str(k), KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(KEYS)}"
            raise InvalidInstance(f"{at(k)}: unknown key {k!r}{hint}")
    if "gpus" not in spec:
        raise InvalidInstance(f"{where}: 'gpus' is required (a GPU count or a list of them)")
    vals = {}
    for k, rule in _rules().items():
        vals[k] = rule(spec.get(k, DEFAULTS.get(k)), f"{at(k)}: {k}:")
    vals["seed"] = vals.pop("seeds")
    grid = {k: vals[k] for k in GRID}
    models = max(vals["gpus"]) * max(vals["models_per_gpu"])
    if models > MAX_MODELS:
        raise InvalidInstance(f"{where}: gpus x models_per_gpu gives instances of {models:.6g} models; "
                              f"at most {MAX_MODELS} are allowed")
    rows = math.prod(len(v) for v in grid.values())
    if rows > MAX_ROWS:
        raise InvalidInstance(f"{where}: the grid has {rows} rows (the product of the lengths of "
                              f"gpus, gpu_mem, models_per_gpu, sizes, popularity, seeds, mode and effort); "
                              f"at most {MAX_ROWS} are allowed")
    return Spec(grid, vals["batch_size"], vals["backend"], vals["exact_work"])


def expand(spec: Spec) -> list[dict]:
    """One row of parameters per instance and mode, each with its ``key``."""
    rows = []
    for vals in itertools.product(*(spec.grid[k] for k in GRID)):
        row = dict(zip(GRID, vals))
        row["effort"] = row["effort"] if row["mode"] == "search" else 0
        row["exact"] = "false" if row["mode"] == "seed" and row["exact"] == "auto" else row["exact"]
        row["key"] = "|".join(f"{k}={row[k]}" for k in GRID)
        rows.append(row)
    return list({r["key"]: r for r in rows}.values())  # seed mode ignores effort (and auto proofs): one row


# ----------------------------------------------------------------------------- instances, batches

def _rng(row: dict) -> np.random.Generator:
    """A generator seeded by the row's instance parameters only (not mode or effort)."""
    seed = [int(row["seed"]), int(row["gpus"]), int(round(row["gpu_mem"] * 100)),
            int(round(row["models_per_gpu"] * 1000)), sorted(generate.SIZES).index(row["sizes"]),
            list(generate.POPULARITY).index(row["popularity"])]
    return np.random.default_rng(seed)


def instance(row: dict):
    """The :class:`kvgpu.problem.Instance` of a row: a function of its parameters only."""
    G = int(row["gpus"])
    return generate.fixed_count(_rng(row), G, max(1, int(round(row["models_per_gpu"] * G))), sizes=row["sizes"],
                                popularity=row["popularity"], gpu_mem=float(row["gpu_mem"]), max_fill=MAX_FILL)


def solve_rows(rows: list[dict], backend: str = "auto", exact_work: int | None = None) -> list[dict]:
    """Solve one batch (all rows share mode and effort); the result rows, each with its
    ``status`` (an instance without a placement keeps NaN figures and the sweep goes on).
    Runs on Dask workers."""
    from kvgpu.api import solve_batch
    from kvgpu.batch.state import batch_from_instances

    insts = [instance(r) for r in rows]
    b = batch_from_instances(insts)
    t0 = time.perf_counter()
    work = {} if exact_work is None else {"exact_work": exact_work}
    res = solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask, backend=backend,
                      mode=rows[0]["mode"], effort=rows[0]["effort"], exact=EXACT[rows[0]["exact"]],
                      infeasible="mark", **work)
    per = (time.perf_counter() - t0) / len(rows)
    placed = res.status == OK
    proven, source = res.proven_optimal & placed, np.where(placed, res.bound_source, None)
    return [{**r, "models": inst.n_models, "status": str(res.status[k]), "max_kvpr": float(res.max_kvpr[k]),
             "lower_bound": float(res.lower_bound[k]), "gap": float(res.gap[k]), "proven": bool(proven[k]),
             "bound": source[k], "time_s": per, "backend": res.backend}
            for k, (r, inst) in enumerate(zip(rows, insts))]


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    """Rows grouped by mode, effort, proof and instance shape -- one solver call each, so that
    ``time_s`` is the time of one shape -- then cut into ``size`` chunks, bigger clusters first
    so the slow batches start early."""
    def shape(r):
        return r["mode"], r["effort"], r["exact"], -r["gpus"] * r["models_per_gpu"], r["gpus"], r["gpu_mem"]

    out = []
    for _, grp in itertools.groupby(sorted(rows, key=lambda r: (shape(r), r["key"])), key=shape):
        grp = list(grp)
        out += [grp[i:i + size] for i in range(0, len(grp), size)]
    return out


# ----------------------------------------------------------------------------- the output folder

def prepare_output(out: str | Path) -> Path:
    """Create the Parquet folder ``out`` if needed (its parent must exist) and check that it can
    be written, before any solving; clears temporary parts left by a killed run (their rows are
    redone).  Raises ``OSError`` with a one-line message naming the path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInstance(f"{out}: sweep output is a folder of Parquet parts; this is a file")
    if not out.parent.is_dir():
        raise OSError(f"{out}: cannot create the output folder: {out.parent} does not exist")
    try:
        out.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OSError(f"{out}: cannot create or write the output folder ({e.strerror or e})") from None
    for stale in out.glob(".part-*.tmp"):
        stale.unlink()
    return out


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def done_keys(out: str | Path) -> set[str]:
    """The keys of the rows already in the folder ``out``."""
    import pyarrow.parquet as pq

    return {k for p in _parts(Path(out)) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()}


def read(out: str | Path):
    """All rows of the folder ``out`` as a pandas DataFrame sorted by ``key`` (parts written
    before rows had a ``status`` get ``ok``)."""
    import pandas as pd

    parts = [pd.read_parquet(p) for p in _parts(Path(out))]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t if t != "string" else object) for c, t in _COLUMNS.items()})
    df = pd.concat(parts, ignore_index=True)
    if "status" not in df:
        df["status"] = OK
    df["status"] = df["status"].fillna(OK)
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def _write_part(out: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = hashlib.sha1("\n".join(r["key"] for r in rows).encode()).hexdigest()[:16]
    final = out / f"part-{name}.parquet"
    tmp = out / f".part-{name}.parquet.tmp"
    schema = pa.schema([(c, pa.string() if t == "string" else pa.from_numpy_dtype(np.dtype(t)))
                        for c, t in _COLUMNS.items()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(final)  # atomic: a killed run leaves whole parts only
    return final


# ----------------------------------------------------------------------------- running

def run(spec: Spec | dict | str | Path, out: str | Path, *, client=None, progress: bool = True) -> Any:
    """Run (or resume) a sweep into the Parquet folder ``out``; returns all its rows as a pandas
    DataFrame (:func:`read`).  ``client``: a ``dask.distributed.Client`` to run the batches as
    tasks.  The spec and the folder are checked before anything is solved."""
    s = load_spec(spec)
    out = prepare_output(out)
    done = done_keys(out)
    todo = [r for r in expand(s) if r["key"] not in done]
    work = batches(todo, s.batch_size)
    bar = _progress(len(work), progress, skipped=len(done))
    for rows in _results(work, s.backend, s.exact_work, client):
        _write_part(out, rows)
        bar.update(1)
    bar.close()
    return read(out)


def _results(work: list[list[dict]], backend: str, exact_work: int | None, client) -> Iterable[list[dict]]:
    if client is None:
        for rows in work:
            yield solve_rows(rows, backend, exact_work)
        return
    from dask.distributed import as_completed

    futures = client.map(solve_rows, work, backend=backend, exact_work=exact_work, pure=False)
    for fut in as_completed(futures):
        yield fut.result()


def _progress(total: int, enabled: bool, skipped: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", disable=not enabled,
                desc=f"sweep ({skipped} rows already done)" if skipped else "sweep")


def dask_client(address: str | None = None, local_workers: int | None = None, *,
                timeout: float = CONNECT_TIMEOUT_S):
    """A ``dask.distributed.Client`` for an existing scheduler (``tcp://HOST:PORT``, reached
    within ``timeout`` seconds or ``ConnectionError``) or a new LocalCluster of
    ``local_workers`` (1 to :data:`MAX_LOCAL_WORKERS`) single-threaded worker processes."""
    from dask.distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout=timeout)
        except ValueError as e:  # a malformed address: dask says what is wrong with it
            raise InvalidInstance(f"Dask scheduler address {address!r}: {e}") from None
        except OSError:
            raise ConnectionError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                                  f"(is it running, and is the address right?)") from None
    return Client(LocalCluster(n_workers=check_local_workers(local_workers), threads_per_worker=1))


def check_local_workers(n) -> int:
    """``n`` as a count of local Dask worker processes (1 to :data:`MAX_LOCAL_WORKERS`; 0 or a
    negative count would wait for workers forever); else :class:`kvgpu.InvalidInstance`."""
    return integer(n, "local_workers (--dask-local): the number of worker processes", 1, MAX_LOCAL_WORKERS)
