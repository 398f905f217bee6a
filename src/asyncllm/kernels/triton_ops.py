"""The Triton ``KernelOps`` bundle: every member has the signature of its ``*_reference`` op.

Importing this module imports Triton; ``asyncllm.kernels.dispatch`` does so only when the Triton
backend is requested and Triton is installed. On CPU the kernels run only under ``TRITON_INTERPRET=1``,
which Triton reads when the kernel modules are first imported.
"""

from __future__ import annotations

from asyncllm.kernels.bundle import KernelOps, on_cache
from asyncllm.kernels.triton_activation import silu_and_mul_triton
from asyncllm.kernels.triton_attention import paged_attention_cache_triton, paged_attention_triton
from asyncllm.kernels.triton_kv_write import write_kv_cache_triton, write_kv_triton
from asyncllm.kernels.triton_moe import moe_triton
from asyncllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from asyncllm.kernels.triton_quant import quant_linear_triton
from asyncllm.kernels.triton_rotary import rotary_triton

_write_kv, _paged_attention = on_cache("triton", write_kv_triton, paged_attention_triton,
                                      write_quantized=write_kv_cache_triton,
                                      attend_quantized=paged_attention_cache_triton)
TRITON_OPS = KernelOps(
    name="triton",
    rms_norm=rms_norm_triton,
    add_rms_norm=add_rms_norm_triton,
    rotary=rotary_triton,
    silu_and_mul=silu_and_mul_triton,
    write_kv=_write_kv,
    paged_attention=_paged_attention,
    quantized_linear=quant_linear_triton,
    moe=moe_triton,
    graph_safe=True,
)
