"""Triton weight-only quantized linears (GEMV, in-tile GEMM, dequantize + matmul) against float64 references.

Small shapes run on CPU through the Triton interpreter (and compiled on a GPU through the ``device``
fixture); ``cuda``-marked tests run Llama-3-8B-sized shapes, CUDA-graph capture and a no-sync check.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from asyncllm.kernels.triton_quant import (
    GEMM_MAX_M,
    GEMV_MAX_M,
    MAX_SPLIT_K,
    PATHS,
    default_path,
    dequantize_triton,
    plan_quant_linear,
    plan_splits,
    quant_linear_triton,
    tile_k,
)
from asyncllm.quant.packed import PackedWeight, QuantCodes, pack

# Relative to the largest reference output: fp32 accumulates in fp32 throughout; bf16 rounds the output
# (and, on the GEMM and dequant paths, each weight) to 8 significant bits, fp16 to 11.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
SEEDS = st.integers(0, 2**31 - 1)


def random_codes(n: int, k: int, bits: int, group: int, seed: int, device: torch.device) -> QuantCodes:
    """Random codes with positive scales, integer zero points and small mins (every format's shape)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.05 + 0.005
    zeros = torch.randint(0, 2**bits, (n, groups), generator=gen).float()
    mins = torch.randn(n, groups, generator=gen) * 0.02
    return QuantCodes(codes.to(device), scales.to(device), zeros.to(device), mins.to(device), bits, group)


def float64_weight(codes: QuantCodes) -> torch.Tensor:
    """The weight straight from the codes, in float64, without the packed form."""
    g = codes.group_size
    q = codes.codes.double().unflatten(1, (-1, g))
    w = (q - codes.zeros.double()[..., None]) * codes.scales.double()[..., None] + codes.mins.double()[..., None]
    return w.flatten(1)


def reference(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.dequantize().double().T
    return out + bias.double() if bias is not None else out


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    tol = TOLERANCE[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol * scale, rtol=tol)


def half_params(weight: PackedWeight) -> PackedWeight:
    return PackedWeight(weight.qweight, weight.scales.half(), weight.biases.half(), weight.bits, weight.group_size,
                        weight.in_features)


def run_case(device: torch.device, path: str, bits: int, group: int | None, k: int, n: int, m: int,
             dtype: torch.dtype, split_k: int | None, with_bias: bool, seed: int,
             strided: bool = False, half: bool = False) -> None:
    weight = pack(random_codes(n, k, bits, group or k, seed, device))
    if half:  # the same codes with their parameters rounded to and stored as float16
        weight = half_params(weight)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k + 8 if strided else k, generator=gen).to(dtype).to(device)
    if strided:  # a column slice: row stride larger than K
        x = x[:, 8:]
    bias = torch.randn(n, generator=gen).to(device) if with_bias else None
    out = quant_linear_triton(x, weight, bias, path=path, split_k=split_k)  # type: ignore[arg-type]
    assert out.shape == (m, n)
    assert_close_to(out, reference(x, weight, bias), dtype)


# Every path meets every (bits, group) pair once, with an (M, dtype) that rotates from path to path, so the
# pairs see different row counts on different paths. The GEMV takes 5 rows where 40 would come up (two row
# blocks, one partial) and meets 40 rows once, below, to bound interpreter time.
_PAIRS = [(bits, group) for bits in (4, 8) for group in (16, 32, 64, None)]  # None: channel-wise, G = K
_ROWS_DTYPES = list(itertools.product((1, 3, 16, 40), (torch.float32, torch.bfloat16)))


def _cases() -> list[object]:
    cases = []
    for p, path in enumerate(PATHS):
        for i, (bits, group) in enumerate(_PAIRS):
            m, dtype = _ROWS_DTYPES[(i + 3 * p) % len(_ROWS_DTYPES)]
            m = 5 if path == "gemv" and m == 40 else m
            name = f"{path}-w{bits}-g{group or 'K'}-m{m}-{str(dtype).removeprefix('torch.')}"
            cases.append(pytest.param(path, bits, group, m, dtype, id=name))
    return cases


@pytest.mark.parametrize(("path", "bits", "group", "m", "dtype"), _cases())
def test_paths_match_float64(device: torch.device, path: str, bits: int, group: int | None, m: int,
                             dtype: torch.dtype) -> None:
    run_case(device, path, bits, group, k=128, n=40, m=m, dtype=dtype, split_k=2 if m % 2 else None,
             with_bias=m != 16, seed=bits * 1000 + (group or 0) + m)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 16)])
def test_float16_parameters(device: torch.device, path: str, bits: int, group: int) -> None:
    """Scales and biases stored as float16 (what ``pack`` picks for GGUF-style weights) on every path."""
    run_case(device, path, bits, group, k=96, n=24, m=3, dtype=torch.float32, split_k=2, with_bias=True,
             seed=bits + group, half=True)
    weight = half_params(pack(random_codes(24, 96, bits, group, 5, device)))
    torch.testing.assert_close(dequantize_triton(weight).cpu(), weight.dequantize().cpu(), atol=0, rtol=0)


