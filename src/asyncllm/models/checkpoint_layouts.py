"""Checkpoint layouts: other families' tensor names and packings, rewritten as Hugging Face Llama tensors.

``ArchitectureSpec.checkpoint_layout`` (copied into ``ModelConfig.checkpoint_layout``) names one of them;
``to_llama_names(config, weights)`` streams a checkpoint's tensors under the names the Llama definition
loads (``q/k/v_proj``, ``gate/up_proj``, ...), so the generic weight loader stays unaware of them.

- ``"llama"``: unchanged.
- ``"phi3"``: ``self_attn.qkv_proj`` is q, k and v stacked along the output rows; ``mlp.gate_up_proj`` is the
  gate then the up projection.
- ``"internlm2"``: ``model.tok_embeddings``, ``output``, ``attention_norm``, ``ffn_norm``, ``attention.wo``,
  ``feed_forward.w1`` (gate), ``w3`` (up), ``w2`` (down) and ``attention.wqkv``, whose rows are grouped per
  KV head: for each KV head its ``num_queries_per_kv`` query heads, then its key head, then its value head.

Packed tensors are split along their rows (dim 0), as dense weights and biases store them; a quantized
tensor of another shape is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from asyncllm.config import ModelConfig

Weights = Iterable[tuple[str, torch.Tensor]]

_INTERNLM2_NAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def to_llama_names(config: ModelConfig, weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` renamed and split into the Llama definition's checkpoint names (see the module docstring)."""
    layout = config.checkpoint_layout
    if layout == "llama":
        yield from weights
    elif layout == "phi3":
        yield from _phi3(config, weights)
    elif layout == "internlm2":
        yield from _internlm2(config, weights)
    else:
        raise ValueError(f"checkpoint_layout: unknown {layout!r}; known: 'llama', 'phi3', 'internlm2'")


def _split_rows(name: str, tensor: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    if tensor.dim() == 0 or tensor.shape[0] != sum(sizes):
        raise ValueError(f"{name}: {tuple(tensor.shape)} cannot be split into rows {sizes} "
                         "(only dense weights and biases of this layout can be loaded)")
    return tuple(part.contiguous() for part in torch.split(tensor, sizes, dim=0))


def _qkv_sizes(config: ModelConfig) -> list[int]:
    d = config.head_dim
    return [config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d]


def _phi3(config: ModelConfig, weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if ".self_attn.qkv_proj." in name:
            parts = _split_rows(name, tensor, _qkv_sizes(config))
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                yield name.replace(".qkv_proj.", f".{proj}."), part
        elif ".mlp.gate_up_proj." in name:
            inter = config.intermediate_size
            gate, up = _split_rows(name, tensor, [inter, inter])
            yield name.replace(".gate_up_proj.", ".gate_proj."), gate
            yield name.replace(".gate_up_proj.", ".up_proj."), up
        else:
            yield name, tensor


def _internlm2_wqkv(config: ModelConfig, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    kv_heads, groups, d = config.num_key_value_heads, config.num_queries_per_kv, config.head_dim
    rows = kv_heads * (groups + 2) * d
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (KV heads x (queries per KV + 2) x head_dim), "
                         f"got {tuple(tensor.shape)}")
    grouped = tensor.reshape(kv_heads, groups + 2, d, *tensor.shape[1:])
    rest = tuple(tensor.shape[1:])
    return {
        "q_proj": grouped[:, :groups].reshape(kv_heads * groups * d, *rest).contiguous(),
        "k_proj": grouped[:, groups].reshape(kv_heads * d, *rest).contiguous(),
        "v_proj": grouped[:, groups + 1].reshape(kv_heads * d, *rest).contiguous(),
    }


def _internlm2(config: ModelConfig, weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.startswith("model.tok_embeddings."):
            yield name.replace("model.tok_embeddings.", "model.embed_tokens.", 1), tensor
        elif name.startswith("output."):
            yield "lm_head." + name.removeprefix("output."), tensor
        elif ".attention.wqkv." in name:
            for proj, part in _internlm2_wqkv(config, name, tensor).items():
                yield name.replace(".attention.wqkv.", f".self_attn.{proj}."), part
        else:
            for old, new in _INTERNLM2_NAMES.items():
                if f".{old}." in name:
                    name = name.replace(f".{old}.", f".{new}.")
                    break
            yield name, tensor
