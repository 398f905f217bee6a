"""``quant.packed``: which dtype ``pack`` stores scales and biases in, and that the values never change."""

from __future__ import annotations

import pytest
import torch

from asyncllm.quant.packed import PackedWeight, QuantCodes, pack


def gguf_like(rows: int, cols: int, bits: int, seed: int, *, zero: int | None, with_mins: bool) -> QuantCodes:
    """Blocks of 32 with float16 ``d`` (and ``m``): Q4_0 / Q8_0 (``zeros`` 8 / 128) or Q4_1 (``mins``)."""
    gen = torch.Generator().manual_seed(seed)
    groups = cols // 32
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(rows, groups, generator=gen) * 0.02 + 1e-4).half().float()
    zeros = torch.full((rows, groups), float(zero or 0))
    mins = (torch.randn(rows, groups, generator=gen) * 0.1).half().float() if with_mins else torch.zeros(rows, groups)
    return QuantCodes(codes, scales, zeros, mins, bits=bits, group_size=32)


def reference(codes: QuantCodes) -> torch.Tensor:
    """``PackedWeight.dequantize`` as it was with float32 parameters only."""
    scales = codes.scales
    biases = codes.mins - codes.scales * codes.zeros
    values = codes.codes.float().unflatten(1, (-1, codes.group_size)) * scales.unsqueeze(-1) + biases.unsqueeze(-1)
    return values.flatten(1)


@pytest.mark.parametrize(("bits", "zero", "with_mins"), [(4, 8, False), (4, None, True), (8, 128, False)],
                         ids=["q4_0", "q4_1", "q8_0"])
def test_float16_when_exact(bits: int, zero: int | None, with_mins: bool) -> None:
    codes = gguf_like(24, 128, bits, seed=bits, zero=zero, with_mins=with_mins)
    packed = pack(codes)
    assert packed.scales.dtype == torch.float16 and packed.biases.dtype == torch.float16
    assert torch.equal(packed.dequantize(), reference(codes))
    assert torch.equal(packed.dequantize(), codes.dequantize())
    assert torch.equal(packed.codes(), codes.codes)
    rows = torch.tensor([[3, 0], [23, 3]])
    assert torch.equal(packed.rows(rows), reference(codes)[rows])
    assert packed.nbytes == packed.qweight.numel() + 2 * 2 * 24 * 4  # 1 bit of parameters per 4-bit weight


def test_float32_when_not_exact() -> None:
    # float16 scales, but scales * zeros with an odd zero point overflow float16's 11-bit significand
    codes = gguf_like(8, 64, 4, seed=1, zero=None, with_mins=False)
    odd = QuantCodes(codes.codes, codes.scales, torch.full_like(codes.scales, 7.0), codes.mins, bits=4, group_size=32)
    products = odd.scales * odd.zeros
    assert not bool((products.half().float() == products).all())
    packed = pack(odd)
    assert packed.scales.dtype == torch.float32 and packed.biases.dtype == torch.float32
    assert torch.equal(packed.dequantize(), reference(odd))
    # scales that are not float16 values, and scales beyond float16's range
    scales = torch.rand(8, 2, generator=torch.Generator().manual_seed(2)) * 0.05 + 1e-3
    for wide in (scales, torch.full((8, 2), 1e6)):
        other = QuantCodes(codes.codes, wide, codes.zeros, codes.mins, bits=4, group_size=32)
        assert pack(other).scales.dtype == torch.float32
        assert torch.equal(pack(other).dequantize(), reference(other))


def test_non_finite_stays_float32() -> None:
    codes = gguf_like(4, 32, 4, seed=3, zero=8, with_mins=False)
    scales = codes.scales.clone()
    scales[0, 0] = float("inf")
    packed = pack(QuantCodes(codes.codes, scales, codes.zeros, codes.mins, bits=4, group_size=32))
    assert packed.scales.dtype == torch.float32


def test_parameter_dtypes_are_validated() -> None:
    packed = pack(gguf_like(4, 64, 4, seed=4, zero=8, with_mins=False))
    q, s, b = packed.qweight, packed.scales, packed.biases
    with pytest.raises(ValueError, match="biases: expected the scales' dtype"):
        PackedWeight(q, s, b.float(), 4, 32, 64)
    with pytest.raises(ValueError, match="scales: expected float32 or float16"):
        PackedWeight(q, s.bfloat16(), b.bfloat16(), 4, 32, 64)
    with pytest.raises(ValueError, match=r"scales: expected torch\.float16"):
        PackedWeight(q, s[:, :1].contiguous(), b, 4, 32, 64)
    single = PackedWeight(q, s.float(), b.float(), 4, 32, 64)
    assert torch.equal(single.dequantize(), packed.dequantize())
