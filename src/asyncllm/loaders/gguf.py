"""GGUF checkpoints of the registry's GGUF architectures (``llama``, ``qwen2``, ``qwen3``, ``phi3``,
``internlm2``, ``gemma2``, ``gemma3``, and the mixture-of-experts ``qwen2moe`` and ``qwen3moe``), presented as
Hugging Face tensors of their family. A ``llama`` file with ``llama.expert_count`` > 0 is a Mixtral-style model
and loads as ``mixtral``.

``load_gguf`` parses the header, builds a ``config.json``-style dict from the ``llama.*`` and
``tokenizer.ggml.*`` metadata and checks every tensor's name and storage type up front, so an
unsupported file fails before any weight is decoded. Streaming then decodes one tensor at a time from
the memory-mapped file.

Block-quantized weights (``Q4_0`` ... ``Q6_K``, see ``gguf_codes``) are kept quantized by default: each is
streamed as its exact codes (``<module>.codes``, ``.code_scales``, ``.code_zeros``, ``.code_mins``; see
``quant.packed_linear``) and the checkpoint's ``quantization`` names every such module with its code width
and group size, so the model packs them once loaded. With ``dequantize_weights=True`` every tensor is decoded to
floats instead (``gguf_dequant``), and the model is dense.

Layout conversions (the inverse of llama.cpp's ``convert_hf_to_gguf.py``):

- GGUF lists dimensions innermost first; a weight stored as ``(in, out)`` is yielded as ``[out, in]``.
- The q and k projections of ``llama`` and ``internlm2`` files are stored with the rows of each head
  interleaved for GGML's pairwise ("normal") rotary; they are permuted back to Hugging Face's rotate-half
  order: within a head of ``2h`` rows, GGUF row ``2i + j`` becomes row ``j·h + i``. ``qwen2``, ``qwen3`` and
  ``phi3`` files use GGML's rotate-half ("neox") rotary and keep Hugging Face's rows.
- ``qwen3``'s ``attn_q_norm`` / ``attn_k_norm`` are the per-head q/k norms. ``phi3``'s fused ``attn_qkv`` and
  ``ffn_up`` (gate then up) are yielded as ``qkv_proj`` / ``gate_up_proj`` and decoded to floats (their
  codes are not kept packed); its LongRoPE factors (``rope_factors_short`` / ``rope_factors_long``) become a
  ``longrope`` ``rope_scaling`` dict. ``internlm2`` files (split q/k/v, Llama names) load as Llama tensors.
- Mixture-of-experts files (``qwen2moe``, ``qwen3moe``, ``llama`` with experts) store each layer's experts
  stacked: ``ffn_gate_exps`` / ``ffn_up_exps`` ``[E, I, H]`` and ``ffn_down_exps`` ``[E, H, I]`` (row-major),
  yielded as ``mlp.experts.gate_proj`` / ``up_proj`` / ``down_proj`` ``.weight`` (``models.moe`` splits them per
  expert); the router ``ffn_gate_inp`` is ``mlp.gate``; Qwen2-MoE's shared expert ``ffn_{gate,up,down}_shexp``
  is ``mlp.shared_expert.*`` and its gate ``ffn_gate_inp_shexp`` (``[H]`` or ``[1, H]``) ``mlp.shared_expert_gate``
  ``[1, H]``. The metadata ``{arch}.expert_count``, ``expert_used_count``, ``expert_feed_forward_length`` and
  ``expert_shared_feed_forward_length`` give the expert shapes; a layer without ``ffn_gate_inp`` runs the dense
  MLP. Top-k weights are renormalized as llama.cpp does (``{arch}.expert_weights_norm`` when present, else
  always for ``qwen3moe`` and Mixtral, never for ``qwen2moe``). The mixture-of-experts model holds dense
  weights only, so every block-quantized tensor of such a file is decoded to floats at load, as if
  ``dequantize_weights=True``.
- ``gemma2`` / ``gemma3`` files (rotate-half rotary, HF rows) store every norm weight with llama.cpp's ``+ 1``
  folded in; it is taken back out (``(1 + w)`` norms). ``ffn_norm`` is the pre-feed-forward norm,
  ``post_attention_norm`` / ``post_ffw_norm`` the post-attention / post-feed-forward norms. The files carry
  no ``query_pre_attn_scalar``: as llama.cpp, it is ``hidden / heads`` for the 27B models (46 layers for
  Gemma 2, 62 for Gemma 3) and ``head_dim`` otherwise. Layers slide per
  ``attention.sliding_window_pattern`` (a period, or one flag per layer), by default every other layer
  from the first (Gemma 2) or five of every six (Gemma 3); Gemma 3's sliding layers rotate with
  ``rope.freq_base_swa`` (default 10000).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType

from asyncllm.architectures import ArchitectureSpec, spec_for_gguf, spec_named
from asyncllm.loaders.checkpoint import Checkpoint
from asyncllm.loaders.gguf_codes import QUANTIZED_TYPES, layer_quant, quant_codes
from asyncllm.loaders.gguf_dequant import SUPPORTED_TYPES, dequantize
from asyncllm.loaders.gguf_file import GGUFFile, GGUFTensorInfo
from asyncllm.loaders.gguf_rope import rope_scaling_from_metadata
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig, WeightOnlyQuantization
from asyncllm.quant.layer_quant import LayerQuant

ROPE_FREQS_TENSOR = "rope_freqs.weight"
LONGROPE_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")
_INTERLEAVED_ROTARY = frozenset({"llama", "internlm2"})
"""Architectures whose llama.cpp conversion permutes the q/k rows for pairwise rotary."""
_FUSED = {"phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}
"""Per architecture, GGUF modules holding fused projections, and the Hugging Face module of each."""

_GEMMA = frozenset({"gemma2", "gemma3"})
"""Architectures with ``(1 + w)`` norms (stored as ``1 + w``), sandwich norms and sliding-window layers."""
_GEMMA_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_MOE_LAYER_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
"""GGUF modules of mixture-of-experts layers, and the Hugging Face module of each (experts stacked)."""
_MOE_RENORMALIZE = {"qwen2moe": False, "qwen3moe": True, "llama": True}
"""Whether llama.cpp renormalizes the top-k routing weights, per GGUF architecture (absent
``{arch}.expert_weights_norm``)."""
_LLAMA_EXPERTS_FAMILY = "mixtral"
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str, num_layers: int, architecture: str = "llama", *, moe: bool = False) -> str:
    """The Hugging Face parameter name of a GGUF tensor of ``architecture`` (with the expert tensors of
    mixture-of-experts layers when ``moe``); ``ValueError`` for unknown names."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = {**_LAYER_NAMES, **_FUSED.get(architecture, {}), **(_MOE_LAYER_NAMES if moe else {}),
             **(_GEMMA_NAMES if architecture in _GEMMA else {})}
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is not None and match.group(2) in names and int(match.group(1)) < num_layers:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{names[module]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in a {architecture!r} model")


def gguf_spec(metadata: dict[str, Any]) -> ArchitectureSpec:
    """The family of a GGUF file: its ``general.architecture``, except that a ``llama`` file with experts
    (``llama.expert_count`` > 0) is Mixtral; experts in a file of another dense architecture raise ``ValueError``."""
    architecture = metadata.get("general.architecture")
    spec = spec_for_gguf(architecture)
    experts = metadata.get(f"{architecture}.expert_count") or 0
    if spec.model == "moe" or not experts:
        return spec
    if architecture == "llama":
        return spec_named(_LLAMA_EXPERTS_FAMILY)
    raise ValueError(f"GGUF architecture {architecture!r} with {architecture}.expert_count={experts}: "
                     "mixture-of-experts files of this architecture are not supported")


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of a q/k weight or bias (rows are dim 0)."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"rotary weight with {rows} rows cannot be split into {num_heads} heads of pairs")
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def _field(metadata: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"GGUF metadata key {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _vocab_size(gguf: GGUFFile) -> int:
    embedding = gguf.tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{gguf.path}: tensor 'token_embd.weight' is missing")
    rows = embedding.torch_shape[0]
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > rows:
        raise ValueError(
            f"{gguf.path}: the tokenizer has {len(tokens)} tokens but the embedding only {rows} rows"
        )
    return rows


def _special_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    eos = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(int(token) for token in eos if token is not None))
    if eos_ids:
        ids["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        ids["pad_token_id"] = int(pad)
    return ids


def gguf_hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``LlamaConfig``-style dict from a llama GGUF file's metadata and tensor list."""
    meta = gguf.metadata
    architecture = meta.get("general.architecture")
    spec = gguf_spec(meta)
    prefix = f"{architecture}."
    hidden = _field(meta, prefix + "embedding_length", int)
    heads = _field(meta, prefix + "attention.head_count", int)
    kv_heads = _field(meta, prefix + "attention.head_count_kv", int, heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"{prefix}attention.head_count_kv={kv_heads} must divide head_count={heads}")
    if prefix + "attention.key_length" in meta:
        head_dim = _field(meta, prefix + "attention.key_length", int)
    elif hidden % heads == 0:
        head_dim = hidden // heads
    else:
        raise ValueError(f"{prefix}attention.head_count={heads} does not divide embedding_length={hidden}")
    rotary_dim = _field(meta, prefix + "rope.dimension_count", int, head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{prefix}rope.dimension_count={rotary_dim} != head_dim={head_dim}: partial rotary "
                         "embeddings are not supported")
    rope_theta = _field(meta, prefix + "rope.freq_base", float, 10000.0)
    freq_factors = None
    if ROPE_FREQS_TENSOR in gguf.tensors:
        info = gguf.tensors[ROPE_FREQS_TENSOR]
        freq_factors = dequantize(gguf.read_bytes(info), _checked_type(info), torch.float64)
    config: dict[str, Any] = {
        "architectures": [spec.hf_architectures[0]],
        "model_type": spec.hf_model_types[0],
        "vocab_size": _vocab_size(gguf),
        "hidden_size": hidden,
        "intermediate_size": _field(meta, prefix + "feed_forward_length", int),
        "num_hidden_layers": _field(meta, prefix + "block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _field(meta, prefix + "attention.layer_norm_rms_epsilon", float),
        "rope_theta": rope_theta,
        "max_position_embeddings": _field(meta, prefix + "context_length", int),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors or "blk.0.attn_qkv.bias" in gguf.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in gguf.tensors,
        **_special_ids(meta),
    }
    if any(name in gguf.tensors for name in LONGROPE_TENSORS):
        rope_scaling = _longrope_scaling(gguf, prefix, head_dim)
    else:
        rope_scaling = rope_scaling_from_metadata(meta, prefix, freq_factors, rope_theta, head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if spec.model == "moe":
        config.update(_moe_config(gguf, str(architecture), config))
    if architecture in _GEMMA:
        config.update(_gemma_config(meta, str(architecture), config))
    return config


def _moe_config(gguf: GGUFFile, architecture: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``Qwen2MoeConfig``-style expert settings of a mixture-of-experts GGUF file (module docstring)."""
    meta, prefix = gguf.metadata, f"{architecture}."
    layers = config["num_hidden_layers"]
    sparse = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in gguf.tensors]
    if not sparse:
        raise ValueError(f"{gguf.path}: {prefix}expert_count is set but no layer has an 'ffn_gate_inp' router")
    shared = 0
    shared_gate = gguf.tensors.get(f"blk.{sparse[0]}.ffn_gate_shexp.weight")
    if shared_gate is not None:
        shared = _field(meta, prefix + "expert_shared_feed_forward_length", int, shared_gate.torch_shape[0])
    renormalize = meta.get(prefix + "expert_weights_norm", _MOE_RENORMALIZE.get(architecture, False))
    return {
        "num_experts": _field(meta, prefix + "expert_count", int),
        "num_experts_per_tok": _field(meta, prefix + "expert_used_count", int),
        "moe_intermediate_size": _field(meta, prefix + "expert_feed_forward_length", int,
                                        config["intermediate_size"]),
        "shared_expert_intermediate_size": shared,
        "mlp_only_layers": [i for i in range(layers) if i not in sparse],
        "decoder_sparse_step": 1,
        "norm_topk_prob": bool(renormalize),
    }


def _gemma_config(meta: dict[str, Any], architecture: str, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3 ``config.json`` fields from a GGUF file's metadata (see the module docstring)."""
    prefix = f"{architecture}."
    layers = config["num_hidden_layers"]
    pattern = meta.get(prefix + "attention.sliding_window_pattern", 2 if architecture == "gemma2" else 6)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"{prefix}attention.sliding_window_pattern: {len(pattern)} flags for {layers} layers")
        sliding = [bool(flag) for flag in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    heads = config["num_attention_heads"]
    big = layers == _GEMMA_27B_LAYERS[architecture]
    fields: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": _field(meta, prefix + "attention.sliding_window", int),
        "layer_types": ["sliding_attention" if flag else "full_attention" for flag in sliding],
        "query_pre_attn_scalar": config["hidden_size"] // heads if big else config["head_dim"],
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if prefix + key in meta:
            fields[key] = _field(meta, prefix + key, float)
    if architecture == "gemma3":
        fields["rope_local_base_freq"] = _field(meta, prefix + "rope.freq_base_swa", float, 10000.0)
    return fields


def _longrope_scaling(gguf: GGUFFile, prefix: str, head_dim: int) -> dict[str, Any]:
    """A ``longrope`` ``rope_scaling`` dict from Phi-3's factor tensors and ``rope.scaling.*`` metadata."""
    factors = {}
    for key, name in zip(("short_factor", "long_factor"), LONGROPE_TENSORS, strict=True):
        info = gguf.tensors.get(name)
        if info is None:
            raise ValueError(f"{gguf.path}: LongRoPE needs both {LONGROPE_TENSORS}, {name!r} is missing")
        values = dequantize(gguf.read_bytes(info), _checked_type(info), torch.float32).reshape(-1)
        if values.numel() != head_dim // 2:
            raise ValueError(f"{name} has {values.numel()} values, expected head_dim/2 = {head_dim // 2}")
        factors[key] = values.tolist()
    meta = gguf.metadata
    scaling: dict[str, Any] = {"rope_type": "longrope", **factors, "original_max_position_embeddings": _field(
        meta, prefix + "rope.scaling.original_context_length", int)}
    if prefix + "rope.scaling.attn_factor" in meta:
        scaling["attention_factor"] = _field(meta, prefix + "rope.scaling.attn_factor", float)
    return scaling


def _checked_type(info: GGUFTensorInfo) -> GGMLQuantizationType:
    """The tensor's storage type; ``ValueError`` naming the tensor and the type if it is unsupported."""
    ggml_type = info.ggml_type
    if ggml_type is None or ggml_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGUF tensor {info.name!r} has storage type {info.type_name}, which is not supported "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    return ggml_type


@dataclass(frozen=True)
class GGUFSource:
    """Streams a llama GGUF file's tensors as Hugging Face tensors (see the module docstring)."""

    gguf: GGUFFile
    names: tuple[tuple[str, str], ...]
    rotary_heads: dict[str, int]
    packed: frozenset[str] = frozenset()
    """GGUF names of the tensors streamed as codes (the rest are decoded to floats)."""
    norm_offset: float = 0.0
    """Subtracted from every norm weight (Gemma files store ``1 + w``)."""

    def tensor_names(self) -> tuple[str, ...]:
        return tuple(name for gguf_name, hf_name in self.names for name in self._hf_names(gguf_name, hf_name))

    def _hf_names(self, gguf_name: str, hf_name: str) -> tuple[str, ...]:
        if gguf_name not in self.packed:
            return (hf_name,)
        prefix = hf_name.removesuffix(".weight")
        return tuple(f"{prefix}.{part}" for part in _CODE_PARTS)

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for gguf_name, hf_name in self.names:
            info = self.gguf.tensors[gguf_name]
            heads = self.rotary_heads.get(gguf_name)
            if gguf_name in self.packed:
                rows, cols = info.torch_shape
                codes = quant_codes(self.gguf.read_bytes(info), _checked_type(info), rows, cols)
                parts = (codes.codes, codes.scales, codes.zeros, codes.mins)
                for name, part in zip(self._hf_names(gguf_name, hf_name), parts, strict=True):
                    yield name, part if heads is None else unpermute_rotary_rows(part, heads)
                continue
            values = dequantize(self.gguf.read_bytes(info), _checked_type(info), dtype)
            values = values.reshape(info.torch_shape)
            if hf_name.endswith(".shared_expert_gate.weight") and values.dim() == 1:
                values = values.unsqueeze(0)  # llama.cpp may store the [1, H] gate as [H]
            if self.norm_offset and hf_name.endswith("norm.weight"):
                values = values - self.norm_offset
            yield hf_name, values if heads is None else unpermute_rotary_rows(values, heads)


_CODE_PARTS = ("codes", "code_scales", "code_zeros", "code_mins")


def _keeps_codes(info: GGUFTensorInfo, hf_name: str) -> bool:
    fused = ".qkv_proj." in hf_name or ".gate_up_proj." in hf_name
    return (info.ggml_type in QUANTIZED_TYPES and len(info.torch_shape) == 2 and hf_name.endswith(".weight")
            and not fused)


def load_gguf(path: pathlib.Path, *, dequantize_weights: bool = False) -> Checkpoint:
    """Open a ``.gguf`` file of a registered architecture, its block-quantized weights kept as codes unless
    ``dequantize_weights``; other architectures, unknown tensors and unsupported storage types raise
    ``ValueError`` naming them."""
    gguf = GGUFFile(path)
    try:
        spec = gguf_spec(gguf.metadata)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    moe = spec.model == "moe"
    dequantize_weights = dequantize_weights or moe  # the mixture-of-experts model holds dense weights only
    if int(gguf.metadata.get("split.count", 1)) > 1:
        raise ValueError(f"{path} is one part of a split GGUF model; merge the parts first "
                         "(llama-gguf-split --merge) and pass the merged file")
    config = gguf_hf_config(gguf)
    architecture = str(gguf.metadata.get("general.architecture"))
    interleaved = architecture in _INTERLEAVED_ROTARY
    names = []
    rotary_heads: dict[str, int] = {}
    layers: dict[str, LayerQuant] = {}
    packed: set[str] = set()
    for info in gguf.tensors.values():
        if info.name == ROPE_FREQS_TENSOR or info.name in LONGROPE_TENSORS:
            continue
        hf_name = hf_tensor_name(info.name, config["num_hidden_layers"], architecture, moe=moe)
        ggml_type = _checked_type(info)
        names.append((info.name, hf_name))
        if not dequantize_weights and _keeps_codes(info, hf_name):
            packed.add(info.name)
            layers[hf_name.removesuffix(".weight")] = layer_quant(ggml_type)
        if interleaved and ".attn_q." in info.name:
            rotary_heads[info.name] = config["num_attention_heads"]
        elif interleaved and ".attn_k." in info.name:
            rotary_heads[info.name] = config["num_key_value_heads"]
    quantization: QuantizationConfig = WeightOnlyQuantization("gguf", layers) if layers else UNQUANTIZED
    return Checkpoint(hf_config=config, local_path=path, format="gguf",
                      source=GGUFSource(gguf, tuple(names), rotary_heads, frozenset(packed),
                                        norm_offset=1.0 if architecture in _GEMMA else 0.0),
                      gguf_metadata=gguf.metadata, quantization=quantization)
