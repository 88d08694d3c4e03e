"""Models by name: sizes and KV bytes per token read from a model's own files (kvgpu.model_files),
through every reader of models (API dicts, CSV/JSON/YAML files), and KV cache in tokens in the
placement's table and JSON.

The config.json files in tests/data/hf/ are the published ones (see tests/data/hf/README.md); the
expected figures are the published parameter counts (the model cards' and the safetensors
indexes' ``total_size / 2`` for bf16) and KV bytes per token worked out by hand below.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kvgpu
from kvgpu import model_files as mf
from kvgpu.errors import InvalidInstance
from kvgpu.io import read_models

HF = Path(__file__).parent / "data" / "hf"

# family -> (published parameter count, index total_size in bytes or None, KV bytes per token bf16)
# KV by hand: 2 (K and V) x layers x KV heads x head_dim x 2 bytes
FAMILIES = {
    "llama3": (8_030_261_248, 16_060_522_496, 2 * 32 * 8 * 128 * 2),     # Llama 3.1 8B: 131072
    "qwen2.5": (7_615_616_512, 15_231_233_024, 2 * 28 * 4 * 128 * 2),    # Qwen2.5 7B: 57344
    "mistral": (7_248_023_552, 14_496_047_104, 2 * 32 * 8 * 128 * 2),    # Mistral 7B v0.3: 131072
    "gemma2": (9_241_705_984, None, 2 * 42 * 8 * 256 * 2),               # Gemma 2 9B (head_dim 256, not 3584/16)
    "mixtral": (46_702_792_704, 93_405_585_408, 2 * 32 * 8 * 128 * 2),   # Mixtral 8x7B
}
#: the config formula must give the published count to this relative tolerance (it is exact for
#: these five; the tolerance covers families whose cards round)
PARAM_RTOL = 1e-3


def folder(tmp_path, family, index=True):
    """A copy of a family's files in tmp_path (the header tests add safetensors files)."""
    out = tmp_path / family
    shutil.copytree(HF / family, out)
    if not index and (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_formula_gives_the_published_parameter_count(family):
    params, _, _ = FAMILIES[family]
    config = mf.read_config(HF / family, family)
    nbytes, how = mf.parameter_bytes(config, family)
    assert nbytes / 2 == pytest.approx(params, rel=PARAM_RTOL)  # bf16: 2 bytes each
    assert f"{params:,} parameters" in how  # exact for these families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weights_and_kv_of_each_family(family):
    params, total, kv = FAMILIES[family]
    files = mf.read(str(HF / family), family)
    assert files.weights_bytes == (total if total is not None else 2 * params)
    assert files.weights_from.startswith("model.safetensors.index.json" if total else "config.json")
    assert files.size_gb == files.weights_bytes / 1e9
    assert files.kv_bytes_per_token == kv


def test_kv_dtype_and_tensor_parallel():
    llama = str(HF / "llama3")
    assert mf.read(llama, "m", kv_cache_dtype="fp8").kv_bytes_per_token == 2 * 32 * 8 * 128
    assert mf.read(llama, "m", kv_cache_dtype="auto").kv_bytes_per_token == 131072
    assert mf.read(llama, "m", kv_cache_dtype="float32").kv_bytes_per_token == 2 * 131072
    # tp 2 splits the 8 KV heads: 4 per shard, the replica holds the same total
    assert mf.read(llama, "m", tp=2).kv_bytes_per_token == 131072
    # tp 16 > 8 KV heads: each shard holds one (replicated) head, 16 in all
    assert mf.read(llama, "m", tp=16).kv_bytes_per_token == 16 * 2 * 32 * 128 * 2
    with pytest.raises(InvalidInstance, match="tp 3 does not divide num_attention_heads 32"):
        mf.read(llama, "m", tp=3)
    with pytest.raises(InvalidInstance, match="tp 3 neither divides nor is a multiple of num_key_value_heads 8"):
        mf.kv_bytes_per_shard(mf.read_config(HF / "llama3", "m"), 3, None, "m")
    with pytest.raises(InvalidInstance, match="kv_cache_dtype 'int3' is not known"):
        mf.read(llama, "m", kv_cache_dtype="int3")


def test_kv_bytes_per_token_is_the_models_own_and_tp_divides_the_heads():
    """The user's kv_bytes_per_token is the model's own (unsharded) figure; kvgpu spreads it
    over tp, replicating KV heads fewer than tp; a tp that does not divide the attention heads
    is refused by name (vLLM refuses it)."""
    llama, qwen = str(HF / "llama3"), str(HF / "qwen2.5")
    # Llama 3.1 8B at tp 16: 8 KV heads, one replicated head per shard
    spec = kvgpu.model_specs([{"hf": llama, "kv_bytes_per_token": 131072, "tp": 16, "req_rate": 1, "slo": 1}])[0]
    assert spec.kv_bytes_per_token == 131072 and spec.kv_bytes_per_shard == 2 * 32 * 1 * 128 * 2
    assert kvgpu.model_specs([spec.to_dict()])[0].kv_bytes_per_shard == spec.kv_bytes_per_shard  # round trip
    with pytest.raises(InvalidInstance, match="kv_bytes_per_token 262144 bytes and hf"):  # the replicated total
        kvgpu.model_specs([{"hf": llama, "kv_bytes_per_token": 262144, "tp": 16, "req_rate": 1, "slo": 1}])
    q = kvgpu.model_specs([{"hf": qwen, "kv_bytes_per_token": 57344, "tp": 4, "req_rate": 1, "slo": 1}])[0]
    assert q.kv_bytes_per_shard == 57344 / 4
    with pytest.raises(InvalidInstance, match=r"qwen2.5/config.json: tp 8 does not divide num_attention_heads 28"):
        kvgpu.model_specs([{"hf": qwen, "kv_bytes_per_token": 57344, "tp": 8, "req_rate": 1, "slo": 1}])
    # without files, the heads split evenly: kv / tp
    plain = kvgpu.model_specs([{"size": 10, "kv_bytes_per_token": 57344, "tp": 4, "req_rate": 1, "slo": 1}])[0]
    assert plain.kv_bytes_per_shard == 57344 / 4


def test_explicit_figures_stand_in_where_the_files_give_none(tmp_path):
    """size / kv_bytes_per_token given where the files cannot give one: taken, with a warning;
    where both exist the 5% agreement still holds."""
    d = folder(tmp_path, "llama3", index=False)
    _retype(d, "deepseek_v3")  # no parameter formula, no safetensors
    with pytest.raises(InvalidInstance, match=r"no parameter formula for model_type 'deepseek_v3'.*give size"):
        kvgpu.model_specs([{"hf": str(d), "req_rate": 1, "slo": 1}])
    with pytest.warns(kvgpu.KvgpuWarning, match=r"size 671 GB as given, for the files give none \(.*no parameter "
                                                 r"formula"):
        spec = kvgpu.model_specs([{"hf": str(d), "size": 671, "req_rate": 1, "slo": 1}])[0]
    assert spec.size == 671 and spec.kv_bytes_per_token == 131072  # the KV figure still from config.json
    # an index, and a config without num_hidden_layers: the index's size, the given KV figure
    n = folder(tmp_path, "mistral")
    config = json.loads((n / "config.json").read_text())
    del config["num_hidden_layers"]
    (n / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInstance, match=r"'num_hidden_layers' is missing; give kv_bytes_per_token"):
        kvgpu.model_specs([{"hf": str(n), "req_rate": 1, "slo": 1}])
    with pytest.warns(kvgpu.KvgpuWarning, match="kv_bytes_per_token 131072 bytes as given"):
        spec = kvgpu.model_specs([{"hf": str(n), "kv_bytes_per_token": 131072, "tp": 2, "req_rate": 1, "slo": 1}])[0]
    assert spec.size == 14.496047104 and spec.kv_bytes_per_shard == 65536
    with pytest.raises(InvalidInstance, match="size 7 GB and hf"):  # both exist: the 5% check holds
        kvgpu.model_specs([{"hf": str(n), "size": 7, "kv_bytes_per_token": 131072, "req_rate": 1, "slo": 1}])


def test_safetensors_headers_give_exact_bytes(tmp_path):
    """Without an index, the tensors' bytes in the headers (safetensors' own writer)."""
    st = pytest.importorskip("safetensors.numpy")
    d = folder(tmp_path, "gemma2")
    _retype(d, "tiny_test")  # no parameter formula: the tiny headers are not cross-checked
    st.save_file({"a": np.zeros((3, 5), np.float16), "b": np.zeros(7, np.int8)}, str(d / "model-00001-of-00002.safetensors"))
    st.save_file({"c": np.zeros((2, 2, 2), np.float32)}, str(d / "model-00002-of-00002.safetensors"))
    files = mf.read(str(d), "m")
    assert files.weights_bytes == 3 * 5 * 2 + 7 + 8 * 4
    assert "safetensors headers" in files.weights_from
    (d / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInstance, match="cannot be read as safetensors"):
        mf.read(str(d), "m")


def _retype(d, model_type):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": model_type}))


def test_partial_downloads_are_refused(tmp_path):
    """Shards -0000k-of-0000N missing, or headers far below config.json's parameter count, are
    refused naming both figures -- never a silently tiny model."""
    st = pytest.importorskip("safetensors.numpy")
    d = folder(tmp_path, "gemma2")
    for k in (1, 2):
        st.save_file({f"t{k}": np.zeros(10, np.float16)}, str(d / f"model-0000{k}-of-00003.safetensors"))
    with pytest.raises(InvalidInstance, match=r"has 2 of the 3 safetensors shards \(-of-00003; missing shard\(s\) 3\)"):
        mf.read(str(d), "m")
    with pytest.raises(InvalidInstance, match=r"2 of the 3 safetensors shards"):  # size given: still refused
        kvgpu.model_specs([{"hf": str(d), "size": 18.5, "req_rate": 1, "slo": 1}])
    st.save_file({"t3": np.zeros(10, np.float16)}, str(d / "model-00003-of-00003.safetensors"))
    with pytest.raises(InvalidInstance, match=r"headers .* hold 30 parameters, but config.json's gemma2 formula "
                                              r"gives 9,241,705,984: weights are missing"):
        mf.read(str(d), "m")


def test_quantised_configs():
    """fp8 and AWQ/GPTQ int4 from quantization_config, against formulas worked out by hand."""
    config = mf.read_config(HF / "llama3", "m")
    L, h, q, kv, inter = 32, 4096, 4096, 1024, 14336
    lin = [(h, q, L), (h, kv, 2 * L), (q, h, L), (h, inter, 2 * L), (inter, h, L)]
    linear = sum(i * o * n for i, o, n in lin)
    other = 8_030_261_248 - linear  # embeddings, lm_head, norms
    fp8 = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    scales = sum(-(-o // 128) * -(-i // 128) * 4 * n for i, o, n in lin)
    assert mf.parameter_bytes(fp8, "m")[0] == other * 2 + linear + scales
    fp8_tensor = {**config, "quantization_config": {"quant_method": "fp8"}}
    assert mf.parameter_bytes(fp8_tensor, "m")[0] == other * 2 + linear + 4 * sum(n for _, _, n in lin)
    awq = {**config, "torch_dtype": "float16",
           "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}}
    groups = sum(-(-i // 128) * o * n for i, o, n in lin)
    assert mf.parameter_bytes(awq, "m")[0] == other * 2 + linear / 2 + groups * 2.5
    gptq = {**awq, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}}
    assert mf.parameter_bytes(gptq, "m")[0] == other * 2 + linear / 2 + groups * 2.5 + 4 * sum(i * n for i, _, n in lin)
    # about 5.7 GB for an int4 8B (embeddings and lm_head stay in fp16)
    assert 5.5e9 < mf.parameter_bytes(awq, "m")[0] < 6e9
    for bad, msg in (({"quant_method": "bitsandbytes"}, "'bitsandbytes' has no formula"),
                     ({"quant_method": "awq", "bits": 4}, "needs bits"),
                     ({"quant_method": "gptq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp.down_proj"]},
                      "keeps \\['mlp.down_proj'\\] unquantised")):
        with pytest.raises(InvalidInstance, match=msg):
            mf.parameter_bytes({**config, "quantization_config": bad}, "m")


def test_moe_with_shared_experts():
    """Qwen2-MoE: routed experts of moe_intermediate_size, a shared expert and its gate."""
    config = {"model_type": "qwen2_moe", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 99, "moe_intermediate_size": 4,
              "num_experts": 3, "shared_expert_intermediate_size": 6, "torch_dtype": "bfloat16"}
    h, L, hd = 8, 2, 4
    attn = L * (h * 8 + 2 * h * hd + 8 * h) + L * (8 + 2 * hd)  # q, k, v, o and the q/k/v biases
    experts = L * 3 * (3 * h * 4) + L * 3 * h  # routed experts, router
    shared = L * 3 * h * 6 + L * h  # shared expert, its gate
    expected = attn + experts + shared + 2 * 10 * h + h + L * 2 * h
    assert mf.parameter_bytes(config, "m")[0] == 2 * expected


def test_multi_head_latent_attention():
    """DeepSeek V2/V3 cache one latent (kv_lora_rank + qk_rope_head_dim) per layer, on every tp shard."""
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
              "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128, "torch_dtype": "bfloat16"}
    assert mf.kv_bytes_per_shard(config, 1, None, "m") == 61 * 576 * 2
    assert mf.kv_bytes_per_shard(config, 8, None, "m") == 61 * 576 * 2  # not split over tp
    with pytest.raises(InvalidInstance, match="multi-head latent attention"):
        mf.kv_bytes_per_shard(config, 1, "fp8", "m")
    with pytest.raises(InvalidInstance, match="no parameter formula for model_type 'deepseek_v3'"):
        mf.parameter_bytes(config, "m")


def test_missing_files_and_fields_are_named(tmp_path, monkeypatch):
    with pytest.raises(InvalidInstance, match=r"m: hf './nowhere': no such folder"):
        mf.read("./nowhere", "m", base_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInstance, match=r"m: .*empty/config.json is missing"):
        mf.read(str(empty), "m")
    d = folder(tmp_path, "llama3", index=False)
    config = json.loads((d / "config.json").read_text())
    del config["torch_dtype"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInstance, match=r"config.json .*: torch_dtype is missing.*; give size"):
        kvgpu.model_specs([{"hf": str(d), "req_rate": 1, "slo": 1}])
    assert mf.read(str(d), "m").weights_bytes is None  # the files give none: a given size may stand in
    config["torch_dtype"] = "int7"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInstance, match="torch_dtype 'int7' is not a known dtype"):
        mf.read(str(d), "m")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    with pytest.raises(InvalidInstance, match="has no metadata.total_size"):
        mf.read(str(d), "m")
    # a repo id that is not in the (empty) cache: named with the cache folder, nothing downloaded
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidInstance, match=r"'meta-llama/Llama-3.1-8B' is not in the local Hugging Face cache \(.*cache\)"):
        mf.read("meta-llama/Llama-3.1-8B", "m")


def test_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    """A repo id is read from the hub cache's layout (models--owner--name/snapshots/<rev>)."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen2.5-7B-Instruct"
    rev = "a09a35458c702b33eeacc393d103063234e8bc28"
    shutil.copytree(HF / "qwen2.5", repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    files = mf.read("Qwen/Qwen2.5-7B-Instruct", "m")
    assert files.weights_bytes == 15_231_233_024 and files.kv_bytes_per_token == 57344


# ---------------------------------------------------------------- through the readers

def test_api_dicts_and_conflicts():
    specs = kvgpu.model_specs([{"name": "q", "hf": str(HF / "qwen2.5"), "req_rate": 1, "slo": 2, "tp": 2}])
    assert specs[0].size == 15.231233024 and specs[0].kv_bytes_per_token == 57344
    # an explicit size within 5% is replaced by the exact one; beyond, refused naming both
    assert kvgpu.model_specs([{"hf": str(HF / "qwen2.5"), "size": 15, "req_rate": 1, "slo": 2}])[0].size == 15.231233024
    with pytest.raises(InvalidInstance, match=r"model 0 \('q'\): size 7.6 GB and hf .* \(15.2312 GB, from "
                                              r"model.safetensors.index.json: metadata.total_size\) disagree"):
        kvgpu.model_specs([{"name": "q", "hf": str(HF / "qwen2.5"), "size": 7.6, "req_rate": 1, "slo": 2}])
    with pytest.raises(InvalidInstance, match="kv_bytes_per_token 131072 bytes and hf"):
        kvgpu.model_specs([{"hf": str(HF / "qwen2.5"), "kv_bytes_per_token": 131072, "req_rate": 1, "slo": 2}])
    with pytest.raises(InvalidInstance, match="kv_cache_dtype applies to a model read from its files"):
        kvgpu.model_specs([{"size": 10, "kv_cache_dtype": "fp8", "req_rate": 1, "slo": 2}])
    with pytest.raises(InvalidInstance, match="missing field 'size' or 'model_size'"):
        kvgpu.model_specs([{"req_rate": 1, "slo": 2}])
    # the canonical form round-trips (hf, size and KV bytes agree with themselves)
    again = kvgpu.model_specs([specs[0].to_dict()])[0]
    assert (again.size, again.kv_bytes_per_token, again.hf, again.tp) == (specs[0].size, 57344, specs[0].hf, 2)


def test_model_files_resolve_relative_to_the_model_file(tmp_path):
    shutil.copytree(HF / "mistral", tmp_path / "models" / "mistral")
    (tmp_path / "m.yaml").write_text("gpus: 2\nmodels:\n  - {name: m, hf: ./models/mistral, req_rate: 2, slo: 1,"
                                     " kv_cache_dtype: fp8}\n  - {name: plain, size: 20, req_rate: 1, slo: 1}\n")
    (tmp_path / "m.csv").write_text("name,hf,size,req_rate,slo\nm,./models/mistral,,2,1\nplain,,20,1,1\n")
    (tmp_path / "m.json").write_text(json.dumps([{"name": "m", "hf": "models/mistral", "req_rate": 2, "slo": 1}]))
    for name in ("m.yaml", "m.csv", "m.json"):
        specs, _ = read_models(tmp_path / name)
        assert specs[0].size == 14.496047104
        assert specs[0].kv_bytes_per_token == (65536 if name == "m.yaml" else 131072)
    (tmp_path / "bad.csv").write_text("name,hf,req_rate,slo\nm,./models/nothing,2,1\n")
    with pytest.raises(InvalidInstance, match=r"bad.csv, line 2 \('m'\): hf './models/nothing': no such folder"):
        read_models(tmp_path / "bad.csv")


def test_kv_tokens_in_table_and_json():
    models = [{"name": "llama", "hf": str(HF / "llama3"), "req_rate": 3, "slo": 1},
              {"name": "plain", "size": 20, "req_rate": 1, "slo": 1},
              {"name": "mixtral", "hf": str(HF / "mixtral"), "req_rate": 2, "slo": 1, "tp": 2}]
    p = kvgpu.solve(models, gpus=3)
    split, tokens = p.kv_split(), p.kv_tokens()
    per_shard = {"llama": 131072, "plain": np.nan, "mixtral": 131072 / 2}
    for i, m in enumerate(p.model_of.tolist()):
        name = models[m]["name"]
        if name == "plain":
            assert np.isnan(tokens[i])
        else:
            assert tokens[i] == np.floor(split[i] * 1e9 / per_shard[name])
    d = p.to_dict()
    assert "kv_tokens" in d["units"]
    for row in d["gpus"]:
        assert len(row["kv_tokens"]) == len(row["models"])
        for name, t in zip(row["models"], row["kv_tokens"]):
            assert (t is None) == (name == "plain")
    text = str(p)
    for line in text.splitlines():
        if "plain" in line:
            assert "plain (" not in line  # nothing printed for a model without KV bytes (not 0)
    assert "KV tokens)" in text
    # without any KV bytes per token the outputs are as before
    plain = kvgpu.solve([{"size": 20, "req_rate": 1, "slo": 1}], gpus=1)
    assert "kv_tokens" not in plain.to_dict()["gpus"][0] and "KV tokens" not in str(plain)


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "kvgpu.cli", *args], capture_output=True, text=True)


def test_every_cli_entry_point_reads_models_by_name(tmp_path):
    """solve, certify, replan, size and size --headroom read hf models from the same reader: the
    same GB of weights everywhere (the total on the GPUs), tokens in solve's JSON."""
    for fam in ("llama3", "qwen2.5", "gemma2"):
        shutil.copytree(HF / fam, tmp_path / fam)
    f, running = tmp_path / "models.yaml", tmp_path / "running.yaml"
    text = ("gpus: 2\nmodels:\n  - {name: llama, hf: ./llama3, req_rate: 4, slo: 2}\n"
            "  - {name: qwen, hf: ./qwen2.5, req_rate: 2, slo: 1, kv_cache_dtype: fp8}\n"
            "  - {name: gemma, hf: ./gemma2, req_rate: 1, slo: 1}\n")
    f.write_text(text)
    running.write_text("gpus: 2\nmodels:\n  - {name: llama, hf: ./llama3, req_rate: 4, slo: 2, cur_gpu_id: 0}\n"
                       "  - {name: qwen, hf: ./qwen2.5, req_rate: 2, slo: 1, kv_cache_dtype: fp8, cur_gpu_id: 0}\n"
                       "  - {name: gemma, hf: ./gemma2, req_rate: 1, slo: 1, cur_gpu_id: 1}\n")
    total = 16.060522496 + 15.231233024 + 18.483411968
    out = _cli("solve", str(f), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert sum(g["models_gb"] for g in d["gpus"]) == pytest.approx(total, rel=1e-12)
    assert all(t > 0 for g in d["gpus"] for t in g["kv_tokens"])
    for args in (("certify", str(f), "--json"), ("replan", str(running), "--json"),
                 ("size", str(f), "--max-kvpr", "1", "--json"), ("size", str(f), "--max-kvpr", "1", "--headroom", "--json")):
        out = _cli(*args)
        assert out.returncode == 0, (args, out.stderr)
        d = json.loads(out.stdout)
        placement = d.get("placement", d)
        assert sum(g["models_gb"] for g in placement["gpus"]) == pytest.approx(total, rel=1e-12), args
    f.write_text("models:\n  - {name: gone, hf: ./nowhere, req_rate: 1, slo: 1}\n")
    out = _cli("solve", str(f), "--gpus", "1")
    assert out.returncode == 2 and "line 2, model 0 ('gone'): hf './nowhere': no such folder" in out.stderr


def test_csv_output_has_kv_tokens_only_when_known(tmp_path):
    import csv

    from kvgpu.io import KV_TOKENS_COLUMN, MODEL_COLUMNS, write_placement
    p = kvgpu.solve([{"name": "llama", "hf": str(HF / "llama3"), "req_rate": 1, "slo": 1},
                     {"name": "plain", "size": 20, "req_rate": 1, "slo": 1}], gpus=1)
    write_placement(p, tmp_path / "p.csv")
    write_placement(p, tmp_path / "p.json")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    gpu = json.loads((tmp_path / "p.json").read_text())["gpus"][0]
    assert list(rows[0])[:len(MODEL_COLUMNS) + 1] == [*MODEL_COLUMNS, KV_TOKENS_COLUMN]
    assert [r[KV_TOKENS_COLUMN] for r in rows] == [str(gpu["kv_tokens"][0]), ""]  # empty, not 0
    plain = kvgpu.solve([{"size": 20, "req_rate": 1, "slo": 1}], gpus=1)
    write_placement(plain, tmp_path / "q.csv")
    assert KV_TOKENS_COLUMN not in (tmp_path / "q.csv").read_text().splitlines()[0]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 30), st.floats(0, 5), st.sampled_from([1, 2]),
                          st.one_of(st.none(), st.sampled_from([57344.0, 131072.0, 344064.0]))),
                min_size=1, max_size=5))
