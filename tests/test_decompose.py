"""Decomposition of big clusters (kvgpu.decompose): partition, lanes, the repair between groups,
the options that steer it, and Dask giving the local answer."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import kvgpu
from kvgpu import decompose
from kvgpu.batch.state import batch_from_instances
from kvgpu.bounds import lower_bound, simple_bound
from kvgpu.errors import InvalidInstance
from kvgpu.generate import hetero, tight, uniform

FLEET = Path(__file__).parent / "data" / "fleet"


def _models(inst):
    return [dict(model_size=float(s), req_rate=float(w), slo=1.0) for s, w in zip(inst.sizes, inst.demand)]


def _bound(inst):
    b = batch_from_instances([inst])
    return float(lower_bound(b, 2 * simple_bound(b) + 1e-9)[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9), st.integers(8, 80))
def test_partition_balances_the_load_at_the_target(seed, K, G):
    """Every GPU is in a group, groups differ by at most one GPU and hold the same memory mix,
    and (LPT) each group's load at T is within one model's load of its share."""
    rng = np.random.default_rng(seed)
    K = min(K, G)
    s, w = rng.uniform(1, 30, 4 * G), rng.uniform(0.1, 9, 4 * G)
    M = rng.choice([40.0, 80.0, 141.0], G)
    T = 0.3
    gg, mg = decompose.partition(s, w, M, T, K)
    counts = np.bincount(gg, minlength=K)
    assert counts.max() - counts.min() <= 1
    for m in np.unique(M):  # dealt largest first, round robin: each memory class spread evenly
        c = np.bincount(gg[M == m], minlength=K)
        assert c.max() - c.min() <= 1 + (counts.max() - counts.min())
    load = s + w / T
    room = np.bincount(gg, weights=M, minlength=K) - np.bincount(mg, weights=load, minlength=K)
    # the group a model joins has the most room; so the room left differs by at most one load
    assert room.max() - room.min() <= load.max() + 1e-9


def test_lanes_hold_each_lanes_gpus_and_models_in_local_ids():
    rng = np.random.default_rng(1)
    G, n = 20, 60
    s, w, M = rng.uniform(1, 10, n), rng.uniform(0, 5, n), np.full(G, 80.0)
    assign = rng.integers(0, G, n)
    pos = rng.permutation(n)
    gpu_lane = np.where(np.arange(G) % 3 == 2, -1, np.arange(G) % 3)  # lane 2 empty of GPUs -> -1
    gpu_lane[gpu_lane == 2] = -1
    D = 2
    sz, dm, mem, nm, ng, a, p, (mo, ms), (go, gs) = decompose._lanes(gpu_lane[assign], gpu_lane, D, s, w, M, assign,
                                                                       pos)
    for d in range(D):
        gids = go[gs[d]:gs[d + 1]]
        mids = mo[ms[d]:ms[d + 1]]
        assert set(gids) == set(np.nonzero(gpu_lane == d)[0]) and ng[d] == gids.size
        assert set(mids) == set(np.nonzero(gpu_lane[assign] == d)[0]) and nm[d] == mids.size
        assert (gids[a[d, :nm[d]]] == assign[mids]).all()  # local ids map back to the GPUs
        assert (sz[d, :nm[d]] == s[mids]).all() and (p[d, :nm[d]] == pos[mids]).all()
        assert (mem[d, :ng[d]] == M[gids]).all()


@pytest.mark.parametrize("family", [uniform, hetero])
def test_decomposition_keeps_memory_and_is_never_worse_than_its_groups(family):
    inst = family(np.random.default_rng(7), 96)
    lb = _bound(inst)
    start = decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba", effort=0, patience=6, seed=0)
    a0, _, rep0 = start
    assert rep0.groups == 3 and rep0.draws == 0
    a, p, rep = decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba", effort=30, patience=6,
                                seed=0)
    assert sorted(p.tolist()) == list(range(inst.n_models))  # dense list stamps
    G = inst.n_gpus
    S = np.bincount(a, weights=inst.sizes, minlength=G)
    assert (S <= inst.gpu_mem + 1e-9).all()
    kv = lambda x: (np.bincount(x, weights=inst.demand, minlength=G)  # noqa: E731
                    / (inst.gpu_mem - np.bincount(x, weights=inst.sizes, minlength=G))).max()
    assert rep.draws > 0 and kv(a) < kv(a0)  # the repair between groups gained
    assert kv(a) >= lb * (1 - 1e-12)


def test_same_seed_same_answer_another_seed_a_restart():
    inst = uniform(np.random.default_rng(3), 80)
    lb = _bound(inst)
    run = lambda seed: decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba",  # noqa: E731
                                       effort=30, patience=6, seed=seed)[0]
    assert (run(0) == run(0)).all()
    assert not (run(0) == run(1)).all()


def test_solve_and_solve_batch_decompose_on_request_and_say_so():
    inst = uniform(np.random.default_rng(4), 64)
    p = kvgpu.solve(_models(inst), 64, decompose=True)
    whole = kvgpu.solve(_models(inst), 64, decompose=False)
    assert p.note and "decomposition" in p.note and whole.note is None
    assert p.lower_bound == pytest.approx(whole.lower_bound)
    assert p.max_kvpr <= p.lower_bound * 1.02  # within 2% of the bound on 64 GPUs
    b = batch_from_instances([inst, uniform(np.random.default_rng(5), 16)])
    r = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask, decompose=True)
    assert r.decomposed.tolist() == [True, True]
    assert r.max_kvpr[0] == pytest.approx(p.max_kvpr)  # the same answer as one instance alone
    mem_used = np.zeros(b.gpu_mem.shape)
    for k in range(2):
        real = b.model_mask[k]
        mem_used[k] = np.bincount(r.assignment[k, real], weights=b.sizes[k, real], minlength=b.gpu_mem.shape[1])
    assert (mem_used <= b.gpu_mem + 1e-9).all()


def test_automatic_from_the_threshold(monkeypatch):
    inst = uniform(np.random.default_rng(4), 40)
    b = batch_from_instances([inst])
    assert not kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem).decomposed[0]
    monkeypatch.setattr(decompose, "AUTO_GPUS", 32)
    assert kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem).decomposed[0]
    assert not kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, decompose=False).decomposed[0]
    assert not kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, mode="seed").decomposed[0]  # the seed, whole


@pytest.mark.parametrize("asked", [True, None])
def test_a_split_the_seed_cannot_pack_is_solved_whole_and_said(asked, monkeypatch):
    # two models of 70 GB per pair of 80 GB GPUs only fit one per GPU: groups of the partition
    # by load cannot all pack, the cluster whole does; said also where decomposing was automatic
    monkeypatch.setattr(decompose, "AUTO_GPUS", 4)
    models = [dict(model_size=70.0 if i % 2 else 5.0, req_rate=1.0 + i, slo=1.0) for i in range(8)]
    p = kvgpu.solve(models, 4, decompose=asked)
    assert (np.bincount(p.assignment, weights=[m["model_size"] for m in models], minlength=4) <= 80).all()
    if "decomposition" not in (p.note or ""):
        assert "solved whole" in p.note
    monkeypatch.setattr(decompose, "solve", lambda *a, **k: None)  # no split packs, for sure
    p = kvgpu.solve(models, 4, decompose=asked)
    assert not p.decomposed and "fit no split" in p.note and "solved whole" in p.note


@pytest.mark.parametrize("kwargs, words", [
    (dict(decompose=True, mode="seed"), "mode 'seed'"),
    (dict(decompose="yes"), "decompose: must be True, False or None"),
    (dict(decompose=False, dask="tcp://127.0.0.1:1"), "decompose=False"),
    (dict(mode="seed", dask="tcp://127.0.0.1:1"), "mode 'seed'"),
    (dict(dask="tcp://127.0.0.1:1"), "give a dask.distributed.Client"),
])
def test_options_that_cannot_apply_are_refused(kwargs, words):
    inst = uniform(np.random.default_rng(1), 8)
    with pytest.raises(InvalidInstance, match=words):
        kvgpu.solve(_models(inst), 8, **kwargs)


def test_rules_go_to_the_rule_decomposition_and_dask_needs_a_decomposed_cluster():
    # clusters with rules are decomposed by kvgpu.decompose_rules (tests/test_decompose_rules.py)
    models = [dict(model_size=10.0, req_rate=1.0, slo=1.0, pin=0), dict(model_size=10.0, req_rate=1.0, slo=1.0)]
    with pytest.raises(InvalidInstance, match="nothing is decomposed"):
        kvgpu.solve(models, 4, dask=_FakeClient())


class _FakeClient:
    """Enough of a dask Client to be accepted (never used: the solve is refused first)."""

    def scheduler_info(self):
        raise AssertionError("not reached")

    def submit(self, *a, **k):
        raise AssertionError("not reached")

    def gather(self, f):
        raise AssertionError("not reached")


def test_dask_without_a_decomposed_cluster_is_refused():
    inst = uniform(np.random.default_rng(1), 8)
    with pytest.raises(InvalidInstance, match="no cluster here is decomposed"):
        kvgpu.solve(_models(inst), 8, dask=_FakeClient())


def test_dask_local_cluster_gives_the_local_answer():
    pytest.importorskip("distributed")
    from kvgpu import sweep

    inst = uniform(np.random.default_rng(9), 96)
    local = kvgpu.solve(_models(inst), 96, decompose=True, seed=3)
    client = sweep.dask_client(local_workers=2)
    try:
        remote = kvgpu.solve(_models(inst), 96, decompose=True, seed=3, dask=client)
    finally:
        client.close()
    assert (remote.assignment == local.assignment).all()
    assert remote.max_kvpr == local.max_kvpr and "decomposition" in remote.note


def test_cli_flags(tmp_path, capsys):
    from kvgpu import cli

    inst = uniform(np.random.default_rng(2), 64)
    f = tmp_path / "m.csv"
    f.write_text("model_size,req_rate,slo\n" + "".join(f"{s},{w},1\n" for s, w in zip(inst.sizes, inst.demand)))
    assert cli.main(["solve", str(f), "--gpus", "64", "--decompose", "on"]) == 0
    assert "solved by decomposition" in capsys.readouterr().out
    assert cli.main(["solve", str(f), "--gpus", "64", "--decompose", "off", "--dask-local", "2"]) == 2
    assert "decompose=False" in capsys.readouterr().err


def test_memory_grows_with_models_plus_gpus_not_their_product():
    """A decomposition allocates lanes and groups padded to their own sizes: on 2,048 GPUs and
    ~7,500 models its NumPy arrays peak far below one dense models x GPUs array (123 MB)."""
    import tracemalloc

    small = uniform(np.random.default_rng(2), 64)  # load the kernels first: not the solve's memory
    decompose.solve(small.sizes, small.demand, small.gpu_mem, _bound(small), backend="numba", effort=1, patience=1,
                    seed=0)
    inst = uniform(np.random.default_rng(2), 2048)
    lb = _bound(inst)
    dense = inst.n_models * inst.n_gpus * 8
    tracemalloc.start()
    try:
        decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba", effort=3, patience=3, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < dense / 8, (peak, dense)


def test_failures_name_this_batchs_instances_and_marks_keep_decomposed():
    """A batch mixing a decomposed instance and one whose models fit no GPU: the error names
    the second (its index in this batch), with or without decomposition; marked, the first
    keeps its decomposed flag."""
    from kvgpu.errors import NoPlacementFound
    from kvgpu.problem import Instance

    bad = Instance(np.full(5, 50.0), np.ones(5), np.full(4, 80.0))  # fits in total, not on the GPUs
    b = batch_from_instances([uniform(np.random.default_rng(9), 16), bad])
    args = (b.sizes, b.demand, b.gpu_mem)
    kw = dict(model_mask=b.model_mask, gpu_mask=b.gpu_mask)
    for decompose in (True, False):
        with pytest.raises(NoPlacementFound) as e:
            kvgpu.solve_batch(*args, decompose=decompose, **kw)
        assert e.value.instances == [1], (decompose, e.value)
    r = kvgpu.solve_batch(*args, decompose=True, infeasible="mark", **kw)
    assert r.decomposed.tolist() == [True, False] and r.status[1] != "ok" and np.isnan(r.max_kvpr[1])


def test_json_says_decomposed_and_backend_names_only_what_ran():
    inst = uniform(np.random.default_rng(4), 64)
    p = kvgpu.solve(_models(inst), 64, decompose=True, backend="numpy", effort=0)
    d = p.to_dict()
    assert d["decomposed"] is True and "decomposition" in d["note"]
    assert p.backend == "numpy"  # effort 0: no repair between groups, no numba
    assert kvgpu.solve(_models(inst), 64, decompose=True, backend="numpy").backend == "numpy+numba"
    one = kvgpu.solve(_models(inst)[:1], 8, decompose=True)
    assert not one.decomposed and "nothing to split" in one.note


# ----------------------------------------------------------------------------- tight clusters
# The groups' seeds can leave GPUs with no KV memory at all (KVPR inf) when the cluster is
# nearly full; the repair between groups must give them room before it bisects (no bisection
# reaches anything from an infinite max), and the answer is never worse than solving whole.

def _full_gpus(inst, assign):
    S = np.bincount(assign, weights=inst.sizes, minlength=inst.n_gpus)
    return int((S >= inst.gpu_mem).sum())


def test_the_repair_gives_full_gpus_room_first():
    """tight(4) on 64 GPUs (97.4% full): the groups' seeds leave 24 GPUs full (it ended there,
    max inf, before); the repair brings every GPU to a finite KVPR, within 1% of the
    whole-cluster search's 1.39643 (measured)."""
    inst = tight(np.random.default_rng(4), 64)
    lb = _bound(inst)
    a0, _, rep0 = decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba", effort=0, patience=6,
                                  seed=0)
    assert _full_gpus(inst, a0) > 0 and rep0.full_gpus > 0  # the kind this test is about
    a, p, rep = decompose.solve(inst.sizes, inst.demand, inst.gpu_mem, lb, backend="numba", effort=30, patience=6,
                                seed=0)
    assert rep.full_gpus == 0 and _full_gpus(inst, a) == 0
    G = inst.n_gpus
    S = np.bincount(a, weights=inst.sizes, minlength=G)
    kv = np.bincount(a, weights=inst.demand, minlength=G) / (inst.gpu_mem - S)
    assert (S < inst.gpu_mem).all() and lb * (1 - 1e-12) <= kv.max() <= 1.39643 * 1.01


