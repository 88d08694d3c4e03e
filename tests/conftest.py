import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

from kvgpu.kernels.deltas import safe_div
from kvgpu.problem import make_instance

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


def brute_force_optimum(inst):
    """The optimal max KVPR by trying every assignment (tiny instances only)."""
    s, w, M = inst.py
    best = np.inf
    for a in itertools.product(range(inst.n_gpus), repeat=inst.n_models):
        S = [0.0] * inst.n_gpus
        W = [0.0] * inst.n_gpus
        for i, g in enumerate(a):
            S[g] += s[i]
            W[g] += w[i]
        if all(S[g] <= M[g] for g in range(inst.n_gpus)):
            best = min(best, max(safe_div(W[g], M[g] - S[g]) for g in range(inst.n_gpus)))
    return best


@st.composite
def tiny_instances(draw, max_gpus=3, max_models=6):
    """Valid instances small enough for :func:`brute_force_optimum`: 1-3 GPUs of 40/80/141 GB
    (equal or mixed), up to 6 models of 1-60 GB, rates 0-9, SLOs 1-9."""
    g = draw(st.integers(1, max_gpus))
    mem = draw(st.one_of(st.lists(st.sampled_from([40.0, 80.0, 141.0]), min_size=g, max_size=g),
                         st.sampled_from([40.0, 80.0]).map(lambda m: [m] * g)))
    models = draw(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 9), st.integers(1, 9)), min_size=1,
                           max_size=max_models))
    models = [m for m in models if m[0] <= max(mem)]
    assume(models and sum(m[0] for m in models) <= sum(mem))
    return make_instance(models, g, mem)
