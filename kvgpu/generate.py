"""Random instance families for tests, benchmarks and sweeps (deterministic per seed)."""

from __future__ import annotations

from typing import NamedTuple

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


# ----------------------------------------------------------------------------- size and demand draws
# Every family below, and every sweep row (:mod:`kvgpu.sweep`), draws from these.  ``n=None``
# draws one value (the quality-bench families add models one at a time until a fill level).

#: Sizes (GB) of common open LLM checkpoints in fp16 (3B, 6.5-7B, 13-14B, 16B, 26B, 28B).
LLM_SIZES = np.array([3.0, 6.5, 14.0, 16.0, 26.0, 28.0])
#: How common each of :data:`LLM_SIZES` is (small checkpoints more so).
LLM_SHARES = np.array([0.25, 0.3, 0.2, 0.1, 0.08, 0.07])
#: Memories (GB) of A100-40, A100/H100-80 and H200-141 GPUs, for heterogeneous clusters.
HETERO_MEMS = np.array([40.0, 80.0, 141.0])

#: Model size distributions, ``draw(rng, n) -> (n,)`` GB (a scalar for ``n=None``): ``uniform``
#: integers 10-30 GB (ADRS's), ``llm`` :data:`LLM_SIZES` by :data:`LLM_SHARES`, ``small`` 1-8 GB.
SIZES = {"uniform": lambda rng, n=None: rng.integers(10, 31, n),
         "llm": lambda rng, n=None: rng.choice(LLM_SIZES, n, p=LLM_SHARES),
         "small": lambda rng, n=None: rng.uniform(1.0, 8.0, n)}


def _zipf_rates(rng: np.random.Generator, n: int) -> np.ndarray:
    """Skewed popularity: rate ~ 100 / rank^1.1, ranks shuffled over the models."""
    return 100.0 / rng.permutation(np.arange(1, n + 1)) ** 1.1


#: Request rate distributions, ``draw(rng, n) -> (n,)`` req/s: ``uniform`` integers 1-9
#: (ADRS's), ``zipf`` :func:`_zipf_rates`.
POPULARITY = {"uniform": lambda rng, n: rng.integers(1, 10, n), "zipf": _zipf_rates}


def demand(rng: np.random.Generator, n: int, popularity: str = "uniform",
           slo: tuple[int, int] = (5, 9)) -> tuple[np.ndarray, np.ndarray]:
    """``(req_rate (n,), slo (n,))``: rates from :data:`POPULARITY`, integer SLOs (s) in ``slo``
    (both ends included)."""
    rate = POPULARITY[popularity](rng, n)
    return rate, rng.integers(slo[0], slo[1] + 1, n)


def fixed_count(rng: np.random.Generator, gpus: int, models: int, *, sizes: str = "uniform",
                popularity: str = "uniform", gpu_mem: float = 80.0, max_fill: float = 0.95) -> Instance:
    """``models`` models on ``gpus`` GPUs of ``gpu_mem`` GB (the sweeps' instances).

    Sizes from :data:`SIZES`, scaled down where they would use more than ``max_fill`` of the
    cluster's memory, and each at most one GPU; rates from :data:`POPULARITY`, SLOs 5-9 s.
    The models may not pack (bin packing can fail at any fill): sweeps record such instances.
    """
    s = SIZES[sizes](rng, models).astype(float)
    cap = max_fill * gpu_mem * gpus
    if s.sum() > cap:
        s = s * (cap / s.sum())
    s = np.minimum(s, gpu_mem)
    rate, slo = demand(rng, models, popularity)
    return make_instance(np.stack([s, rate, slo], axis=1).astype(float), gpus, gpu_mem)


# ----------------------------------------------------------------------------- quality-bench families
# Each draws models until the total size reaches ``fill`` of the GPU memory (the draw that
# crosses it is dropped), retrying until best-fit decreasing packs them (so they are feasible).


