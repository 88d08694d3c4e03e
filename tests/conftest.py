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