def test_gemv_many_rows(device: torch.device) -> None:
    """40 rows through the GEMV: ten row blocks of ``GEMV_MAX_M``, split K, a strided ``x``."""
    run_case(device, "gemv", 4, 32, k=96, n=24, m=40, dtype=torch.bfloat16, split_k=3, with_bias=True,
             seed=7, strided=True)


@settings(max_examples=25, deadline=None)
@given(path=st.sampled_from(PATHS), bits=st.sampled_from([4, 8]), group=st.sampled_from([16, 32, 48, 64, None]),
       runs=st.integers(2, 4), n=st.integers(1, 70), m=st.sampled_from([1, 2, 3, 5, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), split_k=st.sampled_from([None, 1, 2, 5]),
       with_bias=st.booleans(), strided=st.booleans(), seed=SEEDS, half=st.booleans())
def test_random_shapes_match_float64(device: torch.device, path: str, bits: int, group: int | None, runs: int,
                                     n: int, m: int, dtype: torch.dtype, split_k: int | None, with_bias: bool,
                                     strided: bool, seed: int, half: bool) -> None:
    # K a multiple of both G and 32: odd group counts and non-power-of-two K.
    k = runs * {48: 96, 64: 64}.get(group or 32, 32)
    run_case(device, path, bits, group, k=k, n=n, m=m, dtype=dtype, split_k=split_k, with_bias=with_bias,
             seed=seed, strided=strided, half=half)


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (4, 48), (4, 64), (8, 16), (8, 96)])
def test_dequantize(device: torch.device, bits: int, group: int) -> None:
    codes = random_codes(33, 192, bits, group, bits + group, device)
    weight = pack(codes)
    exact = float64_weight(codes)
    out = dequantize_triton(weight, torch.float32)
    assert out.shape == (33, 192) and out.dtype == torch.float32
    # fp32 w = scales * q + biases: one or two roundings (a GPU may fuse them) of values near 1
    torch.testing.assert_close(out.double().cpu(), exact.cpu(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, weight.dequantize(), atol=1e-6, rtol=1e-6)
    bf16 = dequantize_triton(weight, torch.bfloat16)
    torch.testing.assert_close(bf16.float(), weight.dequantize(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)


def test_split_k_is_deterministic(device: torch.device) -> None:
    weight = pack(random_codes(24, 256, 4, 32, 3, device))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).to(device)
    for path in ("gemv", "gemm"):
        first = quant_linear_triton(x, weight, path=path, split_k=4)  # type: ignore[arg-type]
        assert torch.equal(first, quant_linear_triton(x, weight, path=path, split_k=4))  # type: ignore[arg-type]


def test_empty_and_zero_k(device: torch.device) -> None:
    weight = pack(random_codes(8, 64, 4, 32, 0, device))
    assert quant_linear_triton(torch.empty(0, 64, device=device), weight).shape == (0, 8)
    empty_k = PackedWeight(torch.empty(3, 0, dtype=torch.uint8, device=device),
                           torch.empty(3, 0, device=device), torch.empty(3, 0, device=device), 4, 16, 0)
    bias = torch.tensor([1.0, 2.0, 3.0], device=device)
    out = quant_linear_triton(torch.empty(2, 0, device=device), empty_k, bias)
    assert torch.equal(out.cpu(), bias.cpu().expand(2, 3))


def test_rejects_bad_inputs(device: torch.device) -> None:
    weight = pack(random_codes(8, 64, 4, 32, 0, device))
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="weight:"):
        quant_linear_triton(x, weight.dequantize(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x:"):
        quant_linear_triton(torch.randn(2, 32, device=device), weight)
    with pytest.raises(ValueError, match="x:"):
        quant_linear_triton(x[None], weight)
    with pytest.raises(ValueError, match="x:"):
        quant_linear_triton(x.to(torch.int32), weight)
    with pytest.raises(ValueError, match="bias:"):
        quant_linear_triton(x, weight, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="path:"):
        quant_linear_triton(x, weight, path="cublas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split_k:"):
        quant_linear_triton(x, weight, split_k=0)
    with pytest.raises(ValueError, match="dtype:"):
        dequantize_triton(weight, torch.int8)


# -- planning (host-side only) -----------------------------------------------------------------------
def test_default_paths() -> None:
    assert [default_path(m) for m in (1, GEMV_MAX_M, GEMV_MAX_M + 1, GEMM_MAX_M, GEMM_MAX_M + 1, 4096)] == [
        "gemv", "gemv", "gemm", "gemm", "dequant", "dequant"]


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.integers(1, 64).map(lambda g: 16 * g),
       cap=st.sampled_from([32, 64, 128, 256]))
def test_tiles_never_straddle_a_group(bits: int, group: int, cap: int) -> None:
    block_k = tile_k(bits, group, cap)
    assert block_k & (block_k - 1) == 0 and block_k <= max(cap, 32)
    if bits == 8 or group % 32 == 0:
        assert group % block_k == 0  # one group per tile and row
    else:
        # one 32-value run: its low nibbles (values 0..15) and high nibbles (16..31) each sit in one group
        assert block_k == 32 and group % 16 == 0


@settings(max_examples=200, deadline=None)
@given(tiles=st.integers(1, 10_000), k_tiles=st.integers(1, 300), block_k=st.sampled_from([16, 32, 128]),
       target=st.integers(1, 2000), split_k=st.one_of(st.none(), st.integers(1, 64)))
def test_plan_splits_cover_k(tiles: int, k_tiles: int, block_k: int, target: int, split_k: int | None) -> None:
    k = k_tiles * block_k
    splits, split_len = plan_splits(tiles, k, block_k, target, split_k)
    assert 1 <= splits <= min(MAX_SPLIT_K, k_tiles)
    assert split_len % block_k == 0
    assert (splits - 1) * split_len < k <= splits * split_len  # covers K, none empty


def test_plan_uses_dot_sized_tiles() -> None:
    cpu = torch.device("cpu")
    for m, bits, group in itertools.product((5, 64, 256), (4, 8), (16, 48, 128)):
        launch = plan_quant_linear(m, 1, 4096 * 3 // 2, bits, group, torch.bfloat16, cpu)
        assert launch.path == "gemm" and launch.block_m >= 16 and launch.block_n >= 16
        assert (launch.block_k // 2 if bits == 4 else launch.block_k) >= 16  # each dot's K: low or high nibbles


# -- the GPU benchmark's quantized-linear rows, timing stubbed ------------------------------------------------
def test_benchmark_quant_rows(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/gpu.py``'s W4A16 section on tiny shapes: every row present, the two layers' outputs close."""
    name = "asyncllm_gpu_benchmark_quant"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, bench)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "QUANT_LAYER", (("a", 64, 48), ("b", 96, 32)))
    monkeypatch.setattr(bench, "QUANT_GROUP", 32)
    monkeypatch.setattr(bench, "QUANT_BATCHES", (1, 5))
    timed: list[int] = []

    def fake_time(fn: Callable[[int], object]) -> float:
        fn(0), fn(1)  # both layer copies
        timed.append(1)
        return 10.0 * len(timed)

    monkeypatch.setattr(bench, "graph_time_us", fake_time)
    rows, raw = bench.bench_quant_layer(device, seed=0)
    assert len(timed) == 4
    metrics = [row.metric for row in rows]
    assert metrics == [f"{what}, batch {b}{suffix}" for b in (1, 5) for what, suffix in (
        ("2 linears", f" ({'gemv' if b == 1 else 'gemm'})"), ("bytes read per s", ""),
        ("max relative difference to bf16", ""))]
    assert rows[0].ratio == 2.0 and rows[0].target.threshold == bench.QUANT_TARGET  # 20 us bf16 / 10 us W4
    assert all(v["max_relative_difference"] < 2e-2 for v in raw["batches"].values())


# -- on a GPU: realistic shapes, graphs, no host sync ----------------------------------------------------
@functools.lru_cache(maxsize=2)
def _llama_weight(bits: int) -> PackedWeight:
    """A random ``[14336, 4096]`` weight with groups of 128 (Llama-3-8B's MLP width), on the GPU."""
    return pack(random_codes(14336, 4096, bits, 128, bits, torch.device("cuda")))


@pytest.mark.parametrize(("m", "bits"), [(1, 4), (8, 4), (64, 4), (512, 4), (1, 8), (64, 8)])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_llama_shapes_on_gpu(m: int, bits: int) -> None:
    weight = _llama_weight(bits)
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    bias = torch.randn(14336, generator=gen, device="cuda").to(torch.bfloat16)
    expected = reference(x, weight, bias)
    assert_close_to(quant_linear_triton(x, weight, bias), expected, torch.bfloat16)
    if m <= GEMM_MAX_M:  # the dequantize + cuBLAS path too, on the same inputs
        assert_close_to(quant_linear_triton(x, weight, bias, path="dequant"), expected, torch.bfloat16)
    else:  # and the in-tile GEMM past its default range
        assert_close_to(quant_linear_triton(x, weight, bias, path="gemm"), expected, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_graph_capture_and_no_host_sync() -> None:
    weight = _llama_weight(4)
    x = torch.randn(64, 4096, device="cuda").to(torch.bfloat16)
    rows = {m: x[:m].clone() for m in (1, 3, 64)}  # gemv, gemv with row blocks, gemm (split-K)
    expected = {m: quant_linear_triton(v, weight) for m, v in rows.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for v in rows.values():
            quant_linear_triton(v, weight)
            quant_linear_triton(v, weight, path="dequant")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = {m: quant_linear_triton(v, weight) for m, v in rows.items()}
    torch.cuda.current_stream().wait_stream(stream)
    for v in rows.values():
        v.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    for m in rows:
        # halving x halves every product exactly, so the replay must give exactly half the eager output
        assert torch.equal(captured[m], expected[m] * 0.5)
