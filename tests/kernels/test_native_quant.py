"""The native weight-only quantized linear (``kernels/csrc/quant_linear.c``) against float64 references: its
own build and builds of the other instruction-set paths (AVX2, AVX-VNNI, portable C), compiled here.

Two tolerances, from the schemes (see ``kernels.native_quant``). The int8-activation kernel (``gemv``)
computes ``xhat @ w.T`` up to fp32 rounding, where ``xhat`` rounds each block of 32 activations to int8
times ``d = max|x| / 127``; the many-row path (``dequantized``) computes ``x @ w.T`` in fp32.

* fp32 rounding only: ``|y - x @ w.T| <= FP32_SLACK * (|x| @ (|scales * q| + |biases|).T)``. ``gemv`` must
  meet it on exactly representable activations (every block ``d * codes`` with ``d`` a power of two and
  one code at +-127, so ``xhat == x``), ``dequantized`` on any.
* ``gemv`` on any activations: ``|y - x @ w.T| <= sum_b (d_b / 2) * sum_{k in b} |w[n, k]|`` plus that
  fp32 slack (each activation is off by at most half its block's scale).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels import native_quant
from asyncllm.kernels.native_quant import (
    GEMV_MAX_ROWS,
    NativeQuantLinear,
    cpu_quant_linear,
    native_quant_linear,
    quant_linear_native,
)
from asyncllm.quant.packed import PackedWeight, QuantCodes, pack

from .native_support import require_native_kernels

FP32_SLACK = 1e-5  # relative to sum |x| |w-parts|: ~80 ulps, far below int8 rounding (~4e-3 relative)
BLOCK = 32


@pytest.fixture(scope="module")
def kernel() -> NativeQuantLinear:
    require_native_kernels()
    loaded = native_quant_linear()
    assert loaded is not None, "the native quantized linear kernel failed to build"
    return loaded


def random_weight(n: int, k: int, bits: int, group_size: int, seed: int, half: bool = False) -> PackedWeight:
    """Codes over the full storage range, positive scales, zero points and mins of both signs; scales and
    biases rounded to float16 and stored so when ``half``, else float32."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    top = 2 ** bits
    codes = torch.randint(0, top, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.05 + 1e-3
    zeros = torch.randint(0, top, (n, groups), generator=gen).float()
    mins = torch.randn(n, groups, generator=gen) * 0.05
    weight = pack(QuantCodes(codes, scales, zeros, mins, bits=bits, group_size=group_size))
    assert weight.scales.dtype == torch.float32  # random parameters are not float16 values
    if half:
        weight = PackedWeight(weight.qweight, weight.scales.half(), weight.biases.half(), weight.bits,
                              weight.group_size, weight.in_features)
    return weight


def exact_activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose int8 block quantization is lossless: per block of 32, codes in [-127, 127] with one at
    +-127, times a power of two (some blocks all zero)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-k // BLOCK)
    codes = torch.randint(-127, 128, (rows, blocks, BLOCK), generator=gen)
    valid = torch.full((blocks, 1), BLOCK)
    valid[-1] = k - (blocks - 1) * BLOCK  # a last block of 16 has its peak among those 16
    peak = (torch.rand(rows, blocks, 1, generator=gen) * valid).long()
    sign = torch.randint(0, 2, (rows, blocks, 1), generator=gen) * 2 - 1
    codes.scatter_(2, peak, 127 * sign)
    scale = torch.exp2(torch.randint(-10, 4, (rows, blocks, 1), generator=gen).float())
    scale[torch.rand(rows, blocks, 1, generator=gen) < 0.1] = 0.0
    return (codes.float() * scale).flatten(1)[:, :k].contiguous()


class Reference:
    """One weight (and bias) in float64, with what the two tolerances need, computed once."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None) -> None:
        self.dense = weight.dequantize().double()
        self.bias = None if bias is None else bias.double()
        parts = weight.codes().double().unflatten(1, (-1, weight.group_size)) * weight.scales.double().unsqueeze(-1)
        parts = parts.abs() + weight.biases.double().abs().unsqueeze(-1)
        self.parts = parts.flatten(1)  # |scales * q| + |biases|: the magnitudes the kernel sums
        pad = -weight.in_features % BLOCK
        self.block_abs = F.pad(self.dense.abs(), (0, pad)).unflatten(1, (-1, BLOCK)).sum(-1)  # [N, blocks]

    def error(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        expected = x.double() @ self.dense.T
        return (y.double() - (expected if self.bias is None else expected + self.bias)).abs()

    def fp32_slack(self, x: torch.Tensor) -> torch.Tensor:
        total = x.double().abs() @ self.parts.T
        return FP32_SLACK * (total if self.bias is None else total + self.bias.abs()) + 1e-30

    def int8_bound(self, x: torch.Tensor) -> torch.Tensor:
        """sum over blocks b of (d_b / 2) * sum_{k in b} |w[n, k]|, with d_b = max|x_b| / 127."""
        pad = -x.shape[1] % BLOCK
        d = F.pad(x.double(), (0, pad)).unflatten(1, (-1, BLOCK)).abs().amax(-1) / 127  # [M, blocks]
        return (d / 2) @ self.block_abs.T

    def assert_exact(self, y: torch.Tensor, x: torch.Tensor) -> None:
        err, slack = self.error(y, x), self.fp32_slack(x)
        assert bool((err <= slack).all()), f"worst error / fp32 slack: {float((err / slack).max()):.3g}"

    def assert_within_bound(self, y: torch.Tensor, x: torch.Tensor) -> None:
        err, bound = self.error(y, x), self.int8_bound(x) + self.fp32_slack(x)
        assert bool((err <= bound).all()), f"worst error / bound: {float((err / bound).max()):.3g}"


# (bits, group_size, K): every group-size path (16 and 32 fixed per chunk, multiples of 64, others such as
# 48 / 96, channel-wise G = K), with K % 64 != 0 tails (4-bit: one nibble run; 8-bit: 16, 32 or 48 codes).
CASES = [
    (4, 16, 160), (4, 32, 160), (4, 64, 192), (4, 128, 256), (4, 160, 160), (4, 48, 96), (4, 96, 288),
    (8, 16, 272), (8, 32, 160), (8, 64, 192), (8, 128, 384), (8, 208, 208), (8, 48, 240), (8, 16, 48),
]
ROW_COUNTS = [*range(1, 65), 300]
HALF_ROW_COUNTS = [*range(1, 10), 16, 31, 32, 33, 64, 300]  # every row-tile shape, both paths, fewer calls


@pytest.mark.parametrize(("bits", "group_size", "k"), CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32-scales", "fp16-scales"])
def test_every_row_count_against_float64(
    kernel: NativeQuantLinear, bits: int, group_size: int, k: int, with_bias: bool, half: bool
) -> None:
    n = 37  # not a multiple of 16: uneven feature ranges across threads
    weight = random_weight(n, k, bits, group_size, seed=bits * 1000 + group_size + k, half=half)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k)) if with_bias else None
    exact = exact_activations(max(ROW_COUNTS), k, seed=k)
    noisy = torch.randn(max(ROW_COUNTS), k, generator=torch.Generator().manual_seed(k + 1)) * 3
    ref = Reference(weight, bias)
    for rows in HALF_ROW_COUNTS if half else ROW_COUNTS:
        ref.assert_exact(kernel.gemv(exact[:rows], weight, bias), exact[:rows])
        ref.assert_within_bound(kernel.gemv(noisy[:rows], weight, bias), noisy[:rows])
        ref.assert_exact(kernel.dequantized(noisy[:rows], weight, bias), noisy[:rows])


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    group_units=st.integers(1, 9),
    groups=st.integers(1, 6),
    n=st.integers(1, 70),
    rows=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    half=st.booleans(),
)
def test_random_shapes_within_bound(
    kernel: NativeQuantLinear, bits: int, group_units: int, groups: int, n: int, rows: int, seed: int, half: bool
) -> None:
    group_size = 16 * group_units
    k = group_size * groups
    if bits == 4 and k % 32:
        k *= 2  # 4-bit storage needs whole nibble runs
    weight = random_weight(n, k, bits, group_size, seed, half)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 2
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    ref = Reference(weight, bias)
    ref.assert_within_bound(kernel.gemv(x, weight, bias), x)
    ref.assert_exact(kernel.dequantized(x, weight, bias), x)
    exact = exact_activations(rows, k, seed)
    Reference(weight, None).assert_exact(kernel.gemv(exact, weight, None), exact)


def test_half_scales_match_their_float32_copy(kernel: NativeQuantLinear) -> None:
    """The same parameter values stored as float16 or float32 give the same outputs (the kernel converts
    float16 exactly), on every group-size path and both row paths."""
    for bits, group_size, k in CASES:
        half = random_weight(19, k, bits, group_size, seed=k, half=True)
        single = PackedWeight(half.qweight, half.scales.float(), half.biases.float(), half.bits, half.group_size,
                              half.in_features)
        assert torch.equal(half.dequantize(), single.dequantize())
        for rows in (1, 2, 5, 40):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            torch.testing.assert_close(kernel(x, half), kernel(x, single), rtol=1e-6, atol=1e-6)


def test_zero_tiny_and_huge_blocks(kernel: NativeQuantLinear) -> None:
    """A block of zeros, one of denormals (quantized to zero: 127 / max would overflow), one near 1e30."""
    weight = random_weight(30, 128, 4, 32, seed=10)
    x = torch.randn(3, 128)
    x[:, :32] = 0.0
    x[:, 32:64] = torch.randn(3, 32) * 1e-40
    x[1, 64:96] = torch.randn(32) * 1e30
    y = kernel.gemv(x, weight, None)
    assert bool(torch.isfinite(y).all())
    Reference(weight, None).assert_within_bound(y, x)


def test_rows_choose_the_path(kernel: NativeQuantLinear) -> None:
    weight = random_weight(40, 128, 4, 32, seed=8)
    x = torch.randn(GEMV_MAX_ROWS + 1, 128)
    few, many = x[:GEMV_MAX_ROWS], x
    assert torch.equal(kernel(few, weight), kernel.gemv(few, weight))
    assert torch.equal(kernel(many, weight), kernel.dequantized(many, weight))
    assert torch.equal(quant_linear_native(many, weight), kernel.dequantized(many, weight))


def test_dequantized_slabs(kernel: NativeQuantLinear, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights larger than one slab run slab by slab (a short last one too), into a fresh output or add_to."""
    weight = random_weight(100, 64, 8, 16, seed=9)
    x = torch.randn(20, 64)
    bias = torch.randn(100)
    monkeypatch.setattr(native_quant, "TILE_BYTES", 32 * 64 * 4)  # 32 features per slab: 32, 32, 32, 4
    ref = Reference(weight, bias)
    ref.assert_exact(kernel.dequantized(x, weight, bias), x)
    start = torch.randn(20, 100)
    target = start.clone()
    assert kernel.dequantized(x, weight, bias, add_to=target) is target
    torch.testing.assert_close(target, start + kernel.dequantized(x, weight, bias), rtol=0, atol=1e-5)


def test_add_to_accumulates_in_place(kernel: NativeQuantLinear) -> None:
    weight = random_weight(50, 192, 4, 32, seed=3)
    x = torch.randn(5, 192)
    bias = torch.randn(50)
    start = torch.randn(5, 50)
    target = start.clone()
    result = kernel.gemv(x, weight, bias, add_to=target)
    assert result is target
    torch.testing.assert_close(target, start + kernel.gemv(x, weight, bias), rtol=0, atol=1e-6)


def test_strided_rows_threads_and_empty(kernel: NativeQuantLinear) -> None:
    weight = random_weight(5, 128, 8, 32, seed=4)
    wide = exact_activations(6, 160, seed=5)
    x = wide[:, :128]  # rows 160 floats apart: read in place
    ref = Reference(weight, None)
    ref.assert_exact(kernel.gemv(x, weight, None), x)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):  # 3 threads over 5 features: some get none
            torch.set_num_threads(threads)
            ref.assert_exact(kernel.gemv(x, weight, None), x)
            ref.assert_exact(kernel.dequantized(x, weight, None), x)
    finally:
        torch.set_num_threads(before)
    for path in (kernel.gemv, kernel.dequantized):
        assert path(torch.empty(0, 128), weight, None).shape == (0, 5)


