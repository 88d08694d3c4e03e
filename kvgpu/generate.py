"""Random instance families for tests, benchmarks and sweeps (deterministic per seed)."""

from __future__ import annotations

import numpy as np

from kvgpu.problem import Instance, make_instance


def adrs_like(rng: np.random.Generator) -> Instance:
    """The ADRS benchmark's shape: 5-9 GPUs of 80 GB, two models per GPU, size 10-29 GB,
    req_rate 1-9, slo 5-9 (integers, as the benchmark draws them)."""
    g = int(rng.integers(5, 10))
    m = np.stack([rng.integers(10, 30, 2 * g), rng.integers(1, 10, 2 * g), rng.integers(5, 10, 2 * g)], axis=1)
    return make_instance(m.astype(float), g)


def varied(rng: np.random.Generator, g_range=(5, 64), per_gpu=(1, 4), tight_share=0.3) -> Instance:
    """Varied shapes: ``G`` GPUs of 80 GB, 1-4 models per GPU on average, integer sizes scaled to
    a memory fill of 40-85% (or 88-96% for a ``tight_share`` of instances), rates 1-9, SLOs 1-9."""
    while True:
        inst = _varied_draw(rng, g_range, per_gpu, tight_share)
        if _packs(inst):
            return inst


def _packs(inst: Instance) -> bool:
    """Best-fit decreasing fits the models (so the instance is feasible)."""
    free = inst.gpu_mem.copy()
    for s in sorted(inst.sizes, reverse=True):
        ok = np.nonzero(free >= s)[0]
        if ok.size == 0:
            return False
        g = ok[np.argmin(free[ok])]
        free[g] -= s
    return True


def _varied_draw(rng, g_range, per_gpu, tight_share) -> Instance:
    g = int(rng.integers(g_range[0], g_range[1] + 1))
    n = max(1, int(round(g * rng.uniform(per_gpu[0], per_gpu[1]))))
    fill = rng.uniform(0.88, 0.96) if rng.random() < tight_share else rng.uniform(0.4, 0.85)
    raw = rng.uniform(0.2, 1.0, n)
    sizes = np.clip(np.floor(raw * fill * 80 * g / raw.sum()), 1, 79)
    m = np.stack([sizes, rng.integers(1, 10, n), rng.integers(1, 10, n)], axis=1).astype(float)
    return make_instance(m, g)


def cluster(rng: np.random.Generator, gpus: int, models: int, fill: float = 0.7) -> Instance:
    """A large uniform cluster: ``models`` sizes 10-30 GB scaled to ``fill`` of ``gpus`` x 80 GB."""
    raw = rng.uniform(10, 30, models)
    sizes = np.minimum(raw * fill * 80 * gpus / raw.sum(), 79.0)
    m = np.stack([sizes, rng.integers(1, 10, models), rng.integers(1, 10, models)], axis=1).astype(float)
    return make_instance(m, gpus)
