"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) over a flat varlen batch and paged KV cache.

Pre-norm blocks: ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` with grouped-query attention, rotary
positions, a SiLU-gated MLP and RMSNorm. Qwen2 is the same graph with a bias on q/k/v (``attention_bias``)
and none on ``o_proj``. Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is not
applied: every token attends to its whole context, which matches those models up to the window length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, AttentionMetadata, KernelOps
from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.embedding import LMHead, VocabEmbedding
from asyncllm.layers.linear import Linear, MergedColumnLinear, QKVLinear
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.layers.weights import ShardId, WeightLoading, empty_k_major_parameter, load_unsharded
from asyncllm.models.llama_decode import LlamaCpuDecoder, use_k_major_weights

KVCache = tuple[torch.Tensor, torch.Tensor]

# Checkpoint module name -> (our merged module name, shard id).
_STACKED: dict[str, tuple[str, ShardId]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_UNSTACKED: dict[tuple[str, ShardId], str] = {merged: hf for hf, merged in _STACKED.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ops: KernelOps,
        rotary_emb: RotaryEmbedding,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size, head_dim, heads, kv_heads,
            bias=config.attention_bias, dtype=dtype, device=device, matmul=ops.linear,
        )
        o_bias = config.attention_bias and config.architecture != "qwen2"
        self.o_proj = Linear(
            heads * head_dim, config.hidden_size, bias=o_bias, dtype=dtype, device=device, matmul=ops.linear
        )
        self.rotary_emb = rotary_emb
        self.attn = PagedAttention(heads, kv_heads, head_dim, ops)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta, kv_cache)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(
        self, config: ModelConfig, ops: KernelOps, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(
            hidden, (inter, inter), bias=config.mlp_bias, dtype=dtype, device=device, matmul=ops.linear
        )
        self.down_proj = Linear(
            inter, hidden, bias=config.mlp_bias, dtype=dtype, device=device, matmul=ops.linear
        )
        self.act_fn = SiluAndMul(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ops: KernelOps,
        rotary_emb: RotaryEmbedding,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, ops, rotary_emb, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, ops, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype=dtype, device=device)

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


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, ops: KernelOps, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            config.rope_scaling,
            ops,
            device=device,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ops, self.rotary_emb, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype=dtype, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, meta, kv_cache)
        if residual is None:
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM: ``forward`` -> final hidden states, ``compute_logits`` -> float32 logits.

    Parameters are created uninitialised on ``device`` in ``dtype`` and must be filled by ``load_weights``
    (Hugging Face parameter names) before use. ``max_positions`` is the length of the rotary cache: every
    position passed to ``forward`` must be below it.
    """

    def __init__(
        self, config: ModelConfig, ops: KernelOps, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        if config.architecture not in ("llama", "qwen2"):
            raise ValueError(f"config.architecture: expected 'llama' or 'qwen2', got {config.architecture!r}")
        self.config = config
        self.ops = ops
        self.model = LlamaModel(config, ops, dtype=dtype, device=device)
        # The flat CPU decode loop: built at the first step that needs it (after the weights are loaded in
        # place). Its split GEMVs want K-major weights, laid out here before the head ties to the embedding.
        self._cpu_decode_enabled = ops is CPU_OPS and torch.device(device).type == "cpu"
        k_major = self._cpu_decode_enabled and dtype == torch.float32
        if k_major:
            use_k_major_weights(self.model)
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, tied_to=tied_to, dtype=dtype, device=device, matmul=ops.linear
        )
        if k_major and tied_to is None:
            self.lm_head.weight = empty_k_major_parameter(
                config.vocab_size, config.hidden_size, dtype=dtype, device=device
            )
        self._cpu_decoder: LlamaCpuDecoder | None = None

    @property
    def max_positions(self) -> int:
        return self.model.rotary_emb.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` int64 (flat varlen batch laid out per ``meta``) -> ``[T, H]``.

        ``kv_caches[i]`` is layer ``i``'s ``(k_cache, v_cache)``; this step's keys and values are written
        into them at ``meta.slot_mapping``.
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
            raise ValueError(
                f"kv_caches: expected {self.config.num_hidden_layers} (k, v) pairs, got {len(kv_caches)}"
            )
        decoder = self._decoder() if meta.is_decode_only else None
        if decoder is not None and decoder.accepts(input_ids, meta, kv_caches):
            return decoder.forward(input_ids, positions, meta, kv_caches)
        return self.model(input_ids, positions, meta, kv_caches)

    def _decoder(self) -> LlamaCpuDecoder | None:
        """The flat decode loop when this model runs the CPU kernel bundle on CPU and fits it, else None."""
        if not self._cpu_decode_enabled:
            return None
        if self._cpu_decoder is None:
            if not LlamaCpuDecoder.supports(self.model, self.lm_head):
                self._cpu_decode_enabled = False
                return None
            self._cpu_decoder = LlamaCpuDecoder(self.model, self.lm_head)
        return self._cpu_decoder

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden states -> ``[N, V]`` float32 logits."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden: last dim must be {self.config.hidden_size}, got {hidden.shape[-1]}")
        decoder = self._decoder() if hidden.device.type == "cpu" and hidden.dim() == 2 else None
        if decoder is not None:
            return decoder.logits(hidden)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from Hugging Face-named tensors through its module's ``weight_loader``.

        ``q/k/v_proj`` and ``gate/up_proj`` load as shards of the merged ``qkv_proj`` / ``gate_up_proj``;
        ``*.rotary_emb.inv_freq`` is skipped; with tied embeddings ``lm_head.weight`` may be absent and,
        if present, is ignored (the embedding is the tied tensor, as in Hugging Face). After consuming
        ``weights``, raises ``ValueError`` listing every unexpected name and every missing one (in
        checkpoint names); a tensor of the wrong shape raises ``ValueError`` naming it.
        """
        owners = self._parameter_owners()
        loaded: set[tuple[str, ShardId]] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.lm_head.tied and name == "lm_head.weight"):
                continue
            target, shard_id = _to_param_name(name)
            owner = owners.get(target)
            if owner is None:
                unexpected.append(name)
                continue
            module, param = owner
            try:
                if isinstance(module, WeightLoading):
                    module.weight_loader(param, tensor, shard_id)
                else:
                    load_unsharded(param, tensor, shard_id)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
            loaded.add((target, shard_id))
        missing = [
            _to_checkpoint_name(target, shard_id)
            for target, (module, _) in owners.items()
            for shard_id in (module.shard_ids if isinstance(module, WeightLoading) else (None,))
            if (target, shard_id) not in loaded
        ]
        if unexpected or missing:
            raise ValueError(
                f"load_weights: unexpected parameters {sorted(unexpected)}; "
                f"missing parameters {sorted(missing)}"
            )

    def _parameter_owners(self) -> dict[str, tuple[nn.Module, nn.Parameter]]:
        """Each distinct parameter's full name -> (owning module, parameter); a tied tensor appears once."""
        owners: dict[str, tuple[nn.Module, nn.Parameter]] = {}
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                owners[f"{module_name}.{param_name}" if module_name else param_name] = (module, param)
        return owners


def _to_param_name(checkpoint_name: str) -> tuple[str, ShardId]:
    parts = checkpoint_name.split(".")
    for i, part in enumerate(parts[:-1]):
        stacked = _STACKED.get(part)
        if stacked is not None:
            parts[i] = stacked[0]
            return ".".join(parts), stacked[1]
    return checkpoint_name, None


def _to_checkpoint_name(param_name: str, shard_id: ShardId) -> str:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        original = _UNSTACKED.get((part, shard_id))
        if original is not None:
            parts[i] = original
            return ".".join(parts)
    return param_name
