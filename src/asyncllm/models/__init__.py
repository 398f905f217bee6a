"""Model families built from ``layers/``, and the one constructor the runner calls."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import AttentionMetadata, KernelOps
from asyncllm.models.llama import LlamaForCausalLM


@runtime_checkable
class CausalLM(Protocol):
    """What the runner needs from a model.

    ``forward`` takes a flat varlen batch (``[T]`` int64 token ids and positions, laid out per ``meta``) and
    the per-layer paged caches ``(k_cache, v_cache)``, each ``[num_blocks, block_size, Hk, D]``, into which
    it writes this step's keys/values; it returns the final hidden states ``[T, H]``. ``compute_logits``
    maps ``[N, H]`` to float32 ``[N, V]``. ``load_weights`` takes Hugging Face-named tensors and raises
    ``ValueError`` naming any unexpected or missing parameter.
    """

    config: ModelConfig

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


_FAMILIES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def build_model(config: ModelConfig, ops: KernelOps, *, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Construct the model for ``config.architecture`` with uninitialised weights on ``device``.

    Construction allocates with ``torch.empty`` (no random init, nothing to gain from the ``meta`` device)
    and computes the rotary cache, so build directly on the target device; call ``load_weights`` next.
    """
    family = _FAMILIES.get(config.architecture)
    if family is None:
        raise ValueError(
            f"config.architecture: unsupported {config.architecture!r}; supported: {sorted(_FAMILIES)}"
        )
    return family(config, ops, dtype=dtype, device=torch.device(device))


__all__ = ["CausalLM", "LlamaForCausalLM", "build_model"]
