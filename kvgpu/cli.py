"""Command line: ``kvgpu solve|certify|replan|size FILE``, ``kvgpu demo``, ``kvgpu info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from kvgpu import backends
from kvgpu.api import DEFAULT_EFFORT, DEFAULT_EXACT_WORK, MODES, solve
from kvgpu.backends import BACKENDS
from kvgpu.io import read_models, write_placement
from kvgpu.problem import InvalidInstance, NoPlacementFound


def _gpu_mem(text: str):
    parts = [p for p in text.split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpu-mem takes a number or a comma-separated list, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def _add_solve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, help="number of GPUs (default: from the file, else required)")
    p.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU: one number, or one per GPU as 40,80,80 "
                   "(default: from the file, else 80)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=MODES, default="search",
                   help="search (default): the seed pipeline plus search beyond it; seed: the seed pipeline only")
    p.add_argument("--effort", type=int, default=DEFAULT_EFFORT, help="search rounds per instance (mode search)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search (results repeat for a seed)")
    p.add_argument("--exact", action="store_true", help="also prove optimality (or the interval of the optimum)")
    p.add_argument("--exact-work", type=int, default=DEFAULT_EXACT_WORK,
                   help="work limit of the proof: search nodes / DP states per instance")
    p.add_argument("--json", action="store_true", help="print the placement as JSON")
    p.add_argument("--out", help="also write the placement to this .json or .csv file")
    p.add_argument("--plot", help="also draw the placement (per-GPU memory and KVPR) to this image file")


def _solve_and_print(models, opts, args, header: str | None = None) -> int:
    gpus = args.gpus if args.gpus is not None else opts.get("gpus")
    if gpus is None:
        raise InvalidInstance("give the number of GPUs with --gpus N")
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else opts.get("gpu_mem", 80.0)
    if args.cmd == "replan":
        placement = solve(models, gpus, gpu_mem=gpu_mem, max_moves=args.max_moves, effort=args.effort, seed=args.seed)
    else:
        placement = solve(models, gpus, gpu_mem=gpu_mem, backend=args.backend, mode=args.mode, effort=args.effort,
                          seed=args.seed, exact=args.exact or args.cmd == "certify", exact_work=args.exact_work)
    if args.out:
        write_placement(placement, args.out)
    if args.plot:
        from kvgpu import plot
        plot.placement(placement, args.plot)
    # nothing is printed before the solve succeeded
    if args.json:
        print(json.dumps(placement.to_dict(), indent=1))
    elif args.cmd == "certify":
        print(f"{placement.status}: max KVPR {placement.max_kvpr:.9g}, lower bound {placement.lower_bound:.9g}")
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
    models, opts = read_models(args.file)
    work = dict(effort=args.effort, seed=args.seed, exact_work=args.exact_work)
    if args.headroom:
        if args.gpu_types or args.max_gpus is not None:
            raise InvalidInstance("--headroom tests one cluster (--gpus N, --gpu-mem); --gpu-types and --max-gpus "
                                  "are for sizing")
        gpus = args.gpus if args.gpus is not None else opts.get("gpus")
        if gpus is None:
            raise InvalidInstance("--headroom needs the cluster: give --gpus N")
        gpu_mem = args.gpu_mem if args.gpu_mem is not None else opts.get("gpu_mem", 80.0)
        result = capacity.headroom(models, gpus, max_kvpr=target, gpu_mem=gpu_mem, **work)
    else:
        if args.gpus is not None:
            raise InvalidInstance("--gpus is for --headroom; sizing finds the number of GPUs")
        if args.gpu_types and args.gpu_mem is not None:
            raise InvalidInstance("give --gpu-mem (one GPU type) or --gpu-types (several, with prices), not both")
        types = capacity.parse_gpu_types(args.gpu_types) if args.gpu_types else None
        gpu_mem = None if types else (args.gpu_mem if args.gpu_mem is not None else opts.get("gpu_mem"))
        result = capacity.size(models, target, gpu_mem=gpu_mem, gpu_types=types, max_gpus=args.max_gpus, **work)
        if "gpus" in opts:  # said once the answer stands, so an error stays one line
            print(f"kvgpu: note: {args.file} gives gpus: {opts['gpus']}, not used: sizing finds the number of GPUs "
                  f"(--headroom tests that cluster)", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0


def _sweep(args) -> int:
    from kvgpu import sweep

    client = sweep.dask_client(args.dask, args.dask_local) if (args.dask or args.dask_local) else None
    try:
        df = sweep.run(args.spec, args.out, client=client, progress=not args.no_progress)
    finally:
        if client is not None:
            client.close()
    print(f"{len(df)} rows in {args.out}")
    if len(df):
        summary = df.groupby(["gpus", "mode", "effort"]).agg(instances=("key", "size"), gap_mean=("gap", "mean"),
                                                             gap_worst=("gap", "max"), s_per_instance=("time_s", "mean"))
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.plot and len(df):
        from kvgpu import plot
        plot.sweep(df, args.plot)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvgpu", description="Place LLMs on GPUs minimising the worst "
                                     "GPU's KV cache pressure (demand / free memory).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("solve", help="solve the models of a JSON or CSV file")
    ps.add_argument("file", help="JSON list of {name, size, req_rate, slo} or CSV with that header")
    _add_solve_options(ps)
    pc = sub.add_parser("certify", help="prove the optimum of a file's instance (exact for small instances; "
                        "otherwise the proven interval within --exact-work)")
    pc.add_argument("file", help="as for solve")
    _add_solve_options(pc)
    pr = sub.add_parser("replan", help="re-place a running cluster: models carry cur_gpu_id (-1 if new); "
                        "at most --max-moves of them move")
    pr.add_argument("file", help="as for solve, plus a cur_gpu_id field/column per model")
    pr.add_argument("--max-moves", type=int, required=True, help="most models that may change GPU")
    _add_solve_options(pr)
    pw = sub.add_parser("sweep", help="solve a grid of generated instances (YAML spec) into a Parquet folder; "
                        "re-running resumes")
    pw.add_argument("spec", help="YAML: gpus, gpu_mem, models_per_gpu, sizes, popularity, seeds, mode, effort, "
                    "batch_size, backend")
    pw.add_argument("--out", required=True, help="Parquet folder (created; existing rows are kept and skipped)")
    where = pw.add_mutually_exclusive_group()
    where.add_argument("--dask", metavar="tcp://HOST:PORT", help="run the batches on this Dask scheduler")
    where.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster of N workers")
    pw.add_argument("--plot", help="draw gap and time against cluster size to this image file")
    pw.add_argument("--no-progress", action="store_true", help="no progress bar")
    pz = sub.add_parser("size", help="capacity planning: the fewest GPUs (or cheapest mix of GPU types) whose "
                        "max KVPR stays at or below --max-kvpr; or --headroom of a cluster")
    pz.add_argument("file", help="models, as for solve (pin/forbid are refused: GPU ids need a cluster)")
    pz.add_argument("--max-kvpr", required=True, metavar="X", help="target max KVPR (demand per GB of KV cache)")
    pz.add_argument("--gpu-mem", type=_gpu_mem, help="GB per GPU (default: from the file, else 80); with "
                    "--headroom one per GPU may be given")
    pz.add_argument("--gpu-types", metavar="NAME:GB:PRICE,...", help="GPU types to mix, e.g. H100:80:2.0,H200:141:3.5"
                    " (the answer is the cheapest mix)")
    pz.add_argument("--max-gpus", type=int, help="most GPUs to consider (default: one per model shard/replica)")
    pz.add_argument("--headroom", action="store_true", help="instead: how much all request rates can grow on the "
                    "cluster of --gpus N (and --gpu-mem) under --max-kvpr")
    pz.add_argument("--gpus", type=int, help="the cluster for --headroom (default: from the file)")
    pz.add_argument("--effort", type=int, default=DEFAULT_EFFORT, help="search rounds per solver call")
    pz.add_argument("--seed", type=int, default=0, help="random seed of the search")
    pz.add_argument("--exact-work", type=int, default=DEFAULT_EXACT_WORK,
                    help="proof work per cluster size tried (0: bounds only)")
    pz.add_argument("--json", action="store_true", help="print the answer as JSON")
    pd = sub.add_parser("demo", help="solve the embedded example (46 models on 16 x 80 GB GPUs)")
    _add_solve_options(pd)
    sub.add_parser("info", help="which backends are usable here, and why not")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print(backends.info())
        return 0
    try:
        if args.cmd == "sweep":
            return _sweep(args)
        if args.cmd == "size":
            return _size(args)
        if args.cmd in ("solve", "certify", "replan"):
            models, opts = read_models(args.file)
        else:
            data = json.loads(resources.files("kvgpu").joinpath("data/demo.json").read_text())
            models, opts = data["models"], {"gpus": data["gpus"], "gpu_mem": data["gpu_mem"]}
            return _solve_and_print(models, opts, args, header=data["description"])
        return _solve_and_print(models, opts, args)
    except (InvalidInstance, NoPlacementFound, ValueError) as e:
        print(f"kvgpu: error: {e}", file=sys.stderr)
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
