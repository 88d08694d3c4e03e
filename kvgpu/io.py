"""Model files in (CSV, JSON, YAML) and placements out (JSON, CSV).

Reading: :func:`read_models` returns validated :class:`kvgpu.schema.ModelSpec` records whose
``where`` names the file and the line (CSV: the physical line of the row; JSON and YAML: the
line where the model starts, and its index), plus the cluster options the file gives.  Every
refusal is a :class:`kvgpu.errors.InvalidInstance` naming the file, the line or model, and the
field.  Text may be UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32 with a
byte-order mark; a file that is not UTF-8 is read as Windows-1252 (Latin-1) with a
:class:`kvgpu.errors.KvgpuWarning` saying so.

Writing: every output goes to a temporary file in the target folder and is renamed over the
target only when complete (:func:`atomic_output`), so a failure leaves the previous file as it
was and no temporary file behind; :func:`check_output_path` lets a command refuse a bad output
path before a long solve.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import csv
import difflib
import io
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from kvgpu import cluster
from kvgpu.errors import InvalidInstance, KvgpuWarning
from kvgpu.schema import (MAX_GPU_ID, MAX_GPUS, OPTION_RANGES, ModelSpec, check_keys, gpu_ids, integer, model_specs,
                          per_gpu)

#: Model files by suffix.
MODEL_SUFFIXES = (".csv", ".json", ".yaml", ".yml")
#: Top-level keys of a JSON/YAML model file; ``description`` is free text, ignored by design.
FILE_KEYS = ("models", *cluster.FIELDS, "description")
#: Placements are written as these.
PLACEMENT_SUFFIXES = (".json", ".csv")

# BOM -> codec; UTF-32 first: its little-endian mark starts with UTF-16's
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


# ---------------------------------------------------------------- text

def read_text(path: str | Path) -> str:
    """The text of a file, whatever its encoding.

    A byte-order mark picks UTF-8, UTF-16 or UTF-32 (and is dropped); otherwise UTF-8; a file
    that is not valid UTF-8 (a spreadsheet's Latin-1 export) is read as Windows-1252, or
    Latin-1 where Windows-1252 leaves a byte undefined, with a :class:`KvgpuWarning` naming
    the line.  Never raises ``UnicodeDecodeError``.

    Raises
    ------
    InvalidInstance
        The file cannot be read, its text is broken after a byte-order mark, or it holds NUL
        characters (UTF-16 without a byte-order mark, or not a text file).
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInstance(f"{name}: cannot read ({e.strerror or e})") from None
    text = _decode(data, name)
    nul = text.find("\x00")
    if nul >= 0:
        raise InvalidInstance(f"{name}, line {text.count(chr(10), 0, nul) + 1}: a NUL character: not a text file, "
                              f"or UTF-16 without a byte-order mark (save it as UTF-8)")
    return text


def _decode(data: bytes, name: str) -> str:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as e:
                raise InvalidInstance(f"{name}: not valid {codec.upper()} text after its byte-order mark "
                                      f"(byte {e.start})") from None
    if b"\x00" in data:  # refused by the caller; not to be mistaken for Latin-1 text first
        return data.decode("latin-1")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        warnings.warn(f"{name}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); read as Windows-1252 "
                      f"(Latin-1); save the file as UTF-8 to be sure of its text", KvgpuWarning, stacklevel=3)
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # bytes 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined there
        return data.decode("latin-1")


def _line_of(text: str) -> Any:
    """``pos -> line number`` (1-based) of a text."""
    starts = [m.end() for m in re.finditer("\n", text)]
    return lambda pos: bisect.bisect_right(starts, pos) + 1


# ---------------------------------------------------------------- models in

class _Lines(NamedTuple):
    """Where things start in a JSON/YAML document: top-level key -> line, and each model's line
    (None where the parser gives none)."""

    keys: dict
    models: list | None


def read_models(path: str | Path, defaults: dict | None = None) -> tuple[list[ModelSpec], dict]:
    """Models and cluster options from a model file.

    Parameters
    ----------
    path : str or Path
        ``.csv``: a header row (``name,size,req_rate,slo`` and optional columns, see
        :data:`kvgpu.schema.KEYS`) and one model per line; ``.json`` / ``.yaml`` / ``.yml``:
        a list of models, or an object with ``models`` and the options below.
    defaults : dict, optional
        Field -> value for models that leave the field out (or empty): e.g. ``req_rate`` and
        ``slo`` where the demand comes from a request log (:mod:`kvgpu.demand`).

    Returns
    -------
    specs : list of ModelSpec
        Validated, each ``where`` naming the file and line (and the model's index for JSON/YAML).
    options : dict
        What the file gives, typed: ``gpus`` (int), ``gpu_mem`` (float or list of float, > 0),
        ``nodes`` (list of lists of GPU ids, disjoint), ``gpus_per_node`` (int),
        ``reserve_gb`` (float or list of float, >= 0), ``out_of_service`` (list of GPU ids),
        ``description`` (str).  Ranges that
        depend on the GPU count (list lengths, GPU ids) are the caller's to check.

    Raises
    ------
    InvalidInstance
        Naming the file, the line or model, and the field.
    """
    name = str(path)
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():
        raise InvalidInstance(f"{name}: is a folder; give a model file ({', '.join(MODEL_SUFFIXES)})")
    if suffix not in MODEL_SUFFIXES:
        raise InvalidInstance(f"{name}: models are read from {', '.join(MODEL_SUFFIXES)} files, "
                              f"not {suffix or 'a file without a suffix'!r}")
    text = read_text(path)
    if suffix == ".csv":
        rows, where = _csv_rows(text, name)
        return model_specs(_with_defaults(rows, defaults), where, base_dir=Path(path).parent), {}
    data, lines = _json_document(text, name) if suffix == ".json" else _yaml_document(text, name)
    return _document(data, lines, name, Path(path).parent, defaults)


def _with_defaults(models: list, defaults: dict | None) -> list:
    """``models`` with ``defaults`` filled in where a model (a dict) leaves a field out or empty."""
    if not defaults:
        return models
    out = []
    for m in models:
        if isinstance(m, dict):
            m = {**m, **{k: v for k, v in defaults.items() if m.get(k) is None or m.get(k) == ""}}
        out.append(m)
    return out


def models_from_data(data: dict, name: str, base_dir: Path | None = None,
                     read_files: bool = True) -> tuple[list[ModelSpec], dict]:
    """Models and cluster options from a document already parsed (a dict with ``models`` and
    the cluster fields of :data:`FILE_KEYS`), checked as :func:`read_models` checks a file;
    messages name ``name`` (e.g. a placement file that carries its models); ``base_dir``: where
    a model's relative ``hf`` folder is (default: the working folder); ``read_files=False``
    keeps the sizes a placement file stored for its ``hf`` models (:func:`kvgpu.schema.model_specs`)."""
    return _document(data, _Lines({}, None), name, base_dir, read_files=read_files)


def _document(data: Any, lines: _Lines, name: str, base_dir: Path | None = None,
              defaults: dict | None = None, read_files: bool = True) -> tuple[list[ModelSpec], dict]:
    options: dict = {}
    if isinstance(data, dict):
        _no_duplicate(data, name)
        unknown = [k for k in data if not isinstance(k, str) or k not in FILE_KEYS]
        if unknown:
            k = unknown[0]
            where = _at(name, lines, k)
            if not isinstance(k, str):
                raise InvalidInstance(f"{where}: top-level key {k!r} is not text (keys: {', '.join(FILE_KEYS)})")
            guess = difflib.get_close_matches(k, FILE_KEYS, 1, 0.6)
            raise InvalidInstance(f"{where}: unknown top-level key {k!r}" + (
                f" (did you mean {guess[0]!r}?)" if guess else f" (known: {', '.join(FILE_KEYS)})"))
        for key, value in data.items():
            if key != "models":
                label = f"{_at(name, lines, key)}: {key}"
                options[key] = _OPTIONS[key](value, label)
        if "nodes" in options and "gpus_per_node" in options:
            raise InvalidInstance(f"{name}: give 'nodes' or 'gpus_per_node', not both")
        if "models" not in data:
            raise InvalidInstance(f"{name}: no 'models' list (keys given: {', '.join(map(str, data))})")
        models = data["models"]
        if not isinstance(models, list):
            raise InvalidInstance(f"{_at(name, lines, 'models')}: 'models' must be a list of models, "
                                  f"got {_type(models)}")
    elif isinstance(data, list):
        models = data
    else:
        raise InvalidInstance(f"{name}: expected a list of models or an object with a 'models' list, "
                              f"got {'an empty file' if data is None else _type(data)}")
    at = lines.models if lines.models is not None and len(lines.models) == len(models) else None
    where = [f"{name}, line {at[i]}, model {i}" if at else f"{name}, model {i}" for i in range(len(models))]
    for w, m in zip(where, models):
        _no_duplicate(m, w)
    return model_specs(_with_defaults(models, defaults), where, base_dir=base_dir, read_files=read_files), options


def _at(name: str, lines: _Lines, key: Any) -> str:
    """``"file, line n"`` of a top-level key (YAML's ``5:`` is found by its text), or ``"file"``."""
    line = lines.keys.get(key) if isinstance(key, str) else lines.keys.get(str(key))
    return f"{name}, line {line}" if line else name


def _type(value: Any) -> str:
    return "dict" if isinstance(value, dict) else type(value).__name__


def _nodes(value: Any, label: str) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(n, list) for n in value):
        raise InvalidInstance(f"{label} must be a list of lists of GPU ids (one list per node), got {_type(value)}")
    seen: dict[int, int] = {}
    out = []
    for k, node in enumerate(value):
        if not node:
            raise InvalidInstance(f"{label}: node {k} has no GPUs")
        ids = [integer(g, f"{label}[{k}]", 0, MAX_GPU_ID) for g in node]
        for g in ids:
            if g in seen:
                raise InvalidInstance(f"{label}: GPU {g} is in node {seen[g]} and node {k}")
            seen[g] = k
        out.append(ids)
    return out


