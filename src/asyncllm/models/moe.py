"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE): the Llama-family decoder with sparse
MLP blocks.

Attention (with Qwen3-MoE's per-head q/k norms when ``qk_norm``), norms, embeddings and the dense MLP are the
Llama definition's; in the layers listed by ``ModelConfig.moe.sparse_layers`` the MLP is a ``SparseMoeBlock``:
a router (``gate``, ``[E, H]``) picks each token's top-k experts (``kernels.moe.select_experts``), the bundle's
``moe`` op runs them over stacked expert weights, and an optional shared expert is added, scaled by
``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE) or as is (DeepSeek-MoE's ``mlp.shared_experts``, its shared
experts fused into one MLP, loaded as ``mlp.shared_expert``; ``MoeConfig.shared_expert_gated``). Sparse layers
are never fusable: they declare no ``FusedLayerWeights``.

Tensor parallelism: attention, dense layers, embedding and LM head split as the Llama definition's. In a
sparse block the router is replicated (every rank routes every token the same way), every routed expert is
split by its intermediate features (gate/up column-wise, down row-wise: each rank a slice of every expert,
``layers.moe``), the shared expert the same way, and the block all-reduces once: the routed experts' partial
sum plus the shared expert's partial output, which the shared gate scales on every rank first. That is exact:
the gate ``sigmoid(shared_expert_gate(x))`` is computed from the replicated input, so it is the same factor
on every rank and ``sum_r g * y_r = g * sum_r y_r``.

Checkpoints name experts either one tensor per expert and projection (``mlp.experts.{e}.gate_proj`` /
``up_proj`` / ``down_proj``; Mixtral's ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``), as files on the
hub do, or stacked (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``),
as the in-memory modules of recent ``transformers`` do, or stacked per projection (``mlp.experts.gate_proj`` /
``up_proj`` ``.weight`` ``[E, I, H]``, ``down_proj.weight`` ``[E, H, I]``), as GGUF files do; all load into the
same stacked parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from asyncllm.config import ModelConfig
from asyncllm.distributed.parallel_state import SINGLE, TensorParallel
from asyncllm.kernels import FusedLayerWeights, KernelOps
from asyncllm.kernels.moe import select_experts
from asyncllm.layers.moe import FusedMoE
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.layers.weights import ShardId
from asyncllm.models.llama import (
    _IGNORED_SUFFIXES,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    _Build,
    llama_decoder_layer,
)
from asyncllm.models.weight_loader import load_named_weights
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj|gate_proj|up_proj)(?:\.weight)?$")


class SparseMoeBlock(nn.Module):
    """Router, routed experts and the optional shared expert of one sparse layer (see the module docstring)."""

    def __init__(self, build: _Build, prefix: str) -> None:
        super().__init__()
        config = build.config
        moe = config.moe
        if moe is None:
            raise ValueError(f"config: architecture {config.architecture!r} has no mixture-of-experts settings")
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.gate = build.linear(config.hidden_size, moe.num_experts, bias=False, prefix=f"{prefix}.gate")
        self.parallel = build.parallel
        self.experts = FusedMoE(moe.num_experts, config.hidden_size, moe.intermediate_size, build.ops,
                                dtype=build.dtype, device=build.device, parallel=build.parallel)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: nn.Module | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(build, f"{prefix}.shared_expert", moe.shared_expert_intermediate_size)
            if moe.shared_expert_gated:
                self.shared_expert_gate = build.linear(config.hidden_size, 1, bias=False,
                                                       prefix=f"{prefix}.shared_expert_gate")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_weights [T, K] float32, topk_ids [T, K] int64)`` for hidden states ``x`` ``[T, H]``."""
        return select_experts(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        # under tensor parallelism both terms are this rank's partial sums; one all-reduce adds them up
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert.forward_unreduced(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return self.parallel.all_reduce(out)


class MoeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose MLP is a ``SparseMoeBlock``."""

    def __init__(self, build: _Build, rotary_emb: RotaryEmbedding, prefix: str) -> None:
        super().__init__(build, rotary_emb, prefix)
        self.mlp = SparseMoeBlock(build, f"{prefix}.mlp")  # type: ignore[assignment]

    def fused_weights(self) -> FusedLayerWeights | None:
        return None


def moe_decoder_layer(build: _Build, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
    moe = build.config.moe
    if moe is None or index not in moe.sparse_layers:
        return llama_decoder_layer(build, rotary_emb, index)
    return MoeDecoderLayer(build, rotary_emb, f"model.layers.{index}")


def canonical_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with expert names in one form: Mixtral's ``block_sparse_moe`` / ``w1 w3 w2`` as
    ``mlp`` / ``gate_proj up_proj down_proj``, DeepSeek-MoE's ``mlp.shared_experts`` as ``mlp.shared_expert``,
    and stacked expert tensors (``gate_up_proj``, or GGUF's separate
    ``gate_proj`` / ``up_proj`` ``[E, I, H]``; ``down_proj`` ``[E, H, I]``) split into per-expert ones."""
    for name, tensor in weights:
        if ".mlp.shared_experts." in name:
            name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        if ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            parts = name.split(".")
            if len(parts) >= 3 and parts[-3].isdigit() and parts[-2] in _MIXTRAL_EXPERT:
                parts[-2] = _MIXTRAL_EXPERT[parts[-2]]
                name = ".".join(parts)
        stacked = _STACKED.match(name)
        if stacked is None:
            yield name, tensor
            continue
        base, kind = stacked.groups()
        for expert, weight in enumerate(tensor.unbind(0)):
            if kind != "gate_up_proj":
                yield f"{base}.{expert}.{kind}.weight", weight
            else:
                gate, up = weight.chunk(2, dim=0)
                yield f"{base}.{expert}.gate_proj.weight", gate
                yield f"{base}.{expert}.up_proj.weight", up


def _route(name: str) -> tuple[str, ShardId] | None:
    match = _PER_EXPERT.match(name)
    if match is None:
        return None
    base, expert, proj = match.groups()
    if proj == "down_proj":
        return f"{base}.down.weight", f"{expert}.down"
    return f"{base}.gate_up.weight", f"{expert}.{proj.removesuffix('_proj')}"


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family causal LM with sparse MoE layers (``config.moe`` must be set)."""

    make_layer: ClassVar = staticmethod(moe_decoder_layer)

    def __init__(
        self,
        config: ModelConfig,
        ops: KernelOps,
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantization: QuantizationConfig = UNQUANTIZED,
        parallel: TensorParallel = SINGLE,
    ) -> None:
        if config.moe is None:
            raise ValueError(f"config: architecture {config.architecture!r} has no mixture-of-experts settings")
        if quantization != UNQUANTIZED:
            raise ValueError("quantization: mixture-of-experts models load dense weights only")
        super().__init__(config, ops, dtype=dtype, device=device, quantization=quantization, parallel=parallel)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """``LlamaForCausalLM.load_weights`` with expert tensors per expert or stacked (module docstring)."""
        tied = self.lm_head.tied

        def skip(name: str) -> bool:
            return name.endswith(_IGNORED_SUFFIXES) or (tied and name.startswith("lm_head."))

        load_named_weights(self, canonical_weights(weights), self.packed_modules, skip=skip, route=_route)
        if tied:
            self.lm_head.tie_to(self.model.embed_tokens)
