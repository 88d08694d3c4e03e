"""A model's weights and KV bytes per token from its own files, read offline.

A model given by ``hf`` -- a local folder, or a Hugging Face repo id found in the local Hugging
Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; nothing is
ever downloaded) -- gets its size and its KV bytes per token from:

* **weights**, exact where the files allow: ``model.safetensors.index.json``'s
  ``metadata.total_size`` (bytes); else the sum of the tensors' bytes in the safetensors headers
  (``safetensors.safe_open``: shape x dtype size, no tensor data read); else an estimate from
  ``config.json``: the parameters of the architecture (:func:`parameter_bytes`) at the checkpoint's
  ``torch_dtype``, with the linear layers as ``quantization_config`` stores them;
* **KV bytes per token** from ``config.json`` (:func:`kv_bytes_per_shard`):
  ``2 x num_hidden_layers x num_key_value_heads x head_dim x KV dtype bytes``
  (``head_dim = hidden_size / num_attention_heads`` when the config has none); the KV dtype is
  the model's ``torch_dtype`` unless ``kv_cache_dtype`` says otherwise.  Multi-head latent
  attention (DeepSeek V2/V3, ``kv_lora_rank``) caches one latent of ``kv_lora_rank +
  qk_rope_head_dim`` per layer and token, the same on every tensor-parallel rank.

GB is 10**9 bytes throughout (the unit of model sizes in kvgpu: a Llama 3.1 8B in bf16 is 16.06
GB).  Sliding-window layers (Mistral v0.1, Gemma 2's every other layer) are counted as full
layers: every cached token costs every layer's K and V, as engines allocate it without a hybrid
allocator; with vLLM's hybrid KV cache manager a long request holds fewer bytes, so the token
count kvgpu prints is then a lower bound.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvgpu.errors import InvalidInstance

#: Bytes per GB (decimal, as model sizes are quoted).
GB = 1e9
#: How far (relative) an explicit ``size`` / ``kv_bytes_per_token`` may be from the files'
#: figure: within it the files' exact figure is used, beyond it the model is refused.
AGREE_RTOL = 0.05

#: bytes per element of the dtype names config.json and kv_cache_dtype use
DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
#: ``kv_cache_dtype`` values (vLLM's names and the torch ones); ``auto``: the model's torch_dtype
KV_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "fp8", "fp8_e4m3",
             "fp8_e5m2")
#: bytes per element of each safetensors header dtype (F4 is packed two to a byte; its header
#: shape counts elements)
SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                     "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                     "F8_E8M0": 1, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "F4": 0.5}
#: architectures whose parameter count :func:`parameter_bytes` knows, and whether their word
#: embeddings are tied when config.json does not say (the transformers class default)
FAMILIES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True, "gemma2": True,
            "mixtral": False, "qwen2_moe": False, "qwen3_moe": False}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelFiles:
    """What a model's files say.

    Attributes
    ----------
    folder : Path -- where they were read.
    weights_bytes : float or None -- bytes of weights; None where the files give no figure (no
        safetensors, and no parameter formula for this config: the reason in ``weights_from``).
    weights_from : str -- how ``weights_bytes`` was found, in words, or why there is none.
    kv_bytes_per_token : float or None -- KV bytes per token of one replica, all its tp shards
        together (``tp x`` :func:`kv_bytes_per_shard`, replicated KV heads counted on each
        shard), for the ``tp`` asked; None where the files give no figure (``kv_note`` says why).
    kv_note : str -- how the KV figure was found, or why there is none.
    kv_bytes_model : float or None -- the model's own KV bytes per token, unsharded (what a
        user's ``kv_bytes_per_token`` means): ``2 x layers x KV heads x head_dim x bytes``, or the
        latent of multi-head latent attention.
    kv_split : int or None -- over how many tp shards the model's KV is split: ``min(tp, KV
        heads)`` (heads replicated beyond), 1 for a latent, None where config.json does not say.
    """

    folder: Path
    weights_bytes: float | None
    weights_from: str
    kv_bytes_per_token: float | None
    kv_note: str
    kv_bytes_model: float | None = None
    kv_split: int | None = None

    @property
    def size_gb(self) -> float | None:
        """The weights in GB (``weights_bytes / 1e9``); None where the files give none."""
        return None if self.weights_bytes is None else self.weights_bytes / GB


def read(ref: str, where: str, *, tp: int = 1, kv_cache_dtype: str | None = None,
         base_dir: str | Path | None = None) -> ModelFiles:
    """The weights and KV bytes per token of the model ``ref`` names.

    Parameters
    ----------
    ref : str -- a folder (absolute, or relative to ``base_dir``, else to the working folder),
        or a Hugging Face repo id (``owner/name``) looked up in the local cache only.
    where : str -- how messages name the model (``"models.yaml, line 4, model 0 ('chat')"``).
    tp : int -- tensor-parallel degree (KV heads are split over it, or replicated when fewer).
    kv_cache_dtype : str or None -- one of :data:`KV_DTYPES`; None or ``auto``: torch_dtype.
    base_dir : folder relative paths start from (the model file's folder).

    Raises
    ------
    InvalidInstance -- naming the model, the path and what is missing or not understood.
    """
    folder = find_folder(ref, where, base_dir)
    where = f"{where}: hf {ref!r}"
    config = read_config(folder, where)
    cfg_where = f"{where}: {_p(folder / 'config.json')}"
    check_tp(config, tp, cfg_where)
    try:
        nbytes, how = weights_bytes(folder, config, where)
    except _Unsupported as e:  # no figure in the files: an explicit size may stand in
        nbytes, how = None, str(e)
    kv = own = None
    try:
        kv = tp * kv_bytes_per_shard(config, tp, kv_cache_dtype, cfg_where)
        own = kv_bytes_per_shard(config, 1, kv_cache_dtype, cfg_where)
        note = "config.json: layers x KV heads x head_dim x KV dtype"
    except _Unsupported as e:
        note = str(e)
    return ModelFiles(folder, None if nbytes is None else float(nbytes), how, kv, note, own, kv_split(config, tp))


def check_tp(config: dict, tp: int, where: str) -> None:
    """Refuse a ``tp`` that does not divide ``num_attention_heads`` (where config.json gives
    it): vLLM and SGLang split the attention heads evenly over the tensor-parallel ranks."""
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and heads % tp:
        raise InvalidInstance(f"{where}: tp {tp} does not divide num_attention_heads {heads} (engines split the "
                              f"attention heads evenly over the tp ranks: choose a tp that divides {heads})")


def kv_split(config: dict, tp: int) -> int | None:
    """Over how many of ``tp`` shards the model's KV cache is split: ``min(tp, KV heads)`` (KV
    heads are replicated when fewer than tp), 1 for multi-head latent attention (each shard
    holds the whole latent), None where config.json gives no heads."""
    if config.get("kv_lora_rank"):
        return 1
    kvh = config.get("num_key_value_heads", config.get("num_attention_heads"))
    if isinstance(kvh, bool) or not isinstance(kvh, int) or kvh <= 0:
        return None
    return min(tp, kvh)


class _Unsupported(InvalidInstance):
    """A figure the files cannot give (an attention kind or architecture kvgpu has no formula
    for, a field config.json lacks): an explicit ``size`` / ``kv_bytes_per_token`` may stand in."""


# ---------------------------------------------------------------- finding the files

def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def find_folder(ref: str, where: str, base_dir: str | Path | None = None) -> Path:
    """The folder of ``ref``: a local folder when one exists at that path (or ``ref`` looks
    like a path: ``/``, ``.``, ``~``), else the cached snapshot of repo id ``ref``."""
    text = ref.strip()
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        return path
    if text.startswith(("/", ".", "~")) or not _REPO_ID.match(text):
        raise InvalidInstance(f"{where}: hf {ref!r}: no such folder ({_p(path)})"
                              + ("" if text.startswith(("/", ".", "~")) else
                                 " and not a Hugging Face repo id (owner/name)"))
    return _cached_snapshot(text, where)


def _cached_snapshot(repo_id: str, where: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # the optional extra is missing: say which
        raise InvalidInstance(f"{where}: hf {repo_id!r} is a Hugging Face repo id, and reading the local cache "
                              f"needs huggingface_hub (pip install 'kvgpu[hf]'); or give the model's folder") from None
    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InvalidInstance(f"{where}: hf {repo_id!r} is not in the local Hugging Face cache ({_p(cache)}); kvgpu "
                              f"never downloads: fetch it first (huggingface-cli download {repo_id} --include "
                              f"'*.json'), set HF_HUB_CACHE, or give the model's folder") from None
    except HFValidationError as e:
        raise InvalidInstance(f"{where}: hf {repo_id!r} is not a valid Hugging Face repo id ({_first_line(e)})") from None


def _p(path: Path | str) -> str:
    """A path for a message, on one line (a name with a line break is escaped)."""
    from kvgpu.results import printable  # results imports this module: import when used
    return printable(str(path))


def _first_line(e: Exception) -> str:
    """An exception's message on one line (kvgpu's errors are one line: the CLI prints them so)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInstance(f"{where}: {_p(path)} is missing") from None
    except (OSError, ValueError) as e:
        raise InvalidInstance(f"{where}: {_p(path)} cannot be read as JSON ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise InvalidInstance(f"{where}: {_p(path)} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(folder: Path, where: str) -> dict:
    """``config.json`` of the folder; a multimodal config's language model (``text_config``)
    is merged over it, so that layers and heads are the decoder's."""
    config = _json(folder / "config.json", where)
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config:
        config = {**config, **text, "_multimodal": config.get("model_type")}
    return config


# ---------------------------------------------------------------- weights

def weights_bytes(folder: Path, config: dict, where: str) -> tuple[float, str]:
    """Bytes of weights and how they were found (index, headers, or config.json)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = _json(index, where)
        total = (data.get("metadata") or {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0:
            raise InvalidInstance(f"{where}: {_p(index)} has no metadata.total_size (bytes of weights), got {total!r}")
        return float(total), f"{index.name}: metadata.total_size"
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        _all_shards(files, folder, where)
        counts = [_header_bytes(f, where) for f in files]
        total, elements = sum(c[0] for c in counts), sum(c[1] for c in counts)
        _check_headers(config, total, elements, where, folder)
        return float(total), f"safetensors headers of {', '.join(_p(f.name) for f in files)}"
    return parameter_bytes(config, f"{where}: {_p(folder / 'config.json')} (no safetensors in {_p(folder)})")


_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
#: Headers holding fewer than this share of the parameters config.json's formula counts are
#: refused: weights are missing (an interrupted download), not a smaller model.
HEADER_MIN_SHARE = 0.9


def _all_shards(files: list, folder: Path, where: str) -> None:
    """Refuse a sharded checkpoint (``...-0000k-of-0000N.safetensors``) missing a shard."""
    sets: dict[int, set] = {}
    for f in files:
        m = _SHARD.search(f.name)
        if m:
            sets.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    for n, have in sets.items():
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            raise InvalidInstance(f"{where}: {_p(folder)} has {len(have)} of the {n} safetensors shards (-of-{n:05d}; "
                                  f"missing shard(s) {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}): "
                                  f"an interrupted download? fetch every shard, or ship model.safetensors.index.json")


def _check_headers(config: dict, nbytes: float, elements: float, where: str, folder: Path) -> None:
    """Refuse headers far below config.json's parameter formula (where one exists): element
    counts against its parameters (dtype-free), or bytes against its bytes when quantised."""
    try:
        formula, _ = parameter_bytes(config, where)
        params = parameter_count(config, where)
    except InvalidInstance:  # no formula for this config: nothing to cross-check
        return
    quant = config.get("quantization_config") is not None
    got, want, unit = (nbytes, formula, "bytes") if quant else (elements, params, "parameters")
    if got < HEADER_MIN_SHARE * want:
        raise InvalidInstance(f"{where}: the safetensors headers in {_p(folder)} hold {got:,.0f} {unit}, but "
                              f"config.json's {config.get('model_type')} formula gives {want:,.0f}: weights are "
                              f"missing (an interrupted download?); fetch them, or ship model.safetensors.index.json")


def _header_bytes(path: Path, where: str) -> tuple[float, int]:
    """Sum of the tensors' bytes in one safetensors file's header (shape x dtype size), and of
    their elements."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise InvalidInstance(f"{where}: reading {_p(path.name)} needs safetensors (pip install 'kvgpu[hf]')") from None
    total, elements = 0.0, 0
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                t = f.get_slice(name)
                dtype = t.get_dtype()
                if dtype not in SAFETENSORS_BYTES:
                    raise InvalidInstance(f"{where}: {_p(path)}: tensor {name!r} has dtype {dtype!r}, whose size "
                                          f"kvgpu does not know ({', '.join(SAFETENSORS_BYTES)})")
                n = math.prod(t.get_shape())
                total += n * SAFETENSORS_BYTES[dtype]
                elements += n
    except InvalidInstance:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise InvalidInstance(f"{where}: {_p(path)} cannot be read as safetensors ({_first_line(e)})") from None
    return total, elements


def _int(config: dict, key: str, where: str, default: Any = None) -> int:
    v = config.get(key)
    v = default if v is None else v  # transformers reads a null as "use the default"
    if v is None:  # the files do not say: an explicit figure may stand in
        raise _Unsupported(f"{where}: {key!r} is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidInstance(f"{where}: {key!r} must be a whole number >= 0, got {v!r}")
    return v


def _dtype_bytes(name: Any, where: str, key: str) -> int:
    if name is None:  # the files do not say: an explicit figure may stand in
        raise _Unsupported(f"{where}: {key} is missing (known: {', '.join(sorted(DTYPE_BYTES))})")
    text = str(name).strip().lower().removeprefix("torch.")
    if text not in DTYPE_BYTES:
        raise InvalidInstance(f"{where}: " + (f"{key} is missing" if name is None else
                                              f"{key} {name!r} is not a known dtype")
                              + f" (known: {', '.join(sorted(DTYPE_BYTES))})")
    return DTYPE_BYTES[text]


def model_dtype(config: dict, where: str) -> int:
    """Bytes per element of the checkpoint's ``torch_dtype`` (``dtype`` in newer configs)."""
    key = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    return _dtype_bytes(config.get(key), where, "torch_dtype")


def _shape(config: dict, where: str) -> dict:
    """Layers, heads and widths of a decoder config (``head_dim`` defaulted as transformers does)."""
    h = _int(config, "hidden_size", where)
    heads = _int(config, "num_attention_heads", where)
    if heads == 0:
        raise InvalidInstance(f"{where}: 'num_attention_heads' must be > 0")
    hd = config.get("head_dim")
    return {"layers": _int(config, "num_hidden_layers", where), "hidden": h, "heads": heads,
            "kv_heads": _int(config, "num_key_value_heads", where, heads),
            "head_dim": _int(config, "head_dim", where) if hd is not None else h // heads}


def _matrices(config: dict, family: str, s: dict, where: str) -> tuple[list[tuple[int, int, int]], int]:
    """The linear layers a quantisation stores quantised, as ``(in, out, count)``, and the
    count of the other parameters (embeddings, lm_head, norms, biases, routers)."""
    h, L, hd = s["hidden"], s["layers"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    lin = [(h, q, L), (h, kv, 2 * L), (q, h, L)]
    vocab = _int(config, "vocab_size", where)
    tied = config.get("tie_word_embeddings", FAMILIES[family])
    other = vocab * h * (1 if tied else 2) + h  # embeddings, lm_head, final norm
    other += L * h * (4 if family == "gemma2" else 2)  # per-layer norms
    if family in ("qwen2", "qwen2_moe") or config.get("attention_bias"):  # Qwen2 always has q/k/v biases
        other += L * (q + 2 * kv) + (L * h if config.get("attention_bias") else 0)
    if family in ("qwen3", "qwen3_moe"):
        other += L * 2 * hd  # q_norm, k_norm
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = _int(config, "num_local_experts" if family == "mixtral" else "num_experts", where)
        width = _int(config, "intermediate_size" if family == "mixtral" else "moe_intermediate_size", where)
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise _Unsupported(f"{where}: {family} with dense layers (mlp_only_layers / decoder_sparse_step) "
                                  f"has no parameter formula here; ship the safetensors index, or give size")
        lin += [(h, width, 2 * L * experts), (width, h, L * experts)]
        other += L * h * experts  # router
        shared = config.get("shared_expert_intermediate_size") or 0
        if shared:
            lin += [(h, shared, 2 * L), (shared, h, L)]
            other += L * h  # shared expert gate
    else:
        inter = _int(config, "intermediate_size", where)
        lin += [(h, inter, 2 * L), (inter, h, L)]
        if config.get("mlp_bias"):
            other += L * (2 * inter + h)
    return lin, other


def parameter_bytes(config: dict, where: str) -> tuple[float, str]:
    """Bytes of weights from config.json: the parameters of the architecture at ``torch_dtype``,
    the linear layers of attention and MLP / experts as ``quantization_config`` stores them.

    Formulas per linear layer of ``in x out`` weights: unquantised ``in*out*b`` (``b`` the
    torch_dtype's bytes); ``fp8``: ``in*out`` bytes plus one float32 scale per
    ``weight_block_size`` block (or per tensor); AWQ / GPTQ with ``bits`` and ``group_size``
    ``g``: ``in*out*bits/8`` plus, per group of ``g`` inputs and each output, an fp16 scale and
    a packed ``bits``-wide zero point (``ceil(in/g)*out*(2 + bits/8)``), GPTQ adding its int32
    ``g_idx`` (``4*in``).  Embeddings, lm_head, norms, biases and routers stay at torch_dtype.
    Per-tensor activation scales (a few bytes) are left out.
    """
    family = config.get("model_type")
    if config.get("_multimodal") or family not in FAMILIES:
        name = config.get("_multimodal") or family
        raise _Unsupported(f"{where}: no parameter formula for model_type {name!r} (known: "
                              f"{', '.join(FAMILIES)}); ship model.safetensors.index.json or the safetensors "
                              f"files, or give size")
    b = model_dtype(config, where)
    lin, other = _matrices(config, family, _shape(config, where), where)
    params = parameter_count(config, where)
    quant = config.get("quantization_config")
    linear_bytes, how = _quantised(quant, lin, b, where)
    total = other * b + linear_bytes
    return float(total), f"config.json: {params:,} parameters ({family}), {how}"


def parameter_count(config: dict, where: str) -> int:
    """Parameters of the architecture config.json describes (a known ``model_type`` only)."""
    family = config.get("model_type")
    if config.get("_multimodal") or family not in FAMILIES:
        raise _Unsupported(f"{where}: no parameter formula for model_type {family!r}")
    lin, other = _matrices(config, family, _shape(config, where), where)
    return other + sum(i * o * n for i, o, n in lin)


def _quantised(quant: Any, lin: list, b: int, where: str) -> tuple[float, str]:
    """Bytes of the linear layers ``lin`` under ``quantization_config`` (see parameter_bytes)."""
    if quant is None:
        return float(sum(i * o * n for i, o, n in lin) * b), f"{b} bytes each"
    if not isinstance(quant, dict):
        raise InvalidInstance(f"{where}: quantization_config must be an object, got {quant!r}")
    method = str(quant.get("quant_method", "")).lower()
    skip = [m for m in quant.get("modules_to_not_convert") or [] if not re.search(r"lm_head|embed|gate$|router", m)]
    if skip:
        raise _Unsupported(f"{where}: quantization_config keeps {skip} unquantised, which the config formula "
                              f"does not model; ship the safetensors index, or give size")
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2 and all(
                isinstance(x, int) and x > 0 for x in block)):
            raise InvalidInstance(f"{where}: quantization_config.weight_block_size must be [rows, cols], got {block!r}")
        scales = sum((math.ceil(o / block[0]) * math.ceil(i / block[1]) if block else 1) * 4 * n for i, o, n in lin)
        return float(sum(i * o * n for i, o, n in lin) + scales), \
            f"fp8 linear layers ({'block scales ' + str(block) if block else 'per-tensor scales'})"
    if method in ("awq", "gptq"):
        bits = quant.get("bits", quant.get("w_bit"))
        g = quant.get("group_size", quant.get("q_group_size"))
        if bits not in (2, 3, 4, 8) or isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1):
            raise InvalidInstance(f"{where}: quantization_config ({method}) needs bits (2, 3, 4, 8) and group_size "
                                  f"(> 0, or -1), got bits={bits!r}, group_size={g!r}")
        total = 0.0
        for i, o, n in lin:
            groups = 1 if g == -1 else math.ceil(i / g)
            total += n * (i * o * bits / 8 + groups * o * (2 + bits / 8) + (4 * i if method == "gptq" else 0))
        return total, f"{method} int{bits} linear layers, group size {g}"
    raise _Unsupported(f"{where}: quantization_config quant_method {method or None!r} has no formula here "
                          f"(known: fp8, awq, gptq); ship the safetensors index, or give size")


# ---------------------------------------------------------------- KV cache

def kv_bytes_per_shard(config: dict, tp: int, kv_cache_dtype: str | None, where: str) -> float:
    """KV bytes per token on one tensor-parallel shard of the model.

    Standard and grouped-query attention: ``2 x layers x kv_heads_per_shard x head_dim x b``, with
    ``kv_heads_per_shard = kv_heads / tp`` -- or 1 when ``tp`` exceeds the KV heads (vLLM then
    replicates them; it refuses a tp that neither divides nor is divided by the KV heads, and so
    does this).  Multi-head latent attention (``kv_lora_rank``): ``layers x (kv_lora_rank +
    qk_rope_head_dim) x b`` on every shard (the latent is not split).  ``b``: bytes of
    ``kv_cache_dtype`` (``auto``/None: torch_dtype).
    """
    dtype = (kv_cache_dtype or "auto").strip().lower()
    if dtype not in KV_DTYPES:
        raise InvalidInstance(f"{where}: kv_cache_dtype {kv_cache_dtype!r} is not known (known: {', '.join(KV_DTYPES)})")
    b = model_dtype(config, where) if dtype == "auto" else DTYPE_BYTES[dtype]
    layers = _int(config, "num_hidden_layers", where)
    if config.get("kv_lora_rank"):
        if b == 1:
            raise _Unsupported(f"{where}: multi-head latent attention ({config.get('model_type')}) with an fp8 KV "
                               f"cache has engine-specific layouts (scales beside the latent); give kv_bytes_per_token")
        return float(layers * (_int(config, "kv_lora_rank", where) + _int(config, "qk_rope_head_dim", where)) * b)
    if config.get("layer_types") and any(t not in ("full_attention", "sliding_attention")
                                         for t in config["layer_types"]):
        kinds = sorted(set(config["layer_types"]) - {"full_attention", "sliding_attention"})
        raise _Unsupported(f"{where}: layers of kind {kinds} (not attention) keep state that is not a KV cache per "
                           f"token; give kv_bytes_per_token")
    s = _shape(config, where)
    kvh = s["kv_heads"]
    if kvh == 0 or (kvh % tp and tp % kvh):
        raise InvalidInstance(f"{where}: tp {tp} neither divides nor is a multiple of num_key_value_heads {kvh} "
                              f"(engines refuse such a split)")
    return float(2 * layers * max(kvh // tp, 1) * s["head_dim"] * b)
