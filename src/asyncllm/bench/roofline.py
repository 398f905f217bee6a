"""The decode roofline: measured memory bandwidth and the bytes and FLOPs one decode step must touch.

Decode is memory bound: every step reads every weight once (tied embeddings once: the LM head reads the
whole matrix, the lookup one row) plus the KV of every cached token. Achieved bandwidth is
``bytes_per_step * steps_per_second``; the fraction of roofline divides it by the measured copy bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from asyncllm.config import ModelConfig
from asyncllm.layers.weights import parameter_bytes  # noqa: F401  (re-exported: the bench counts weights with it)


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-``repeats`` copy bandwidth; ``bytes_per_copy`` counts bytes read plus bytes written."""

    bytes_per_copy: int
    best_seconds: float
    repeats: int

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_per_copy / self.best_seconds


def measure_copy_bandwidth(megabytes: int, *, repeats: int = 5) -> Bandwidth:
    """Copy a ``megabytes`` MiB float32 tensor into another ``repeats`` times; keep the fastest copy."""
    if megabytes <= 0:
        raise ValueError(f"megabytes: must be positive, got {megabytes}")
    if repeats <= 0:
        raise ValueError(f"repeats: must be positive, got {repeats}")
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.zeros(numel, dtype=torch.float32)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return Bandwidth(bytes_per_copy=2 * numel * 4, best_seconds=best, repeats=repeats)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """K and V bytes one cached token occupies across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def decode_flops_per_token(config: ModelConfig, context_tokens: float) -> float:
    """Multiply-adds x 2 of one decode token: every projection, the MLP, the LM head and attention over
    ``context_tokens`` cached tokens (norms, rotary and softmax left out)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * inter
    attention = 2 * config.num_attention_heads * config.head_dim * context_tokens
    return 2.0 * (config.num_hidden_layers * (per_layer + attention) + hidden * config.vocab_size)
