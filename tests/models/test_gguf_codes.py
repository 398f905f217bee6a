"""GGUF block types kept quantized: codes bit-exact against the ``gguf`` package, and a quantized GGUF model
loaded packed produces what the same file decoded to dense weights produces."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from asyncllm.config import ModelConfig
from asyncllm.kernels import get_kernel_ops
from asyncllm.loaders import load_checkpoint
from asyncllm.loaders.gguf_codes import QUANTIZED_TYPES, quant_codes
from asyncllm.loaders.gguf_dequant import dequantize
from asyncllm.models import build_model
from asyncllm.quant.config import WeightOnlyQuantization
from asyncllm.quant.packed import pack

from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches
from .test_loaders import SHAPE, _weight_shapes, norm_tensors, write_gguf

BLOCK_TYPES = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q5_K, QType.Q6_K]
HALF_FIELDS = {QType.Q8_0: (0,), QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2),
               QType.Q6_K: (208,)}
"""Byte offsets of each block's half-float scale fields (the rest of a block may be any bytes)."""


def random_blocks(rng: np.random.Generator, qtype: QType, rows: int, cols: int) -> np.ndarray:
    """Random block bytes with finite, modest (possibly negative) half-float scales: ``[rows, row bytes]``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for start in HALF_FIELDS[qtype]:
        scales = (rng.uniform(1e-4, 2e-2, size=blocks.shape[0]) * rng.choice([-1, 1], blocks.shape[0]))
        blocks[:, start:start + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_every_block_type_has_codes() -> None:
    assert set(BLOCK_TYPES) == set(QUANTIZED_TYPES)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_codes_dequantize_bit_exact_against_gguf(qtype: QType) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    raw = random_blocks(rng, qtype, rows, cols)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32))
    codes = quant_codes(torch.from_numpy(raw.reshape(-1).copy()), qtype, rows, cols)
    assert torch.equal(codes.dequantize(), expected)
    assert int(codes.codes.max()) < 1 << codes.bits
    flat = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, torch.float32)
    assert torch.equal(flat.reshape(rows, cols), expected)
    packed = pack(codes)  # folded biases: the same values up to one float32 rounding
    torch.testing.assert_close(packed.dequantize(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(packed.codes(), codes.codes)


def test_codes_reject_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="raw"):
        quant_codes(torch.zeros(10, dtype=torch.uint8), QType.Q4_0, 1, 32)
    with pytest.raises(ValueError, match="F32"):
        quant_codes(torch.zeros(128, dtype=torch.uint8), QType.F32, 1, 32)


def _tiny_model_tensors(rng: np.random.Generator, qtypes: dict[str, QType]) -> list[tuple[str, np.ndarray, QType]]:
    """A tiny llama GGUF's weights, each in the type ``qtypes`` names for its GGUF module."""
    tensors: list[tuple[str, np.ndarray, QType]] = []
    for name, (rows, cols) in _weight_shapes(SHAPE).items():
        qtype = qtypes[name.split(".")[-2]]
        tensors.append((name, random_blocks(rng, qtype, rows, cols), qtype))
    return tensors


MIXES = {
    "q4_1+q8_0": {**dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
                                  QType.Q4_1), "token_embd": QType.Q8_0},
    "k-quants": {"attn_q": QType.Q4_K, "attn_k": QType.Q4_K, "attn_v": QType.Q6_K, "attn_output": QType.Q5_K,
                 "ffn_gate": QType.Q4_K, "ffn_up": QType.Q4_K, "ffn_down": QType.Q6_K, "token_embd": QType.Q4_0},
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_packed_gguf_model_matches_dequantized(tmp_path: pathlib.Path, mix: str) -> None:
    """The same file loaded packed (default) and decoded to floats: equal logits up to float32 rounding (the
    packed weight folds its zero point into a bias), on the torch reference ops and the CPU fast paths."""
    rng = np.random.default_rng(7)
    tensors = [*_tiny_model_tensors(rng, MIXES[mix]), *norm_tensors(rng, SHAPE)]
    path = write_gguf(tmp_path / f"{mix}.gguf", tensors)
    packed_ckpt = load_checkpoint(path)
    dense_ckpt = load_checkpoint(path, dequantize_weights=True)
    assert isinstance(packed_ckpt.quantization, WeightOnlyQuantization)
    assert "model.embed_tokens" in packed_ckpt.quantization.layers
    assert any(name.endswith(".codes") for name in packed_ckpt.tensor_names())
    assert not any(name.endswith(".codes") for name in dense_ckpt.tensor_names())
    config = ModelConfig.from_hf_config(packed_ckpt.hf_config)
    ids = torch.from_numpy(rng.integers(0, SHAPE["vocab"], size=40)).long()  # prefill > 32 rows: exact paths
    for backend in ("torch", "auto"):
        ops = get_kernel_ops(backend, torch.device("cpu"))
        dense = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"))
        dense.load_weights(dense_ckpt.tensors(torch.float32))
        packed = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"),
                             quantization=packed_ckpt.quantization)
        packed.load_weights(packed_ckpt.tensors(torch.float32))
        names = {name for name, _ in packed.named_parameters()}
        assert "model.layers.0.self_attn.qkv_proj.qweight" in names and "model.embed_tokens.qweight" in names
        assert not any(name.endswith(".weight") and "proj" in name for name in names)
        # the torch ops multiply the exact weights, and so does the CPU fast path's many-row (prefill) path; its
        # decode kernels round activations to int8 blocks (llama.cpp's scheme): an error of up to half a block
        # scale per input (see kernels.native_quant), a few percent of the logits' scale here
        steps = zip(_logits_per_step(dense, ids), _logits_per_step(packed, ids), strict=True)
        for index, (want, got) in enumerate(steps):
            tolerance = 1e-4 if backend == "torch" or index == 0 else 5e-2
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))
            if tolerance < 1e-3:
                assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.no_grad()
def _logits_per_step(model: torch.nn.Module, ids: torch.Tensor, decode_steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill of ``ids`` on two sequences, then ``decode_steps`` greedy decode steps of both."""
    config = model.config
    pool = BlockPool(32, 16, seed=1)
    caches = make_kv_caches(config.num_hidden_layers, 32, 16, config.num_key_value_heads, config.head_dim)
    seqs = [PagedSequence(), PagedSequence()]
    feeds = [ids.tolist(), ids.flip(0)[:5].tolist()]
    out = []
    for _ in range(decode_steps + 1):
        positions, meta = build_step(pool, [(seq, len(feed)) for seq, feed in zip(seqs, feeds, strict=True)])
        flat = torch.tensor([t for feed in feeds for t in feed], dtype=torch.int64)
        logits = model.compute_logits(model.forward(flat, positions, meta, caches))
        out.append(logits)
        last = logits[meta.query_start_loc[1:].long() - 1]
        feeds = [[int(t)] for t in last.argmax(-1)]
    return out
