"""Tiny random Hugging Face Llama / Qwen2 directories stored in each weight-only quantized format.

``write_awq(dir)``, ``write_gptq(dir)`` and ``write_compressed_tensors(dir)`` build a random
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
vocab 256), quantize every decoder linear (q/k/v/o, gate/up/down) with min-max round-to-nearest, store it
the way the format's tools do (AWQ / GPTQ with the reference packers in ``_packers``, compressed-tensors
with the ``compressed_tensors`` package's compressor) into ``model.safetensors`` (or ``shards`` files with
an index) next to a ``config.json`` carrying the ``quantization_config``, and return the reference state
dict: Hugging Face names (``...q_proj.weight``) -> float32 tensors, every quantized weight dequantized
exactly (``(q - z) * s`` in float32, original column order) and every other tensor as stored. Load it
with ``model.load_state_dict`` into the same transformers class for a reference model. No tokenizer files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._packers import act_order_g_idx, pack_awq, pack_gptq, rtn

QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.2,
            tie_word_embeddings=False, rope_theta=10000.0)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def model_class(family: str) -> type:
    """The transformers ``*ForCausalLM`` class of ``family`` (``"llama"`` or ``"qwen2"``)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    classes = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    if family not in classes:
        raise ValueError(f"family: expected one of {sorted(classes)}, got {family!r}")
    return classes[family]


def tiny_model(family: str = "llama", *, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random tiny model of ``family``: (config.json dict, float32 state dict)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = model_class(family)
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**TINY)
    torch.manual_seed(seed)
    model = cls(config).eval()
    hf_config = config.to_dict()
    hf_config["architectures"] = [cls.__name__]
    return hf_config, {name: t.detach().clone() for name, t in model.state_dict().items()}


def quantized_prefix(name: str) -> str | None:
    """The module name of ``name`` when it is the weight of a decoder linear the writers quantize."""
    prefix = name.removesuffix(".weight")
    return prefix if name.endswith(".weight") and prefix.endswith(QUANTIZED_LINEARS) else None


