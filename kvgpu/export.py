"""From a placement to running servers: launch scripts, kvcached configs and a manifest.

:func:`export` turns a :class:`kvgpu.Placement` (or the JSON that ``kvgpu solve/replan --out``
writes, which carries its models and cluster) into one *engine* per model replica: the ``tp``
shards of a replica are one serving process over ``tp`` GPUs.  Each engine gets its GPUs
(``CUDA_VISIBLE_DEVICES``; with nodes, the ids local to its node: a GPU's rank among its node's
GPU ids), its tensor-parallel size, a port (per node, from ``base_port`` up) and, where engines
share a GPU without a shared KV pool, its memory fraction:

* **KV memory** (:meth:`kvgpu.Placement.kv_split`): each GPU's free memory (memory - reserve -
  weights and overheads) split in proportion to demand, so every engine on a GPU sees the
  GPU's own KV pressure.  An engine needs some KV blocks to start, and a model with no demand
  would get none: every engine gets at least ``min_kv_gb`` GB per GPU, taken from the others on
  its GPU in proportion to their shares (they keep equal pressure among themselves);
  ``min_kv_gb=0`` refuses such an engine instead.  A tp engine keeps one pool size on all its
  GPUs (vLLM and SGLang size the pool by the smallest rank): the least of its shards' shares.
* **vLLM** ``--gpu-memory-utilization`` is the fraction of the GPU's *total* memory this
  instance may use -- weights, activations, CUDA context and KV cache -- a per-instance limit
  (vLLM's engine-args docs: "if you have two vLLM instances running on the same GPU, you can set
  the GPU memory utilization to 0.5 for each"): ``(size / tp + overhead_gb + kv) / memory``,
  the least over the engine's GPUs.  At startup vLLM refuses to run when the GPU's free memory
  is below that share ("Free memory on device ... is less than desired GPU memory utilization"),
  so the fractions on a GPU add up to at most ``1 - reserve / memory`` and the launch script
  starts the engines of a GPU one after another (each waits until the earlier ones answer
  ``/health``).  vLLM measures the free memory after creating its own CUDA context, so a GPU
  needs ``reserve_gb`` of at least that (1-2 GB): the notes name GPUs without any.
* **SGLang** ``--mem-fraction-static`` is the share of memory for weights and the KV pool;
  SGLang measures it against the memory *free when the engine starts* (its
  ``pre_model_load_memory``; KV pool = free after loading - free before x (1 - fraction)), not
  the GPU's total.  With the engines of a GPU started one after another in the script's order,
  an engine's fraction is ``(size / tp + kv) / free`` where ``free`` is the GPU's memory less
  what the engines started before it take (weights, overhead, KV), the least over its GPUs.
  A tp engine whose GPUs are free to different degrees (by more than SGLang's 10% check) gets
  ``SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK=1``.
* **kvcached** (``ovg-project/kvcached``): the engines of a GPU share one elastic KV pool, so
  no per-engine fraction is set (kvcached's README: no need to set a memory utilization limit;
  its patches treat vLLM's fraction as a logical bound and skip vLLM's startup check).  Its
  controller config (``controller/example-config.yaml``: ``kvcached``, ``router`` -- which
  routes by each instance's ``model``, so it is off where an engine loads a path other than
  its served name, or a name runs as several replicas --,
  ``instances`` with ``name``, ``model``, ``engine``, ``using_venv``, ``venv_path``,
  ``kvcached_env``, ``engine_env``, ``engine_args``) is written per node, with
  ``kvcached_gpu_utilization = (memory - reserve) / device memory`` (the headroom kvcached
  leaves free on each GPU is the reserve, and the device's memory beyond ``gpu_mem``; the least
  over the node's GPUs).  kvcached's launcher starts vLLM from a
  virtual environment only (``using_venv``, ``venv_path``): ``venv`` is required for it.

Each engine loads the model's ``serve`` (a repo id or a folder), else its ``hf`` (a repo id, or
the folder made absolute when read), else -- with a note -- its name as given, and serves it
under its name (``--served-model-name NAME``, vLLM's and SGLang's flag): names are the
engines' identity, so two models of one name are refused.  A model's ``kv_cache_dtype``
becomes ``--kv-cache-dtype`` (:data:`KV_DTYPE_FLAGS`).  Fractions are of each device's real
memory when ``device_memory_gb`` gives it (an "80 GB" H100 has 85.5e9 bytes), else of
``gpu_mem`` (a note says so); every engine then gets the GB the split gives it.

A LoRA adapter (``colocate_with: BASE``) is no process of its own: the engine of its base on
its GPU serves it (vLLM ``--enable-lora --lora-modules NAME=PATH``, SGLang ``--lora-paths
NAME=PATH``, PATH the adapter's ``serve``), with the adapter's weights, overhead and KV share
added to that engine (its requests use that engine's KV pool); adapters of tp bases are refused
when the models are read.

Every format writes ``manifest.json`` (the engines, and the placement's models, cluster and
assignment, so :func:`load` reads it back like an ``--out`` file); ``json`` writes only that.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvgpu.errors import InvalidInstance, KvgpuWarning
from kvgpu.kernels.deltas import EPS, mem_unit, safe_div_array
from kvgpu.results import Placement, json_float, printable

#: The formats :func:`export` writes.
FORMATS = ("vllm", "sglang", "kvcached", "json")
#: First port of each engine's servers on a node (its usual default port).
BASE_PORTS = {"vllm": 8000, "sglang": 30000}
#: GB of KV cache every engine gets at least, per GPU (an engine cannot start without KV blocks).
DEFAULT_MIN_KV_GB = 1.0
#: Version of the manifest's layout.
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Engine:
    """One serving process: replica ``replica`` of model ``model_index`` over ``gpus``.

    Attributes
    ----------
    model : str -- the model's name: the name clients ask for (``--served-model-name``).
    path : str -- what the engine loads (:func:`source`): the model's ``serve``, else its ``hf``
        (a repo id, or an absolute folder), else its name (``named``: False, and a note says so).
    model_index, replica : int -- the model's position in the input, and which of its replicas.
    node : int or None -- the node (None without nodes).
    gpus, local_gpus : list of int -- GPU ids in the cluster, and on the node (``CUDA_VISIBLE_DEVICES``).
    tp : int -- tensor-parallel size (``len(gpus)``).
    port : int -- its server's port.
    weights_gb, overhead_gb, kv_gb : float -- GB per GPU: ``size / tp``, ``overhead_gb``, KV cache
        (with its adapters' weights, overheads and KV shares).
    demand : float -- demand per GPU (``req_rate / slo`` over ``tp x replicas``, with its adapters').
    kvpr : float -- its KV pressure: ``demand / kv_gb``.
    adapters : list of str -- LoRA adapters (``colocate_with`` this model, on its GPU) it serves.
    adapter_paths : list of str -- what it loads for each adapter (:func:`source`).
    kv_cache_dtype : str or None -- the model's ``kv_cache_dtype`` (the engine's flag is set from it).
    gpu_memory_utilization, mem_fraction_static : float or None -- vLLM's and SGLang's fraction
        (None where the format does not use it).
    env : dict -- extra environment of the process.
    raised : bool -- its KV share was raised to ``min_kv_gb``.
    """

    model: str
    path: str
    model_index: int
    replica: int
    node: int | None
    gpus: list
    local_gpus: list
    tp: int
    port: int = 0
    weights_gb: float = 0.0
    overhead_gb: float = 0.0
    kv_gb: float = 0.0
    demand: float = 0.0
    kvpr: float = 0.0
    adapters: list = field(default_factory=list)
    adapter_paths: list = field(default_factory=list)
    kv_cache_dtype: str | None = None
    named: bool = True
    gpu_memory_utilization: float | None = None
    mem_fraction_static: float | None = None
    env: dict = field(default_factory=dict)
    raised: bool = False


@dataclass
class Deployment:
    """What :func:`export` returns: the ``engines`` in start order, the ``files`` (name -> text)
    and ``notes`` (what an operator should know); :meth:`write` puts the files in a folder."""

    format: str
    engines: list
    files: dict
    notes: list

    def write(self, folder: str | Path) -> Path:
        """Write every file into ``folder`` at once: into a temporary folder beside it, renamed
        to ``folder`` when complete (nothing half-written on error).  ``folder`` must not exist,
        or be empty."""
        target = Path(folder)
        check_folder(target)
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            for name, text in self.files.items():
                path = tmp / name
                path.write_text(text, encoding="utf-8")
                if name.endswith(".sh"):
                    path.chmod(0o755)
            if target.is_dir():
                target.rmdir()  # empty (checked): replaced by the finished folder
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def check_folder(folder: str | Path) -> Path:
    """Refuse an export folder that exists and is not empty, is a file, or whose parent is missing."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise InvalidInstance(f"-o {p}: is a file; give a folder for the launch scripts")
    if p.is_dir() and any(p.iterdir()):
        raise InvalidInstance(f"-o {p}: the folder is not empty; give a new folder (nothing is overwritten)")
    if not p.parent.is_dir():
        raise InvalidInstance(f"-o {p}: the folder {str(p.parent)!r} does not exist")
    return p


# ---------------------------------------------------------------- reading a placement back

def load(path: str | Path) -> Placement:
    """The placement of a ``kvgpu solve/replan --out`` JSON file or of an export's
    ``manifest.json`` (a folder: its manifest), rebuilt from the models, cluster and assignment
    it carries and checked against them: every rule and the memory, and the file's own KVPR
    figures (an edited file is refused, never exported as it claims).

    Raises
    ------
    InvalidInstance
        Naming the file and what is wrong: not such a file (a launch script or a kvcached
        config names the manifest to give instead), a model or cluster field, a broken rule.
    """
    from kvgpu.io import models_from_data, read_text
    from kvgpu.problem import build_problem

    path = _manifest_of(Path(path))
    name = str(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidInstance(f"{name}, line {e.lineno}: invalid JSON ({e.msg})") from None
    missing = [k for k in ("models", "cluster", "assignment") if not isinstance(data, dict) or k not in data]
    if missing:
        raise InvalidInstance(f"{name}: not a placement written by kvgpu solve/replan --out (.json) or kvgpu export "
                              f"(manifest.json): no {', '.join(map(repr, missing))} (files written before kvgpu "
                              f"carried its models lack them: solve again with --out)")
    models = [{k: v for k, v in m.items() if k != "cur_gpu_id"} if isinstance(m, dict) else m
              for m in (data["models"] if isinstance(data["models"], list) else [])]
    cluster = data["cluster"] if isinstance(data["cluster"], dict) else {}
    # the figures stored (size, kv_bytes_per_token) stand: the hf files are not read again
    specs, opts = models_from_data({"models": models, **cluster}, name, base_dir=path.parent, read_files=False)
    if "gpus" not in opts or "gpu_mem" not in opts:
        raise InvalidInstance(f"{name}: 'cluster' must give gpus and gpu_mem")
    try:
        problem = build_problem(specs, opts["gpus"], opts["gpu_mem"], reserve_gb=opts.get("reserve_gb"),
                                nodes=opts.get("nodes"), out_of_service=opts.get("out_of_service"))
    except InvalidInstance as e:
        raise InvalidInstance(f"{name}: {e}") from None
    assign = _assignment(data["assignment"], problem, name)
    _check_rules(problem, assign, name)
    inst = problem.items
    used = np.bincount(assign, weights=inst.sizes, minlength=problem.n_gpus)
    demand = np.bincount(assign, weights=inst.demand, minlength=problem.n_gpus)
    kvpr = safe_div_array(demand, inst.gpu_mem - used, np)
    _check_figures(data, kvpr, name)
    return Placement(problem, assign, kvpr, min(_bound(data), float(kvpr.max())))


def _bound(data: dict) -> float:
    """The file's lower bound (0 where it gives none it can prove: the bound is not re-proven)."""
    try:
        lb = float(data.get("lower_bound", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return lb if lb >= 0 else 0.0


def _manifest_of(path: Path) -> Path:
    """``path``, or the manifest to read instead (a folder: its manifest; a launch script or a
    kvcached config: refused, naming the manifest beside it)."""
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return path / MANIFEST
        raise InvalidInstance(f"{path}: a folder without {MANIFEST} (kvgpu export writes one); give the placement "
                              f"file (--out of kvgpu solve/replan) or an export's {MANIFEST}")
    if path.suffix.lower() in (".sh", ".yaml", ".yml"):
        beside = path.parent / MANIFEST
        what = "a launch script" if path.suffix.lower() == ".sh" else "a kvcached controller config"
        hint = (f"give {beside}, written beside it" if beside.is_file()
                else f"give the {MANIFEST} kvgpu export wrote beside it")
        raise InvalidInstance(f"{path}: {what} is not read back (a script can be edited into anything); {hint}")
    if path.suffix.lower() == ".csv":
        raise InvalidInstance(f"{path}: a CSV placement lacks the models and cluster; give the JSON (--out FILE.json)")
    return path


def _assignment(value: Any, problem, name: str) -> np.ndarray:
    n, G = problem.items.n_models, problem.n_gpus
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise InvalidInstance(f"{name}: 'assignment' must give one GPU id per shard/replica ({n}), got {got}")
    from kvgpu.schema import integer

    return np.array([integer(g, f"{name}: assignment[{i}]", 0, G - 1) for i, g in enumerate(value)], np.int64)


def _check_rules(problem, a: np.ndarray, name: str) -> None:
    """Every rule of ``problem`` on assignment ``a`` (memory, distinct GPUs per model, allowed
    GPUs, tp shards in one node, adapters beside their base), else InvalidInstance naming it."""
    inst = problem.items
    used = np.bincount(a, weights=inst.sizes, minlength=problem.n_gpus)
    over = np.nonzero(used > inst.gpu_mem + EPS * mem_unit(inst.gpu_mem))[0]
    if over.size:
        g = int(over[0])
        raise InvalidInstance(f"{name}: GPU {g} holds {used[g]:g} GB of models, more than its {inst.gpu_mem[g]:g} GB "
                              f"(after reserve_gb)")
    for m, spec in enumerate(problem.specs):
        gs = a[problem.items_of(m)].tolist()
        if len(set(gs)) != len(gs):
            raise InvalidInstance(f"{name}: {spec.where}: two shards/replicas on one GPU ({gs})")
        if problem.allowed.shape[0] and not problem.allowed[problem.items_of(m), gs].all():
            raise InvalidInstance(f"{name}: {spec.where}: on a GPU its rules do not allow (pin, forbid, node, "
                                  f"out_of_service): {gs}")
    if problem.node_group.shape[0]:
        for k in set(problem.node_group.tolist()) - {-1}:
            if len({int(problem.node_of[g]) for g in a[problem.node_group == k]}) > 1:
                m = int(problem.model_of[np.nonzero(problem.node_group == k)[0][0]])
                raise InvalidInstance(f"{name}: {problem.specs[m].where}: the tp shards of a replica span nodes")
    if problem.coloc.shape[0]:
        for i in np.nonzero(problem.coloc >= 0)[0].tolist():
            if a[i] not in a[problem.model_of == problem.coloc[i]]:
                raise InvalidInstance(f"{name}: {problem.specs[problem.model_of[i]].where}: not beside its base model")


def _check_figures(data: dict, kvpr: np.ndarray, name: str) -> None:
    """The file's per-GPU KVPR must be the one its models and assignment give."""
    rows = data.get("gpus")
    if not isinstance(rows, list) or len(rows) != kvpr.shape[0]:
        return  # a manifest lists only what it needs; --out files list every GPU
    for g, row in enumerate(rows):
        try:
            said = float(row["kvpr"])
        except (KeyError, TypeError, ValueError):
            continue
        # to 1e-6: the solver's kernels add a GPU's loads in their own order
        ok = said == kvpr[g] or (math.isfinite(said) and abs(said - kvpr[g]) <= 1e-6 * max(abs(said), abs(kvpr[g])))
        if not ok:
            raise InvalidInstance(f"{name}: GPU {g}: the file says KVPR {said!r}, its models and assignment give "
                                  f"{float(kvpr[g])!r} (an edited file?); solve again with --out")


def current_of(path: str | Path, specs: list | None = None) -> tuple[list, dict]:
    """The current placement for ``kvgpu replan --current``: ``(models, cluster options)``,
    the models as :class:`kvgpu.schema.ModelSpec` carrying ``cur_gpu`` -- their GPUs in the
    file at ``path`` (a ``--out`` JSON or an export manifest), None for a model not running
    there.

    ``specs`` (the replan file's models) are matched to the file's models by name (names are
    the identity: a model without one, or two of one name, are refused in either), and the
    cluster options are ``{}`` (the replan
    file's); None: the file's own models and cluster.  A model that runs in the file but is not
    among ``specs`` stops: a :class:`kvgpu.KvgpuWarning` names it.

    Raises
    ------
    InvalidInstance
        The file cannot be read (see :func:`load`), a model has no name to match it by or
        shares it, or a model of ``specs`` carries ``cur_gpu_id`` too.
    """
    from dataclasses import replace

    prev = load(path)
    running = [tuple(g) for g in prev.gpus_of_models()]
    if specs is None:
        return [replace(s, cur_gpu=g) for s, g in zip(prev.problem.specs, running)], prev.problem.cluster_fields()
    why = f"--current {path} matches models by name"
    unique_names(prev.problem.specs, why)
    unique_names(specs, why)
    where = {s.name: g for s, g in zip(prev.problem.specs, running)}
    out = []
    for s in specs:
        if s.cur_gpu is not None:
            raise InvalidInstance(f"{s.where}: gives cur_gpu_id, and --current {path} gives the current placement "
                                  f"too; give it once")
        out.append(replace(s, cur_gpu=where.get(s.name)))
    stopped = [printable(n) for n in where if n not in {s.name for s in specs}]
    if stopped:
        warnings.warn(f"{path}: running there but not among the models: {', '.join(stopped)}; they stop (their GPUs "
                      f"are free for the re-placement)", KvgpuWarning, stacklevel=2)
    return out, {}


# ---------------------------------------------------------------- engines and their memory

def _items_per_gpu(p: Placement) -> list:
    """The items on each GPU, in input order."""
    out: list = [[] for _ in range(p.problem.n_gpus)]
    for i, g in enumerate(p.assignment.tolist()):
        out[g].append(i)
    return out


def _names(p: Placement, idx) -> str:
    """The names of items ``idx`` for a message (one line each: :func:`printable`)."""
    names = p.problem.items.names
    return ", ".join(printable(names[i] if names[i] is not None else f"#{i}") for i in idx)


def _kv_per_item(p: Placement, min_kv_gb: float) -> tuple[np.ndarray, np.ndarray]:
    """(n,) GB of KV cache per item (:meth:`Placement.kv_split`, with every item raised to
    ``min_kv_gb`` at the expense of the others on its GPU, which keep equal pressure), and
    (n,) bool: raised.  Refuses a GPU without room for the minimum, and with ``min_kv_gb=0``
    an item left with no KV cache."""
    base = p.kv_split()
    kv = base.copy()
    raised = np.zeros(kv.shape[0], bool)
    w = p.instance.demand
    for g, idx in enumerate(_items_per_gpu(p)):
        if not idx:
            continue
        free = max(float(p.kv_free[g]), 0.0)
        names = _names(p, idx)
        if min_kv_gb <= 0:
            zero = [i for i in idx if kv[i] <= 0]
            if zero:
                raise InvalidInstance(f"GPU {g}: {_names(p, zero)} would get 0 GB of KV cache (no demand beside "
                                      f"engines with demand, or no free memory): an engine cannot start without KV "
                                      f"blocks; give a minimum KV share (min_kv_gb, --min-kv-gb)")
            continue
        if free < min_kv_gb * len(idx) * (1 - 1e-12):
            raise InvalidInstance(f"GPU {g}: {len(idx)} engine(s) ({names}) need at least {min_kv_gb:g} GB of KV cache "
                                  f"each (min_kv_gb), but only {free:.4g} GB are free after weights, overheads and "
                                  f"reserve; lower --min-kv-gb or place with more room")
        low: set = set()
        while True:  # water-filling: raise the smallest shares to the minimum, share the rest by demand
            rest = [i for i in idx if i not in low]
            left = free - min_kv_gb * len(low)
            total = float(sum(w[i] for i in rest))
            share = {i: left * w[i] / total if total > 0 else left / len(rest) for i in rest}
            new = {i for i, v in share.items() if v < min_kv_gb}
            if not new:
                break
            low |= new
        for i in idx:
            kv[i] = min_kv_gb if i in low else share[i]
            raised[i] = i in low and base[i] < min_kv_gb
    return kv, raised


def _local_ids(p: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(G,) node of each GPU (-1 without nodes) and its id on the node (its rank among the
    node's GPU ids)."""
    node = p.problem.gpu_node
    G = p.problem.n_gpus
    if not node.shape[0]:
        return np.full(G, -1, np.int64), np.arange(G, dtype=np.int64)
    local = np.empty(G, np.int64)
    for k in range(int(node.max()) + 1):
        ids = np.nonzero(node == k)[0]
        local[ids] = np.arange(ids.shape[0])
    return node, local


def engines_of(p: Placement, min_kv_gb: float = DEFAULT_MIN_KV_GB, base_port: int = BASE_PORTS["vllm"]) -> list:
    """The engines of placement ``p`` in start order (node, then input order, then replica),
    with ports and KV cache (no fractions: :func:`export` sets those).  A LoRA adapter
    (``colocate_with``) is no process of its own: the engine of its base on its GPU serves it,
    with the adapter's weights, overhead, demand and KV share added (its requests use that
    engine's KV pool).  Refuses an unnamed model, two models of one name, and a replica whose
    tp shards span nodes (``same_node: false``)."""
    prob = p.problem
    unique_names(prob.specs, "an engine serves a model by its name (--served-model-name, the router, and "
                             "replan --current match by it)")
    kv, raised = _kv_per_item(p, min_kv_gb)
    node, local = _local_ids(p)
    out, adapters = [], []
    for m, spec in enumerate(prob.specs):
        if spec.colocate_with is not None:
            adapters.append(m)
            continue
        items = prob.items_of(m)
        for r in range(spec.replicas):
            its = items[r * spec.tp:(r + 1) * spec.tp]
            its = its[np.argsort(p.assignment[its], kind="stable")]  # CUDA_VISIBLE_DEVICES in id order
            gpus = p.assignment[its].tolist()
            nodes = {int(node[g]) for g in gpus}
            if len(nodes) > 1:
                raise InvalidInstance(f"{spec.where}: replica {r} spans nodes {sorted(nodes)} (same_node: false): one "
                                      f"engine over several nodes needs a multi-node launch, which kvgpu does not "
                                      f"write; keep its shards in one node")
            k = nodes.pop()
            path, named = source(spec)
            out.append(Engine(spec.name, path, m, r, None if k < 0 else k, gpus, local[gpus].tolist(), spec.tp,
                              weights_gb=spec.size / spec.tp, overhead_gb=spec.overhead_gb,
                              kv_gb=float(kv[its].min()), demand=float(prob.items.demand[its[0]]),
                              raised=bool(raised[its].any()), kv_cache_dtype=spec.kv_cache_dtype, named=named))
    for m in adapters:
        _attach(p, out, m, kv, raised)
    for e in out:
        e.kvpr = float(safe_div_array(np.array([e.demand]), np.array([e.kv_gb]), np)[0])
    out.sort(key=lambda e: (-1 if e.node is None else e.node, e.model_index, e.replica))
    ports: dict = {}
    for e in out:
        e.port = base_port + ports.get(e.node, 0)
        ports[e.node] = ports.get(e.node, 0) + 1
    return out


def unique_names(specs: list, why: str) -> None:
    """Refuse a model without a name, or two models of one name, where the name is the
    model's identity (``why`` says for what)."""
    seen: dict = {}
    for spec in specs:
        if spec.name is None or not spec.name.strip():
            raise InvalidInstance(f"{spec.where}: has no name; {why}: give each model its name")
        if spec.name in seen:
            raise InvalidInstance(f"{spec.where}: the same name as {seen[spec.name]}; {why}: give each model a name "
                                  f"of its own (replicas: the model's 'replicas' key)")
        seen[spec.name] = spec.where


def source(spec) -> tuple[str, bool]:
    """What an engine loads for model ``spec`` and whether the model says so: its ``serve``,
    else its ``hf`` (kvgpu made a local folder absolute), else ``(name, False)``."""
    ref = spec.serve or spec.hf
    return (ref, True) if ref else (spec.name, False)


def _attach(p: Placement, engines: list, m: int, kv: np.ndarray, raised: np.ndarray) -> None:
    """Adapter ``m`` (one item) joins the engine of its base on its GPU."""
    prob = p.problem
    spec = prob.specs[m]
    i = int(prob.items_of(m)[0])
    g = int(p.assignment[i])
    base = next(e for e in engines if e.model == spec.colocate_with and g in e.gpus)  # the rule keeps one there
    base.adapters.append(spec.name)
    base.adapter_paths.append(source(spec)[0])
    base.weights_gb += spec.size
    base.overhead_gb += spec.overhead_gb
    base.kv_gb += float(kv[i])
    base.demand += float(prob.items.demand[i])
    base.raised |= bool(raised[i])


def _floor4(x: float) -> float:
    """Down to 4 decimals: a fraction never rounds up past its share."""
    return math.floor(x * 10_000 + 1e-9) / 10_000


def set_vllm_fractions(engines: list, memory: np.ndarray) -> None:
    """``gpu_memory_utilization`` of each engine: (weights + overhead + KV) / memory, the least
    over its GPUs (vLLM applies one fraction to every rank's total memory)."""
    for e in engines:
        e.gpu_memory_utilization = _fraction(e, min((e.weights_gb + e.overhead_gb + e.kv_gb) / memory[g]
                                                     for g in e.gpus))


def set_sglang_fractions(engines: list, memory: np.ndarray) -> None:
    """``mem_fraction_static`` of each engine: (weights + KV) / the memory free on its GPUs when
    it starts (the engines before it in ``engines`` started and took weights, overhead and KV),
    the least over its GPUs; flags a tp engine whose GPUs differ by more than SGLang's 10%."""
    free = memory.astype(float).copy()
    for e in engines:
        at_start = free[e.gpus]
        e.mem_fraction_static = _fraction(e, (e.weights_gb + e.kv_gb) / float(at_start.min()))
        if e.tp > 1 and at_start.min() < 0.9 * at_start.max():
            e.env["SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"] = "1"
        free[e.gpus] -= e.weights_gb + e.overhead_gb + e.kv_gb


def _fraction(e: Engine, x: float) -> float:
    f = _floor4(x)
    if not 0 < f <= 1:
        raise InvalidInstance(f"{printable(e.model)} (replica {e.replica}, GPUs {e.gpus}): its memory fraction would "
                              f"be {x:.6g}, outside (0, 1]")
    return f


# ---------------------------------------------------------------- files

def export(placement: Placement | str | Path, fmt: str, out: str | Path | None = None, *, base_port: int | None = None,
           min_kv_gb: float = DEFAULT_MIN_KV_GB, kvcached_engine: str | None = None, venv: str | None = None,
           device_memory_gb=None) -> Deployment:
    """The engines and launch files of ``placement`` (a Placement, or the path of a ``--out``
    JSON / an export manifest) for ``fmt`` (:data:`FORMATS`), written to the folder ``out``
    when given (see the module doc for what each engine's fraction means).

    Parameters
    ----------
    base_port : int, optional -- first port on each node (default 8000 for vLLM, 30000 for SGLang).
    min_kv_gb : float -- GB of KV cache every engine gets at least per GPU (0: refuse an engine
        the proportional split leaves without KV cache).
    kvcached_engine : "vllm" or "sglang", optional -- the engine kvcached runs (format kvcached
        only; default vllm).
    venv : str, optional -- the virtual environment kvcached's controller starts vLLM from
        (format kvcached only).
    device_memory_gb : float or sequence of float, optional -- each GPU's real total memory in
        GB as the engines see it (an "80 GB" H100 has 85.5e9 bytes), at least its ``gpu_mem``:
        the fractions are taken of it, so every engine gets the GB the split gives it (the
        rest stays free); default ``gpu_mem`` (a note says so).

    Returns
    -------
    Deployment -- engines (start order), files (``launch.sh`` or ``launch_node{K}.sh`` per node,
    ``kvcached.yaml`` / ``kvcached_node{K}.yaml``, ``manifest.json``) and notes.

    Raises
    ------
    InvalidInstance -- a bad option or input, naming it (nothing is written then).
    """
    from kvgpu.schema import choice, integer, number

    fmt = choice(fmt, "format", FORMATS)
    for given, flag in ((kvcached_engine, "kvcached_engine (--kvcached-engine)"), (venv, "venv (--venv)")):
        if given is not None and fmt != "kvcached":
            raise InvalidInstance(f"{flag} applies to format kvcached only, not {fmt}; leave it out")
    engine = choice(kvcached_engine or "vllm", "kvcached engine", tuple(BASE_PORTS)) if fmt == "kvcached" else fmt
    min_kv_gb = number(min_kv_gb, "min_kv_gb", 0.0)
    if out is not None:
        check_folder(out)
    p = placement if isinstance(placement, Placement) else load(placement)
    port0 = BASE_PORTS.get(engine, BASE_PORTS["vllm"]) if base_port is None else integer(base_port, "base_port",
                                                                                         1, 65535)
    engines = engines_of(p, min_kv_gb, port0)
    _check_ports(engines, port0)
    if fmt == "kvcached" and engine == "vllm" and not venv:
        raise InvalidInstance("kvcached's controller starts vLLM from a virtual environment only (using_venv, "
                              "venv_path): give venv (--venv PATH)")
    memory = device_memory(p, device_memory_gb)
    if fmt in ("vllm", "json"):
        set_vllm_fractions(engines, memory)
        _check_vllm_totals(engines, memory, p.problem.reserve)
    if fmt in ("sglang", "json"):
        set_sglang_fractions(engines, memory)
    if fmt != "json":
        for e in engines:
            _kv_dtype_flag(e, engine)  # refuses a dtype the engine does not take, by name
    notes = _notes(p, engines, min_kv_gb, fmt, engine, device_memory_gb is None)
    files = {}
    if fmt != "json":
        for k, group in _by_node(engines).items():
            suffix = "" if k is None else f"_node{k}"
            files[f"launch{suffix}.sh"] = _script(group, engine, k, fmt == "kvcached", _utilization(p, k, memory))
            if fmt == "kvcached":
                files[f"kvcached{suffix}.yaml"] = _kvcached_yaml(group, engine, k, venv, _utilization(p, k, memory))
    files[MANIFEST] = _manifest(p, engines, fmt, engine, min_kv_gb, notes, sorted(files))
    dep = Deployment(fmt, engines, files, notes)
    if out is not None:
        dep.write(out)
    return dep


def _by_node(engines: list) -> dict:
    out: dict = {}
    for e in engines:
        out.setdefault(e.node, []).append(e)
    return out


def _utilization(p: Placement, node: int | None, memory: np.ndarray) -> float:
    """kvcached's ``gpu_utilization`` for a node: 1 - (reserve + the device's memory beyond
    ``gpu_mem``) / device memory (``memory`` (G,) GB), the least over its GPUs."""
    prob = p.problem
    ids = np.arange(prob.n_gpus) if node is None else np.nonzero(prob.gpu_node == node)[0]
    return _floor4(float(((prob.memory[ids] - prob.reserve[ids]) / memory[ids]).min()))


def device_memory(p: Placement, value) -> np.ndarray:
    """(G,) GB each GPU's engines take their fractions of: ``value`` (one number, or one per
    GPU), at least the GPU's ``gpu_mem``; None: ``gpu_mem``."""
    nominal = p.problem.memory.astype(float)
    if value is None:
        return nominal
    from kvgpu.schema import number

    vals = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if len(vals) not in (1, nominal.shape[0]):
        raise InvalidInstance(f"device_memory_gb: {len(vals)} values for {nominal.shape[0]} GPUs; give one, or one "
                              f"per GPU")
    mem = np.array([number(v, "device_memory_gb", 0.0, None, lo_open=True) for v in vals], float)
    mem = np.broadcast_to(mem, nominal.shape).copy()
    low = np.nonzero(mem < nominal * (1 - 1e-12))[0]
    if low.size:
        g = int(low[0])
        raise InvalidInstance(f"device_memory_gb {mem[g]:g} for GPU {g} is less than its gpu_mem {nominal[g]:g} GB, "
                              f"which the placement fills; give the device's real total (e.g. 85.5 for an "
                              f"'80 GB' H100), or solve again with gpu_mem the device's memory")
    return mem


def _check_ports(engines: list, port0: int) -> None:
    """Every engine's port within 65535 (ports count per node)."""
    if engines and max(e.port for e in engines) > 65535:
        per_node = _by_node(engines)
        most = max(len(g) for g in per_node.values())
        raise InvalidInstance(f"base_port {port0}: {most} engines on a node need ports up to "
                              f"{max(e.port for e in engines)}, above 65535; give a lower --base-port")


def _check_vllm_totals(engines: list, memory: np.ndarray, reserve: np.ndarray) -> None:
    """vLLM applies one ``--gpu-memory-utilization`` to every rank's own total memory: each
    engine must get its GB on each of its GPUs, and a GPU's engines must fit in it less its
    reserve; refuses (by name) a tp engine over GPUs of different memory that breaks either."""
    total = np.zeros(memory.shape[0])
    for e in engines:
        need = e.weights_gb + e.overhead_gb + e.kv_gb
        for g in e.gpus:
            total[g] += e.gpu_memory_utilization * memory[g]
            if e.gpu_memory_utilization * memory[g] < need - 1e-4 * memory[g] - 1e-9:  # fractions floored to 1e-4
                raise InvalidInstance(f"{printable(e.model)} (replica {e.replica}, GPUs {e.gpus}): vLLM applies one "
                                      f"--gpu-memory-utilization to every rank's own memory, and no fraction gives "
                                      f"{need:.4g} GB on GPU {g} ({memory[g]:g} GB) without taking more than its "
                                      f"share on the others; export it with --format sglang or kvcached, or place "
                                      f"it on GPUs of one memory size")
    over = np.nonzero(total > memory - reserve + 1e-6 * memory)[0]
    if over.size:
        g = int(over[0])
        names = ", ".join(printable(e.model) for e in engines if g in e.gpus)
        raise InvalidInstance(f"GPU {g}: the vLLM fractions of its engines ({names}) take {total[g]:.4g} GB of its "
                              f"{memory[g]:g} GB, more than its memory less reserve_gb: a tp engine over GPUs of "
                              f"different memory takes one fraction of each; export with --format sglang or "
                              f"kvcached, or place it on GPUs of one memory size")


#: ``kv_cache_dtype`` -> the value each engine's ``--kv-cache-dtype`` takes (vLLM: auto,
#: bfloat16, fp8, fp8_e4m3, fp8_e5m2; SGLang: auto, bfloat16, fp8_e4m3, fp8_e5m2 -- its
#: fp8 is e4m3, vLLM's default fp8 format); a dtype missing here is refused by name.
KV_DTYPE_FLAGS = {
    "vllm": {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "fp8_e4m3": "fp8_e4m3",
             "fp8_e5m2": "fp8_e5m2"},
    "sglang": {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8_e4m3",
               "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"},
}


def _kv_dtype_flag(e: Engine, engine: str) -> list:
    """``["--kv-cache-dtype", VALUE]`` for engine ``e``'s ``kv_cache_dtype`` ([] without one)."""
    if e.kv_cache_dtype is None:
        return []
    flags = KV_DTYPE_FLAGS[engine]
    if e.kv_cache_dtype not in flags:
        raise InvalidInstance(f"{printable(e.model)}: kv_cache_dtype {e.kv_cache_dtype!r} has no --kv-cache-dtype "
                              f"value in {'vLLM' if engine == 'vllm' else 'SGLang'} (it takes "
                              f"{', '.join(sorted(set(flags.values())))}); use auto, or one of those")
    return ["--kv-cache-dtype", flags[e.kv_cache_dtype]]


#: why a GPU without reserve_gb is a problem, per format
_BARE = {"vllm": "the fractions take the whole GPU: vLLM refuses to start when its share is not free after its own "
                 "CUDA context, and activations beyond overhead_gb have no room",
         "sglang": "--mem-fraction-static may take all the memory free at start (up to 1): CUDA graphs and "
                   "activations beyond overhead_gb have no room",
         "json": "the fractions take the whole GPU (vLLM refuses to start when its share is not free after its "
                 "CUDA context; SGLang leaves no room for activations beyond overhead_gb)",
         "kvcached": "kvcached_gpu_utilization keeps no headroom free on the GPU for CUDA contexts and "
                     "activations beyond overhead_gb"}


def _notes(p: Placement, engines: list, min_kv_gb: float, fmt: str, engine: str, nominal: bool) -> list:
    notes = []
    bare = sorted({g for e in engines for g in e.gpus if p.problem.reserve[g] == 0})
    if bare:
        notes.append(f"GPU(s) {', '.join(map(str, bare[:8]))}{', ...' if len(bare) > 8 else ''}: no reserve_gb, so "
                     f"{_BARE[fmt]}; give reserve_gb (1-2 GB) and solve again")
    if nominal and engines:
        notes.append("the fractions are taken of gpu_mem as each device's total memory; engines apply them to the "
                     "device's real total (an '80 GB' H100 reports 85.5e9 bytes), which gives every engine more "
                     "than planned: give --device-memory-gb (device_memory_gb) for the fractions of the real total")
    bare_names = sorted({printable(e.model) for e in engines if not e.named}
                        | {printable(a) for e in engines for a, path in zip(e.adapters, e.adapter_paths)
                           if path == a and not _said(p, a)})
    if bare_names:
        notes.append(f"no hf or serve key: {', '.join(bare_names)} loaded by name as given (a Hugging Face repo id, "
                     f"or a path relative to where the script runs); give each model serve: REPO_ID or FOLDER")
    raised = [e for e in engines if e.raised]
    if raised:
        notes.append(f"raised to min_kv_gb={min_kv_gb:g} GB of KV cache per GPU (their demand's share was less): "
                     + ", ".join(f"{printable(e.model)} (port {e.port})" for e in raised)
                     + "; the other engines on their GPUs keep equal pressure among themselves")
    served = [e for e in engines if e.adapters]
    if served:
        notes.append("LoRA adapters are served by their base's engine: " + "; ".join(
            f"{', '.join(map(printable, e.adapters))} on port {e.port}" for e in served)
            + (" (vLLM: raise --max-lora-rank / --max-loras if your adapters need it)" if engine == "vllm" else
               " (SGLang: set --max-lora-rank / --max-loras-per-batch if your adapters need it)"))
    lost = [e for e in engines if e.tp > 1 and e.kv_gb < p.kv_split()[p.problem.items_of(e.model_index)].max() - 1e-9]
    if lost:
        notes.append("tp engines keep one KV pool size on all their GPUs (the least of their shares): "
                     + ", ".join(f"{printable(e.model)} (port {e.port})" for e in lost))
    return notes


def _said(p: Placement, name: str) -> bool:
    """Does the model named ``name`` give what the engine loads (``serve`` or ``hf``)?"""
    return any(source(s)[1] for s in p.problem.specs if s.name == name)


def _comment(e: Engine) -> str:
    frac = ""
    if e.gpu_memory_utilization is not None:
        frac += f", gpu_memory_utilization {e.gpu_memory_utilization:g}"
    if e.mem_fraction_static is not None:
        frac += f", mem_fraction_static {e.mem_fraction_static:g}"
    lora = f", adapters {', '.join(map(printable, e.adapters))}" if e.adapters else ""
    if not e.named:
        lora += " (loaded by its name as given: the model has no hf or serve)"
    gpus = ",".join(map(str, e.gpus))
    return (f"# {printable(e.model)}{lora} replica {e.replica}: GPU(s) {gpus} (tp {e.tp}); per GPU "
            f"weights {e.weights_gb:.4g} + overhead {e.overhead_gb:.4g} + KV {e.kv_gb:.4g} GB, KVPR {e.kvpr:.6g}{frac}")


def _command(e: Engine, engine: str, shared: bool) -> str:
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, e.local_gpus)), **e.env}
    q = shlex.quote
    if engine == "vllm":
        cmd = f"vllm serve {q(e.path)} {' '.join(map(q, _engine_args(e, engine)))}"
        if not shared:
            cmd += f" --gpu-memory-utilization {e.gpu_memory_utilization:g}"
    else:
        cmd = f"python -m sglang.launch_server --model-path {q(e.path)} {' '.join(map(q, _engine_args(e, engine)))}"
        if not shared:
            cmd += f" --mem-fraction-static {e.mem_fraction_static:g}"
    envs = " ".join(f"{k}={q(v)}" for k, v in env.items())
    return f'{envs} {cmd} --host "$HOST" --port {e.port} > "$LOG_DIR/engine-{e.port}.log" 2>&1 &'


_SCRIPT_HEAD = """#!/usr/bin/env bash
# kvgpu export: {what}; see manifest.json.
{why}
set -euo pipefail
HOST="${{HOST:-0.0.0.0}}"
LOG_DIR="${{LOG_DIR:-logs}}"
READY_TIMEOUT="${{READY_TIMEOUT:-1800}}"
mkdir -p "$LOG_DIR"
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT INT TERM
wait_ready() {{  # PORT PID: until the engine answers /health (or its process ends)
  local port="$1" pid="$2" waited=0
  until curl -sf "http://127.0.0.1:${{port}}/health" > /dev/null; do
    if ! kill -0 "$pid" 2> /dev/null; then
      echo "engine on port $port exited; see $LOG_DIR/engine-$port.log" >&2; exit 1
    fi
    if [ "$waited" -ge "$READY_TIMEOUT" ]; then
      echo "engine on port $port not ready after ${{READY_TIMEOUT}}s" >&2; exit 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
}}
"""


def _script(engines: list, engine: str, node: int | None, shared: bool, utilization: float) -> str:
    where = "this machine" if node is None else f"node {node}"
    what = f"{len(engines)} {'vLLM' if engine == 'vllm' else 'SGLang'} engine(s) on {where}"
    if shared:
        what += " with kvcached (one elastic KV pool per GPU, no memory fraction per engine)"
        why = "# kvcached: the engines of a GPU share its KV memory on demand; they may start together."
    else:
        why = ("# Engines that share a GPU start one after another: each waits until the earlier ones on its GPUs\n"
               "# answer /health (vLLM checks its share is free at startup; SGLang measures its fraction against\n"
               "# the memory free when it starts).")
    lines = [_SCRIPT_HEAD.format(what=what, why=why)]
    if shared:
        lines.append(f"export ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 KVCACHED_GPU_UTILIZATION={utilization:g}")
    started: list = []
    waited: set = set()
    for e in engines:
        if not shared:
            for s in started:
                if s.port not in waited and set(s.gpus) & set(e.gpus):
                    lines.append(f'wait_ready {s.port} "$PID_{s.port}"  # shares GPU(s) '
                                 f"{','.join(map(str, sorted(set(s.gpus) & set(e.gpus))))} with the next")
                    waited.add(s.port)
        lines.append(_comment(e))
        lines.append(_command(e, engine, shared))
        lines.append(f"PID_{e.port}=$!")
        started.append(e)
    ports = ", ".join(str(e.port) for e in engines)
    lines.append(f'echo "started {len(engines)} engine(s) on ports {ports}; logs in $LOG_DIR"')
    lines.append("wait")
    return "\n".join(lines) + "\n"


def _engine_args(e: Engine, engine: str) -> list:
    """The flags of engine ``e`` other than its model, memory fraction, host and port: tp size,
    the name clients ask for (``--served-model-name``, the same flag in vLLM and SGLang), the
    KV cache dtype, and the LoRA adapters (``NAME=PATH``: served as NAME, loaded from PATH)."""
    args = ["--tensor-parallel-size" if engine == "vllm" else "--tp-size", str(e.tp),
            "--served-model-name", e.model, *_kv_dtype_flag(e, engine)]
    if e.adapters:
        mods = [f"{a}={path}" for a, path in zip(e.adapters, e.adapter_paths)]
        args += ["--enable-lora", "--lora-modules", *mods] if engine == "vllm" else ["--lora-paths", *mods]
    return args


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(text)


def _kvcached_yaml(engines: list, engine: str, node: int | None, venv: str | None, utilization: float) -> str:
    names = [e.model for e in engines]
    unique = len(set(names)) == len(names)
    where = "this machine" if node is None else f"node {node}"
    out = [f"# kvgpu export: kvcached controller config for {where} (python controller/launch.py --config FILE);",
           "# the engines of a GPU share one elastic KV pool: no memory fraction per engine. See manifest.json.",
           "kvcached:",
           f"  kvcached_gpu_utilization: {utilization:g}  # (gpu_mem - reserve_gb) / device memory: the rest stays free per GPU",
           "router:"]
    renamed = [e.model for e in engines if e.path != e.model]
    if not unique:
        out.append("  # off: the router keeps one endpoint per model name, and a model runs as several replicas here")
    elif renamed:  # its router maps each instance's `model` (what it loads), but clients ask for the served name
        out.append(f"  # off: the router routes by each instance's model (the path it loads), and these engines serve "
                   f"another name (--served-model-name): {', '.join(renamed)}; clients reach each engine on its port")
    routed = unique and not renamed
    out += [f"  enable_router: {'true' if routed else 'false'}", f"  router_port: {_router_port(engines)}",
            "  router_host: localhost", "instances:"]
    for e in engines:
        label = re.sub(r"[^A-Za-z0-9_-]+", "-", e.model).strip("-") or "model"
        out += [f"  - name: {_yaml_str(f'e{e.port}-{label}')}", f"    model: {_yaml_str(e.path)}",
                f"    engine: {engine}"]
        if venv:
            out += ["    using_venv: true", f"    venv_path: {_yaml_str(venv)}"]
        out += ["    kvcached_env:", '      - "ENABLE_KVCACHED=true"', '      - "KVCACHED_AUTOPATCH=1"',
                "    engine_env:", f"      - {_yaml_str('CUDA_VISIBLE_DEVICES=' + ','.join(map(str, e.local_gpus)))}",
                "    engine_args:", f"      - {_yaml_str(' '.join(map(shlex.quote, _engine_args(e, engine))))}",
                f"      - {_yaml_str(f'--port={e.port}')}"]
    return "\n".join(out) + "\n"


#: kvcached's router port (its example config's), unless an engine of the node has it.
ROUTER_PORT = 8080


def _router_port(engines: list) -> int:
    """kvcached's router port on a node: :data:`ROUTER_PORT`, or the first port above the
    node's engines when one of them has it."""
    ports = {e.port for e in engines}
    return ROUTER_PORT if ROUTER_PORT not in ports else max(ports) + 1


def _manifest(p: Placement, engines: list, fmt: str, engine: str, min_kv_gb: float, notes: list, files: list) -> str:
    node, local = _local_ids(p)
    ports: dict = {}
    for e in engines:
        for g in e.gpus:
            ports.setdefault(g, []).append(e.port)
    gpus = [{"gpu": g, "node": None if node[g] < 0 else int(node[g]), "local_id": int(local[g]),
             "memory_gb": float(p.problem.memory[g]), "reserved_gb": float(p.problem.reserve[g]),
             "kv_free_gb": float(p.kv_free[g]), "kvpr": json_float(p.kvpr[g]), "ports": ports.get(g, [])}
            for g in range(p.problem.n_gpus)]
    rows = []
    for e in engines:
        row = {k: v for k, v in asdict(e).items() if v is not None}
        row["kvpr"] = json_float(e.kvpr)
        row["cuda_visible_devices"] = ",".join(map(str, e.local_gpus))
        if fmt != "json":  # the line its launch script runs ($HOST and $LOG_DIR set there)
            row["command"] = _command(e, engine, fmt == "kvcached")
        rows.append(row)
    doc = {"kvgpu_export": MANIFEST_VERSION, "format": fmt, "engine": None if fmt == "json" else engine,
           "shared_kv_pool": fmt == "kvcached", "min_kv_gb": min_kv_gb, "files": files + [MANIFEST],
           "notes": notes, "max_kvpr": json_float(p.max_kvpr), "engines": rows, "gpus": gpus,
           "models": [s.to_dict() for s in p.problem.specs], "cluster": p.problem.cluster_fields(),
           "assignment": p.assignment.tolist()}
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"