def _description(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise InvalidInstance(f"{label} must be text, got {type(value).__name__}")
    return value


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


_OPTIONS = {
    "gpus": lambda v, label: integer(v, label, *OPTION_RANGES["gpus"]),
    "gpu_mem": lambda v, label: _listed(per_gpu(v, label, 0.0, lo_open=True)),
    "reserve_gb": lambda v, label: _listed(per_gpu(v, label, 0.0)),
    "gpus_per_node": lambda v, label: integer(v, label, 1, MAX_GPUS),
    "nodes": _nodes,
    "out_of_service": lambda v, label: list(gpu_ids(v, label)),
    "description": _description,
}


def _no_duplicate(obj: Any, where: str) -> None:
    dup = getattr(obj, "duplicate", None)
    if dup is not None:
        raise InvalidInstance(f"{where}: key {dup!r} appears twice")


def _csv_rows(text: str, name: str) -> tuple[list[dict], list[str]]:
    """Row dicts (cells as text) and ``"file, line n"`` of each; blank lines skipped."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    # a spreadsheet in a decimal-comma locale separates by ';' (or a tab); pins then use ','
    delim = "," if "," in first else ";" if ";" in first else "\t" if "\t" in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    header, rows, where = None, [], []
    line = 0
    try:
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = _csv_header(cells, f"{name}, line {start}")
                continue
            if len(cells) != len(header):
                raise InvalidInstance(f"{name}, line {start}: {len(cells)} values for {len(header)} columns "
                                      f"({', '.join(header)})")
            rows.append({h: c if c.strip() else None for h, c in zip(header, cells)})  # blank: not given
            where.append(f"{name}, line {start}")
    except csv.Error as e:
        raise InvalidInstance(f"{name}, line {reader.line_num}: not a readable CSV row ({e})") from None
    if header is None:
        raise InvalidInstance(f"{name}: empty file (need a header row such as name,size,req_rate,slo)")
    return rows, where


def _csv_header(cells: list[str], where: str) -> list[str]:
    header = [c.strip() for c in cells]
    for k, h in enumerate(header):
        if not h or re.fullmatch(r"Unnamed: \d+", h):
            what = "the first column" if k == 0 else f"column {k + 1}"
            hint = " (a pandas index? write the CSV with to_csv(index=False))" if k == 0 or h else ""
            raise InvalidInstance(f"{where}: {what} has no name{hint}")
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup is not None:
        raise InvalidInstance(f"{where}: column {dup!r} appears twice")
    check_keys(header, where)
    return header


class _Pairs(dict):
    """A JSON object that remembers a repeated key (the json module keeps the last silently)."""

    duplicate = None


def _pairs(pairs: list) -> _Pairs:
    d = _Pairs(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        d.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return d


_JSON_WS = " \t\n\r"


def _json_document(text: str, name: str) -> tuple[Any, _Lines]:
    dec = json.JSONDecoder(object_pairs_hook=_pairs)
    try:
        data = dec.decode(text)
    except json.JSONDecodeError as e:
        raise InvalidInstance(f"{name}, line {e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise InvalidInstance(f"{name}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise InvalidInstance(f"{name}: invalid JSON ({str(e).split(';')[0]})") from None
    return data, _json_lines(text, dec)


def _json_lines(text: str, dec: json.JSONDecoder) -> _Lines:
    """Lines of the top-level keys and of the models of a document already decoded (so it is
    valid JSON and this walk cannot fail): the json module gives no positions."""
    line = _line_of(text)

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _JSON_WS:
            i += 1
        return i

    def elements(i: int) -> list[int]:  # text[i] == "["
        out = []
        i = skip(i + 1)
        while text[i] != "]":
            out.append(line(i))
            i = skip(dec.raw_decode(text, i)[1])
            if text[i] == ",":
                i = skip(i + 1)
        return out

    keys: dict = {}
    models = None
    i = skip(0)
    if text[i] == "[":
        models = elements(i)
    elif text[i] == "{":
        i = skip(i + 1)
        while text[i] != "}":
            key, j = dec.raw_decode(text, i)
            keys.setdefault(key, line(i))
            i = skip(skip(j) + 1)  # past ':'
            if key == "models" and text[i] == "[":
                models = elements(i)
            i = skip(dec.raw_decode(text, i)[1])
            if text[i] == ",":
                i = skip(i + 1)
    return _Lines(keys, models)


def _yaml_document(text: str, name: str) -> tuple[Any, _Lines]:
    try:
        import yaml
    except ImportError:
        raise InvalidInstance(f"{name}: reading YAML needs PyYAML (pip install pyyaml)") from None
    loader = None
    try:
        loader = _yaml_loader()(text)  # its reader refuses some characters right away
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InvalidInstance(f"{name}{where}: invalid YAML ({e.problem or e.context or e})") from None
    except yaml.reader.ReaderError as e:
        raise InvalidInstance(f"{name}, line {text.count(chr(10), 0, e.position) + 1}: invalid YAML "
                              f"(character U+{e.character:04X} is not allowed)") from None
    except yaml.YAMLError as e:
        raise InvalidInstance(f"{name}: invalid YAML ({e})") from None
    except RecursionError:
        raise InvalidInstance(f"{name}: invalid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as e:  # a date like 2024-02-30, an int of 5000 digits
        raise InvalidInstance(f"{name}: invalid YAML value ({str(e).split(';')[0]})") from None
    finally:
        if loader is not None:
            loader.dispose()
    keys: dict = {}
    models = None
    if isinstance(node, yaml.SequenceNode):
        models = [n.start_mark.line + 1 for n in node.value]
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                keys.setdefault(k.value, k.start_mark.line + 1)
                if k.value == "models" and isinstance(v, yaml.SequenceNode):
                    models = [n.start_mark.line + 1 for n in v.value]
    return data, _Lines(keys, models)


_LOADER = None


def _yaml_loader():
    """PyYAML's safe loader, refusing a key given twice (PyYAML keeps the last silently)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class Loader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                seen = set()
                for key_node, _ in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        key = self.construct_object(key_node)
                        if key in seen:
                            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                                    key_node.start_mark)
                        seen.add(key)
                return super().construct_mapping(node, deep)

        _LOADER = Loader
    return _LOADER