@pytest.mark.parametrize("seed", [100, 101, 104, 106])
def test_decomposed_tight_clusters_are_finite(seed):
    """Tight draws (97-98% full) forced through decompose=True on 64 GPUs: never a GPU left
    full (100 and 104 left 20 and 12 before), and within 2% of the bound."""
    inst = tight(np.random.default_rng(seed), 64)
    p = kvgpu.solve(_models(inst), 64, decompose=True, effort=30)
    assert np.isfinite(p.kvpr).all() and p.decomposed
    assert p.max_kvpr <= p.lower_bound * 1.02


def test_a_decomposition_left_full_falls_back_to_the_whole_cluster(monkeypatch):
    """No draws at all (MAX_DRAWS 0): the decomposition keeps its groups' full GPUs, so the
    cluster is solved whole, which finds room on every GPU, and the note says so."""
    monkeypatch.setattr(decompose, "MAX_DRAWS", 0)
    inst = tight(np.random.default_rng(4), 64)
    p = kvgpu.solve(_models(inst), 64, decompose=True, effort=3)
    assert np.isfinite(p.max_kvpr) and not p.decomposed
    assert "left 24 GPU(s) with no memory for the KV cache" in p.note and "solved whole instead" in p.note


def test_a_fallback_that_does_no_better_keeps_the_decomposition_and_says_so():
    """effort 0: no repair, and the whole cluster's seed leaves GPUs full too: the note says
    both did, the answer stays the decomposition's."""
    inst = tight(np.random.default_rng(4), 64)
    p = kvgpu.solve(_models(inst), 64, decompose=True, effort=0)
    assert p.decomposed and not np.isfinite(p.max_kvpr)
    assert "solving the cluster whole did no better" in p.note


