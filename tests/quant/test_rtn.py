"""``quantize_rtn`` against a float64 min-max round-to-nearest written here in plain Python (AutoGPTQ's and
compressed-tensors' formulas): codes, scales and zero points; the half-a-scale error bound; bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from asyncllm.quant.packed import pack
from asyncllm.quant.rtn import quantize_rtn

TIE_MARGIN = 1e-4
"""How close to a rounding tie a float64 value may be for float32 arithmetic to round it the other way."""


def _reference(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[list, ...]:
    """Per row and group, in Python floats (float64): the scale, the zero point and whether it was far enough
    from a rounding tie to be compared exactly; per element the code and whether it (and its group's zero
    point) was."""
    maxq = 2**bits - 1
    rows = weight.double().tolist()
    scales, zeros, zeros_exact, codes, exact = [], [], [], [], []
    for row in rows:
        row_scales, row_zeros, row_zeros_exact, row_codes, row_exact = [], [], [], [], []
        for start in range(0, len(row), group):
            values = row[start:start + group]
            low, high = min(min(values), 0.0), max(max(values), 0.0)
            if low == 0.0 and high == 0.0:
                low, high = -1.0, 1.0
            if symmetric:
                scale = 2.0 * max(-low, high) / maxq
                zero, zero_exact = float(2 ** (bits - 1)), True
            else:
                scale = (high - low) / maxq
                zero = float(round(-low / scale))
                zero_exact = abs(abs(-low / scale - math.floor(-low / scale)) - 0.5) > TIE_MARGIN
            row_scales.append(scale)
            row_zeros.append(zero)
            row_zeros_exact.append(zero_exact)
            for value in values:
                ratio = value / scale
                row_codes.append(min(max(round(ratio) + zero, 0.0), float(maxq)))
                row_exact.append(zero_exact and abs(ratio - math.floor(ratio) - 0.5) > TIE_MARGIN)
        scales.append(row_scales)
        zeros.append(row_zeros)
        zeros_exact.append(row_zeros_exact)
        codes.append(row_codes)
        exact.append(row_exact)
    return scales, zeros, zeros_exact, codes, exact


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal weights with a different spread per row, an all-positive row, a row of zeros and a row with one
    large outlier, so every branch of the range computation is taken."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 0, rows).unsqueeze(1)
    weight[1] = weight[1].abs()
    weight[2] = 0.0
    weight[3, cols // 3] = 40.0
    return weight


CASES = [
    (4, 32, False), (4, 128, False), (4, 64, True), (3, 16, False), (8, 32, False), (8, 32, True),
    (2, 48, True), (4, None, False), (4, None, True), (1, 16, True),
]


@pytest.mark.parametrize(("bits", "group", "symmetric"), CASES)
def test_codes_scales_and_zeros_match_the_float64_reference(bits: int, group: int | None, symmetric: bool) -> None:
    weight = _weight(12, 192 if group in (64, 48, 16) else 256, seed=bits * 31 + (group or 0))
    size = weight.shape[1] if group is None else group
    out = quantize_rtn(weight, bits, group, symmetric=symmetric)
    assert (out.bits, out.group_size, out.shape) == (bits, size, tuple(weight.shape))
    scales, zeros, zeros_exact, codes, exact = (torch.tensor(t, dtype=torch.float64)
                                                for t in _reference(weight, bits, size, symmetric))
    zeros_exact, exact = zeros_exact.bool(), exact.bool()
    torch.testing.assert_close(out.scales.double(), scales, rtol=1e-6, atol=0.0)
    assert torch.equal(out.zeros.double()[zeros_exact], zeros[zeros_exact])
    assert bool(((out.zeros.double() - zeros).abs() <= 1).all())
    assert torch.equal(out.mins, torch.zeros_like(out.scales))
    # Ties are rare but real (the symmetric range's ends sit on one): most codes are compared exactly.
    assert exact.float().mean() > 0.9
    assert torch.equal(out.codes.double()[exact], codes[exact])
    assert bool(((out.codes.double() - codes).abs() <= 1).all())
    assert int(out.codes.max()) <= 2**bits - 1


@pytest.mark.parametrize(("bits", "group", "symmetric"), CASES)
def test_every_element_is_within_half_a_scale(bits: int, group: int | None, symmetric: bool) -> None:
    weight = _weight(16, 384, seed=bits + 100 * symmetric)
    out = quantize_rtn(weight, bits, group, symmetric=symmetric)
    error = (out.dequantize().double() - weight.double()).abs()
    half_scale = out.scales.double().repeat_interleave(out.group_size, dim=1) / 2
    # plus float32 rounding of the computation: a few units in the last place of the scale and of the value
    assert bool((error <= half_scale * (1 + 1e-5) + weight.double().abs() * 1e-6).all())
    assert bool((out.dequantize()[2] == 0).all())  # a row of zeros comes back exactly


def test_groups_of_zeros_and_non_negative_groups() -> None:
    weight = torch.zeros(2, 32)
    weight[1] = torch.linspace(0.0, 1.5, 32)
    out = quantize_rtn(weight, 4, 16)
    # a group of zeros takes the range [-1, 1] (AutoGPTQ): every code is the zero point, dequantized to 0
    assert torch.equal(out.scales[0], torch.full((2,), 2 / 15))
    assert torch.equal(out.codes[0].float(), out.zeros[0].repeat_interleave(16)) and not out.dequantize()[0].any()
    assert torch.equal(out.zeros[1], torch.zeros(2))  # the range starts at 0: zero point 0, full code range used
    assert int(out.codes[1, :16].min()) == 0 and int(out.codes[1, 16:].max()) == 15


def test_half_precision_input_and_packing() -> None:
    weight = _weight(8, 256, seed=5).to(torch.bfloat16)
    out = quantize_rtn(weight, 4, 128)
    assert torch.equal(out.codes, quantize_rtn(weight.float(), 4, 128).codes)
    packed = pack(out)
    assert packed.bits == 4 and torch.equal(packed.codes(), out.codes)
    torch.testing.assert_close(packed.dequantize(), out.dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("shape", "bits", "group", "message"),
    [
        ((4, 64), 0, 16, r"^bits"),
        ((4, 64), 9, 16, r"^bits"),
        ((4, 64), 4.0, 16, r"^bits"),
        ((4, 64), True, 16, r"^bits"),
        ((4, 64), 4, 24, r"^group_size: 24 must be"),
        ((4, 64), 4, 0, r"^group_size"),
        ((4, 64), 4, -16, r"^group_size"),
        ((4, 96), 4, 64, r"^group_size: 64 must be a positive multiple of 16 dividing K=96"),
        ((4, 64), 4, 128, r"^group_size"),
        ((4, 40), 4, None, r"^group_size: channel-wise"),
        ((64,), 4, 16, r"^weight"),
    ],
)
def test_bad_arguments_raise_naming_them(shape: tuple[int, ...], bits: object, group: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_rtn(torch.randn(shape), bits, group)  # type: ignore[arg-type]


def test_integer_and_non_finite_weights_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^weight: expected a 2-D floating"):
        quantize_rtn(torch.ones(4, 32, dtype=torch.int32), 4, 16)
    weight = torch.randn(4, 32)
    weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^weight: holds NaN"):
        quantize_rtn(weight, 4, 16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_gpu_gives_the_cpu_codes() -> None:
    weight = _weight(64, 512, seed=9)
    here = quantize_rtn(weight, 4, 128)
    there = quantize_rtn(weight.cuda(), 4, 128)
    assert there.codes.is_cuda
    for name in ("codes", "scales", "zeros", "mins"):
        assert torch.equal(getattr(there, name).cpu(), getattr(here, name)), name
