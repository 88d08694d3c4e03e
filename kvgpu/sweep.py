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
    batch_size: 64              # instances per solve_batch call (one task on Dask)
    backend: auto

Output: a Parquet dataset (a folder of part files, each batch written to a temporary name and
renamed, so a killed run leaves only whole parts); each row holds the parameters, ``key`` (the
instance's identity), ``models``, ``max_kvpr``, ``lower_bound``, ``gap``, ``time_s`` (the
batch's wall time over its instances), ``backend``.  Re-running with the same output skips the
keys already there.  Batches run locally or as tasks on a Dask cluster, with identical rows
(except ``time_s``): an instance depends only on its parameters, and every solver mode gives an
instance the same answer whatever batch it is in.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kvgpu.errors import InvalidInstance
from kvgpu.problem import Instance, make_instance

GRID = ("gpus", "gpu_mem", "models_per_gpu", "sizes", "popularity", "seed", "mode", "effort")
DEFAULTS = {"gpu_mem": [80.0], "models_per_gpu": [3], "sizes": ["uniform"], "popularity": ["uniform"],
            "seeds": 3, "mode": ["search"], "effort": [30], "batch_size": 64, "backend": "auto"}
SIZES = {"uniform": lambda rng, n: rng.integers(10, 31, n).astype(float),
         "llm": lambda rng, n: rng.choice([3.0, 6.5, 14.0, 16.0, 26.0, 28.0], n, p=[.25, .3, .2, .1, .08, .07]),
         "small": lambda rng, n: rng.uniform(1.0, 8.0, n)}
POPULARITY = ("uniform", "zipf")
#: Sizes are scaled down so that the models use at most this share of the cluster's memory.
MAX_FILL = 0.95


def load_spec(spec: dict | str | Path) -> dict:
    """The spec with defaults filled in and every rule checked (errors name the key)."""
    if not isinstance(spec, dict):
        import yaml

        p = Path(spec)
        try:
            spec = yaml.safe_load(p.read_text())
        except OSError as e:
            raise InvalidInstance(f"{p}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InvalidInstance(f"{p}{f', line {mark.line + 1}' if mark else ''}: invalid YAML") from None
        if not isinstance(spec, dict):
            raise InvalidInstance(f"{p}: a sweep spec is a mapping of grid keys (gpus, sizes, ...)")
    unknown = set(spec) - set(DEFAULTS) - {"gpus"}
    if unknown:
        raise InvalidInstance(f"sweep spec: unknown key(s) {sorted(unknown)}; known: {sorted(set(DEFAULTS) | {'gpus'})}")
    if "gpus" not in spec:
        raise InvalidInstance("sweep spec: 'gpus' is required (a GPU count or a list of them)")
    s = {**DEFAULTS, **spec}
    for k in ("gpus", "gpu_mem", "models_per_gpu", "sizes", "popularity", "mode", "effort"):
        if not isinstance(s[k], (list, tuple)):
            s[k] = [s[k]]
    s["seed"] = list(range(int(s["seeds"]))) if isinstance(s["seeds"], int) else list(s["seeds"])
    for g in s["gpus"]:
        if not (isinstance(g, int) and g >= 1):
            raise InvalidInstance(f"sweep spec: gpus must be positive integers, got {g!r}")
    for v in s["sizes"]:
        if v not in SIZES:
            raise InvalidInstance(f"sweep spec: sizes {v!r} unknown; choose from {sorted(SIZES)}")
    for v in s["popularity"]:
        if v not in POPULARITY:
            raise InvalidInstance(f"sweep spec: popularity {v!r} unknown; choose from {list(POPULARITY)}")
    for v in s["mode"]:
        if v not in ("seed", "search"):
            raise InvalidInstance(f"sweep spec: mode {v!r} unknown; choose seed or search")
    if not (isinstance(s["batch_size"], int) and s["batch_size"] >= 1):
        raise InvalidInstance(f"sweep spec: batch_size must be a positive integer, got {s['batch_size']!r}")
    return s


def expand(spec: dict) -> list[dict]:
    """One row of parameters per instance and mode, each with its ``key``."""
    rows = []
    for vals in itertools.product(*(spec[k] for k in GRID)):
        row = dict(zip(GRID, vals))
        row["gpu_mem"] = float(row["gpu_mem"])
        row["effort"] = int(row["effort"]) if row["mode"] == "search" else 0
        row["key"] = "|".join(f"{k}={row[k]}" for k in GRID)
        rows.append(row)
    return list({r["key"]: r for r in rows}.values())  # seed mode ignores effort: one row


def instance(row: dict) -> Instance:
    """The instance of a row: a function of its parameters only (the same on every machine)."""
    sizes_id = sorted(SIZES).index(row["sizes"])
    seed = [int(row["seed"]), int(row["gpus"]), int(round(row["gpu_mem"] * 100)),
            int(round(row["models_per_gpu"] * 1000)), sizes_id, POPULARITY.index(row["popularity"])]
    rng = np.random.default_rng(seed)
    G = int(row["gpus"])
    n = max(1, int(round(row["models_per_gpu"] * G)))
    s = SIZES[row["sizes"]](rng, n)
    cap = MAX_FILL * row["gpu_mem"] * G
    if s.sum() > cap:
        s = s * (cap / s.sum())
    s = np.minimum(s, row["gpu_mem"])
    if row["popularity"] == "zipf":
        rate = 100.0 / rng.permutation(np.arange(1, n + 1)) ** 1.1
    else:
        rate = rng.integers(1, 10, n).astype(float)
    slo = rng.integers(5, 10, n).astype(float)
    return make_instance(np.stack([s, rate, slo], axis=1), G, row["gpu_mem"])


def solve_rows(rows: list[dict], backend: str = "auto") -> list[dict]:
    """Solve one batch (all rows share mode and effort); the result rows.  Runs on Dask workers."""
    from kvgpu.api import solve_batch
    from kvgpu.batch.state import batch_from_instances

    insts = [instance(r) for r in rows]
    b = batch_from_instances(insts)
    t0 = time.perf_counter()
    res = solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask, backend=backend,
                      mode=rows[0]["mode"], effort=max(rows[0]["effort"], 0))
    per = (time.perf_counter() - t0) / len(rows)
    return [{**r, "models": inst.n_models, "max_kvpr": float(res.max_kvpr[k]),
             "lower_bound": float(res.lower_bound[k]), "gap": float(res.gap[k]), "time_s": per,
             "backend": res.backend} for k, (r, inst) in enumerate(zip(rows, insts))]


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    """Rows grouped by (mode, effort) -- one solver call each -- then cut into ``size`` chunks,
    bigger clusters first so the slow batches start early."""
    rows = sorted(rows, key=lambda r: (r["mode"], r["effort"], -r["gpus"] * r["models_per_gpu"], r["key"]))
    out = []
    for _, grp in itertools.groupby(rows, key=lambda r: (r["mode"], r["effort"])):
        grp = list(grp)
        out += [grp[i:i + size] for i in range(0, len(grp), size)]
    return out


def done_keys(out: Path) -> set[str]:
    if not out.exists():
        return set()
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    return set().union(*(set(pq.read_table(p, columns=["key"]).column("key").to_pylist()) for p in parts)) \
        if parts else set()


def _write_part(out: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = hashlib.sha1("\n".join(r["key"] for r in rows).encode()).hexdigest()[:16]
    final = out / f"part-{name}.parquet"
    tmp = out / f".part-{name}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(final)  # atomic: a killed run leaves whole parts only
    return final


def run(spec: dict | str | Path, out: str | Path, *, client=None, progress: bool = True) -> Any:
    """Run (or resume) a sweep into the Parquet folder ``out``; returns all its rows as a pandas
    DataFrame.  ``client``: a ``dask.distributed.Client`` to run the batches as tasks."""
    import pandas as pd

    s = load_spec(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInstance(f"{out}: sweep output is a folder of Parquet parts; this path is a file")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp"):  # left by a run killed while writing; its rows are redone
        stale.unlink()
    done = done_keys(out)
    todo = [r for r in expand(s) if r["key"] not in done]
    work = batches(todo, s["batch_size"])
    bar = _progress(len(work), progress, skipped=len(done))
    for rows in _results(work, s["backend"], client):
        _write_part(out, rows)
        bar.update(1)
    bar.close()
    return pd.read_parquet(out) if any(out.glob("part-*.parquet")) else pd.DataFrame()


def _results(work: list[list[dict]], backend: str, client) -> Iterable[list[dict]]:
    if client is None:
        for rows in work:
            yield solve_rows(rows, backend)
        return
    from dask.distributed import as_completed

    futures = client.map(solve_rows, work, backend=backend, pure=False)
    for fut in as_completed(futures):
        yield fut.result()


def _progress(total: int, enabled: bool, skipped: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", disable=not enabled,
                desc=f"sweep ({skipped} rows already done)" if skipped else "sweep")


def dask_client(address: str | None = None, local_workers: int | None = None):
    """A ``dask.distributed.Client`` for an existing scheduler (``tcp://HOST:PORT``) or a new
    LocalCluster of ``local_workers`` single-threaded worker processes."""
    from dask.distributed import Client, LocalCluster

    if address:
        return Client(address)
    return Client(LocalCluster(n_workers=int(local_workers), threads_per_worker=1))
