"""The dispatch point hands out the Triton kernels for backend ``"triton"``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from asyncllm.kernels import TORCH_OPS, AttentionMetadata, KernelOps, KVCache, get_kernel_ops
from asyncllm.kernels.triton_activation import silu_and_mul_triton
from asyncllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from asyncllm.kernels.triton_rotary import rotary_triton


def test_triton_backend_returns_triton_kernels() -> None:
    ops = get_kernel_ops("triton", torch.device("cpu"))
    assert isinstance(ops, KernelOps)
    assert ops.name == "triton"
    expected = {
        "rms_norm": rms_norm_triton,
        "add_rms_norm": add_rms_norm_triton,
        "rotary": rotary_triton,
        "silu_and_mul": silu_and_mul_triton,
    }
    for member, kernel in expected.items():
        assert getattr(ops, member) is kernel
        assert getattr(ops, member) is not getattr(TORCH_OPS, member)
    assert ops.fused_decode is None and ops.plan_attention is TORCH_OPS.plan_attention


def test_triton_cache_members_write_and_read_a_kv_cache(device: torch.device) -> None:
    """The bundle's cache-level members run the Triton kernels on the ``KVCache``'s tensors."""
    ops = get_kernel_ops("triton", device)
    gen = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(3, 1, 8, generator=gen).to(device) for _ in range(3))
    cache = KVCache.allocate(2, 4, 1, 8, dtype=torch.float32, device=device)
    reference = KVCache.allocate(2, 4, 1, 8, dtype=torch.float32, device=device)
    slots = torch.tensor([5, 6, 7], device=device)
    ops.write_kv(k, v, cache, slots)
    TORCH_OPS.write_kv(k, v, reference, slots)
    assert torch.equal(cache.key.cpu(), reference.key.cpu())
    assert torch.equal(cache.value.cpu(), reference.value.cpu())
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.tensor([0, 3], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([3], dtype=torch.int32, device=device),
        block_tables=torch.tensor([[1, 0]], dtype=torch.int32, device=device),
        query_lens_cpu=(3,), seq_lens_cpu=(3,), max_query_len=3, max_seq_len=3,
    )
    cache = KVCache(cache.key.roll(-1, 1), cache.value.roll(-1, 1))  # tokens 0..2 at slots 4..6
    got = ops.paged_attention(q, cache, meta, 0.5)
    want = TORCH_OPS.paged_attention(q, cache, meta, 0.5)
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


def test_triton_capabilities() -> None:
    ops = get_kernel_ops("triton", torch.device("cpu"))
    # matmuls stay with the framework (cuBLAS on CUDA); no host syncs, so steps can be recorded as graphs
    assert ops.linear is torch.nn.functional.linear
    assert ops.graph_safe and not TORCH_OPS.graph_safe
    weight = torch.ones(4, 2)
    assert ops.prepare_weight(weight) is weight


def test_torch_backend_gives_the_reference_ops_on_cpu() -> None:
    assert get_kernel_ops("torch", torch.device("cpu")) is TORCH_OPS
