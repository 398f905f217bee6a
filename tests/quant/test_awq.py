"""AWQ GEMM unpacking against a packer written from AutoAWQ's published order map."""

from __future__ import annotations

import pytest
import torch

from asyncllm.quant.awq import AWQ_ORDER, AWQ_REVERSE_ORDER, unpack_awq

from ._packers import AWQ_ORDER_MAP, dequantize_reference, pack_awq


def _random(n: int, k: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // group_size), generator=gen)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.05 + 1e-3).half()
    return codes, zeros, scales


def test_order_maps_are_inverse() -> None:
    assert list(AWQ_ORDER) == AWQ_ORDER_MAP
    assert [AWQ_ORDER[AWQ_REVERSE_ORDER[j]] for j in range(8)] == list(range(8))


@pytest.mark.parametrize(("n", "k", "group_size"), [(64, 128, 32), (96, 64, 64), (32, 256, 128), (32, 96, 96)])
def test_unpack_matches_reference(n: int, k: int, group_size: int) -> None:
    codes, zeros, scales = _random(n, k, group_size, seed=n + k)
    packed = pack_awq(codes, zeros, scales)
    out = unpack_awq(packed["qweight"], packed["qzeros"], packed["scales"])
    assert out.group_size == group_size and out.bits == 4
    assert torch.equal(out.codes, codes.to(torch.uint8))
    assert torch.equal(out.zeros, zeros.float())
    assert torch.equal(out.scales, scales.float())
    assert torch.equal(out.mins, torch.zeros_like(out.mins))
    assert torch.equal(out.dequantize().half(), dequantize_reference(codes, zeros, scales))


def test_single_column_block_positions() -> None:
    """Each output column of a block lands where the order map says, one nibble at a time."""
    for column in range(8):
        codes = torch.zeros(32, 32, dtype=torch.int64)
        codes[column] = 9
        packed = pack_awq(codes, torch.zeros(32, 1, dtype=torch.int64), torch.ones(32, 1).half())
        nibble = AWQ_REVERSE_ORDER[column]
        assert int(packed["qweight"][0, 0]) & 0xFFFFFFFF == 9 << (4 * nibble)
        assert torch.equal(unpack_awq(**packed).codes, codes.to(torch.uint8))


def test_inconsistent_shapes_raise() -> None:
    codes, zeros, scales = _random(32, 64, 32, seed=1)
    packed = pack_awq(codes, zeros, scales)
    with pytest.raises(ValueError, match="qzeros"):
        unpack_awq(packed["qweight"], packed["qzeros"][:1], packed["scales"])
    with pytest.raises(ValueError, match="scales"):
        unpack_awq(packed["qweight"], packed["qzeros"], packed["scales"][:, :8])
    with pytest.raises(ValueError, match="qweight"):
        unpack_awq(packed["qweight"].float(), packed["qzeros"], packed["scales"])