# ---------------------------------------------------------------- outputs

def check_output_path(path: str | Path, suffixes: Sequence[str] = (), field: str | None = None) -> Path:
    """Refuse an output path before any work: a suffix not in ``suffixes`` (lower case, with
    the dot; empty: any), a folder that does not exist or cannot be written (tried by creating
    and removing a file there), or a path that is a folder.

    Returns
    -------
    Path

    Raises
    ------
    InvalidInstance
        Naming ``field`` (e.g. ``"--out"``) and the path.
    """
    p = Path(path)
    label = f"{field} {p}" if field else str(p)
    if suffixes and p.suffix.lower() not in suffixes:
        raise InvalidInstance(f"{label}: the file name must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise InvalidInstance(f"{label}: is a folder; give a file name")
    folder = p.parent
    if not folder.is_dir():
        raise InvalidInstance(f"{label}: the folder {str(folder)!r} does not exist")
    probe = folder / f".{p.stem}.probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as e:
        raise InvalidInstance(f"{label}: cannot write in the folder {str(folder)!r} ({e.strerror or e})") from None
    return p


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Write a file all at once: yields a temporary path in the target's folder (same suffix,
    so writers that go by the suffix, like matplotlib, work); when the block ends without an
    exception the file is flushed to disk and renamed over ``path``, else it is removed and
    ``path`` is left as it was.

    Raises
    ------
    OSError
        The folder cannot be written (see :func:`check_output_path` to refuse that early).
    """
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp-{secrets.token_hex(4)}{p.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours the umask
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: The CSV's columns about the model (shard) of a row, and their meaning.
MODEL_COLUMNS = {"model": "the model's name", "gpu": "the GPU id it is placed on",
                 "model_gb": "GB it takes on that GPU: size / tp + overhead_gb",
                 "model_demand": "its demand there: req_rate / slo / (tp x replicas)"}
#: The column after :data:`MODEL_COLUMNS` when some model's KV bytes per token are known (empty
#: for the others): tokens of KV cache it holds there (``Placement.kv_tokens``), the entry of the
#: JSON's ``gpus[gpu]["kv_tokens"]`` for that model.
KV_TOKENS_COLUMN = "kv_tokens"
#: The CSV's columns about the row's GPU: ``gpu_X`` is the JSON's ``gpus[gpu]["X"]``, one
#: meaning per name in every format (``memory_gb`` is the GPU's whole memory, reserve included).
GPU_COLUMNS = ("memory_gb", "reserved_gb", "models_gb", "kv_free_gb", "demand", "kvpr")


def placement_rows(placement) -> list[dict]:
    """One row per model (per shard / replica of a split model), in input order: the
    :data:`MODEL_COLUMNS` (and :data:`KV_TOKENS_COLUMN` when known), then ``gpu_X`` for each ``X`` of :data:`GPU_COLUMNS`, the same value
    as the JSON's ``gpus[gpu]["X"]`` (floats; KVPR may be ``inf``)."""
    inst = placement.instance
    per_gpu = placement.gpu_rows()
    tokens = placement.kv_tokens() if any(s.kv_bytes_per_token is not None for s in placement.problem.specs) else None
    rows = []
    for i, g in enumerate(placement.assignment.tolist()):
        row = {"model": placement._name(i), "gpu": g, "model_gb": float(inst.sizes[i]),
               "model_demand": float(inst.demand[i])}
        if tokens is not None:
            row[KV_TOKENS_COLUMN] = None if tokens[i] != tokens[i] else int(tokens[i])  # NaN: not known
        row.update({f"gpu_{k}": per_gpu[g][k] for k in GPU_COLUMNS})
        rows.append(row)
    return rows


