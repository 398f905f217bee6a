"""Kernels: each op's pure-torch reference (the spec) beside its Triton version, one dispatch point."""

from asyncllm.kernels.bundle import FusedLayerWeights, KernelOps
from asyncllm.kernels.cpu import CPU_OPS, cpu_ops
from asyncllm.kernels.dispatch import TORCH_OPS, get_kernel_ops
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions

__all__ = [
    "CPU_OPS",
    "TORCH_OPS",
    "AttentionMetadata",
    "AttentionOptions",
    "FusedLayerWeights",
    "KVCache",
    "KernelOps",
    "cpu_ops",
    "get_kernel_ops",
]