def _fill_up(rng, gpu_mem, fill, draw_size, draw_demand) -> Instance:
    while True:
        sizes = []
        cap = fill * float(np.sum(gpu_mem))
        while True:
            v = float(draw_size())
            if sum(sizes) + v > cap:
                break
            sizes.append(v)
        n = len(sizes)
        rate, slo = draw_demand(n)
        inst = make_instance(np.stack([sizes, rate, slo], axis=1), len(gpu_mem), gpu_mem)
        if _packs(inst):
            return inst


def uniform(rng: np.random.Generator, gpus: int, fill: float = 0.92) -> Instance:
    """Integer sizes 10-30 GB on ``gpus`` x 80 GB up to ``fill``; rates 1-9, SLOs 5-9 (ADRS's)."""
    return _fill_up(rng, np.full(gpus, 80.0), fill, lambda: SIZES["uniform"](rng), lambda n: demand(rng, n))


def tight(rng: np.random.Generator, gpus: int, fill: float | None = None) -> Instance:
    """:func:`uniform`'s models (10-30 GB, ADRS's demand) nearly filling the cluster: ``fill``
    drawn in 93-98% unless given.  A GPU holds 2-3 GB of KV memory on average, so a packing
    can easily leave one with none (KVPR inf)."""
    return uniform(rng, gpus, float(rng.uniform(0.93, 0.98)) if fill is None else fill)


def llm(rng: np.random.Generator, gpus: int, fill: float = 0.85) -> Instance:
    """Realistic checkpoints (:data:`LLM_SIZES`, small ones more common) with Zipf popularity, SLOs 2-10."""
    return _fill_up(rng, np.full(gpus, 80.0), fill, lambda: SIZES["llm"](rng),
                    lambda n: demand(rng, n, "zipf", slo=(2, 10)))


def small(rng: np.random.Generator, gpus: int, fill: float = 0.85) -> Instance:
    """Many small models: 1-8 GB (about 15 per GPU), rates 1-9, SLOs 1-9."""
    return _fill_up(rng, np.full(gpus, 80.0), fill, lambda: SIZES["small"](rng),
                    lambda n: demand(rng, n, slo=(1, 9)))


def hetero(rng: np.random.Generator, gpus: int, fill: float = 0.85) -> Instance:
    """GPUs of 40, 80 and 141 GB mixed; integer sizes 5-35 GB; rates 1-9, SLOs 5-9."""
    mem = rng.choice(HETERO_MEMS, gpus)
    return _fill_up(rng, mem, fill, lambda: rng.integers(5, 36), lambda n: demand(rng, n))


FAMILIES = {"uniform": uniform, "llm": llm, "small": small, "hetero": hetero}


# ----------------------------------------------------------------------------- real clusters
#: Checkpoints served with tensor parallelism: (name, size GB, tp) -- 70B on 4 or 8 GPUs, 32B
#: and 27B on 2, and single-GPU 7-14B models; shares of the draws.
TP_MODELS = (("llama-70b", 140.0, 4), ("llama-70b-tp8", 140.0, 8), ("qwen-32b", 64.0, 2), ("gemma-27b", 54.0, 2),
             ("qwen-14b", 28.0, 1), ("llama-8b", 16.0, 1), ("mistral-7b", 14.5, 1))
TP_SHARES = np.array([0.06, 0.02, 0.12, 0.1, 0.2, 0.3, 0.2])


def tp_cluster(rng: np.random.Generator, gpus: int, fill: float = 0.8, gpus_per_node: int = 8,
               popularity: str = "uniform") -> tuple[list, dict]:
    """A cluster of nodes (``gpus_per_node`` x 80 GB) serving a mix of tensor-parallel and
    single-GPU models (``popularity`` of :data:`POPULARITY`); popular small models get 2 replicas.  Models are
    drawn until their weights reach ``fill`` of the memory.  Returns ``(models, options)`` for
    :func:`kvgpu.solve` (``options``: gpus, gpu_mem, gpus_per_node)."""
    models, used, cap = [], 0.0, fill * 80.0 * gpus
    while True:
        name, size, tp = TP_MODELS[int(rng.choice(len(TP_MODELS), p=TP_SHARES))]
        if tp > gpus_per_node or used + size > cap:
            break
        models.append({"name": f"{name}-{len(models)}", "size": size, "tp": tp})
        used += size
    rate, slo = demand(rng, len(models), popularity, slo=(2, 10))
    for m, r, o in zip(models, rate, slo):
        m.update(req_rate=float(r), slo=float(o))
        if m["tp"] == 1 and r >= 8 and used + m["size"] <= 0.9 * 80.0 * gpus:
            m["replicas"] = 2
            used += m["size"]
    return models, {"gpus": gpus, "gpu_mem": 80.0, "gpus_per_node": gpus_per_node}


