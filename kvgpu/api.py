"""Public API: :func:`solve`, :func:`replan`, :func:`solve_batch`, :func:`compute_model_placement`.

Each validates its input into a :class:`kvgpu.problem.Problem` (or a batch of plain
instances), checks the options once (:func:`kvgpu.engine.options`) and hands both to
:mod:`kvgpu.engine`; nothing else happens here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from kvgpu import backends, engine
from kvgpu._namespace import device_namespace
from kvgpu.batch.state import make_batch
from kvgpu.engine import DEFAULT_EFFORT, DEFAULT_EXACT_WORK
from kvgpu.errors import InvalidInstance
from kvgpu.problem import DEFAULT_GPU_MEM, build_problem, oversized, validate_batch
from kvgpu.results import BatchResult, Placement

_OPTIONS_DOC = """
    Options (every entry point takes them; each is checked, none is ignored):

    ``mode="search"`` (default): the seed pipeline (or, with rules, a start that keeps them),
    then up to ``effort`` rounds of search per instance (repair at a target KVPR, iterated
    local search; :mod:`kvgpu.kernels.search`), stopping after ``patience`` rounds without a
    better placement (default ``max(6, effort // 5)``); never worse than ``mode="seed"``.
    ``seed`` picks the random stream: the same ``seed`` gives the same answer on every machine,
    another one is an independent restart.  ``mode="seed"`` runs the seed pipeline exactly
    (plain instances only).  ``exact=True`` proves optimality (:mod:`kvgpu.kernels.exact`) with at
    most ``exact_work`` search nodes / DP states per instance: the lower bound becomes the proven
    one, equal to ``max_kvpr`` when optimal; ``exact=None`` proves problems of at most
    ``kvgpu.engine.AUTO_EXACT_ITEMS`` items with a little work.  ``backend``: "numpy", "numba",
    "cuda" or "auto" (see :mod:`kvgpu.backends`) runs the seed pipeline; "cuda" also the search
    and the reported figures and bounds, on the device; search otherwise, proofs and every
    instance with rules run in numba kernels.  ``"auto"`` picks the GPU only for jobs of at
    least ``kvgpu.backends.GPU_MIN_WORK`` (sum over instances of models x GPUs); instances with
    rules stay on the CPU.  ``decompose``: plain clusters of
    ``kvgpu.decompose.AUTO_GPUS`` GPUs and more (``None``, default), every plain one (``True``) or
    none (``False``) are split into groups solved as one batch, then repaired between groups
    (:mod:`kvgpu.decompose`; search mode); clusters with rules from
    ``kvgpu.decompose_rules.AUTO_GPUS`` GPUs, in groups of whole nodes that keep every rule
    (:mod:`kvgpu.decompose_rules`; a re-placement is solved whole, and refused with ``True``);
    ``dask``: a ``dask.distributed.Client`` on which those batches or group solves run as tasks,
    with the same answer as here for the same ``seed``."""


def solve(models: Any, gpus: int, *, gpu_mem: float | Sequence[float] = DEFAULT_GPU_MEM, nodes=None,
          gpus_per_node=None, reserve_gb=None, current=None, max_moves=None, max_migrated_gb=None, min_gain=None,
          out_of_service=None, backend: str = "auto", mode: str = "search", effort: int = DEFAULT_EFFORT,
          patience: int | None = None, seed: int = 0, exact: bool | None = None, exact_work: int = DEFAULT_EXACT_WORK,
          decompose: bool | None = None, dask=None, objective: str | None = None, demand=None) -> Placement:
    """Place ``models`` on ``gpus`` GPUs (memory ``gpu_mem`` GB each, or one value per GPU).

    ``models``: objects or dicts with ``model_size`` (or ``size``), ``req_rate``, ``slo`` (and
    optionally a name, ``tp``, ``replicas``, ``pin``, ``forbid``, ``cur_gpu_id``, ``overhead_gb``,
    ``same_node``, ``node``, ``colocate_with``; ``hf`` -- the model's files -- instead of the
    size, :mod:`kvgpu.model_files`), a pandas DataFrame with those columns, an (N, 3)
    array, or any iterable of them.  The cluster: ``nodes`` (lists of GPU ids) or
    ``gpus_per_node`` keep each model's tp shards inside one node; ``reserve_gb`` (a number or
    one per GPU) is kept off each GPU for the serving engine; ``out_of_service`` (GPU ids) are
    GPUs no model may use (a failed or preempted node: a model running there must move).  A
    current placement (the models' ``cur_gpu_id``, or ``current``: one GPU id or list per model,
    -1 for new) makes it a re-placement, see :func:`replan`.

    ``objective="lex"`` (the default in search mode) balances the GPUs: after the largest KVPR,
    the largest of the other GPUs, and so on (the sorted vector of GPU KVPRs compared term by
    term), by levels of search on the GPUs not yet fixed, ``effort // 4`` rounds each
    (:func:`kvgpu.engine._balance`); a GPU stays empty only where no model gains by moving
    there.  ``objective="seed"`` keeps the seed's order ``(max, second largest, mean)``.  A
    decomposed cluster uses the seed's order; the result's ``objective`` says which ran.

    ``demand``: request rates per model and demand window, an (n_models, W) array (req/s; it
    replaces the models' ``req_rate``), or a :class:`kvgpu.demand.Demand`, a DataFrame of the long
    table ``model, window, req_rate[, slo]`` or a path to one (its SLOs replace the models'): the placement minimises the worst KVPR over every GPU
    and every window, and the result's ``kvpr_by_window`` (W, G) gives each window's figures.
    ``W = 1`` is today's solve on those rates, exactly; ``W > 1`` runs the CPU NumPy engine of
    the robust objective (:mod:`kvgpu.robust`, which says what it supports and refuses).

    Raises :class:`kvgpu.InvalidInstance` for bad input (naming the model, field and rule) and
    :class:`kvgpu.NoPlacementFound` when no placement keeps memory, rules and budget (saying
    whether that is proven).
    """
    opts = engine.options(backend, mode, effort, patience, seed, exact, exact_work, decompose, dask, objective)
    labels = ()
    if demand is not None:
        models = _rates_optional(models)
        if not isinstance(demand, np.ndarray):
            models, demand, labels = _windows_of(models, demand)
    problem = build_problem(models, gpus, gpu_mem, nodes=nodes, gpus_per_node=gpus_per_node, reserve_gb=reserve_gb,
                            current=current, max_moves=max_moves, max_migrated_gb=max_migrated_gb,
                            min_gain=min_gain, out_of_service=out_of_service)
    if demand is not None:
        from kvgpu.robust import solve_windows

        out = solve_windows(problem, demand, opts, backend=backend, objective=objective)
        if labels and hasattr(out, "window_labels"):
            out.window_labels = tuple(labels)
        return out
    return engine.solve_problem(problem, backends.for_problem(problem, opts, backend))


def _rates_optional(models):
    """With ``demand=`` the demand gives every rate: a model (a dict) may leave ``req_rate`` out."""
    if isinstance(models, (list, tuple)):
        return [{**m, "req_rate": 0.0} if isinstance(m, dict) and "req_rate" not in m else m for m in models]
    return models


def _windows_of(models, demand):
    """``(models, rates, labels)`` for a demand given as a :class:`kvgpu.demand.Demand`, a DataFrame of
    the long table ``model, window, req_rate[, slo]`` or a path to one (:func:`kvgpu.demand.as_demand`,
    which names the file, line and field of bad input): the rates (n_models, W) in the models'
    order, and the models with the table's SLOs where it gives them."""
    from kvgpu import demand as dm
    from kvgpu.schema import model_specs

    specs = model_specs(models)
    d = dm.as_demand(demand, specs)
    return (specs if d.slo is None else dm.with_rates(specs, d.pick("mean"), d.slo)), d.rates, d.windows


def replan(models: Any, gpus: int, *, max_moves: int | None = None, current=None, max_migrated_gb=None,
           min_gain=None, **kwargs) -> Placement:
    """Re-place a running cluster: the best placement found from the current one (the models'
    ``cur_gpu_id``, or ``current``) moving at most ``max_moves`` models and copying at most
    ``max_migrated_gb`` GB (None: no limit); nothing running moves unless the max KVPR improves
    by at least ``min_gain`` (relative; default ``kvgpu.problem.DEFAULT_MIN_GAIN`` = 0.01, and
    ``min_gain=0`` moves for any gain) over the baseline -- the new models placed and nothing
    running moved.  The default holds for every re-placement (:func:`solve` with a current
    placement too).

    New models (-1) and running ones are placed jointly (a new model may need a running one to
    move first); the rules of :func:`solve` hold.  The result's ``plan`` lists the steps in an
    order that keeps every GPU within its memory (``plan_note`` says when only a cycle works
    and what spare room it needs); ``moves`` the migrations; ``start_kvpr``, ``baseline_kvpr``,
    ``gain`` the figures.  Other keywords as for :func:`solve`.
    """
    return solve(models, gpus, current=current, max_moves=max_moves, max_migrated_gb=max_migrated_gb,
                 min_gain=min_gain, **kwargs)


def solve_batch(sizes, demand, gpu_mem, *, model_mask=None, gpu_mask=None, backend: str = "auto",
                mode: str = "search", effort: int = DEFAULT_EFFORT, patience: int | None = None, seed: int = 0,
                exact: bool | None = None, exact_work: int = DEFAULT_EXACT_WORK, infeasible: str = "raise",
                decompose: bool | None = None, dask=None) -> BatchResult:
    """Solve ``B`` padded plain instances at once.

    ``sizes``, ``demand``: (B, N) float (GB, and ``req_rate / slo``; ``demand`` (B, N, 1), one
    window, is the same, and W > 1 windows are refused); ``gpu_mem``: (B, G) float GB;
    ``model_mask`` (B, N) / ``gpu_mask`` (B, G) bool mark real entries (default: all real).
    ``infeasible="mark"`` returns instances without a placement with their ``status`` instead of
    raising :class:`kvgpu.NoPlacementFound`.  As :func:`solve`, ``exact=None`` (the default)
    proves each instance of at most ``kvgpu.engine.AUTO_EXACT_ITEMS`` models, in the batch
    kernels; the result's ``certified`` / ``bound_source`` say which bound each gap measures.

    CuPy arrays (all of them on the GPU) are accepted: they are copied to the host once, and the
    result's ``assignment``, ``kvpr``, ``max_kvpr`` and ``lower_bound`` come back as CuPy arrays,
    copied to the device once (``status`` and ``proven`` stay NumPy).  The ``cuda`` backend moves
    its own compacted copy to the device, as for NumPy input.

    Batches search in the seed's order ``(max, second largest, mean)`` (the batch and device
    kernels), not the balanced order of :func:`solve`'s ``objective="lex"``: the result's
    ``objective`` says so.
    """
    opts = engine.options(backend, mode, effort, patience, seed, exact, exact_work, decompose, dask)
    demand = _one_window_batch(demand)
    cp = device_namespace(sizes, demand, gpu_mem, model_mask, gpu_mask)
    if cp is not None:  # one copy in of each array; the solve's bookkeeping is host code
        sizes, demand, gpu_mem, model_mask, gpu_mask = (None if a is None else cp.asnumpy(a)
                                                        for a in (sizes, demand, gpu_mem, model_mask, gpu_mask))
    batch = make_batch(sizes, demand, gpu_mem, model_mask, gpu_mask)
    if backend == "auto":  # now the size of the job is known
        opts = dataclasses.replace(opts, backend=backends.resolve("auto", backends.work_of(batch.n_models,
                                                                                           batch.n_gpus)))
    if infeasible != "mark":
        validate_batch(batch)
        res = engine.solve_batch_plain(batch, opts, infeasible)
    else:
        over, _ = oversized(batch)
        if (~over).any():
            rest = np.nonzero(~over)[0]
            validate_batch(batch.take(rest), ids=rest)
        res = engine.solve_batch_plain(batch, opts, infeasible, proven_infeasible=over)
    return res if cp is None else res.to_device(cp)


def _one_window_batch(demand):
    """A batch's demand of (B, N, 1) as (B, N); demand over W > 1 windows (B, N, W) refused by
    name: the batch engines take one demand per model."""
    ndim = getattr(demand, "ndim", None)
    ndim = np.ndim(demand) if ndim is None else ndim
    if ndim == 3:
        if demand.shape[2] != 1:
            raise InvalidInstance(f"solve_batch: demand of shape {tuple(demand.shape)} holds W = {demand.shape[2]} "
                                  f"windows; the batch engines (numpy, numba, cuda) take one demand per model (W = 1) "
                                  f"-- the robust objective over windows runs in kvgpu.solve(models, gpus, demand=D)")
        return demand[:, :, 0]
    return demand


solve.__doc__ += _OPTIONS_DOC
solve_batch.__doc__ += _OPTIONS_DOC


def compute_model_placement(gpu_num: int, models: Sequence[Any]) -> dict[int, list]:
    """Drop-in for the ADRS evaluator: ``{gpu_id: [model, ...]}`` for every GPU id (80 GB GPUs),
    holding the caller's own model objects; :func:`solve` with its defaults (search mode)."""
    return solve(models, gpu_num).by_gpu()