def test_rejects_what_it_cannot_take(kernel: NativeQuantLinear) -> None:
    weight = random_weight(24, 64, 4, 32, seed=6)
    x = torch.randn(2, 64)
    cases: list[tuple[str, dict[str, object]]] = [
        ("x", {"x": x.double()}),
        ("x", {"x": x.bfloat16()}),
        ("x", {"x": torch.randn(2, 96)}),
        ("x", {"x": x.unsqueeze(0)}),
        ("bias", {"bias": torch.randn(23)}),
        ("bias", {"bias": torch.randn(24, dtype=torch.float64)}),
        ("add_to", {"add_to": torch.randn(2, 23)}),
        ("add_to", {"add_to": torch.randn(24, 2).t()}),
        ("weight", {"weight": weight.dequantize()}),
        ("weight", {"weight": PackedWeight(weight.qweight, weight.scales.t().contiguous().t(), weight.biases,
                                           4, 32, 64)}),
    ]
    for name, override in cases:
        args: dict[str, object] = {"x": x, "weight": weight, "bias": None, "add_to": None, **override}
        for path in (kernel.gemv, kernel.dequantized):
            with pytest.raises(ValueError, match=f"^{name}:"):
                path(args["x"], args["weight"], args["bias"], add_to=args["add_to"])  # type: ignore[arg-type]


