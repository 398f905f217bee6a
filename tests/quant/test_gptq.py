"""GPTQ unpacking against AutoGPTQ's ``QuantLinear.pack`` layout: 4 and 8 bits, sym / asym, v1 / v2,
with and without act-order."""

from __future__ import annotations

import pytest
import torch

from asyncllm.quant.gptq import unpack_gptq

from ._packers import act_order_g_idx, dequantize_reference, pack_gptq, rtn


def _random(n: int, k: int, group_size: int, bits: int, *, symmetric: bool, min_zero: int, seed: int,
            act_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen)
    if symmetric:
        zeros = torch.full((n, k // group_size), (maxq + 1) // 2)
    else:
        zeros = torch.randint(min_zero, maxq + 1, (n, k // group_size), generator=gen)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.05 + 1e-3).half()
    g_idx = act_order_g_idx(k, group_size, gen) if act_order else torch.arange(k) // group_size
    return codes, zeros, scales, g_idx


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("storage", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_unpack_matches_reference(bits: int, symmetric: bool, storage: str, act_order: bool) -> None:
    n, k, group_size = 64, 128, 32
    # The classic format stores z - 1, so a zero point of 0 corrupts AutoGPTQ's own packing: stay above it.
    min_zero = 1 if storage == "gptq" else 0
    codes, zeros, scales, g_idx = _random(n, k, group_size, bits, symmetric=symmetric, min_zero=min_zero,
                                          seed=bits * 7 + act_order, act_order=act_order)
    packed = pack_gptq(codes, zeros, scales, g_idx, bits, v2=storage == "gptq_v2")
    out = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits=bits,
                      storage=storage, act_order=act_order)
    reference = dequantize_reference(codes, zeros, scales, g_idx)
    assert out.codes.group_size == group_size and out.codes.bits == bits
    assert torch.equal(out.codes.zeros, zeros.float())
    assert torch.equal(out.codes.scales, scales.float())
    ours = out.codes.dequantize().half()
    if not act_order:
        assert out.input_perm is None
        assert torch.equal(out.codes.codes, codes.to(torch.uint8))
        assert torch.equal(ours, reference)
        return
    perm = out.input_perm
    assert perm is not None and perm.dtype == torch.int64
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    assert torch.equal(g_idx[perm], torch.arange(k) // group_size)
    assert torch.equal(out.codes.codes, codes[:, perm].to(torch.uint8))
    assert torch.equal(ours, reference[:, perm])
    x = torch.randn(3, k, dtype=torch.float64)
    assert torch.allclose(x[:, perm] @ ours.double().t(), x @ reference.double().t())


def test_channelwise_group() -> None:
    n, k, bits = 32, 64, 4
    codes, zeros, scales, g_idx = _random(n, k, k, bits, symmetric=False, min_zero=1, seed=3, act_order=False)
    assert torch.equal(g_idx, torch.zeros(k, dtype=torch.int64))
    packed = pack_gptq(codes, zeros, scales, g_idx, bits)
    out = unpack_gptq(**packed, bits=bits, act_order=True)
    assert out.input_perm is None and out.codes.group_size == k
    assert torch.equal(out.codes.dequantize().half(), dequantize_reference(codes, zeros, scales, g_idx))


def test_v1_zero_point_zero_reads_back_as_zero() -> None:
    """``z - 1 = -1`` stored in its field's bits decodes to 0, as AutoGPTQ's reference dequantization does."""
    codes = torch.zeros(32, 32, dtype=torch.int64)
    zeros = torch.tensor([0, 1, 15, 7, 0, 2, 3, 4] * 4).unsqueeze(1)
    words = [sum(((int(z) - 1) & 0xF) << (4 * i) for i, z in enumerate(zeros[8 * w:8 * w + 8, 0])) for w in range(4)]
    qzeros = torch.tensor([[w - 2**32 if w >= 2**31 else w for w in words]], dtype=torch.int32)
    packed = pack_gptq(codes, torch.ones_like(zeros), torch.ones(32, 1).half(), torch.zeros(32), 4)
    out = unpack_gptq(packed["qweight"], qzeros, packed["scales"], None, bits=4)
    assert torch.equal(out.codes.zeros, zeros.float())


def test_round_to_nearest_act_order_roundtrip() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 128, generator=gen)
    g_idx = act_order_g_idx(128, 32, gen)
    codes, zeros, scales = rtn(weight, 4, 32, symmetric=False, g_idx=g_idx, min_zero=1)
    packed = pack_gptq(codes, zeros, scales, g_idx, 4)
    out = unpack_gptq(**packed, bits=4, act_order=True)
    assert out.input_perm is not None
    restored = torch.empty_like(weight)
    restored[:, out.input_perm] = out.codes.dequantize()
    assert (restored - weight).abs().max() <= scales.float().max() / 2 + 1e-6


def test_reordered_g_idx_without_act_order_raises() -> None:
    codes, zeros, scales, g_idx = _random(32, 64, 32, 4, symmetric=True, min_zero=1, seed=6, act_order=True)
    packed = pack_gptq(codes, zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="desc_act"):
        unpack_gptq(**packed, bits=4, act_order=False)


def test_unequal_groups_raise() -> None:
    codes, zeros, scales, _ = _random(32, 64, 32, 4, symmetric=True, min_zero=1, seed=7, act_order=False)
    g_idx = torch.cat([torch.zeros(40), torch.ones(24)]).long()
    packed = pack_gptq(codes, zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="exactly 32"):
        unpack_gptq(**packed, bits=4, act_order=True)


def test_inconsistent_shapes_raise() -> None:
    codes, zeros, scales, g_idx = _random(32, 64, 32, 4, symmetric=True, min_zero=1, seed=8, act_order=False)
    packed = pack_gptq(codes, zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="qzeros"):
        unpack_gptq(packed["qweight"], packed["qzeros"][:, :1], packed["scales"], None, bits=4)
    with pytest.raises(ValueError, match="g_idx"):
        unpack_gptq(**{**packed, "g_idx": packed["g_idx"][:32]}, bits=4)
    with pytest.raises(ValueError, match="bits"):
        unpack_gptq(**packed, bits=3)
