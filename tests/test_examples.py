"""The README's three questions on the files of ``examples/``: each command runs as the README
shows it, and its answer keeps the file's rules and says what the README says it proves."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvgpu
from conftest import check_placement, check_plan_executable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def cli_json(*args):
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", *args, "--json"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_how_many_gpus():
    d = cli_json("size", str(EXAMPLES / "models.yaml"), "--max-kvpr", "0.2")
    assert d["proven"] and d["achieved_max_kvpr"] <= 0.2
    assert d["reserve_gb"] == 4 and d["gpus_per_node"] == 4  # the file's cluster fields were read
    assert all(c["proven_impossible"] for c in d["cheaper"]) and d["count_lower_bound"] == d["gpus"]
    # the same GPUs, solved as a cluster of that size, meet the target too
    specs, cluster = kvgpu.io.read_models(EXAMPLES / "models.yaml")
    p = kvgpu.solve(specs, d["gpus"], reserve_gb=cluster["reserve_gb"], gpus_per_node=cluster["gpus_per_node"])
    assert p.max_kvpr <= 0.2
    check_placement(p.problem, p)


def test_where_each_model_goes():
    specs, cluster = kvgpu.io.read_models(EXAMPLES / "cluster.yaml")
    p = kvgpu.solve(specs, cluster["gpus"], gpu_mem=cluster["gpu_mem"])
    check_placement(p.problem, p)
    assert p.proven_optimal
    d = cli_json("solve", str(EXAMPLES / "cluster.yaml"))
    assert d["max_kvpr"] == pytest.approx(p.max_kvpr) and d["proven_optimal"]


def test_what_moves():
    specs, cluster = kvgpu.io.read_models(EXAMPLES / "running.yaml")
    p = kvgpu.replan(specs, cluster["gpus"], gpu_mem=cluster["gpu_mem"], reserve_gb=cluster["reserve_gb"],
                     gpus_per_node=cluster["gpus_per_node"], max_moves=2)
    assert check_placement(p.problem, p) <= 2
    check_plan_executable(p.problem, p)
    assert p.start_kvpr > p.max_kvpr and p.proven_optimal
    d = cli_json("replan", str(EXAMPLES / "running.yaml"), "--max-moves", "2")
    assert d["replan"]["moved_models"] == p.moved_models and d["max_kvpr"] == pytest.approx(p.max_kvpr)
