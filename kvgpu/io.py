"""Model lists in (JSON, CSV, YAML) and placements out (JSON, CSV), with errors that name the
file, the line or row, and the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvgpu.errors import InvalidInstance

FIELDS = ("model_size", "req_rate", "slo")
ALIASES = {"size": "model_size", "model_name": "name"}


def _row(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise InvalidInstance(f"{where}: expected an object with name, size, req_rate, slo; got {raw!r}")
    row = {ALIASES.get(k.strip(), k.strip()): v for k, v in raw.items() if k is not None}
    out = {"name": str(row.get("name", "")).strip() or None}
    for f in FIELDS:
        v = row.get(f)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise InvalidInstance(f"{where}: missing field {f!r}")
        try:
            out[f] = float(v)
        except (TypeError, ValueError):
            raise InvalidInstance(f"{where}: field {f!r} must be a number, got {v!r}") from None
    for key in ("tp", "replicas", "pin", "forbid", "overhead_gb", "same_node"):  # kvgpu.problem checks them
        v = row.get(key)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            out[key] = v
    cur = row.get("cur_gpu_id")
    if cur is not None and not (isinstance(cur, str) and not cur.strip()):
        out["cur_gpu_id"] = cur
    return out


def read_models(path: str | Path) -> tuple[list[dict], dict]:
    """Models from a JSON or YAML file (a list of objects, or ``{"models": [...], "gpus": ..,
    "gpu_mem": ..}``) or a CSV file with a header row (``name,size,req_rate,slo``).  Returns
    ``(models, options)`` where ``options`` holds ``gpus`` / ``gpu_mem`` if the file gives them."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidInstance(f"{p}: cannot read ({e.strerror})") from None
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise InvalidInstance(f"{p}: empty CSV file (need a header row name,size,req_rate,slo)")
        return [_row(r, f"{p}, line {reader.line_num}") for r in reader], {}
    if p.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(text, p)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInstance(f"{p}, line {e.lineno}: invalid JSON ({e.msg})") from None
    opts = {}
    if isinstance(data, dict):
        opts = {k: data[k] for k in ("gpus", "gpu_mem", "nodes", "gpus_per_node", "reserve_gb") if k in data}
        data = data.get("models")
    if not isinstance(data, list):
        raise InvalidInstance(f"{p}: expected a list of models (or an object with a 'models' list)")
    return [_row(r, f"{p}, model {i}") for i, r in enumerate(data)], opts


def _load_yaml(text: str, p: Path):
    try:
        import yaml
    except ImportError:
        raise InvalidInstance(f"{p}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InvalidInstance(f"{p}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def placement_rows(placement) -> list[dict]:
    """One row per model, in input order: name, gpu, size, req_rate/slo demand, and its GPU's
    memory, used memory and KVPR."""
    inst = placement.instance
    rows = []
    for i, g in enumerate(placement.assignment.tolist()):
        rows.append({"model": placement._name(i), "gpu": g, "model_size": float(inst.sizes[i]),
                     "demand": float(inst.demand[i]), "gpu_memory": float(inst.gpu_mem[g]),
                     "gpu_used": float(placement.used[g]), "gpu_kvpr": float(placement.kvpr[g])})
    return rows


def write_placement(placement, path: str | Path) -> None:
    """Write a placement as JSON (``Placement.to_dict()``) or CSV (:func:`placement_rows`), by the
    file's suffix; written to a temporary file first, so a failure leaves nothing half-written."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"{p}: placements are written as .json or .csv, not {suffix or 'no suffix'!r}")
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        if suffix == ".json":
            json.dump(placement.to_dict(), f, indent=1)
        else:
            rows = placement_rows(placement)
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model", "gpu"])
            w.writeheader()
            w.writerows(rows)
    tmp.replace(p)
