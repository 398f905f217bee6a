"""Model families built from ``layers/``, and the one constructor the runner calls."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from asyncllm.architectures import spec_named
from asyncllm.config import ModelConfig
from asyncllm.distributed.parallel_state import SINGLE, TensorParallel
from asyncllm.kernels import AttentionMetadata, KernelOps, KVCache
from asyncllm.models.gemma import GemmaForCausalLM
from asyncllm.models.llama import LlamaForCausalLM
from asyncllm.models.llava import LlavaForConditionalGeneration
from asyncllm.models.llava_next import LlavaNextForConditionalGeneration
from asyncllm.models.moe import MoeForCausalLM
from asyncllm.models.qwen2_vl import Qwen2VLForConditionalGeneration
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig


@runtime_checkable
class CausalLM(Protocol):
    """What the runner needs from a model.

    ``forward`` takes a flat varlen batch (``[T]`` int64 token ids and positions, laid out per ``meta``;
    a model that sets ``mrope_section`` also takes ``[3, T]`` M-RoPE positions, see ``asyncllm.mrope``) and
    the per-layer paged ``KVCache``s, into which it writes this step's keys/values; it returns the final
    hidden states ``[T, H]``. ``compute_logits`` maps ``[N, H]`` to float32 ``[N, V]``. ``load_weights``
    takes Hugging Face-named tensors and raises ``ValueError`` naming any unexpected or missing parameter;
    the weights then stay where they are (kernel bundles may bind their addresses).
    """

    config: ModelConfig

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "moe": MoeForCausalLM,
    "gemma": GemmaForCausalLM,
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
"""Model definitions by the name an ``ArchitectureSpec.model`` uses."""



def model_definitions() -> dict[str, type[nn.Module]]:
    """Every model definition by name (each ``ArchitectureSpec.model`` must be one of them)."""
    return dict(_MODELS)


def build_model(
    config: ModelConfig,
    ops: KernelOps,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization: QuantizationConfig = UNQUANTIZED,
    parallel: TensorParallel = SINGLE,
) -> CausalLM:
    """Construct the model of ``config.architecture``'s family with uninitialised weights on ``device``.

    ``quantization`` picks each linear layer's method (dense weights by default). Construction allocates
    with ``torch.empty`` (no random init, nothing to gain from the ``meta`` device) and computes the rotary
    cache, so build directly on the target device; call ``load_weights`` next. Unknown architectures raise
    ``ValueError`` naming them. ``parallel``: this process's rank of a tensor-parallel group; only the
    text definitions built on ``LlamaForCausalLM`` (``llama``, ``gemma``, ``moe``) take more than one rank
    (``ValueError`` naming ``tensor_parallel_size`` otherwise, e.g. for LLaVA and Qwen2-VL).
    """
    definition = spec_named(config.architecture).model
    model_class = _MODELS[definition]
    if not parallel.is_parallel:
        return model_class(config, ops, dtype=dtype, device=torch.device(device),  # type: ignore[call-arg,return-value]
                           quantization=quantization)
    if not (isinstance(model_class, type) and issubclass(model_class, LlamaForCausalLM)
            and model_class.tensor_parallel) or config.vision is not None:
        raise ValueError(f"tensor_parallel_size: {parallel.size} ranks serve the text model definitions (llama, "
                         f"gemma, moe) only, not {definition!r} (architecture {config.architecture!r}); "
                         f"serve it on one rank")
    model = model_class(config, ops, dtype=dtype, device=torch.device(device), quantization=quantization,  # type: ignore[call-arg]
                        parallel=parallel)
    return model  # type: ignore[return-value]


__all__ = ["CausalLM", "GemmaForCausalLM", "LlamaForCausalLM", "LlavaForConditionalGeneration",
           "LlavaNextForConditionalGeneration", "MoeForCausalLM", "Qwen2VLForConditionalGeneration",
           "build_model", "model_definitions"]
