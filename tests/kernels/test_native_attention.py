"""The native paged decode attention (C, ``kernels/csrc``) against a float64 reference, its input checks,
and how it is built and loaded (cache, switches, process state)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asyncllm.config import NATIVE_KERNELS_ENV, EngineConfig
from asyncllm.kernels import get_kernel_ops, native_build
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.native_attention import NativeDecodeAttention
from asyncllm.kernels.native_build import load_native_library, native_kernels_status

from .native_support import require_native_kernels


@pytest.fixture
def kernel() -> NativeDecodeAttention:
    require_native_kernels()
    loaded = NativeDecodeAttention.load()
    assert loaded is not None
    return loaded


def _paged_case(
    lens: list[int], *, heads: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q as the query slice of a fused ``[B, (heads + 2 kv_heads) * D]`` output (batch stride > heads * D),
    caches of random values, and each sequence's blocks drawn at random from the pool."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(len(lens), heads + 2 * kv_heads, head_dim, generator=gen)
    q = fused[:, :heads]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column, as padded tables have
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(lens):
        used = -(-n // block_size)
        tables[row, :used] = order[taken : taken + used].int()
        taken += used
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Per sequence, in float64: its tokens' K/V read through the table, softmax(q K^T * scale) V."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = q.shape[1] // kv_heads
    rows = []
    for b, n in enumerate(lens.tolist()):
        token = torch.arange(n)
        slots = tables[b, token // block_size].long() * block_size + token % block_size
        keys = k_cache.flatten(0, 1)[slots].double().repeat_interleave(groups, dim=1)  # [n, heads, D]
        values = v_cache.flatten(0, 1)[slots].double().repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        rows.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("lens", "heads", "kv_heads", "head_dim", "block_size"),
    [
        ([1], 4, 4, 32, 4),
        ([6, 1, 13], 6, 2, 32, 4),
        ([150] * 31 + [141], 9, 3, 64, 16),
        ([1, 17, 16, 33], 8, 1, 64, 16),
        ([700], 9, 3, 64, 16),
    ],
    ids=["one-token", "ragged-gqa", "batch-32", "multi-query", "long"],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_reference(
    kernel: NativeDecodeAttention, lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
    threads: int,
) -> None:
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    q, k_cache, v_cache, tables, seq_lens = _paged_case(
        lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, num_blocks=num_blocks,
        seed=len(lens) * 31 + heads,
    )
    scale = head_dim**-0.5
    plan = kernel.plan(tables, seq_lens, k_cache.shape, num_heads=heads, threads=threads)
    got = plan.run(q, KVCache(k_cache, v_cache), scale)
    assert got.shape == (len(lens), heads * head_dim)
    torch.testing.assert_close(got.double(), _reference(q, k_cache, v_cache, tables, seq_lens, scale),
                               rtol=1e-5, atol=1e-5)
    # the plan serves every layer of a step: other caches, same tables
    k2, v2 = torch.randn_like(k_cache), torch.randn_like(v_cache)
    torch.testing.assert_close(plan.run(q, KVCache(k2, v2), scale).double(),
                               _reference(q, k2, v2, tables, seq_lens, scale), rtol=1e-5, atol=1e-5)


def test_plan_rejects_layouts_the_kernel_would_read_out_of_bounds(kernel: NativeDecodeAttention) -> None:
    _q, k_cache, _v_cache, tables, lens = _paged_case([5, 3], heads=4, kv_heads=2, head_dim=8, block_size=4,
                                                    num_blocks=6, seed=1)
    shape = k_cache.shape
    cases: list[tuple[str, dict[str, object]]] = [
        ("block_tables", {"block_tables": tables.long()}),
        ("seq_lens", {"seq_lens": lens.float()}),
        ("seq_lens", {"seq_lens": torch.tensor([5, 0], dtype=torch.int32)}),
        ("seq_lens", {"seq_lens": torch.tensor([5, tables.shape[1] * 4 + 1], dtype=torch.int32)}),
        ("seq_lens", {"seq_lens": torch.tensor([5], dtype=torch.int32)}),
        ("block_tables", {"block_tables": tables.clone().fill_(6)}),
        ("block_tables", {"block_tables": tables.clone().fill_(-1)}),
        ("num_heads", {"num_heads": 3}),
        ("cache_shape", {"cache_shape": shape[:3]}),
    ]
    for field, change in cases:
        args: dict[str, object] = {"block_tables": tables, "seq_lens": lens, "cache_shape": shape, "num_heads": 4}
        args.update(change)
        with pytest.raises(ValueError, match=field):
            kernel.plan(args.pop("block_tables"), args.pop("seq_lens"), args.pop("cache_shape"),  # type: ignore[arg-type]
                        num_heads=args.pop("num_heads"))  # type: ignore[arg-type]


def test_run_rejects_tensors_that_do_not_fit_the_plan(kernel: NativeDecodeAttention) -> None:
    q, k_cache, v_cache, tables, lens = _paged_case([5, 3], heads=4, kv_heads=2, head_dim=8, block_size=4,
                                                    num_blocks=6, seed=2)
    plan = kernel.plan(tables, lens, k_cache.shape, num_heads=4)
    cache = KVCache(k_cache, v_cache)
    with pytest.raises(ValueError, match="q"):
        plan.run(q.double(), cache, 0.5)
    with pytest.raises(ValueError, match="q"):
        plan.run(q[:, :3], cache, 0.5)
    with pytest.raises(ValueError, match="q"):
        plan.run(q.transpose(1, 2).contiguous().transpose(1, 2), cache, 0.5)
    with pytest.raises(ValueError, match="cache"):
        plan.run(q, KVCache(k_cache[:5], v_cache[:5]), 0.5)
    strided = v_cache.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="cache"):
        plan.run(q, KVCache(strided, strided), 0.5)
    quantized = KVCache.allocate(6, 4, 2, 8, dtype=torch.float32, device=torch.device("cpu"), bits=8)
    with pytest.raises(ValueError, match="cache: expected a float32 cache"):
        plan.run(q, quantized, 0.5)


def test_builds_once_into_the_cache_then_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_native_kernels()
    monkeypatch.setenv("ASYNCLLM_CACHE", str(tmp_path))
    assert load_native_library("decode_attention.c") is not None
    built = list((tmp_path / "native").iterdir())
    assert [path.suffix for path in built] == [".so"]  # the temporary build directory is gone
    stamp = built[0].stat().st_mtime_ns
    assert load_native_library("decode_attention.c") is not None
    assert list((tmp_path / "native").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_switched_off_or_without_gcc_callers_keep_torch_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ASYNCLLM_CACHE", str(tmp_path))
    # switched off: the environment variable is the default of EngineConfig.native_kernels, which shapes
    # the bundle; the bundle then has no native capabilities
    for value in ("0", "off", "false"):
        monkeypatch.setenv(NATIVE_KERNELS_ENV, value)
        config = EngineConfig()
        assert config.native_kernels is False
        ops = get_kernel_ops("auto", torch.device("cpu"), native_kernels=config.native_kernels)
        assert ops.name == "cpu" and ops.plan_attention(None, None, 0) is None  # type: ignore[arg-type]
    monkeypatch.delenv(NATIVE_KERNELS_ENV)
    assert EngineConfig().native_kernels is True
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="asyncllm.kernels"):
        assert NativeDecodeAttention.load() is None
    assert "no GCC" in caplog.text
    assert not (tmp_path / "native").exists()


def test_a_compile_error_is_logged_and_leaves_no_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require_native_kernels()
    monkeypatch.setenv("ASYNCLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "_source", lambda name: b"this is not C;\n")
    with caplog.at_level(logging.WARNING, logger="asyncllm.kernels"):
        assert load_native_library("decode_attention.c") is None
    assert "failed to build" in caplog.text
    assert list((tmp_path / "native").iterdir()) == []


_PROCESS_STATE_PROBE = """
import torch
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.native_attention import NativeDecodeAttention

def runtimes():
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line}

before = runtimes()
assert NativeDecodeAttention.load() is not None
assert runtimes() == before, (before, runtimes())
assert (torch.tensor([1e-40]) * 1.0).item() != 0.0, "denormals flushed to zero"
print("ok")
"""


def test_loading_shares_torchs_openmp_runtime_and_keeps_denormals(kernel: NativeDecodeAttention) -> None:
    """In a fresh process: loading the kernel maps no OpenMP runtime besides the one torch loaded (no
    second thread pool), and does not flush denormals to zero for the whole process (as a library
    linked with GCC's fast-math start-up code would)."""
    done = subprocess.run([sys.executable, "-c", _PROCESS_STATE_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_status_line_says_whether_the_kernels_run_and_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_native_kernels()
    monkeypatch.setenv("ASYNCLLM_CACHE", str(tmp_path))
    assert native_kernels_status() == "on"
    assert {path.suffix for path in (tmp_path / "native").iterdir()} == {".so"}
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "0")
    assert native_kernels_status() == f"off: {NATIVE_KERNELS_ENV}=0"
    monkeypatch.delenv(NATIVE_KERNELS_ENV)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native_kernels_status() == "off: no GCC found ($CC or cc)"
