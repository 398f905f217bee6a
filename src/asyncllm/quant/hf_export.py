"""A loaded model's weights back under the checkpoint's Hugging Face names (merged linears split again).

``hf_tensors(model)`` returns ``(dense, linears)``: ``linears`` maps the Hugging Face module name of every
decoder linear (``model.layers.0.self_attn.q_proj``, ...) to its ``[N, K]`` weight, a merged module
(``qkv_proj``, ``gate_up_proj``) split into its shards by the model's ``packed_modules`` table; ``dense``
holds every other parameter (embeddings, norms, biases, an untied LM head) under its parameter name. Tied
LM heads are left out, as Hugging Face leaves them out. Every tensor is a new contiguous float tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from asyncllm.layers.linear import Linear, dense_weight
from asyncllm.layers.weights import ShardId


def _shard_names(packed_modules: Mapping[str, tuple[str, ShardId]]) -> dict[tuple[str, ShardId], str]:
    return {(merged, shard): name for name, (merged, shard) in packed_modules.items()}


def hf_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(dense, linears)`` of ``model`` (see the module docstring); a linear that is not dense raises
    ``ValueError``."""
    packed: Mapping[str, tuple[str, ShardId]] = getattr(model, "packed_modules", {})
    shard_names = _shard_names(packed)
    dense: dict[str, torch.Tensor] = {}
    linears: dict[str, torch.Tensor] = {}
    decoder = getattr(getattr(model, "model", None), "layers", None)
    decoder_modules = {id(m) for m in decoder.modules()} if decoder is not None else set()
    covered: set[int] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, Linear) or id(module) not in decoder_modules:
            continue
        weight = dense_weight(module)
        if weight is None:
            raise ValueError(f"{prefix}: not a dense linear; load the model with dequantize_weights=True")
        parent, _, leaf = prefix.rpartition(".")
        offset = 0
        for shard, size in zip(module.shard_ids, module.output_sizes, strict=True):
            name = prefix if shard is None else f"{parent}.{shard_names[(leaf, shard)]}"
            linears[name] = weight[offset:offset + size].float().contiguous()
            if module.bias is not None:
                dense[f"{name}.bias"] = module.bias[offset:offset + size].float().contiguous()
            offset += size
        covered.update(id(p) for p in module.parameters(recurse=False))
    lm_head = getattr(model, "lm_head", None)
    tied = bool(getattr(lm_head, "tied", False))
    for name, param in model.named_parameters():
        if id(param) in covered or (tied and name.startswith("lm_head.")):
            continue
        dense[name] = param.detach().float().contiguous()
    return dense, linears
