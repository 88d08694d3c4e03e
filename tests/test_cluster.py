"""Real clusters: tensor-parallel shards, replicas, pins and forbidden GPUs are respected."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvgpu


@st.composite
def clusters(draw):
    G = draw(st.integers(2, 6))
    mem = draw(st.lists(st.sampled_from([40.0, 80.0, 141.0]), min_size=G, max_size=G))
    models = []
    for i in range(draw(st.integers(1, 8))):
        m = {"name": f"m{i}", "model_size": draw(st.integers(1, 30)), "req_rate": draw(st.integers(0, 9)),
             "slo": draw(st.integers(1, 9))}
        kind = draw(st.sampled_from(["plain", "tp", "replicas", "pin", "forbid"]))
        if kind == "tp":
            m["tp"] = draw(st.integers(2, min(4, G)))
        elif kind == "replicas":
            m["replicas"] = draw(st.integers(2, min(3, G)))
        elif kind == "pin":
            m["pin"] = draw(st.integers(0, G - 1))
        elif kind == "forbid":
            m["forbid"] = draw(st.lists(st.integers(0, G - 1), min_size=1, max_size=G - 1, unique=True))
        models.append(m)
    return G, mem, models


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.integers(0, 3))
def test_rules_hold_in_every_answer(cluster, seed):
    G, mem, models = cluster
    try:
        p = kvgpu.solve(models, G, gpu_mem=mem, effort=5, seed=seed)
    except kvgpu.NoPlacementFound:
        return  # tight random draws may leave no room; the rules are never broken to make some
    except kvgpu.InvalidInstance as e:  # random draws may also be too big outright
        assert "above the total GPU memory" in str(e) or "larger than every GPU" in str(e)
        return
    gpus = p.gpus_of_models()
    assert len(gpus) == len(models)
    for m, gs in zip(models, gpus):
        assert len(gs) == m.get("tp", 1) * m.get("replicas", 1)
        assert len(set(gs)) == len(gs)  # shards and replicas on distinct GPUs
        if "pin" in m:
            assert gs == [m["pin"]]
        assert not set(gs) & set(m.get("forbid", []))
    assert (p.used <= np.asarray(mem) + 1e-9).all()
    assert p.lower_bound <= p.max_kvpr * (1 + 1e-12)
    # shard demand and size add up to the model's
    assert np.isclose(p.instance.sizes.sum(), sum(m["model_size"] * m.get("replicas", 1) for m in models))
    assert np.isclose(p.instance.demand.sum(), sum(m["req_rate"] / m["slo"] for m in models))


def test_a_model_bigger_than_any_gpu_fits_as_shards():
    models = [{"name": "llama-70b", "model_size": 140, "req_rate": 6, "slo": 2, "tp": 2},
              {"name": "chat", "model_size": 16, "req_rate": 20, "slo": 2, "replicas": 2},
              {"name": "code", "model_size": 28, "req_rate": 3, "slo": 2, "pin": 3},
              {"name": "rag", "model_size": 6.5, "req_rate": 9, "slo": 4, "forbid": [0, 1]}]
    p = kvgpu.solve(models, 4, gpu_mem=[80, 80, 141, 80])
    g = p.gpus_of_models()
    assert len(set(g[0])) == 2 and g[2] == [3] and not {0, 1} & set(g[3])
    # one 70 GB shard must sit on an 80 GB GPU: 1.5 / 10 is the optimum, and search finds it
    assert p.max_kvpr == pytest.approx(0.15)
    assert "4 models as 6 shards/replicas" in str(p)
    assert p.to_dict()["model_gpus"] == g


@pytest.mark.parametrize("model, message", [
    ({"tp": 0}, "model 0 ('x'): field 'tp' must be an integer from 1 to 65536, got 0"),
    ({"tp": 3, "replicas": 2}, "tp x replicas = 6 shards need 6 distinct GPUs; the cluster has 4"),
    ({"pin": 7}, "model 0 ('x'): pin names GPU 7, not one of 0..3"),
    ({"tp": 2, "pin": 1}, "pin gives 1 GPU(s) for 2 shard(s)"),
    ({"tp": 2, "pin": [1, 1]}, "pin repeats a GPU"),
    ({"pin": 2, "forbid": [2]}, "pinned to GPU 2, which it also forbids"),
    ({"tp": 2, "forbid": [0, 1, 2]}, "2 shard(s) need distinct GPUs, but only 1 GPU(s) are allowed"),
    ({"model_size": 200, "tp": 2}, "larger than every GPU"),
])
def test_bad_rules_are_named(model, message):
    import re
    m = {"name": "x", "model_size": 10, "req_rate": 1, "slo": 1, **model}
    with pytest.raises(kvgpu.InvalidInstance, match=re.escape(message)):
        kvgpu.solve([m], 4)


def test_rules_from_a_csv_file(tmp_path):
    from kvgpu.io import read_models

    f = tmp_path / "cluster.csv"
    f.write_text("name,size,req_rate,slo,tp,pin,forbid\nbig,100,4,2,2,0;2,\nsmall,10,1,1,,,0;1\nfree,12,2,1,,,\n")
    models, _ = read_models(f)
    p = kvgpu.solve(models, 3)
    assert p.gpus_of_models() == [[0, 2], [2], p.gpus_of_models()[2]]