# ----------------------------------------------------------------------------- demand over the day

class BurstyDemand(NamedTuple):
    """A bursty family's draw (:func:`bursty`).

    Attributes
    ----------
    models : list of dict -- name (``m<i>-g<group>``), size (GB), req_rate (the model's mean over
        the windows, req/s) and slo (s), for :func:`kvgpu.solve`.
    rates : ndarray (n, W) float64 -- request rate of each model in each window, req/s.
    group : ndarray (n,) int64 -- the group of each model (models of a group are active together).
    activity : ndarray (groups, W) float64 -- each group's smooth daily curve, in (0, 1], peak 1
        (the rates are ``popularity x activity of the group x bursts x noise``).
    options : dict -- gpus and gpu_mem of the cluster the models were drawn for.
    """

    models: list
    rates: np.ndarray
    group: np.ndarray
    activity: np.ndarray
    options: dict


def bursty(rng: np.random.Generator, gpus: int, *, windows: int = 96, groups: int = 6, burstiness: float = 0.5,
           tail: float = 1.1, fill: float = 0.7, night: float = 0.15, peak_rate: float = 100.0,
           gpu_mem: float = 80.0, replicate: bool = True) -> BurstyDemand:
    """Models whose demand changes over a day in bursty groups (as production multi-LLM traces do).

    Parameters
    ----------
    rng : numpy Generator -- the only source of randomness: the same seed gives the same draw.
    gpus : int -- the cluster the models are drawn for: realistic checkpoints (:data:`LLM_SIZES`)
        until their weights reach ``fill`` of ``gpus x gpu_mem`` GB.
    windows : int -- W, the windows of the day (96: 15 minutes each); at least ``2 x groups``.
    groups : int -- sets of models active together (at most the number of models; fewer models
        make fewer groups).  Group ``g``'s activity is a smooth daily curve
        ``night + (1 - night) x ((1 + cos(2 pi (t - p_g) / W)) / 2) ** 2`` peaking at window
        ``p_g`` in ``[(g + 1/4) W / groups, (g + 3/4) W / groups)``: the groups' peaks are
        distinct windows, spread over the day.
    burstiness : float >= 0 -- bursts and noise: each group has on average ``burstiness x W / 24``
        bursts (1-3 windows each, its rates times ``1 + burstiness x U(1, 4)``), and every rate a
        log-normal factor of sigma ``0.2 x burstiness``.  0: the smooth curves exactly.
    tail : float > 0 -- Zipf exponent of popularity: the model of rank ``k`` (ranks shuffled) peaks
        at ``peak_rate / k ** tail`` req/s before bursts.
    night : float in [0, 1] -- a group's activity at the far side of the day from its peak.
    peak_rate : float -- the most popular model's smooth peak, req/s.
    replicate : bool -- popular models get ``replicas`` (as operators replicate hot models), so
        that no model's peak alone sets the worst KVPR of every placement: ``r`` copies where one
        copy's peak pressure ``rate / slo / (gpu_mem - size)`` is up to ``r`` times the cluster's
        average pressure in the busiest window, the hottest models first, while the copies' weights
        stay within ``fill + 0.15`` of the memory and ``r <= gpus``.

    Returns
    -------
    BurstyDemand
        ``models`` with ``req_rate`` the mean over the windows, ``slo`` integers 2-10 s
        (``replicas`` where more than 1).
    """
    if groups < 1 or windows < 2 * groups:
        raise ValueError(f"bursty: need 1 <= groups and windows >= 2 x groups, got groups={groups}, "
                         f"windows={windows}")
    if burstiness < 0 or tail <= 0 or not 0 <= night <= 1:
        raise ValueError("bursty: burstiness >= 0, tail > 0 and night in [0, 1]")
    sizes, cap = [], fill * gpu_mem * gpus
    while True:
        s = float(SIZES["llm"](rng))
        if sum(sizes) + s > cap:
            break
        sizes.append(s)
    n = len(sizes)
    groups = max(1, min(groups, n))
    group = (rng.permutation(n) % groups).astype(np.int64)  # every group has a model
    popularity = peak_rate / rng.permutation(np.arange(1, n + 1)) ** tail
    activity = _daily_curves(rng, windows, groups, night)
    boost = _bursts(rng, windows, groups, burstiness)
    noise = rng.lognormal(0.0, 0.2 * burstiness, (n, windows)) if burstiness > 0 else np.ones((n, windows))
    rates = popularity[:, None] * (activity * boost)[group] * noise
    slo = rng.integers(2, 11, n)
    copies = _replicas(rates / slo[:, None], np.array(sizes), gpus, gpu_mem, fill + 0.15) if replicate \
        else np.ones(n, np.int64)
    models = [{"name": f"m{i}-g{int(group[i])}", "size": sizes[i], "req_rate": float(rates[i].mean()),
               "slo": float(slo[i]), **({"replicas": int(copies[i])} if copies[i] > 1 else {})} for i in range(n)]
    return BurstyDemand(models, rates, group, activity, {"gpus": gpus, "gpu_mem": gpu_mem})


