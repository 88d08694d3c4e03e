"""Command line: ``kvgpu solve|certify|replan FILE``, ``kvgpu demo``, ``kvgpu info``."""

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


def _sweep(args) -> int:
    """``kvgpu sweep``: spec, output folder and plot file checked before a Dask client starts or
    anything is solved; environment failures (folders, scheduler) are one line, exit status 2."""
    from kvgpu import sweep

    try:
        spec = sweep.load_spec(args.spec)
        if args.dask_local is not None:
            sweep.check_local_workers(args.dask_local)
        sweep.prepare_output(args.out)
        if args.plot:
            from kvgpu import plot
            plot.check_target(args.plot)
        client = sweep.dask_client(args.dask, args.dask_local) if (args.dask or args.dask_local is not None) else None
        try:
            df = sweep.run(spec, args.out, client=client, progress=not args.no_progress)
        finally:
            if client is not None:
                client.close()
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


def _sweep_summary(df, ok: str):
    """Per cluster size, mode and effort: instances, those without a placement, gap (in percent)
    and time per instance over the placed ones."""
    placed = df["status"] == ok
    g = df.assign(gap_pct=100 * df["gap"].where(placed), time_s=df["time_s"].where(placed), failed=~placed)
    g = g.groupby(["gpus", "mode", "effort"])
    return g.agg(**{"instances": ("key", "size"), "failed": ("failed", "sum"), "gap_mean_%": ("gap_pct", "mean"),
                    "gap_worst_%": ("gap_pct", "max"), "s_per_instance": ("time_s", "mean")})


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
    where.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster of N worker processes")
    pw.add_argument("--plot", help="draw gap (%%) and time per instance against cluster size to this image file")
    pw.add_argument("--no-progress", action="store_true", help="no progress bar")
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
