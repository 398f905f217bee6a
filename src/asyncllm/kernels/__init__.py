"""Kernels: each op's pure-torch reference (the spec) beside its Triton version, one dispatch point."""

from asyncllm.kernels.bundle import KernelOps
from asyncllm.kernels.cpu import CPU_OPS
from asyncllm.kernels.dispatch import TORCH_OPS, get_kernel_ops
from asyncllm.kernels.metadata import AttentionMetadata

__all__ = ["CPU_OPS", "TORCH_OPS", "AttentionMetadata", "KernelOps", "get_kernel_ops"]