def write_placement(placement, path: str | Path) -> None:
    """Write a placement as JSON (``Placement.to_dict()``, strict JSON: no NaN/Infinity
    literals) or CSV (:func:`placement_rows`), by the file's suffix, through
    :func:`atomic_output`: a failure leaves the previous file untouched."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in PLACEMENT_SUFFIXES:
        raise InvalidInstance(f"{p}: placements are written as .json or .csv, not {suffix or 'no suffix'!r}")
    with atomic_output(p) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if suffix == ".json":
            json.dump(placement.to_dict(), f, indent=1, allow_nan=False)
        else:
            rows = [{k: _csv_number(v) for k, v in row.items()} for row in placement_rows(placement)]
            kv = [KV_TOKENS_COLUMN] if rows and KV_TOKENS_COLUMN in rows[0] else []
            w = csv.DictWriter(f, fieldnames=[*MODEL_COLUMNS, *kv, *(f"gpu_{k}" for k in GPU_COLUMNS)])
            w.writeheader()
            w.writerows(rows)


def _csv_number(value):
    """A float as a CSV cell: 12 significant digits, so that sums like 0.1 + 0.2 read 0.3, not
    0.30000000000000004 (the JSON keeps every digit); other values as they are."""
    return f"{value:.12g}" if isinstance(value, float) else value
