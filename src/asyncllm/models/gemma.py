"""The Gemma 2 / Gemma 3 (text) decoder over a flat varlen batch and paged KV cache.

Sandwich-normed blocks, every norm an RMSNorm scaled by ``1 + weight`` in float32::

    h = x + post_attention_norm(attn(input_norm(x)))
    out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))

with grouped-query attention scaled by ``query_pre_attn_scalar ** -0.5``, a GELU(tanh)-gated MLP, token
embeddings multiplied by ``sqrt(hidden_size)`` (rounded to the model dtype, as Hugging Face does) and an LM
head tied to them. Gemma 2 soft-caps attention scores (``attn_logit_softcapping``) and logits
(``final_logit_softcapping``); Gemma 3 normalises each head of q and k before rotary and rotates its sliding
layers with their own base (``rope_local_base_freq``, unscaled) and its global layers with ``rope_theta`` and
``rope_scaling``. The layers of ``config.sliding_layers`` attend to the last ``sliding_window`` positions only
(``AttentionOptions``, honoured by every kernel bundle); the others to the whole context.

Every layer runs as the modules below: none declares ``FusedLayerWeights`` (the fused CPU decode layer
computes a Llama block, not this one).

Tensor parallelism splits it as the Llama definition: QKV and gate/up column-wise per head / intermediate
feature, ``o_proj`` and ``down_proj`` row-wise (one all-reduce each), the embedding by vocabulary (the
all-reduced rows are scaled by ``sqrt(hidden_size)`` after the sum, as on one rank), the tied LM head by
vocabulary with the logits gathered before the final soft-capping. The four sandwich norms, the per-head
q/k norms and the rotary tables are replicated; sliding windows and attention soft-capping act per head, so
each rank applies them to its own heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels import AttentionMetadata, AttentionOptions, FusedLayerWeights, KernelOps, KVCache
from asyncllm.layers.embedding import VocabEmbedding
from asyncllm.layers.linear import MergedColumnLinear
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.models.llama import LlamaAttention, LlamaForCausalLM, _Build


class OnePlusRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``x / sqrt(mean(x**2) + eps) * (1 + weight)``, computed in float32 and cast back to the
    input's dtype (the checkpoint stores ``weight`` as the offset from one; ``1 + weight`` in float32 is
    formed once, after loading)."""

    scale: torch.Tensor

    def __init__(self, hidden_size: int, eps: float, ops: KernelOps, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(hidden_size, eps, ops, dtype=dtype, device=device)
        self.register_buffer("scale", torch.empty(hidden_size, dtype=torch.float32, device=device),
                             persistent=False)

    def process_weights_after_loading(self) -> None:
        with torch.no_grad():
            self.scale.copy_(1.0 + self.weight.float())

    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor:  # type: ignore[override]
        if residual is not None:
            raise ValueError("residual: this norm does not fuse the residual add")
        return self.ops.rms_norm(x.float(), self.scale, self.eps).to(x.dtype)


def _norm(build: _Build, size: int | None = None) -> OnePlusRMSNorm:
    config = build.config
    return OnePlusRMSNorm(size or config.hidden_size, config.rms_norm_eps, build.ops, dtype=build.dtype,
                          device=build.device)


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` for an input laid out ``[..., gate | up]`` (``[..., 2 I]`` -> ``[..., I]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def gemma_attention(build: _Build, rotary_emb: RotaryEmbedding, window: int | None, prefix: str) -> LlamaAttention:
    """Llama's attention block with Gemma's ``(1 + w)`` q/k norms (Gemma 3), ``query_pre_attn_scalar ** -0.5``
    scale, and the layer's sliding window and attention-logit soft-capping."""
    config = build.config
    scalar = config.query_pre_attn_scalar
    return LlamaAttention(build, rotary_emb, prefix, norm=lambda size: _norm(build, size),
                          scale=None if scalar is None else scalar**-0.5,
                          options=AttentionOptions(window=window, softcap=config.attn_logit_softcapping))


class GemmaMLP(nn.Module):
    def __init__(self, build: _Build, prefix: str) -> None:
        super().__init__()
        config = build.config
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(
            hidden, (inter, inter), bias=config.mlp_bias,
            method=build.quantization.linear_method(
                f"{prefix}.gate_up_proj", build.ops, shards=[f"{prefix}.gate_proj", f"{prefix}.up_proj"]
            ),
            dtype=build.dtype,
            device=build.device,
            parallel=build.parallel,
        )
        self.down_proj = build.linear(inter, hidden, bias=config.mlp_bias, prefix=f"{prefix}.down_proj", split="row")
        self.act_fn = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, build: _Build, rotary_emb: RotaryEmbedding, window: int | None, prefix: str) -> None:
        super().__init__()
        self.self_attn = gemma_attention(build, rotary_emb, window, f"{prefix}.self_attn")
        self.mlp = GemmaMLP(build, f"{prefix}.mlp")
        self.input_layernorm = _norm(build)
        self.post_attention_layernorm = _norm(build)
        self.pre_feedforward_layernorm = _norm(build)
        self.post_feedforward_layernorm = _norm(build)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), meta, kv_cache)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)

    def fused_weights(self) -> FusedLayerWeights | None:
        """Never fusable: the fused decode layer computes a Llama block (one norm before each half, SiLU)."""
        return None


class GemmaModel(nn.Module):
    def __init__(self, build: _Build) -> None:
        super().__init__()
        config, ops = build.config, build.ops
        self.ops = ops
        # the query heads this rank attends with (all of them on one rank): what the attention plan is for
        self.num_heads = config.num_attention_heads // build.parallel.size
        # sqrt(hidden) rounded to the model dtype, as Hugging Face multiplies it
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=build.dtype))
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, ops, dtype=build.dtype,
                                           device=build.device,
                                           quant=build.quantization.embedding_quant("model.embed_tokens"),
                                           parallel=build.parallel)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling, ops,
            device=build.device,
        )
        # Gemma 3's sliding layers rotate with their own (unscaled) base
        self.local_rotary_emb = None if config.rope_local_theta is None else RotaryEmbedding(
            config.head_dim, config.rope_local_theta, config.max_position_embeddings, None, ops, device=build.device,
        )
        layers = []
        for i in range(config.num_hidden_layers):
            window = config.layer_window(i)
            rotary = self.local_rotary_emb if window is not None and self.local_rotary_emb is not None \
                else self.rotary_emb
            layers.append(GemmaDecoderLayer(build, rotary, window, f"model.layers.{i}"))
        self.layers = nn.ModuleList(layers)
        self.norm = _norm(build)

    @property
    def max_positions(self) -> int:
        tables = [self.rotary_emb] + ([] if self.local_rotary_emb is None else [self.local_rotary_emb])
        return min(table.max_positions for table in tables)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVCache],
    ) -> torch.Tensor:
        meta = self.ops.plan_attention(meta, kv_caches[0], self.num_heads)
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * self.embed_scale
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, meta, kv_cache)
        return self.norm(hidden)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text causal LM: ``LlamaForCausalLM``'s construction, validation, LM head and weight
    loading over the Gemma decoder stack; ``compute_logits`` soft-caps by ``final_logit_softcapping`` when
    set."""

    definition: ClassVar[str] = "gemma"
    activation: ClassVar[str] = "gelu_tanh"
    norm_kind: ClassVar[str] = "rms_one_plus"

    def build_decoder(self, build: _Build) -> nn.Module:
        return GemmaModel(build)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden states -> ``[N, V]`` float32 logits, soft-capped when the config says so."""
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