def test_the_fleet_case_512_gpus_97_full_is_finite(tmp_path):
    """The fleet case (tests/data/fleet/decomposed_full_gpus.csv, 1,982 models of 10-30 GB on
    512 GPUs, 97% full), ``kvgpu solve FILE --gpus 512 --seed 3``: decomposed by default; it
    ended with 17 GPUs full (max inf).  Right: finite, within 0.5% of the whole-cluster answer
    1.2083 (bound 1.2042)."""
    from kvgpu import cli

    out = tmp_path / "p.json"
    assert cli.main(["solve", str(FLEET / "decomposed_full_gpus.csv"), "--gpus", "512", "--seed", "3",
                     "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["decomposed"] is True and all(isinstance(g["kvpr"], float) and g["kv_free_gb"] > 0 for g in d["gpus"])
    assert d["max_kvpr"] <= 1.2083 * 1.005 and d["lower_bound"] == pytest.approx(1.2042, abs=1e-4)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.integers(8, 24), st.floats(0.93, 0.99))
@example(6, 16, 0.9660514166279793)  # left 3 GPUs full, where the whole cluster left none
def test_decomposed_never_leaves_more_gpus_full_than_the_whole_cluster(seed, G, fill):
    """Property (the kind of the fleet case): forced through decompose=True, a tight cluster
    never ends with more GPUs at KVPR inf than the whole-cluster search leaves."""
    inst = tight(np.random.default_rng(seed), G, fill)
    dec = kvgpu.solve(_models(inst), G, decompose=True, effort=10)
    whole = kvgpu.solve(_models(inst), G, decompose=False, effort=10)
    assert np.isinf(dec.kvpr).sum() <= np.isinf(whole.kvpr).sum()
    S = np.bincount(dec.assignment, weights=inst.sizes, minlength=G)
    assert (S <= inst.gpu_mem + 1e-9).all()
