"""The single dispatch point: one ``KernelOps`` bundle per model, chosen by backend name and device.

Models receive a ``KernelOps`` at construction and call only its members, so the torch reference and
the Triton kernels are interchangeable without any process-wide switch.
"""

from __future__ import annotations

import torch

from asyncllm.kernels.activation import silu_and_mul_reference
from asyncllm.kernels.attention import paged_attention_cache_reference, paged_attention_reference
from asyncllm.kernels.bundle import KernelOps, on_cache
from asyncllm.kernels.cpu import cpu_ops
from asyncllm.kernels.kv_write import write_kv_cache_reference, write_kv_reference
from asyncllm.kernels.norm import add_rms_norm_reference, rms_norm_reference
from asyncllm.kernels.rotary import rotary_reference

_write_kv, _paged_attention = on_cache("torch", write_kv_reference, paged_attention_reference,
                                      write_quantized=write_kv_cache_reference,
                                      attend_quantized=paged_attention_cache_reference)
TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_reference,
    add_rms_norm=add_rms_norm_reference,
    rotary=rotary_reference,
    silu_and_mul=silu_and_mul_reference,
    write_kv=_write_kv,
    paged_attention=_paged_attention,
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_kernel_ops(
    backend: str, device: torch.device, *, native_kernels: bool = True, native_layer_max_rows: int = 4
) -> KernelOps:
    """``"torch"``: the reference ops (the spec). ``"triton"``: Triton kernels (on CPU only under
    ``TRITON_INTERPRET=1``). ``"auto"``: Triton on CUDA when importable, the CPU fast paths on CPU, else
    the reference ops. ``native_kernels`` / ``native_layer_max_rows`` shape the CPU bundle
    (``EngineConfig`` fields of the same names)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel_backend: must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto" and torch.device(device).type == "cpu":
        return cpu_ops(native=native_kernels, native_layer_max_rows=native_layer_max_rows)
    if backend == "torch" or (backend == "auto" and (torch.device(device).type != "cuda" or not triton_available())):
        return TORCH_OPS
    if not triton_available():
        raise ValueError("kernel_backend: 'triton' requested but triton is not installed (pip install triton)")
    from asyncllm.kernels.triton_ops import TRITON_OPS

    return TRITON_OPS
