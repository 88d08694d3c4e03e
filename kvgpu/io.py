"""Reading model lists from files, with errors that name the file, the row and the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvgpu.problem import InvalidInstance

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
    return out


def read_models(path: str | Path) -> tuple[list[dict], dict]:
    """Models from a JSON file (a list of objects, or ``{"models": [...], "gpus": .., "gpu_mem": ..}``)
    or a CSV file with a header row (``name,size,req_rate,slo``).  Returns ``(models, options)``
    where ``options`` holds ``gpus`` / ``gpu_mem`` if the JSON file gives them."""
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
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInstance(f"{p}, line {e.lineno}: invalid JSON ({e.msg})") from None
    opts = {}
    if isinstance(data, dict):
        opts = {k: data[k] for k in ("gpus", "gpu_mem") if k in data}
        data = data.get("models")
    if not isinstance(data, list):
        raise InvalidInstance(f"{p}: expected a list of models (or an object with a 'models' list)")
    return [_row(r, f"{p}, model {i}") for i, r in enumerate(data)], opts
