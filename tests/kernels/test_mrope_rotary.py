"""M-RoPE through ``RotaryEmbedding`` on every kernel bundle (reference, CPU fast path, Triton: interpreted on
CPU, compiled on a GPU) against Hugging Face's ``Qwen2VLRotaryEmbedding`` + ``apply_rotary_pos_emb``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from asyncllm.kernels import KernelOps
from asyncllm.kernels.cpu import cpu_ops
from asyncllm.kernels.dispatch import TORCH_OPS
from asyncllm.layers.rotary import RotaryEmbedding

HEAD_DIM, SECTION, THETA = 32, (4, 6, 6), 10000.0


def hf_rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2VLTextConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=256,
                               rope_parameters={"rope_type": "default", "rope_theta": THETA,
                                                "mrope_section": list(SECTION)})
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])
    q_out, k_out = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1)


def _bundles() -> list[Any]:
    def triton_ops() -> KernelOps:
        pytest.importorskip("triton")
        from asyncllm.kernels.triton_ops import TRITON_OPS

        return TRITON_OPS

    return [pytest.param(lambda: TORCH_OPS, "cpu", id="torch"), pytest.param(cpu_ops, "cpu", id="cpu"),
            pytest.param(triton_ops, "triton", id="triton")]


@pytest.mark.parametrize(("make_ops", "where"), _bundles())
def test_three_component_positions_rotate_as_hf(make_ops: Callable[[], KernelOps], where: str) -> None:
    device = torch.device("cuda" if where == "triton" and torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = 11
    q = torch.randn(tokens, 4, HEAD_DIM, generator=gen)
    k = torch.randn(tokens, 2, HEAD_DIM, generator=gen)
    positions = torch.randint(0, 200, (3, tokens), generator=gen)
    positions[:, :3] = torch.tensor([5, 6, 7])  # text tokens: equal components
    want_q, want_k = hf_rotate(q, k, positions)
    rotary = RotaryEmbedding(HEAD_DIM, THETA, 256, None, make_ops(), device=device, mrope_section=SECTION)
    got_q, got_k = rotary(positions.to(device), q.clone().to(device), k.clone().to(device))
    torch.testing.assert_close(got_q.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.cpu(), want_k, atol=1e-5, rtol=1e-5)
    flat_q, _ = rotary(positions[0, :3].to(device), q[:3].clone().to(device), k[:3].clone().to(device))
    torch.testing.assert_close(flat_q.cpu(), want_q[:3], atol=1e-5, rtol=1e-5)


def test_bad_sections_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding(HEAD_DIM, THETA, 64, None, TORCH_OPS, device=torch.device("cpu"), mrope_section=(4, 6, 5))
    plain = RotaryEmbedding(HEAD_DIM, THETA, 64, None, TORCH_OPS, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="positions"):
        plain(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, 1, HEAD_DIM), torch.zeros(2, 1, HEAD_DIM))
