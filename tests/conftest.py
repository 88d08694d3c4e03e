import json
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
FULL = os.environ.get("KVGPU_FULL") == "1"


def load(name):
    return json.loads((DATA / name).read_text())["cases"]


@pytest.fixture(scope="session")
def seed_functions():
    return load("seed_functions.json")


@pytest.fixture(scope="session")
def seed_cases():
    return load("seed_pipeline_cases.json")


@pytest.fixture(scope="session")
def adrs50():
    return load("adrs50.json")


def close(a, b, rtol=1e-9):
    """Float equality to ``rtol``; infinities must match exactly."""
    a, b = float(a), float(b)
    if a == b:
        return True
    return bool(np.isfinite(a) and np.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b)))


def padded(insts):
    """Keyword arguments of ``kvgpu.solve_batch`` for validated instances, padded by hand (kept
    independent of the engine's own padding code)."""
    B, N, G = len(insts), max(i.n_models for i in insts), max(i.n_gpus for i in insts)
    sizes, demand, mem = np.zeros((B, N)), np.zeros((B, N)), np.zeros((B, G))
    mm, gm = np.zeros((B, N), bool), np.zeros((B, G), bool)
    for b, i in enumerate(insts):
        sizes[b, :i.n_models], demand[b, :i.n_models], mm[b, :i.n_models] = i.sizes, i.demand, True
        mem[b, :i.n_gpus], gm[b, :i.n_gpus] = i.gpu_mem, True
    return dict(sizes=sizes, demand=demand, gpu_mem=mem, model_mask=mm, gpu_mask=gm)