def _replicas(demand: np.ndarray, sizes: np.ndarray, gpus: int, gpu_mem: float, most_fill: float) -> np.ndarray:
    """(n,) copies per model: ``ceil`` of one copy's peak pressure over the cluster's average
    pressure in its busiest window, at most ``gpus``; the hottest models first while the weights
    of all copies stay within ``most_fill`` of the memory.  ``demand``: (n, W) rate / slo."""
    fluid = demand.sum(axis=0).max() / (gpus * gpu_mem - sizes.sum())
    alone = demand.max(axis=1) / (gpu_mem - sizes)
    want = np.clip(np.ceil(alone / fluid), 1, gpus).astype(np.int64) if fluid > 0 else np.ones(len(sizes), np.int64)
    copies, room = np.ones(len(sizes), np.int64), most_fill * gpus * gpu_mem - sizes.sum()
    for i in np.argsort(-alone, kind="stable").tolist():
        extra = int(min(want[i] - 1, room // sizes[i])) if sizes[i] > 0 else int(want[i] - 1)
        if extra > 0:
            copies[i] += extra
            room -= extra * sizes[i]
    return copies


def _daily_curves(rng, windows: int, groups: int, night: float) -> np.ndarray:
    """(groups, W) smooth daily activity in [night, 1], group ``g`` peaking at a distinct window."""
    span = windows / groups
    peak = np.floor((np.arange(groups) + rng.uniform(0.25, 0.75, groups)) * span)
    t = np.arange(windows)
    wave = (1 + np.cos(2 * np.pi * (t[None, :] - peak[:, None]) / windows)) / 2
    return night + (1 - night) * wave ** 2


def _bursts(rng, windows: int, groups: int, burstiness: float) -> np.ndarray:
    """(groups, W) multiplicative bursts: about ``burstiness x W / 24`` per group."""
    boost = np.ones((groups, windows))
    if burstiness <= 0:
        return boost
    for g in range(groups):
        for _ in range(int(rng.poisson(burstiness * windows / 24))):
            start, length = int(rng.integers(0, windows)), int(rng.integers(1, 4))
            boost[g, start:start + length] *= 1 + burstiness * rng.uniform(1, 4)
    return boost
