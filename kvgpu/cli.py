"""Command line: ``kvgpu solve|certify|replan|size|evaluate FILE``, ``kvgpu export PLACEMENT``,
``kvgpu demo``, ``kvgpu info``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from importlib import resources

import kvgpu
from kvgpu import backends, schema
from kvgpu import cluster as cluster_fields
from kvgpu import decompose as decomposition
from kvgpu import decompose_rules
from kvgpu.api import solve
from kvgpu.backends import BACKENDS
from kvgpu.engine import DEFAULT_EFFORT, DEFAULT_EXACT_WORK, MODES, OBJECTIVES, options
from kvgpu.errors import BackendUnavailable, InvalidInstance, KvgpuWarning, NoPlacementFound
from kvgpu.io import PLACEMENT_SUFFIXES, atomic_output, check_output_path, read_models, write_placement
from kvgpu.results import printable

# the formats matplotlib's Agg backend writes (checked before solving, not after)
_PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


class _UsageError(Exception):
    """A bad command line: one ``kvgpu: error:`` line, exit status 2 (argparse would print the
    usage too, and raise SystemExit from inside :func:`main`)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _int_option(flag: str):
    """argparse type for an integer option with the range the API uses (:data:`schema.OPTION_RANGES`):
    ``--gpus 1e12`` or ``--effort 10**20`` is one clean line, not a traceback later."""
    lo, hi = schema.OPTION_RANGES[flag.lstrip("-").replace("-", "_")]

    def parse(text: str) -> int:
        try:
            return schema.integer(text, flag, lo, hi)
        except InvalidInstance as e:  # not a ValueError to argparse: it would print its own words
            raise _UsageError(str(e)) from None
    return parse


def _num_option(flag: str, lo: float, hi: float | None = None, unlimited: bool = False):
    """argparse type for a number option, checked as the API checks it (one clean line);
    ``unlimited``: ``inf`` is accepted and means no limit."""
    def parse(text: str) -> float:
        try:
            if unlimited and float(text) == float("inf"):  # inf, infinity, or 1e400: beyond any limit
                return float("inf")
        except ValueError:
            pass
        try:
            return schema.number(text, flag, lo, hi)
        except InvalidInstance as e:
            raise _UsageError(str(e)) from None
    return parse


def _per_gpu_option(flag: str, lo: float, lo_open: bool):
    """argparse type for one number or a comma-separated list of one per GPU (no empty items)."""
    def parse(text: str):
        parts = text.split(",")
        if len(parts) > 1 and any(not p.strip() for p in parts):
            raise _UsageError(f"{flag} {text!r}: an empty item in the list (one number, or one per GPU as 40,80,141)")
        try:
            val = schema.per_gpu(parts if len(parts) > 1 else text, flag, lo, lo_open=lo_open)
        except InvalidInstance as e:
            raise _UsageError(f"{e} (one number, or one per GPU as 40,80,141)") from None
        return list(val) if isinstance(val, tuple) else val
    return parse


_gpu_mem = _per_gpu_option("--gpu-mem", 0.0, True)


def _drain_option(text: str) -> list[int]:
    """argparse type of --drain: comma-separated GPU ids (at least one)."""
    try:
        ids = schema.gpu_ids(text, "--drain")
    except InvalidInstance as e:
        raise _UsageError(f"{e} (GPU ids as 3,7)") from None
    if not ids:
        raise _UsageError(f"--drain {text!r}: give at least one GPU id (as 3,7)")
    return list(ids)


def _add_solve_options(p: argparse.ArgumentParser) -> None:
    lo, hi = schema.OPTION_RANGES["gpus"]
    p.add_argument("--gpus", type=_int_option("--gpus"), help=f"number of GPUs, {lo}..{hi} "
                   "(default: from the file, else required)")
    p.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU: one number, or one per GPU as 40,80,80 "
                   "(default: from the file, else 80)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=MODES, default="search",
                   help="search (default): the seed pipeline plus search beyond it; seed: the seed pipeline only")
    p.add_argument("--gpus-per-node", type=_int_option("--gpus-per-node"),
                   help="GPUs per node (consecutive ids): a model's tp shards stay inside one node "
                   "(default: the file's gpus_per_node or nodes, else no nodes)")
    p.add_argument("--reserve-gb", type=_per_gpu_option("--reserve-gb", 0.0, False),
                   help="GB kept off each GPU for the serving engine (activations, CUDA context): one number, "
                   "or one per GPU as 4,4,8 (default: the file's reserve_gb, else 0)")
    p.add_argument("--drain", type=_drain_option, metavar="3,7",
                   help="GPU ids taken out of service (failed or preempted): no model may use them, and replan "
                   "moves everything off them first; added to the file's out_of_service")
    p.add_argument("--effort", type=_int_option("--effort"), default=DEFAULT_EFFORT,
                   help="search rounds per instance (mode search; default %(default)s)")
    p.add_argument("--patience", type=_int_option("--patience"),
                   help="stop after this many rounds without a better placement (default: max(6, effort / 5))")
    p.add_argument("--seed", type=_int_option("--seed"), default=0,
                   help="random stream of the search: the same seed repeats the answer, another one is an "
                   "independent restart (default %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="order of placements: lex (default in search mode) balances the GPUs -- the largest KVPR, "
                   "then the largest of the others, and so on; seed: the seed's (max, second largest, mean)")
    p.add_argument("--exact", action="store_true", help="also prove optimality (or the interval of the optimum); "
                   "instances of at most 24 shards are proven by default")
    p.add_argument("--exact-work", type=_int_option("--exact-work"), default=DEFAULT_EXACT_WORK,
                   help="work limit of the proof: search nodes / DP states per instance (default %(default)s)")
    p.add_argument("--decompose", choices=("auto", "on", "off"), default="auto",
                   help="split a big cluster into groups solved apart, then repair between them: auto (default) "
                   "from %d GPUs, %d with rules (tp, pins, nodes; not a re-placement), on, off"
                   % (decomposition.AUTO_GPUS, decompose_rules.AUTO_GPUS))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dask", metavar="tcp://HOST:PORT", help="run a decomposition's batches on this Dask scheduler")
    where.add_argument("--dask-local", type=_int_option("--dask-local"), metavar="N",
                       help="run a decomposition's batches on a Dask LocalCluster of N worker processes")
    p.add_argument("--json", action="store_true", help="print the placement as JSON")
    p.add_argument("--out", help="also write the placement to this .json or .csv file")
    p.add_argument("--plot", help="also draw the placement (per-GPU memory and KVPR) to this image file "
                   "(.png, .svg, .pdf, ...)")


