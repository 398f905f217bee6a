"""The single dispatch point: one ``KernelOps`` bundle per model, chosen by backend name and device.

Models receive a ``KernelOps`` at construction and call only its members, so the torch reference and
the Triton kernels are interchangeable without any process-wide switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncllm.kernels.activation import silu_and_mul_reference
from asyncllm.kernels.attention import paged_attention_reference
from asyncllm.kernels.kv_write import write_kv_reference
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.norm import add_rms_norm_reference, rms_norm_reference
from asyncllm.kernels.rotary import rotary_reference

RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AddRmsNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SiluAndMul = Callable[[torch.Tensor], torch.Tensor]
WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


@dataclass(frozen=True)
class KernelOps:
    """The ops a model may call. Every member has the signature of its ``*_reference`` function."""

    name: str
    rms_norm: RmsNorm
    add_rms_norm: AddRmsNorm
    rotary: Rotary
    silu_and_mul: SiluAndMul
    write_kv: WriteKV
    paged_attention: PagedAttention


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_reference,
    add_rms_norm=add_rms_norm_reference,
    rotary=rotary_reference,
    silu_and_mul=silu_and_mul_reference,
    write_kv=write_kv_reference,
    paged_attention=paged_attention_reference,
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_kernel_ops(backend: str, device: torch.device) -> KernelOps:
    """``"torch"``: reference ops. ``"triton"``: Triton kernels (on CPU only under ``TRITON_INTERPRET=1``).
    ``"auto"``: Triton on CUDA when importable, else the reference ops."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel_backend: must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not triton_available())):
        return TORCH_OPS
    if not triton_available():
        raise ValueError("kernel_backend: 'triton' requested but triton is not installed (pip install triton)")
    from asyncllm.kernels.triton_ops import TRITON_OPS

    return TRITON_OPS
