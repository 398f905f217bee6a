"""Building what an engine serves: the model from a checkpoint, its tokenizer, the KV pool and the runner.

``AsyncEngine.from_pretrained`` and ``AsyncEngine.from_model`` delegate here. The torch work
(``load_model``, ``build_runner``) runs on the engine's model thread; these functions only compute.

The context bound ``max_model_len`` is decided once, by ``max_model_len_for``, and handed to the runner
(the bound its padded decode steps are built for), which the engine reads it from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import torch

from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.cuda_graphs import resolve_decode_graphs
from asyncllm.distributed.parallel_state import SINGLE, TensorParallel
from asyncllm.kernels import get_kernel_ops
from asyncllm.load_progress import loading_progress
from asyncllm.models import CausalLM, build_model
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from asyncllm.loaders import Checkpoint

__all__ = [
    "build_runner",
    "engine_config",
    "kv_cache_spec",
    "load_model",
    "load_tokenizer",
    "max_model_len_for",
    "model_from_checkpoint",
    "num_kv_blocks",
]


def engine_config(config: EngineConfig | None, overrides: dict[str, Any]) -> EngineConfig:
    """``config`` (the defaults when ``None``) with ``EngineConfig`` field ``overrides`` applied.

    A keyword that is no ``EngineConfig`` field raises ``TypeError`` naming it and listing the valid ones.
    """
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unknown engine option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"valid EngineConfig fields: {', '.join(fields)}")
    base = config or EngineConfig()
    return base.replace(**overrides) if overrides else base


def load_model(model: str | os.PathLike[str], config: EngineConfig) -> tuple[CausalLM, Tokenizer]:
    """Open ``model`` (an HF directory, hub id or ``.gguf`` file), build it with its weights on
    ``config``'s device and dtype, and build its tokenizer from the same checkpoint."""
    from asyncllm.loaders import load_checkpoint  # imported on use: it pulls in gguf and huggingface_hub

    apply_num_threads(config)
    checkpoint = load_checkpoint(model, dequantize_weights=config.dequantize_weights)
    return model_from_checkpoint(checkpoint, config), load_tokenizer(checkpoint)


def model_from_checkpoint(checkpoint: Checkpoint, config: EngineConfig, *, parallel: TensorParallel = SINGLE
                          ) -> CausalLM:
    """The checkpoint's model, built over the kernel bundle ``config`` selects, weights loaded (``parallel``:
    only this rank's slice of them, see ``asyncllm.distributed``); a vision-language model also gets the
    checkpoint directory's image processor (``load_image_processor``)."""
    device = config.resolved_device()
    dtype = config.resolved_dtype()
    model_config = ModelConfig.from_hf_config(checkpoint.hf_config)
    if config.rope_scaling_factor is not None:
        model_config = model_config.with_rope_scaling_factor(config.rope_scaling_factor)
    ops = get_kernel_ops(config.kernel_backend, device, native_kernels=config.native_kernels,
                         native_layer_max_rows=config.native_layer_max_rows)
    model = build_model(model_config, ops, dtype=dtype, device=device, quantization=checkpoint.quantization,
                        parallel=parallel)
    tensors = checkpoint.tensors(dtype)
    if config.load_progress:
        tensors = loading_progress(tensors, total=len(checkpoint.tensor_names()))
    model.load_weights(tensors)
    if model_config.vision is not None and checkpoint.format == "hf":
        from asyncllm.hf_image_processor import load_image_processor

        model.image_processor = load_image_processor(  # type: ignore[attr-defined]
            checkpoint.local_path, model_config.vision)
    return model


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    """The checkpoint's tokenizer; a GGUF file's comes from the metadata the loader already parsed."""
    if checkpoint.gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(checkpoint.gguf_metadata, path=checkpoint.local_path)
    return Tokenizer.from_path(checkpoint.local_path)


def num_kv_blocks(config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
                  *, num_kv_heads: int | None = None) -> int:
    """The KV pool's size in blocks: ``config.num_kv_blocks`` when set, else ``kv_cache_bytes`` worth of
    blocks, else ``gpu_memory_fraction`` of the free memory on a CUDA device, else ``kv_cache_tokens`` worth
    of blocks. Memory budgets count the cache's own bytes per block (a quantized cache fits more), with
    ``num_kv_heads`` heads (a tensor-parallel rank's; default: the model's)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCacheSpec.for_model(model_config, num_blocks=1, block_size=config.block_size, dtype=dtype,
                                      bits=config.kv_cache_bits(), num_kv_heads=num_kv_heads)
    if config.kv_cache_bytes is not None:
        blocks = config.kv_cache_bytes // per_block.bytes_per_block
        if blocks < 1:
            raise ValueError(f"kv_cache_bytes: {config.kv_cache_bytes} bytes hold no block of {config.block_size} "
                             f"tokens ({per_block.bytes_per_block} bytes each)")
        return blocks
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * config.gpu_memory_fraction) // per_block.bytes_per_block)
    return max(1, config.kv_cache_tokens // config.block_size)


def kv_cache_spec(config: EngineConfig, model_config: ModelConfig, device: torch.device, *,
                  num_kv_heads: int | None = None) -> KVCacheSpec:
    """The KV pool an engine with ``config`` allocates for ``model_config`` on ``device`` (holding
    ``num_kv_heads`` heads per layer: a tensor-parallel rank's share; default all of them)."""
    dtype = config.resolved_dtype()
    blocks = num_kv_blocks(config, model_config, device, dtype, num_kv_heads=num_kv_heads)
    return KVCacheSpec.for_model(model_config, num_blocks=blocks, block_size=config.block_size, dtype=dtype,
                                 bits=config.kv_cache_bits(), num_kv_heads=num_kv_heads)


def max_model_len_for(model: CausalLM, spec: KVCacheSpec, limit: int | None = None) -> int:
    """The longest context a sequence may reach: the model's positions (its rotary cache's ``max_positions``
    when it has one, else ``max_position_embeddings``), capped by the KV pool's token count and by
    ``limit`` (``EngineConfig.max_model_len``) when given."""
    positions = getattr(model, "max_positions", None) or model.config.max_position_embeddings
    bound = min(int(positions), spec.num_blocks * spec.block_size)
    return bound if limit is None else min(bound, limit)


def apply_num_threads(config: EngineConfig) -> int:
    """Set torch's intra-op threads, which the native C kernels also use, to ``config``'s
    ``resolved_num_threads()``; return that count. Call it on the model thread: the setting is process-wide
    (the last engine built wins) and takes effect for the thread teams started after it."""
    threads = config.resolved_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def build_runner(model: CausalLM, config: EngineConfig) -> ModelRunner:
    """Allocate the KV pool and build the runner (recording decode graphs when they are used); call it on
    the model thread."""
    apply_num_threads(config)
    device = config.resolved_device()
    spec = kv_cache_spec(config, model.config, device)
    return ModelRunner(
        model,
        spec,
        device=device,
        max_model_len=max_model_len_for(model, spec, config.max_model_len),
        decode_graphs=resolve_decode_graphs(model, device, config=config),
    )