def _exact(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    groups = g_idx.long()
    return (codes.float() - zeros.float()[:, groups]) * scales.float()[:, groups]


def _save(directory: Path, hf_config: dict[str, Any], quantization_config: dict[str, Any],
          tensors: dict[str, torch.Tensor], dtype: torch.dtype, shards: int) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**hf_config, "quantization_config": quantization_config, "torch_dtype": _DTYPE_NAMES[dtype],
              "dtype": _DTYPE_NAMES[dtype]}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    # Round-robin over the names: every quantized module's parts land in different shard files.
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[index::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def write_awq(directory: Path, family: str = "llama", group_size: int | None = 32, *, seed: int = 0,
              shards: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """An AutoAWQ GEMM checkpoint (4-bit, asymmetric; ``group_size`` ``None`` = channel-wise, stored as -1)."""
    hf_config, state = tiny_model(family, seed=seed)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, weight in state.items():
        prefix = quantized_prefix(name)
        if prefix is None:
            tensors[name] = weight.to(dtype)
            reference[name] = tensors[name].float()
            continue
        g = group_size or weight.shape[1]
        codes, zeros, scales = rtn(weight, 4, g, symmetric=False)
        tensors.update({f"{prefix}.{part}": t for part, t in pack_awq(codes, zeros, scales).items()})
        reference[name] = _exact(codes, zeros, scales, torch.arange(weight.shape[1]) // g)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size or -1, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}
    _save(directory, hf_config, config, tensors, dtype, shards)
    return reference


def _shared_input(prefix: str) -> str:
    """Linears reading the same input share a key: ``...self_attn.qkv``, ``...mlp.gate_up``, else themselves."""
    for members, key in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"), "gate_up")):
        head, _, last = prefix.rpartition(".")
        if last in members:
            return f"{head}.{key}"
    return prefix


def write_gptq(directory: Path, family: str = "llama", bits: int = 4, group_size: int | None = 32, *,
               sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq", seed: int = 0,
               shards: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """An AutoGPTQ-layout checkpoint. ``desc_act`` shuffles the groups over the input channels (``g_idx``)
    as act-order does: one order per input, shared by the linears that read it (q/k/v, gate/up), since
    act-order sorts channels by the input's Hessian; ``checkpoint_format`` ``"gptq"`` stores zero points minus
    one (so the asymmetric quantizer keeps zero points >= 1, which that format can store) or ``"gptq_v2"`` as
    they are."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    hf_config, state = tiny_model(family, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    for name, weight in state.items():
        prefix = quantized_prefix(name)
        if prefix is None:
            tensors[name] = weight.to(dtype)
            reference[name] = tensors[name].float()
            continue
        k = weight.shape[1]
        g = group_size or k
        if desc_act:
            shared = _shared_input(prefix)
            if shared not in orders:
                orders[shared] = act_order_g_idx(k, g, gen)
            g_idx = orders[shared]
        else:
            g_idx = torch.arange(k) // g
        min_zero = 1 if checkpoint_format == "gptq" and not sym else 0
        codes, zeros, scales = rtn(weight, bits, g, symmetric=sym, g_idx=g_idx, min_zero=min_zero)
        packed = pack_gptq(codes, zeros, scales, g_idx, bits, v2=checkpoint_format == "gptq_v2")
        tensors.update({f"{prefix}.{part}": t for part, t in packed.items()})
        reference[name] = _exact(codes, zeros, scales, g_idx)
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": desc_act,
              "sym": sym, "checkpoint_format": checkpoint_format, "damp_percent": 0.01, "static_groups": False,
              "true_sequential": True, "lm_head": False}
    _save(directory, hf_config, config, tensors, dtype, shards)
    return reference


def write_compressed_tensors(directory: Path, family: str = "llama", bits: int = 4, group_size: int | None = 32,
                             *, symmetric: bool = True, fmt: str = "pack-quantized", seed: int = 0,
                             shards: int = 1, dtype: torch.dtype = torch.bfloat16,
                             groups: Sequence[tuple[str, int, int | None, bool]] = ()) -> dict[str, torch.Tensor]:
    """A compressed-tensors checkpoint written by the package's own compressor (``fmt``
    ``"pack-quantized"`` or ``"naive-quantized"``; ``group_size`` ``None`` = the channel strategy),
    with ``lm_head`` ignored, as llm-compressor's W4A16 / W8A16 recipes do. ``groups``: one config group
    per ``(regex, bits, group_size, symmetric)``, each quantizing the decoder linears whose name the regex
    matches (from the start, as the package does) with its own settings, instead of one ``Linear`` group."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationConfig

    from ._ct import compress, decompress, scheme

    schemes = [(f"re:{regex}", scheme(b, g, sym)) for regex, b, g, sym in groups]
    for target, ct_scheme in schemes:
        ct_scheme.targets = [target]
    if not schemes:
        schemes = [("Linear", scheme(bits, group_size, symmetric))]
    hf_config, state = tiny_model(family, seed=seed)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, weight in state.items():
        prefix = quantized_prefix(name)
        if prefix is None:
            tensors[name] = weight.to(dtype)
            reference[name] = tensors[name].float()
            continue
        matching = [s for target, s in schemes if target == "Linear" or re.match(target[3:], prefix)]
        if len(matching) != 1:
            raise ValueError(f"{prefix}: matched by {len(matching)} of the groups")
        parts = compress(weight.to(dtype), matching[0], fmt)
        tensors.update({f"{prefix}.{part}": t for part, t in parts.items()})
        # The package's dequantization with float32 scales: (q - zp) * s, exact.
        reference[name] = decompress({**parts, "weight_scale": parts["weight_scale"].float()}, matching[0], fmt)
    config_groups = {f"group_{i}": s for i, (_, s) in enumerate(schemes)}
    dump = QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed",
                              ignore=["lm_head"]).model_dump(exclude={"quant_method"})
    config = {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {},
              "transform_config": {}, **dump}
    _save(directory, hf_config, config, tensors, dtype, shards)
    return reference
