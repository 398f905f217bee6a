"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2/3, Phi-3, InternLM2) over a flat varlen batch
and paged KV cache.

Pre-norm blocks: ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` with grouped-query attention, rotary
positions, a SiLU-gated MLP and RMSNorm. Families differ only in the flags of their ``ModelConfig``
(``qkv_bias``, ``o_proj_bias``, ``mlp_bias``, tied embeddings, ``qk_norm``: an RMSNorm over each head of q
and k before rotary, ``checkpoint_layout``: how the checkpoint names its tensors; see
``asyncllm.architectures``). Sliding-window
attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is not applied: every token attends to its whole
context, which matches those models up to the window length.

This is the one definition of the math: every faster way to run it sits in the kernel bundle. Per step the
bundle may plan attention once (``plan_attention``), and a bundle with the ``fused_decode`` capability runs
the layers that declare themselves fusable (``LlamaDecoderLayer.fused_weights``) as one call each in decode
steps it accepts; every other layer, and every other step, runs the modules below.

Tensor parallelism (``parallel`` with more than one rank; this definition and the Gemma and
mixture-of-experts ones built on it support it): the QKV and
gate/up projections are column-split (each rank its heads, key/value heads replicated when there are
fewer than ranks), ``o_proj`` and ``down_proj`` row-split with one all-reduce each, the embedding and LM
head split by vocabulary. Norms and rotary are replicated. The fused decode layer is not used (its
single call has no all-reduce between attention and MLP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from asyncllm.config import ModelConfig
from asyncllm.distributed.parallel_state import SINGLE, TensorParallel
from asyncllm.kernels import AttentionMetadata, AttentionOptions, FusedLayerWeights, KernelOps, KVCache
from asyncllm.kernels.bundle import FusedDecodeBinding, FusedDecodeStep
from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.embedding import LMHead, VocabEmbedding
from asyncllm.layers.linear import Linear, MergedColumnLinear, QKVLinear, Split, dense_weight
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.layers.weights import ShardId
from asyncllm.models.checkpoint_layouts import to_llama_names
from asyncllm.models.weight_loader import load_named_weights
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig
from asyncllm.quant.packed_linear import packed_weight

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Build:
    """What every module of one model is built with."""

    config: ModelConfig
    ops: KernelOps
    quantization: QuantizationConfig
    dtype: torch.dtype
    device: torch.device
    parallel: TensorParallel = SINGLE

    def linear(self, input_size: int, output_size: int, *, bias: bool, prefix: str, split: Split | None = None
               ) -> Linear:
        """A plain linear; ``split`` (``"row"`` / ``"column"``) shards it over ``parallel``'s ranks."""
        method = self.quantization.linear_method(prefix, self.ops)
        return Linear(input_size, output_size, bias=bias, method=method, dtype=self.dtype, device=self.device,
                      parallel=self.parallel, split=split)

    def norm(self, size: int | None = None) -> RMSNorm:
        config = self.config
        return RMSNorm(size or config.hidden_size, config.rms_norm_eps, self.ops, dtype=self.dtype,
                       device=self.device)


class LlamaAttention(nn.Module):
    """Fused QKV -> optional per-head q/k norms (``config.qk_norm``) -> rotary -> paged attention -> output
    projection. ``norm`` makes the q/k norms (default ``build.norm``); ``scale`` (default ``head_dim ** -0.5``)
    and ``options`` (sliding window, soft-capping) go to ``PagedAttention``."""

    def __init__(self, build: _Build, rotary_emb: RotaryEmbedding, prefix: str, *,
                 norm: Callable[[int], nn.Module] | None = None, scale: float | None = None,
                 options: AttentionOptions | None = None) -> None:
        super().__init__()
        config = build.config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size, head_dim, heads, kv_heads, bias=config.qkv_bias,
            method=build.quantization.linear_method(
                f"{prefix}.qkv_proj", build.ops, shards=[f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")]
            ),
            dtype=build.dtype,
            device=build.device,
            parallel=build.parallel,
        )
        self.o_proj = build.linear(heads * head_dim, config.hidden_size, bias=config.o_proj_bias,
                                   prefix=f"{prefix}.o_proj", split="row")
        make_norm = norm or build.norm
        self.q_norm = make_norm(head_dim) if config.qk_norm else None
        self.k_norm = make_norm(head_dim) if config.qk_norm else None
        self.rotary_emb = rotary_emb
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, build.ops,
                                   scale=scale, options=options)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta, kv_cache)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, build: _Build, prefix: str, intermediate_size: int | None = None) -> None:
        super().__init__()
        config = build.config
        hidden, inter = config.hidden_size, intermediate_size or config.intermediate_size
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
        self.act_fn = SiluAndMul(build.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))

    def forward_unreduced(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``forward(x)`` before ``down_proj``'s all-reduce (``Linear.forward_unreduced``):
        summed over the ranks it is ``forward(x)``."""
        return self.down_proj.forward_unreduced(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, build: _Build, rotary_emb: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(build, rotary_emb, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(build, f"{prefix}.mlp")
        self.input_layernorm = build.norm()
        self.post_attention_layernorm = build.norm()

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(block output, residual stream)``; their sum is this layer's output in HF terms."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def fused_weights(self) -> FusedLayerWeights | None:
        """This layer as a fused decode kernel reads it, or ``None`` when it computes anything the fused layer
        does not: a module beyond the standard ones (e.g. q/k norms), a linear neither dense nor packed
        (another linear method, or packed with an input permutation),
        partial rotary, another activation, two different norm epsilons, or a tensor-parallel split (the
        fused layer has no all-reduce)."""
        attn, mlp = self.self_attn, self.mlp
        if attn.o_proj.parallel.is_parallel or mlp.down_proj.parallel.is_parallel:
            return None
        standard = (self, attn, mlp, self.input_layernorm, self.post_attention_layernorm, attn.qkv_proj,
                    attn.o_proj, attn.rotary_emb, attn.attn, mlp.gate_up_proj, mlp.down_proj, mlp.act_fn)
        known = {id(module) for module in standard}
        if any(id(module) not in known for module in self.modules()):
            return None
        qkv, o, gate_up, down = (dense_weight(m) if packed_weight(m) is None else packed_weight(m)
                                 for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        if type(mlp.act_fn) is not SiluAndMul or attn.rotary_emb.cos_sin_cache.shape[-1] != attn.qkv_proj.head_dim:
            return None
        if self.input_layernorm.eps != self.post_attention_layernorm.eps:
            return None
        return FusedLayerWeights(
            input_norm=self.input_layernorm.weight, post_norm=self.post_attention_layernorm.weight,
            eps=self.input_layernorm.eps, qkv=qkv, qkv_bias=attn.qkv_proj.bias, o=o, o_bias=attn.o_proj.bias,
            gate_up=gate_up, gate_up_bias=mlp.gate_up_proj.bias, down=down, down_bias=mlp.down_proj.bias,
            num_heads=attn.qkv_proj.num_heads, num_kv_heads=attn.qkv_proj.num_kv_heads,
            head_dim=attn.qkv_proj.head_dim, scale=attn.attn.scale,
        )


DecoderLayerFactory = Callable[[_Build, RotaryEmbedding, int], nn.Module]
"""``(build, shared rotary embedding, layer index) -> decoder layer`` with ``LlamaDecoderLayer``'s forward."""


def llama_decoder_layer(build: _Build, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
    return LlamaDecoderLayer(build, rotary_emb, f"model.layers.{index}")


class LlamaModel(nn.Module):
    def __init__(self, build: _Build, make_layer: DecoderLayerFactory = llama_decoder_layer) -> None:
        super().__init__()
        config, ops = build.config, build.ops
        self.ops = ops
        # the query heads this rank attends with (all of them on one rank): what the attention plan is for
        self.num_heads = config.num_attention_heads // build.parallel.size
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, ops, dtype=build.dtype,
                                           device=build.device,
                                           quant=build.quantization.embedding_quant("model.embed_tokens"),
                                           parallel=build.parallel)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling, ops,
            device=build.device, mrope_section=config.mrope_section,
        )
        self.layers = nn.ModuleList(make_layer(build, self.rotary_emb, i) for i in range(config.num_hidden_layers))
        self.norm = build.norm()
        self._fused: FusedDecodeBinding | None = None
        self._fused_bound = False

    @property
    def max_positions(self) -> int:
        return self.rotary_emb.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds`` ``[T, H]``: the embedded tokens to run instead of ``embed_tokens(input_ids)``."""
        meta = self.ops.plan_attention(meta, kv_caches[0], self.num_heads)
        # [3, T] (M-RoPE) positions rotate in the layers; the fused decode step reads 1-D positions only
        fused = self._fused_step(positions, meta, kv_caches) if meta.is_decode_only and positions.dim() == 1 else None
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual: torch.Tensor | None = None
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if fused is not None and fused.covers(index):
                stream = hidden if residual is None else hidden.add_(residual)
                fused.run(index, stream, kv_cache)
                hidden, residual = stream, None
            else:
                hidden, residual = layer(positions, hidden, residual, meta, kv_cache)
        if residual is None:
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _fused_step(
        self, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVCache]
    ) -> FusedDecodeStep | None:
        """The bundle's fused decode state for this step, binding the fusable layers at the first decode
        step (after the weights are loaded and laid out)."""
        if self.ops.fused_decode is None:
            return None
        if not self._fused_bound:
            self._fused_bound = True
            self._fused = self.ops.fused_decode.bind([layer.fused_weights() for layer in self.layers])
        if self._fused is None:
            return None
        return self._fused.begin(positions, self.rotary_emb.cos_sin_cache, meta, kv_caches)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM: ``forward`` -> final hidden states, ``compute_logits`` -> float32 logits.

    Parameters are created uninitialised on ``device`` in ``dtype`` and must be filled by ``load_weights``
    (Hugging Face parameter names) before use; weights are loaded once and never moved afterwards (kernel
    bundles may bind their addresses). ``max_positions`` is the length of the rotary cache: every position
    passed to ``forward`` must be below it. ``parallel``: this process's rank of a tensor-parallel group
    (see the module docstring); its ``compute_logits`` still returns the full vocabulary's logits.
    """

    make_layer: ClassVar[DecoderLayerFactory] = staticmethod(llama_decoder_layer)
    definition: ClassVar[str] = "llama"
    """The model definition's name (``ArchitectureSpec.model``) and, next, the config flags it implements."""
    tensor_parallel: ClassVar[bool] = True
    """Whether this definition splits over more than one rank (a subclass that adds modules the split does
    not cover sets it ``False``)."""
    activation: ClassVar[str] = "silu"
    norm_kind: ClassVar[str] = "rms"
    packed_modules: ClassVar[Mapping[str, tuple[str, ShardId]]] = MappingProxyType({
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    })

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
        super().__init__()
        if parallel.is_parallel and not self.tensor_parallel:
            raise ValueError(f"tensor_parallel_size: the {self.definition} model definition (architecture "
                             f"{config.architecture!r}) runs on one rank only")
        if config.hidden_act != self.activation or config.norm != self.norm_kind:
            raise ValueError(
                f"config: the {self.definition} model definition has no {config.hidden_act!r} activation or "
                f"{config.norm!r} norm (architecture {config.architecture!r})"
            )
        self.config = config
        self.ops = ops
        self.quantization_name = quantization.name
        self.model = self.build_decoder(_Build(config, ops, quantization, dtype, torch.device(device), parallel))
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied_to, ops=ops, dtype=dtype,
                              device=device, quant=quantization.embedding_quant("lm_head"), parallel=parallel)

    def build_decoder(self, build: _Build) -> nn.Module:
        """The decoder stack (embedding, layers, final norm) that ``forward`` runs; a family with other
        layers overrides it and keeps the rest of this class (validation, LM head, weight loading)."""
        return LlamaModel(build, self.make_layer)

    @property
    def max_positions(self) -> int:
        return int(self.model.max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` int64 (flat varlen batch laid out per ``meta``) -> ``[T, H]``.

        ``kv_caches[i]`` is layer ``i``'s ``KVCache``; this step's keys and values are written into it at
        ``meta.slot_mapping``.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected a 1-D [T] tensor, got shape {tuple(input_ids.shape)}")
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"positions: shape {tuple(positions.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if meta.slot_mapping.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"meta.slot_mapping: has {meta.slot_mapping.shape[0]} entries for {input_ids.shape[0]} tokens"
            )
        if len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(f"kv_caches: expected {self.config.num_hidden_layers} caches, got {len(kv_caches)}")
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden states -> ``[N, V]`` float32 logits."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden: last dim must be {self.config.hidden_size}, got {hidden.shape[-1]}")
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from Hugging Face-named tensors (``models.weight_loader``), then lay them out.

        ``q/k/v_proj`` and ``gate/up_proj`` load as shards of the merged ``qkv_proj`` / ``gate_up_proj``;
        ``*.rotary_emb.inv_freq`` is skipped; with tied embeddings ``lm_head.weight`` may be absent and,
        if present, is ignored (the embedding is the tied tensor, as in Hugging Face). Unexpected or
        missing names and wrong shapes raise ``ValueError`` naming them. Checkpoints of another
        ``config.checkpoint_layout`` (Phi-3's fused projections, InternLM2's names) are first rewritten to
        these names (``models.checkpoint_layouts``).
        """
        tied = self.lm_head.tied

        def skip(name: str) -> bool:
            return name.endswith(_IGNORED_SUFFIXES) or (tied and name.startswith("lm_head."))

        load_named_weights(self, to_llama_names(self.config, weights), self.packed_modules, skip=skip)
        if tied:
            self.lm_head.tie_to(self.model.embed_tokens)
