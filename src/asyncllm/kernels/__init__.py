"""Kernels: each op's pure-torch reference (the spec) beside its Triton version, one dispatch point."""

from asyncllm.kernels.dispatch import TORCH_OPS, KernelOps, get_kernel_ops
from asyncllm.kernels.metadata import AttentionMetadata

__all__ = ["TORCH_OPS", "AttentionMetadata", "KernelOps", "get_kernel_ops"]