def test_cpu_quant_linear_native_and_fallbacks(kernel: NativeQuantLinear, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = random_weight(40, 96, 4, 32, seed=7)
    bias = torch.randn(40)
    x = torch.randn(2, 3, 96)
    native = cpu_quant_linear(x, weight, bias)
    assert native.shape == (2, 3, 40)
    torch.testing.assert_close(native.flatten(0, 1), quant_linear_native(x.flatten(0, 1), weight, bias),
                               rtol=0, atol=0)
    low = x.bfloat16()
    torch.testing.assert_close(cpu_quant_linear(low, weight, bias.bfloat16()),
                               F.linear(low, weight.dequantize(torch.bfloat16), bias.bfloat16()), rtol=0, atol=0)
    monkeypatch.setattr(native_quant, "native_quant_linear", lambda: None)
    torch.testing.assert_close(cpu_quant_linear(x, weight, bias), F.linear(x, weight.dequantize(), bias),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not available"):
        quant_linear_native(x[0], weight, bias)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The paths -march=native may not take here: (name, extra compiler flags, CPU flags they need)
VARIANTS = [
    ("portable", ["-DQG_FORCE_PORTABLE"], set()),
    ("avx2", ["-march=haswell"], {"avx2", "fma", "f16c", "bmi2"}),
    ("avx-vnni", ["-march=haswell", "-mavxvnni"], {"avx2", "fma", "f16c", "bmi2", "avx_vnni"}),
]


@pytest.mark.parametrize(("name", "flags", "needs"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_other_instruction_set_builds(
    kernel: NativeQuantLinear, tmp_path: Path, name: str, flags: list[str], needs: set[str]
) -> None:
    del kernel  # only for its skip: a C compiler is here
    if name != "portable" and (platform.machine() not in ("x86_64", "AMD64") or not needs <= _cpu_flags()):
        pytest.skip(f"the {name} build needs an x86-64 CPU with {sorted(needs)}")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    assert compiler is not None
    csrc = resources.files("asyncllm.kernels").joinpath("csrc")
    for entry in csrc.iterdir():
        if entry.name.endswith((".c", ".h")):
            (tmp_path / entry.name).write_bytes(entry.read_bytes())
    library = tmp_path / f"quant_linear_{name}.so"
    subprocess.run([compiler, "-O2", "-ffast-math", "-fopenmp", "-fPIC", "-shared", *flags,
                    str(tmp_path / "quant_linear.c"), "-o", str(library)], check=True, capture_output=True)
    variant = NativeQuantLinear(ctypes.CDLL(str(library)))
    for (bits, group_size, k), half in itertools.product(CASES, (False, True)):
        weight = random_weight(21, k, bits, group_size, seed=k + bits, half=half)
        bias = torch.randn(21)
        ref = Reference(weight, bias)
        for rows in (1, 2, 3, 4, 6):
            exact = exact_activations(rows, k, seed=rows)
            ref.assert_exact(variant.gemv(exact, weight, bias), exact)
            noisy = torch.randn(rows, k)
            ref.assert_within_bound(variant.gemv(noisy, weight, bias), noisy)
            ref.assert_exact(variant.dequantized(noisy, weight, bias), noisy)