def test_kv_tokens_fill_each_gpu_in_proportion_to_demand(rows):
    """On every GPU the engines' tokens x bytes per token use its free memory (to a token each,
    rounding down), each engine's share in proportion to its demand; unknown bytes give NaN."""
    models = [{"size": s, "req_rate": r, "slo": 1, "tp": tp, "kv_bytes_per_token": kv} for s, r, tp, kv in rows]
    p = kvgpu.solve(models, gpus=3, gpu_mem=80)
    tokens, split = p.kv_tokens(), p.kv_split()
    per_shard = np.array([np.nan if rows[m][3] is None else rows[m][3] / rows[m][2] for m in p.model_of.tolist()])
    assert np.array_equal(np.isnan(tokens), np.isnan(per_shard))
    known = ~np.isnan(per_shard)
    used = tokens[known] * per_shard[known]
    assert np.all(used <= split[known] * 1e9) and np.all(split[known] * 1e9 - used < per_shard[known])
    for g in range(p.problem.n_gpus):
        on = p.assignment == g
        if not on.any():
            continue
        assert split[on].sum() == pytest.approx(max(p.kv_free[g], 0.0), rel=1e-9, abs=1e-9)
        demand = p.instance.demand[on]
        if demand.sum() > 0:
            assert split[on] == pytest.approx(max(p.kv_free[g], 0.0) * demand / demand.sum(), rel=1e-9, abs=1e-9)
