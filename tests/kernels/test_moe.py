"""The mixture-of-experts op: each implementation against a float64 evaluation of the reference, on drawn
shapes and routings, and the routing against its definition."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels import CPU_OPS, TORCH_OPS
from asyncllm.kernels.moe import moe_cpu, moe_reference, select_experts

MoeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SEEDS = st.integers(0, 2**31 - 1)


def moe_case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, seed: int,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """``(x, topk_weights, topk_ids, w_gate_up, w_down)``: ids drawn from a softmax router, so some experts
    get many tokens and some none."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    weights, ids = select_experts(logits, top_k, renormalize=bool(seed % 2))
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    return x.to(dtype), weights, ids, w_gate_up.to(dtype), w_down.to(dtype)


def float64_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: torch.Tensor,
                      w_down: torch.Tensor) -> torch.Tensor:
    return moe_reference(x.cpu().double(), weights.cpu().double(), ids.cpu(), w_gate_up.cpu().double(),
                         w_down.cpu().double())


def check(fn: MoeFn, case: tuple[torch.Tensor, ...], tol: float) -> None:
    out = fn(*case)
    x = case[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double().cpu(), float64_reference(*case), atol=tol, rtol=tol)


def test_bundles_carry_their_moe() -> None:
    assert TORCH_OPS.moe is moe_reference and CPU_OPS.moe is moe_cpu


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), hidden=st.sampled_from([8, 24, 64]), inter=st.sampled_from([4, 16, 40]),
       experts=st.integers(1, 8), k=st.integers(1, 4), seed=SEEDS)
@pytest.mark.parametrize("fn", [moe_reference, moe_cpu], ids=["reference", "cpu"])
def test_moe_matches_float64(fn: MoeFn, tokens: int, hidden: int, inter: int, experts: int, k: int,
                             seed: int) -> None:
    check(fn, moe_case(tokens, hidden, inter, experts, min(k, experts), seed), 1e-5)


def test_moe_of_one_expert_is_the_dense_gated_mlp() -> None:
    x, _, _, w_gate_up, w_down = moe_case(6, 16, 8, 1, 1, seed=0)
    gate, up = (x @ w_gate_up[0].T).chunk(2, dim=-1)
    dense = (torch.nn.functional.silu(gate) * up) @ w_down[0].T
    weights, ids = torch.ones(6, 1), torch.zeros(6, 1, dtype=torch.long)
    for fn in (moe_reference, moe_cpu):
        torch.testing.assert_close(fn(x, weights, ids, w_gate_up, w_down), dense)


def test_moe_rejects_bad_shapes() -> None:
    x, weights, ids, w_gate_up, w_down = moe_case(4, 16, 8, 4, 2, seed=1)
    with pytest.raises(ValueError, match="w_down"):
        moe_cpu(x, weights, ids, w_gate_up, w_down[:, :, :4])
    with pytest.raises(ValueError, match="topk_ids"):
        moe_reference(x, weights[:3], ids[:3], w_gate_up, w_down)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 16), experts=st.integers(2, 8), k=st.integers(1, 4), renorm=st.booleans(), seed=SEEDS)
def test_select_experts_is_softmax_then_topk(tokens: int, experts: int, k: int, renorm: bool, seed: int) -> None:
    k = min(k, experts)
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    weights, ids = select_experts(logits, k, renorm)
    probs = torch.softmax(logits.double(), -1)
    expected = probs.gather(1, ids)
    if renorm:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.double(), expected)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool((probs.gather(1, ids).min(-1).values[:, None] >= probs.scatter(1, ids, -1.0)).all())
    assert all(len(set(row)) == k for row in ids.tolist())


@settings(max_examples=8, deadline=None)
@given(tokens=st.integers(1, 24), hidden=st.sampled_from([16, 40]), inter=st.sampled_from([16, 24]),
       experts=st.integers(1, 6), k=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=SEEDS)
def test_triton_moe_matches_float64(device: torch.device, tokens: int, hidden: int, inter: int, experts: int,
                                    k: int, dtype: torch.dtype, seed: int) -> None:
    pytest.importorskip("triton")
    from asyncllm.kernels.triton_moe import moe_triton

    case = moe_case(tokens, hidden, inter, experts, min(k, experts), seed, dtype)
    check(moe_triton, tuple(t.to(device) for t in case), 1e-5 if dtype == torch.float32 else 3e-2)


def test_triton_alignment_groups_pairs_by_expert() -> None:
    pytest.importorskip("triton")
    from asyncllm.kernels.triton_moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])
    pairs, block_expert = align_by_expert(ids, num_experts=4, block_m=2)
    blocks = pairs.view(-1, 2).tolist()
    assert block_expert.tolist()[:5] == [0, 0, 1, 2, 2] and all(e == 4 for e in block_expert.tolist()[5:])
    assert blocks[:5] == [[1, 4], [7, 8], [3, 8], [0, 2], [5, 6]]
    assert all(p == 8 for row in blocks[5:] for p in row)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 8, 2), (300, 8, 2), (2048, 64, 6)])
def test_triton_moe_at_model_shapes_on_cuda(tokens: int, experts: int, k: int, dtype: torch.dtype) -> None:
    from asyncllm.kernels.triton_moe import moe_triton

    case = tuple(t.cuda() for t in moe_case(tokens, 1024, 768, experts, k, seed=tokens, dtype=dtype))
    check(moe_triton, case, 1e-4 if dtype == torch.float32 else 3e-2)