def _check_outputs(args) -> None:
    """Refuse bad --out / --plot paths before the solve, not after it -- and never the input."""
    source = getattr(args, "file", None)
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and source and os.path.exists(path) and os.path.samefile(path, source):
            raise InvalidInstance(f"{flag} {path}: that is the input file; write the answer elsewhere")
    if args.out:
        check_output_path(args.out, PLACEMENT_SUFFIXES, "--out")
    if args.plot:
        check_output_path(args.plot, _PLOT_SUFFIXES, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise InvalidInstance("--plot needs matplotlib (pip install matplotlib)")


def _solve_and_print(specs, opts, args, header: str | None = None) -> int:
    found = _cluster(opts, args)
    gpus = found.gpus
    if gpus is None:
        raise InvalidInstance("give the number of GPUs with --gpus N")
    gpu_mem = found.gpu_mem if found.gpu_mem is not None else 80.0
    cluster = dict(found.rules(), out_of_service=found.out_of_service)
    budget = {}
    if args.cmd == "replan":
        budget = dict(max_moves=args.max_moves, max_migrated_gb=args.max_migrated_gb, min_gain=args.min_gain)
    exact = True if (args.exact or args.cmd == "certify") else None
    decompose = {"auto": None, "on": True, "off": False}[args.decompose]
    # the options alone first: their errors are about the command line, not the file
    options(args.backend, args.mode, args.effort, args.patience, args.seed, exact, args.exact_work, decompose,
            objective=args.objective)
    use_dask = bool(args.dask or args.dask_local is not None)
    decomposition.check(decompose, mode=args.mode, dask=use_dask)
    if use_dask and decompose is None and not decomposition.chosen(int(gpus), None):  # said before connecting
        raise InvalidInstance(f"--dask / --dask-local run the group solves of a decomposed cluster, and {gpus} GPUs "
                              f"are below the automatic {decomposition.AUTO_GPUS} (with --dask also for clusters with "
                              f"rules, decomposed alone from {decompose_rules.AUTO_GPUS}): add --decompose on, or drop "
                              f"it")
    with contextlib.ExitStack() as stack:
        client = None
        if args.dask or args.dask_local is not None:
            from kvgpu import sweep

            if args.dask_local is not None:
                sweep.check_local_workers(args.dask_local)
            client = sweep.dask_client(args.dask, args.dask_local)
            stack.callback(client.close)
        placement = _solve_file(specs, gpus, gpu_mem, args, exact, decompose, client, cluster, budget, found.flags)
    return _print_placement(placement, args, header)


def _cluster(opts: dict, args) -> cluster_fields.Cluster:
    """The cluster of the file's ``opts`` and the command line (every entry point reads it here)."""
    return cluster_fields.read(opts, gpus=args.gpus, gpu_mem=args.gpu_mem, reserve_gb=args.reserve_gb,
                               gpus_per_node=args.gpus_per_node, drain=getattr(args, "drain", None))


def _solve_file(specs, gpus, gpu_mem, args, exact, decompose, client, cluster, budget, flags=()):
    windows = {}
    if getattr(args, "demand", None) is not None:
        if args.requests is not None:
            raise InvalidInstance("give the demand once: --demand TABLE (every window) or --requests LOG (one window "
                                  "of it, --pick)")
        windows = {"demand": _demand_file(args.demand, specs, args.window)}
    with _naming_file(args, flags):
        return solve(specs, gpus, gpu_mem=gpu_mem, backend=args.backend, mode=args.mode, effort=args.effort,
                     patience=args.patience, seed=args.seed, exact=exact, exact_work=args.exact_work,
                     decompose=decompose, dask=client, objective=args.objective, **cluster,
                     **budget, **windows)


def _demand_file(path, specs, window=None):
    """The demand over windows of ``--demand``: a long table (:func:`kvgpu.demand.read_table`)
    or a ``.npy`` (n_models, W) array of req/s in the models' order."""
    from kvgpu import demand

    if str(path).lower().endswith(".npy"):
        import numpy as np

        try:
            rates = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InvalidInstance(f"{path}: not a readable .npy array ({_one_line(e)})") from None
        return demand.as_demand(rates, specs, window=window, name=str(path))
    return demand.read_table(path, specs, window=window)


@contextlib.contextmanager
def _naming_file(args, flags=()):
    """A cluster-level refusal (memory list, nodes, totals) names the file and the flags that
    set the cluster."""
    try:
        yield
    except InvalidInstance as e:
        source = getattr(args, "file", None)
        if source and not str(e).startswith(str(source)):
            given = f" (with {', '.join(flags)} from the command line)" if flags else ""
            raise InvalidInstance(f"{source}{given}: {e}") from None
        raise


def _print_placement(placement, args, header) -> int:
    # both files appear together, or neither: each goes to a temporary file, renamed at the end
    with contextlib.ExitStack() as outputs:
        if args.out:
            write_placement(placement, outputs.enter_context(atomic_output(args.out)))
        if args.plot:
            from kvgpu import plot
            plot.placement(placement, outputs.enter_context(atomic_output(args.plot)))
    # nothing is printed before the solve succeeded
    if args.json:
        print(json.dumps(placement.to_dict(), indent=1, allow_nan=False))
    elif args.cmd == "certify":
        print(f"{placement.status}: max KVPR {placement.max_kvpr:.9g}, lower bound {placement.lower_bound:.9g} "
              f"({placement.bound_source}; bound on {placement.bound_scope})")
    else:
        print(f"# {header}\n{placement}" if header else placement)
    return 0


def _size(args) -> int:
    """``kvgpu size``: the fewest GPUs / cheapest mix meeting --max-kvpr, or --headroom of a cluster."""
    from kvgpu import capacity

    try:
        target = float(args.max_kvpr)
    except ValueError:
        raise InvalidInstance(f"--max-kvpr: must be a number (demand per GB of KV cache), got {args.max_kvpr!r}")
    models, opts = _read_models(args)
    found = _cluster(opts, args)
    if found.out_of_service:  # refused, never dropped: sizing has no GPU ids yet
        raise InvalidInstance(f"{args.file}: out_of_service (--drain) names GPU ids, which size/--headroom do not use "
                              f"yet; remove it (size the cluster without those GPUs) or use kvgpu solve")
    work = dict(effort=args.effort, seed=args.seed, exact_work=args.exact_work, **found.rules())
    if args.headroom:
        if args.gpu_types or args.max_gpus is not None:
            raise InvalidInstance("--headroom tests one cluster (--gpus N, --gpu-mem); --gpu-types and --max-gpus "
                                  "are for sizing")
        if found.gpus is None:
            raise InvalidInstance("--headroom needs the cluster: give --gpus N")
        gpu_mem = found.gpu_mem if found.gpu_mem is not None else 80.0
        with _naming_file(args, found.flags):
            result = capacity.headroom(models, found.gpus, max_kvpr=target, gpu_mem=gpu_mem, **work)
    else:
        if args.gpus is not None:
            raise InvalidInstance("--gpus is for --headroom; sizing finds the number of GPUs")
        if args.gpu_types and args.gpu_mem is not None:
            raise InvalidInstance("give --gpu-mem (one GPU type) or --gpu-types (several, with prices), not both")
        types = capacity.parse_gpu_types(args.gpu_types) if args.gpu_types else None
        gpu_mem = None if types else found.gpu_mem
        with _naming_file(args, found.flags):
            result = capacity.size(models, target, gpu_mem=gpu_mem, gpu_types=types, max_gpus=args.max_gpus, **work)
        if "gpus" in opts:  # said once the answer stands, so an error stays one line
            print(f"kvgpu: note: {args.file} gives gpus: {opts['gpus']}, not used: sizing finds the number of GPUs "
                  f"(--headroom tests that cluster)", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0


# ----------------------------------------------------------------------------- demand from logs

def _pick_option(text: str):
    """argparse type of --pick: busiest, mean, peak or a window index."""
    from kvgpu.demand import PICKS

    if text in PICKS:
        return text
    try:
        return schema.integer(text, "--pick", -2**31, 2**31)
    except InvalidInstance:
        raise _UsageError(f"--pick {text!r}: choose {', '.join(PICKS)} or a window index (0-based)") from None


def _add_demand_options(p: argparse.ArgumentParser, single: bool = True) -> None:
    """``--requests LOG`` (and its window, pick, default SLO): every entry point that reads a
    model file takes its req_rate from a request log through :func:`_read_models`."""
    p.add_argument("--requests", metavar="LOG", help="request log (one row per request: timestamp, model[, slo]; "
                   ".csv, .parquet, .jsonl) counted into windows: " + (
                       "each model's req_rate comes from the window of --pick" if single else
                       "the demand over the windows"))
    p.add_argument("--window", help="window length for --requests, e.g. 60s, 15min, 1h (default 1h)" + (
        "" if single else "; with --demand the table's window length (starts closer than it overlap)"))
    p.add_argument("--log-start", help="with --requests: when the log starts (ISO 8601 or epoch seconds; default its "
                   "first request); windows start there")
    p.add_argument("--log-end", help="with --requests: when the log ends (default its last request); a window the "
                   "log covers in part gets requests / seconds covered")
    if single:
        p.add_argument("--pick", type=_pick_option, help="which window sets req_rate: busiest (default: largest "
                       "sum of req_rate/slo), mean (each model's mean), peak (each model's largest), or a window "
                       "index (0-based)")
    p.add_argument("--slo", type=_num_option("--slo", 0.0), help="SLO (s) of models that neither the log (an slo "
                   "column) nor the model file gives one")


def _read_models(args, path=None):
    """The models and options of ``args.file`` -- with ``--requests``, each model's req_rate
    from the log (and its slo from the log's column when it has one, else the file's, else
    ``--slo``).  The one place the CLI reads models, so every entry point takes the log."""
    path = args.file if path is None else path
    log = getattr(args, "requests", None)
    if log is None and getattr(args, "demand", None) is not None:  # solve --demand: the table gives every rate
        given = [f for f in ("pick", "log_start", "log_end") if getattr(args, f, None) is not None]
        if given:
            opt = "--" + given[0].replace("_", "-")
            raise InvalidInstance(f"{opt} is for --requests LOG; a --demand table gives every window (drop {opt})")
        return read_models(path, defaults={"req_rate": 0.0, **({"slo": args.slo} if args.slo is not None else {})})
    if log is None:
        given = [f for f in ("window", "pick", "slo", "log_start", "log_end") if getattr(args, f, None) is not None]
        if given:
            opt = "--" + given[0].replace("_", "-")
            raise InvalidInstance(f"{opt} is for --requests LOG (req_rate from a request log); add it or drop {opt}")
        return read_models(path)
    from kvgpu import demand

    rows = demand.load(log)
    defaults = {"req_rate": 0.0}  # the log gives every rate
    if args.slo is not None:
        defaults["slo"] = args.slo
    elif "slo" in rows.frame.columns:
        defaults["slo"] = 1.0  # only models without requests keep it, with rate 0: their demand is 0
    specs, opts = read_models(path, defaults=defaults)
    found = demand.read_requests(rows, specs, window=args.window or "1h", start=args.log_start,
                                 end=args.log_end)  # its notes are warnings
    if args.cmd in ("evaluate", "replay"):  # the demand over every window
        return specs, opts, found
    how = args.pick if args.pick is not None else "busiest"
    slo = found.slo_of([s.slo for s in specs])
    rates = found.pick(how, slo=slo)
    w = found.busiest(slo) if how == "busiest" else how if not isinstance(how, str) else None
    which = (f"window {found.windows[w]}" + (" (busiest)" if how == "busiest" else "") if w is not None else
             f"each model's {how} over the windows" + (" (weighted by the time each covers)" if how == "mean" else ""))
    if w is not None and found.partial(w):
        which += f", which the log covers for {found.covered_s[w]:g} s only (a rate from fewer seconds)"
    print(f"kvgpu: note: req_rate from {log} ({found.n_windows} windows of {found.window_s:g} s from the log's "
          f"start): {which}", file=sys.stderr)
    return demand.with_rates(specs, rates, found.slo), opts


def _models_and_windows(args):
    """``evaluate`` / ``replay``: the models, their options and their demand over every window,
    from exactly one of ``--demand TABLE|RATES.npy`` and ``--requests LOG`` (both read through
    :func:`_read_models`, which lets the models leave req_rate out)."""
    if (args.demand is None) == (args.requests is None):
        raise InvalidInstance("give the demand over time: --demand TABLE (model, window, req_rate[, slo], or a .npy "
                              "array) or --requests LOG")
    if args.requests is not None:
        return _read_models(args)
    specs, opts = _read_models(args)
    return specs, opts, _demand_file(args.demand, specs, args.window)


def _evaluate(args) -> int:
    """``kvgpu evaluate``: placements over every window of a demand (a long table or a log)."""
    from kvgpu import demand
    from kvgpu.problem import build_problem

    if args.plot:
        check_output_path(args.plot, _PLOT_SUFFIXES, "--plot")
    specs, opts, found = _models_and_windows(args)
    cluster = _cluster(opts, args)
    if cluster.gpus is None:
        raise InvalidInstance("give the number of GPUs with --gpus N")
    gpu_mem = cluster.gpu_mem if cluster.gpu_mem is not None else 80.0
    rules = dict(cluster.rules(), out_of_service=cluster.out_of_service)
    peak = demand.with_rates(specs, found.pick("peak"), found.slo)  # any rates: the files' placements keep theirs
    with _naming_file(args, cluster.flags):
        problem = build_problem(peak, cluster.gpus, gpu_mem, **rules)
        chosen = [(Path(f).stem, demand.read_placement(f, problem)) for f in args.placement or ()]
        if not args.no_compare:  # one placement for every window beside today's single-demand solves
            chosen.append(("robust", solve(peak, cluster.gpus, gpu_mem=gpu_mem, effort=args.effort, seed=args.seed,
                                           demand=found, **rules)))
            chosen += demand.mean_and_peak(peak, cluster.gpus, found, gpu_mem=gpu_mem, effort=args.effort,
                                           seed=args.seed, **rules)
    if not chosen:
        raise InvalidInstance("nothing to evaluate: give --placement FILE.json, or drop --no-compare")
    evals = demand.compare(chosen, found)
    if args.plot:
        from kvgpu import plot
        plot.windows(evals, args.plot)
    if args.json:
        covered = None if found.covered_s is None else found.covered_s.tolist()  # partly covered log windows
        print(json.dumps({"windows": list(found.windows), "window_s": found.window_s, "covered_s": covered,
                          "placements": [_evaluation_dict(e) for e in evals]}, indent=1, allow_nan=False))
        return 0
    from kvgpu.results import KVPR_UNIT

    print(f"max KVPR per window ({found.n_windows} windows" +
          (f" of {found.window_s:g} s" if found.window_s else "") + f"; KVPR unit: {KVPR_UNIT})")
    print(demand.timeline(evals).to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    print()
    print(demand.summary(evals).to_string(float_format=lambda v: f"{v:.6g}"))
    first = evals[0]
    busy = ", ".join(f"{g}: {first.windows[w]}" for g, w in enumerate(first.busiest_window.tolist())
                     if first.kvpr[:, g].max() > 0)
    print(f"\nbusiest window per GPU ({first.label}): {busy or 'no GPU has demand'}")
    return 0


def _evaluation_dict(e) -> dict:
    from kvgpu.demand import QUANTILE
    from kvgpu.results import json_float

    return {"label": e.label, "worst_kvpr": json_float(e.worst), "worst_window": e.windows[e.worst_window],
            "quantile": QUANTILE, "quantile_kvpr": json_float(e.quantile()),
            "max_kvpr_by_window": [json_float(x) for x in e.max_by_window],
            "worst_gpu_by_window": e.worst_gpu.tolist(), "busiest_window_by_gpu": e.busiest_window.tolist()}


def _sweep(args) -> int:
    """``kvgpu sweep``: spec, output folder and plot file checked before a Dask client starts or
    anything is solved; environment failures (folders, scheduler) are one line, exit status 2."""
    from kvgpu import sweep

    try:
        spec = sweep.load_spec(args.spec)
        if args.dask_local is not None:
            sweep.check_local_workers(args.dask_local)
        created = not Path(args.out).exists()
        sweep.prepare_output(args.out)
        try:
            if args.plot:
                from kvgpu import plot
                plot.check_target(args.plot)
                check_output_path(args.plot, _PLOT_SUFFIXES, "--plot")
            client = sweep.dask_client(args.dask, args.dask_local) if (args.dask or args.dask_local is not None) \
                else None
            try:
                df = sweep.run(spec, args.out, client=client, progress=not args.no_progress)
            finally:
                if client is not None:
                    client.close()
        except BaseException:  # a run that wrote nothing leaves no folder it made
            if created and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
                Path(args.out).rmdir()
            raise
        failed = int((df["status"] != sweep.OK).sum())
        print(f"{len(df)} rows in {args.out}" +
              (f" ({failed} without a placement: see column 'status')" if failed else ""))
        if len(df):
            print(_sweep_summary(df, sweep.OK).to_string(float_format=lambda v: f"{v:.4g}"))
            if args.plot:
                plot.sweep(df, args.plot)
    except OSError as e:  # the folders, the scheduler: not the input, but no traceback either
        print(f"kvgpu: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_export_parser(sub) -> None:
    from kvgpu import export

    pe = sub.add_parser("export", help="launch scripts for serving engines (vLLM, SGLang, kvcached) from a placement: "
                        "one engine per replica, its GPUs, tp size, port and memory fraction")
    pe.add_argument("placement", help="a --out JSON of kvgpu solve/replan, or an export's manifest.json")
    pe.add_argument("--format", required=True, choices=export.FORMATS,
                    help="vllm / sglang: launch scripts with each engine's memory fraction; kvcached: its controller "
                    "config and launch scripts (one shared KV pool per GPU); json: the manifest only")
    pe.add_argument("-o", "--output", required=True, metavar="DIR",
                    help="folder to write (created; must not exist, or be empty): a launch script per node and "
                    "manifest.json")
    pe.add_argument("--base-port", type=_int_option("--base-port"),
                    help="first port of the engines on each node (default 8000 for vLLM, 30000 for SGLang)")
    pe.add_argument("--min-kv-gb", type=_num_option("--min-kv-gb", 0.0), default=export.DEFAULT_MIN_KV_GB,
                    help="GB of KV cache every engine gets at least per GPU, taken from the others on its GPU "
                    "(0: refuse an engine the split by demand leaves without KV cache; default %(default)s)")
    pe.add_argument("--kvcached-engine", choices=("vllm", "sglang"),
                    help="the engine kvcached runs (format kvcached only; default vllm)")
    pe.add_argument("--venv", metavar="PATH", help="the virtual environment kvcached's controller starts vLLM from "
                    "(format kvcached only)")
    pe.add_argument("--device-memory-gb", metavar="GB", type=_device_memory,
                    help="each GPU's real total memory as the engines see it (one number, or one per GPU, "
                    "comma-separated), e.g. 85.5 for an '80 GB' H100 (85.5e9 bytes): the memory fractions are "
                    "taken of it; default the placement's gpu_mem (a note says so)")


def _device_memory(text: str):
    """``--device-memory-gb``: one number or comma-separated numbers (checked by export)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        vals = [float(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GB, one number or one per GPU (85.5 or 85.5,85.5), got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def _export(args) -> int:
    """``kvgpu export``: the engines of a placement, written to a folder all at once."""
    from kvgpu import export

    dep = export.export(args.placement, args.format, args.output, base_port=args.base_port, min_kv_gb=args.min_kv_gb,
                        kvcached_engine=args.kvcached_engine, venv=args.venv,
                        device_memory_gb=args.device_memory_gb)
    print(f"{len(dep.engines)} engine(s) written to {args.output}: {', '.join(sorted(dep.files))}")
    print(f"{'node':>4} {'GPUs':>12} {'tp':>3} {'port':>5} {'fraction':>8} {'KV GB':>8} {'KVPR':>10}  model")
    for e in dep.engines:
        frac = e.gpu_memory_utilization if e.gpu_memory_utilization is not None else e.mem_fraction_static
        print(f"{'-' if e.node is None else e.node:>4} {','.join(map(str, e.local_gpus)):>12} {e.tp:>3} {e.port:>5} "
              f"{'shared' if frac is None else f'{frac:g}':>8} {e.kv_gb:>8.2f} {e.kvpr:>10.6f}  {printable(e.model)}")
    for note in dep.notes:
        print(f"kvgpu: note: {_one_line(note)}", file=sys.stderr)
    return 0


def _current(args):
    """``replan --current``: the models with their current GPUs, and the cluster options."""
    from kvgpu import export

    if args.file is None:
        if getattr(args, "requests", None) is not None:
            raise _UsageError("--requests sets the req_rate of a models FILE; replan --current PLACEMENT without FILE "
                              "takes the placement's own models: give FILE too, or drop --requests")
        return export.current_of(args.current)
    specs, opts = _read_models(args)
    return export.current_of(args.current, specs)[0], opts


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _show_warning(default):
    """``warnings.showwarning`` printing a KvgpuWarning as one ``kvgpu: warning:`` line."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KvgpuWarning):
            print(f"kvgpu: warning: {_one_line(message)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _sweep_summary(df, ok: str):
    """Per cluster size, mode, effort and proof setting: instances, those without a placement,
    those proven optimal, gap (in percent) and time per instance over the placed ones."""
    placed = df["status"] == ok
    df = df if "exact" in df.columns else df.assign(exact="false", proven=False)  # rows written before proofs
    g = df.assign(gap_pct=100 * df["gap"].where(placed), time_s=df["time_s"].where(placed), failed=~placed,
                  proven=df["proven"].fillna(False).astype(bool))
    g = g.groupby(["gpus", "mode", "effort", "exact"])
    return g.agg(**{"instances": ("key", "size"), "failed": ("failed", "sum"), "proven": ("proven", "sum"),
                    "gap_mean_%": ("gap_pct", "mean"), "gap_worst_%": ("gap_pct", "max"),
                    "s_per_instance": ("time_s", "mean")})


def _add_replay_parser(sub) -> None:
    pp = sub.add_parser("replay", help="replay placement policies over request rates per window (a .npy array "
                        "of (models, windows) req/s): per window the max KVPR, models moved, GB migrated")
    pp.add_argument("file", help="models, as for solve (their order is the array's rows)")
    pp.add_argument("--demand", metavar="TABLE", help="demand over windows: a long table model, window, req_rate"
                    "[, slo] (.csv, .parquet, .json, .jsonl) or a .npy (n_models, W) array of req/s")
    _add_demand_options(pp, single=False)
    pp.add_argument("--policy", action="append", metavar="POLICY",
                    help="static (one robust placement for every window), replan[:every=K,max_moves=N,"
                    "max_migrated_gb=GB,min_gain=G] or greedy[:every=K,min_gain=G]; repeat to compare (default: "
                    "static, and replan every 4 windows moving at most 8 models)")
    pp.add_argument("--plot", help="also draw max KVPR and models moved per window to this image file")
    pp.add_argument("--gpus", type=_int_option("--gpus"), help="number of GPUs (default: from the file)")
    pp.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU (default: from the file, else 80)")
    pp.add_argument("--effort", type=_int_option("--effort"), default=DEFAULT_EFFORT,
                    help="search rounds per solve (default %(default)s)")
    pp.add_argument("--seed", type=_int_option("--seed"), default=0, help="random stream (default %(default)s)")
    pp.add_argument("--json", action="store_true", help="print the summary and the per-window rows as JSON")


def _policy_text(text: str) -> dict:
    """``replan:every=4,max_moves=2`` -> ``{"name": "replan", "every": "4", "max_moves": "2"}``
    (the values are checked by :class:`kvgpu.policy.Policy`)."""
    name, _, rest = text.partition(":")
    out: dict = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise InvalidInstance(f"--policy {text!r}: {part!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _replay(args) -> int:
    """``kvgpu replay``: the policies' summary table (or JSON with the per-window rows)."""
    from kvgpu.policy import DEFAULT_POLICIES, replay

    from kvgpu import demand

    models, opts, rates = _models_and_windows(args)
    if rates.slo is not None:
        models = demand.with_rates(models, rates.pick("mean"), rates.slo)
    D = rates.rates
    found = cluster_fields.read(opts, gpus=args.gpus, gpu_mem=args.gpu_mem)
    if found.gpus is None:
        raise InvalidInstance(f"{args.file}: no gpus: give --gpus N")
    if args.plot:
        from kvgpu import plot

        plot.check_target(args.plot)  # before the replay, not after
    pols = [_policy_text(t) for t in args.policy] if args.policy else list(DEFAULT_POLICIES)
    extra = {"out_of_service": found.out_of_service} if found.out_of_service else {}
    with _naming_file(args, found.flags):
        res = replay(models, found.gpus, D, pols, gpu_mem=found.gpu_mem if found.gpu_mem is not None else 80.0,
                     effort=args.effort, seed=args.seed, **found.rules(), **extra)
    if args.plot:
        res.plot(args.plot)
    print(json.dumps({"summary": res.summary(), "windows": res.rows()}, indent=1) if args.json else res)
    return 0


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0, or
    2 after one ``kvgpu: error: ...`` line on stderr for any bad input."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", KvgpuWarning)
        warnings.showwarning = _show_warning(warnings.showwarning)
        try:
            return _main(argv)
        except _UsageError as e:
            print(f"kvgpu: error: {_one_line(e)}", file=sys.stderr)
            return 2


def _main(argv) -> int:
    parser = _Parser(prog="kvgpu", description="Place LLMs on GPUs minimising the worst "
                                     "GPU's KV cache pressure (demand / free memory).")
    parser.add_argument("--version", action="version", version=f"kvgpu {kvgpu.__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("solve", help="solve the models of a JSON or CSV file")
    ps.add_argument("file", help="JSON list of {name, size, req_rate, slo} or CSV with that header")
    _add_solve_options(ps)
    _add_demand_options(ps)
    ps.add_argument("--demand", metavar="TABLE", help="demand over windows: a long table model, window, req_rate"
                    "[, slo] (.csv, .parquet, .json, .jsonl) or a .npy (n_models, W) array of req/s; one placement "
                    "for every window (the worst KVPR over GPUs and windows)")
    pc = sub.add_parser("certify", help="prove the optimum of a file's instance (exact for small instances; "
                        "otherwise the proven interval within --exact-work)")
    pc.add_argument("file", help="as for solve")
    _add_solve_options(pc)
    _add_demand_options(pc)
    pr = sub.add_parser("replan", help="re-place a running cluster: models carry cur_gpu_id (-1 if new); "
                        "at most --max-moves of them move")
    pr.add_argument("file", nargs="?", help="as for solve, plus a cur_gpu_id field/column per model (or --current); "
                    "may be left out with --current: the models and cluster of that file")
    pr.add_argument("--current", metavar="PLACEMENT", help="the current placement: a --out JSON of kvgpu solve/replan, "
                    "or an export's manifest.json (or its folder); models matched by name")
    pr.add_argument("--max-moves", type=_int_option("--max-moves"),
                    help="most models that may change GPU (default: no limit)")
    pr.add_argument("--max-migrated-gb", type=_num_option("--max-migrated-gb", 0.0, unlimited=True),
                    help="most GB of model weights copied (default: inf, no limit)")
    pr.add_argument("--min-gain", type=_num_option("--min-gain", 0.0, 1.0),
                    help="move nothing that runs unless the max KVPR improves by at least this share over placing "
                    "the new models alone (default 0.01: 1%%; 0 moves for any gain)")
    _add_solve_options(pr)
    _add_demand_options(pr)
    pw = sub.add_parser("sweep", help="solve a grid of generated instances (YAML spec) into a Parquet folder; "
                        "re-running resumes")
    pw.add_argument("spec", help="YAML: gpus, gpu_mem, models_per_gpu, sizes, popularity, seeds, mode, effort, "
                    "batch_size, backend")
    pw.add_argument("--out", required=True, help="Parquet folder (created; existing rows are kept and skipped)")
    where = pw.add_mutually_exclusive_group()
    where.add_argument("--dask", metavar="tcp://HOST:PORT", help="run the batches on this Dask scheduler")
    where.add_argument("--dask-local", type=_int_option("--dask-local"), metavar="N",
                       help="start a Dask LocalCluster of N worker processes")
    pw.add_argument("--plot", help="draw gap (%%) and time per instance against cluster size to this image file")
    pw.add_argument("--no-progress", action="store_true", help="no progress bar")
    pz = sub.add_parser("size", help="capacity planning: the fewest GPUs (or cheapest mix of GPU types) whose "
                        "max KVPR stays at or below --max-kvpr; or --headroom of a cluster")
    pz.add_argument("file", help="models, as for solve (pin/forbid are refused: GPU ids need a cluster)")
    pz.add_argument("--max-kvpr", required=True, metavar="X", help="target max KVPR (demand per GB of KV cache)")
    pz.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU (default: from the file, else 80); with "
                    "--headroom one per GPU may be given")
    pz.add_argument("--gpu-types", metavar="NAME:GB:PRICE,...", help="GPU types to mix, e.g. H100:80:2.0,H200:141:3.5"
                    " (the answer is the cheapest mix)")
    pz.add_argument("--max-gpus", type=_int_option("--max-gpus"),
                    help="most GPUs to consider (default: one per model shard/replica)")
    pz.add_argument("--headroom", action="store_true", help="instead: how much all request rates can grow on the "
                    "cluster of --gpus N (and --gpu-mem) under --max-kvpr")
    pz.add_argument("--gpus", type=_int_option("--gpus"), help="the cluster for --headroom (default: from the file)")
    pz.add_argument("--gpus-per-node", type=_int_option("--gpus-per-node"),
                    help="GPUs per node (consecutive ids; sizing: of each GPU type): a model's tp shards stay inside "
                    "one node (default: the file's gpus_per_node or nodes)")
    pz.add_argument("--reserve-gb", type=_per_gpu_option("--reserve-gb", 0.0, False),
                    help="GB kept off each GPU for the serving engine (sizing: one number; default: the file's "
                    "reserve_gb, else 0)")
    pz.add_argument("--effort", type=_int_option("--effort"), default=DEFAULT_EFFORT,
                    help="search rounds per solver call (default %(default)s)")
    pz.add_argument("--seed", type=_int_option("--seed"), default=0,
                    help="random stream of the search (default %(default)s)")
    pz.add_argument("--exact-work", type=_int_option("--exact-work"), default=DEFAULT_EXACT_WORK,
                    help="proof work per cluster size tried (0: bounds only; default %(default)s)")
    pz.add_argument("--json", action="store_true", help="print the answer as JSON")
    _add_demand_options(pz)
    pe = sub.add_parser("evaluate", help="placements over every window of a demand that changes: the max KVPR per "
                        "window, side by side with placing on the mean and on each model's peak")
    pe.add_argument("file", help="models, as for solve (req_rate may be left out: the demand gives it)")
    pe.add_argument("--demand", metavar="TABLE", help="long table model, window, req_rate[, slo] (.csv, .parquet, "
                    ".json, .jsonl)")
    _add_demand_options(pe, single=False)
    pe.add_argument("--placement", action="append", metavar="FILE.json",
                    help="a placement written by kvgpu solve --out FILE.json (repeat for several)")
    pe.add_argument("--no-compare", action="store_true", help="do not solve the robust placement (every window) "
                    "and the placements on the mean and on the peak rates")
    pe.add_argument("--gpus", type=_int_option("--gpus"), help="number of GPUs (default: from the file)")
    pe.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU (default: from the file, else 80)")
    pe.add_argument("--gpus-per-node", type=_int_option("--gpus-per-node"), help="GPUs per node")
    pe.add_argument("--reserve-gb", type=_per_gpu_option("--reserve-gb", 0.0, False), help="GB kept off each GPU")
    pe.add_argument("--drain", type=_drain_option, metavar="3,7", help="GPU ids out of service")
    pe.add_argument("--effort", type=_int_option("--effort"), default=DEFAULT_EFFORT,
                    help="search rounds of the mean and peak solves (default %(default)s)")
    pe.add_argument("--seed", type=_int_option("--seed"), default=0, help="random stream of those solves")
    pe.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    pe.add_argument("--plot", help="draw the max KVPR per window of each placement to this image file")
    _add_export_parser(sub)
    pd = sub.add_parser("demo", help="solve the embedded example (46 models on 16 x 80 GB GPUs)")
    _add_solve_options(pd)
    sub.add_parser("info", help="which backends are usable here, and why not")
    pwu = sub.add_parser("warmup", help="compile the numba kernels ahead of time (first run only; later runs load "
                         "them from the cache in under a second)")
    pwu.add_argument("--jobs", type=_int_option("--jobs"), help="compile in this many processes side by side "
                     "(default: one per CPU core)")
    pwu.add_argument("--cuda", action="store_true", help="also compile the cuda backend's kernels for this "
                     "machine's GPU (cached for every later process)")
    _add_replay_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print(backends.info())
        return 0
    if args.cmd == "warmup":
        from kvgpu.warmup import GROUPS, warmup

        if args.cuda:  # refused before the CPU compile, where it cannot run
            try:
                backends.resolve("cuda")
            except BackendUnavailable as e:
                print(f"kvgpu warmup --cuda: {e}", file=sys.stderr)
                return 2
        spent = warmup(jobs=args.jobs, announce=True)
        for g, sec in spent.items():
            print(f"{g:<7} {'compiled' if sec else 'cached  '}  {GROUPS[g][0]}")
        if args.cuda:
            from kvgpu.warmup import warmup_cuda

            sec = warmup_cuda(announce=True)
            print(f"{'cuda':<7} {'compiled' if sec else 'cached  '}  the cuda backend's kernels (seed, search, "
                  "figures)")
        return 0
    try:
        if args.cmd == "replay":
            return _replay(args)
        if args.cmd == "sweep":
            return _sweep(args)
        if args.cmd == "size":
            return _size(args)
        if args.cmd == "evaluate":
            return _evaluate(args)
        if args.cmd == "export":
            return _export(args)
        _check_outputs(args)
        if args.cmd == "replan" and args.current:
            specs, opts = _current(args)
            return _solve_and_print(specs, opts, args)
        if args.cmd in ("solve", "certify", "replan"):
            if args.file is None:
                raise _UsageError("replan needs the models: FILE, or --current PLACEMENT (a --out JSON or an export's "
                                  "manifest.json)")
            specs, opts = _read_models(args)
            return _solve_and_print(specs, opts, args)
        with resources.as_file(resources.files("kvgpu").joinpath("data/demo.json")) as demo:
            specs, opts = read_models(demo)
        return _solve_and_print(specs, opts, args, header=opts.get("description"))
    except ImportError as e:  # an optional package a feature needs (YAML, sweeps, pictures)
        print(f"kvgpu: error: {_one_line(e)}; this feature needs the optional packages of kvgpu's extras: "
              f"pip install -e '.[all]' in the kvgpu checkout (README, 'Extras')", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output cut short by the reader (| head): not an error of ours
        raise
    except (InvalidInstance, NoPlacementFound, ValueError, OSError) as e:
        print(f"kvgpu: error: {_one_line(e)}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point: exit status from :func:`main`; a closed pipe (``| head``) is
    not an error."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    run()
