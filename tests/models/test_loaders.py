"""Checkpoint loaders against independent references.

- GGUF block formats: a float64 decoder written here from the GGML block layouts (and, second,
  ``gguf.quants.dequantize``); float types exactly against the source values.
- q/k rotary rows: files are written with llama.cpp's permutation (re-implemented here); the loader must
  return the original Hugging Face rows.
- The real SmolLM2 GGUF: every tensor and the config against ``transformers``' own GGUF loader.
- Hugging Face directories: tensors and config against what ``transformers`` saved.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file

from asyncllm.config import ModelConfig
from asyncllm.loaders import Checkpoint, load_checkpoint, resolve_model_path
from asyncllm.loaders.gguf_file import GGUFFile

# ----------------------------------------------------------------------------- reference decoders (spec)


def _halves(pairs: np.ndarray) -> np.ndarray:
    """``[n, 2]`` little-endian IEEE half bytes -> float64 ``[n]``."""
    return np.ascontiguousarray(pairs).view("<f2").astype(np.float64).reshape(-1)


def ref_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 34)
    d = _halves(blocks[:, 0:2])
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float64)
    return (d[:, None] * q).reshape(-1)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Per block: element j < 16 is the low nibble of byte j, element j + 16 its high nibble."""
    packed = packed.astype(np.int64)
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float64)


def ref_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 18)
    d = _halves(blocks[:, 0:2])
    return (d[:, None] * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(-1)


def ref_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 20)
    d, m = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    return (d[:, None] * _nibbles(blocks[:, 4:]) + m[:, None]).reshape(-1)


def ref_q4_k(raw: np.ndarray) -> np.ndarray:
    out = []
    for block in raw.reshape(-1, 144):
        d, dmin = _halves(block[0:2].reshape(1, 2))[0], _halves(block[2:4].reshape(1, 2))[0]
        packed = [int(v) for v in block[4:16]]
        qs = block[16:144].astype(np.int64)
        y = np.empty(256)
        for j in range(8):
            if j < 4:
                scale, low = packed[j] & 63, packed[j + 4] & 63
            else:
                scale = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4)
                low = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
            chunk = qs[32 * (j // 2):32 * (j // 2) + 32]
            q = chunk & 0x0F if j % 2 == 0 else chunk >> 4
            y[32 * j:32 * j + 32] = d * scale * q - dmin * low
        out.append(y)
    return np.concatenate(out)


def ref_q6_k(raw: np.ndarray) -> np.ndarray:
    out = []
    for block in raw.reshape(-1, 210):
        ql, qh = block[0:128].astype(np.int64), block[128:192].astype(np.int64)
        scales = np.ascontiguousarray(block[192:208]).view(np.int8).astype(np.int64)
        d = _halves(block[208:210].reshape(1, 2))[0]
        y = np.empty(256)
        for half in range(2):
            lo, hi, sc, base = ql[64 * half:], qh[32 * half:], scales[8 * half:], 128 * half
            for lane in range(32):
                group = lane // 16
                q1 = ((lo[lane] & 0xF) | (((hi[lane] >> 0) & 3) << 4)) - 32
                q2 = ((lo[lane + 32] & 0xF) | (((hi[lane] >> 2) & 3) << 4)) - 32
                q3 = ((lo[lane] >> 4) | (((hi[lane] >> 4) & 3) << 4)) - 32
                q4 = ((lo[lane + 32] >> 4) | (((hi[lane] >> 6) & 3) << 4)) - 32
                y[base + lane] = d * sc[group] * q1
                y[base + lane + 32] = d * sc[group + 2] * q2
                y[base + lane + 64] = d * sc[group + 4] * q3
                y[base + lane + 96] = d * sc[group + 6] * q4
        out.append(y)
    return np.concatenate(out)


SPEC_DECODERS: dict[QType, Callable[[np.ndarray], np.ndarray]] = {
    QType.Q8_0: ref_q8_0, QType.Q4_0: ref_q4_0, QType.Q4_1: ref_q4_1,
    QType.Q4_K: ref_q4_k, QType.Q6_K: ref_q6_k,
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (as ``convert_hf_to_gguf.py`` writes them)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_rows_of_gguf_rows(rows: int, num_heads: int) -> np.ndarray:
    """``index[k]`` = the Hugging Face row stored at GGUF row ``k``."""
    return llama_cpp_permute(np.arange(rows), num_heads)


# ----------------------------------------------------------------------------- writing tiny GGUF files

SHAPE = dict(hidden=256, heads=4, kv_heads=2, ffn=256, layers=1, vocab=32)
LAYER_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _weight_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    head_dim = s["hidden"] // s["heads"]
    shapes = {"token_embd.weight": (s["vocab"], s["hidden"])}
    per_layer = {
        "attn_q": (s["hidden"], s["hidden"]), "attn_k": (s["kv_heads"] * head_dim, s["hidden"]),
        "attn_v": (s["kv_heads"] * head_dim, s["hidden"]), "attn_output": (s["hidden"], s["hidden"]),
        "ffn_gate": (s["ffn"], s["hidden"]), "ffn_up": (s["ffn"], s["hidden"]),
        "ffn_down": (s["hidden"], s["ffn"]),
    }
    for layer in range(s["layers"]):
        shapes.update({f"blk.{layer}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def write_gguf(
    path: pathlib.Path,
    tensors: Sequence[tuple[str, np.ndarray, QType | None]],
    *,
    arch: str = "llama",
    shape: dict[str, int] = SHAPE,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> pathlib.Path:
    """A llama GGUF with the given tensors: float arrays (row-major, HF shape) or uint8 block bytes
    ``[rows, row_bytes]`` with their ``QType``."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(shape["layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(shape["vocab"])])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if extra is not None:
        extra(writer)
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_blocks(rng: np.random.Generator, qtype: QType, rows: int, cols: int) -> np.ndarray:
    """Random K-quant block bytes with finite, modest half-float super-block scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    half_fields = {QType.Q4_K: (0, 2), QType.Q6_K: (208,)}[qtype]
    for start in half_fields:
        scales = rng.uniform(1e-4, 2e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def norm_tensors(rng: np.random.Generator, s: dict[str, int]) -> list[tuple[str, np.ndarray, QType | None]]:
    names = ["output_norm.weight"]
    for layer in range(s["layers"]):
        names += [f"blk.{layer}.attn_norm.weight", f"blk.{layer}.ffn_norm.weight"]
    return [(name, (1.0 + 0.1 * rng.standard_normal(s["hidden"])).astype(np.float32), None) for name in names]


def _expected_hf_name(gguf_name: str) -> str:
    table = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in table:
        return table[gguf_name]
    _, layer, module, kind = gguf_name.split(".")
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    return f"model.layers.{layer}.{hf[module]}.{kind}"


def _rotary_heads(gguf_name: str, s: dict[str, int]) -> int | None:
    if ".attn_q." in gguf_name:
        return s["heads"]
    if ".attn_k." in gguf_name:
        return s["kv_heads"]
    return None


# ----------------------------------------------------------------------------- GGUF: storage types


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K],
                         ids=lambda t: t.name)
def test_gguf_quantized_weights_match_the_block_spec(tmp_path: pathlib.Path, qtype: QType) -> None:
    """Every weight decodes to the float64 spec decoding of its bytes, rows moved back to HF order."""
    rng = np.random.default_rng(int(qtype))
    stored: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    tensors: list[tuple[str, np.ndarray, QType | None]] = norm_tensors(rng, SHAPE)
    for name, (rows, cols) in _weight_shapes(SHAPE).items():
        if qtype in (QType.Q4_K, QType.Q6_K):
            source, raw = None, random_blocks(rng, qtype, rows, cols)
        else:
            source = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
            heads = _rotary_heads(name, SHAPE)
            raw = gguf.quants.quantize(source if heads is None else llama_cpp_permute(source, heads), qtype)
        stored[name] = (raw, source)
        tensors.append((name, raw, qtype))
    checkpoint = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", tensors), dequantize_weights=True)
    loaded = dict(checkpoint.tensors(torch.float32))

    assert checkpoint.format == "gguf"
    assert set(loaded) == {_expected_hf_name(name) for name, _, _ in tensors}
    for name, (raw, source) in stored.items():
        rows, cols = _weight_shapes(SHAPE)[name]
        gguf_rows = SPEC_DECODERS[qtype](raw.reshape(-1)).reshape(rows, cols)
        library_rows = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
        np.testing.assert_allclose(library_rows, gguf_rows, rtol=1e-6, atol=1e-9)
        heads = _rotary_heads(name, SHAPE)
        expected = np.empty_like(gguf_rows)
        if heads is None:
            expected[:] = gguf_rows
        else:
            expected[hf_rows_of_gguf_rows(rows, heads)] = gguf_rows
        got = loaded[_expected_hf_name(name)]
        assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
        if source is not None:  # the layout is also right relative to what was quantized
            assert float(np.abs(got.numpy() - source).max()) < 0.2 * float(np.abs(source).max())
    for name, data, qtype_of in tensors:
        if qtype_of is None:
            assert torch.equal(loaded[_expected_hf_name(name)], torch.from_numpy(data))


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16], ids=lambda t: t.name)
def test_gguf_float_weights_are_exact(tmp_path: pathlib.Path, qtype: QType) -> None:
    """An HF state dict written as llama.cpp would (q/k permuted) reads back exactly, in every dtype."""
    rng = np.random.default_rng(7)
    state = {name: (0.05 * rng.standard_normal(shape)).astype(np.float32)
             for name, shape in _weight_shapes(SHAPE).items()}
    tensors = norm_tensors(rng, SHAPE)
    for name, source in state.items():
        heads = _rotary_heads(name, SHAPE)
        stored = source if heads is None else llama_cpp_permute(source, heads)
        if qtype == QType.F32:
            tensors.append((name, stored, None))
        else:
            raw_dtype = qtype if qtype == QType.BF16 else None
            tensors.append((name, gguf.quants.quantize(stored, qtype), raw_dtype))
    checkpoint = load_checkpoint(write_gguf(tmp_path / "float.gguf", tensors))
    torch_dtype = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}[qtype]
    for out_dtype in (torch.float32, torch.bfloat16):
        loaded = dict(checkpoint.tensors(out_dtype))
        for name, source in state.items():
            expected = torch.from_numpy(source).to(torch_dtype).to(out_dtype)
            got = loaded[_expected_hf_name(name)]
            assert got.dtype == out_dtype
            assert torch.equal(got, expected), name


def test_gguf_yielded_tensors_are_owned_copies(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(3)
    embedding = rng.standard_normal((SHAPE["vocab"], SHAPE["hidden"])).astype(np.float32)
    path = write_gguf(tmp_path / "own.gguf", [("token_embd.weight", embedding, None)])
    before = path.read_bytes()
    checkpoint = load_checkpoint(path)
    (name, tensor), = checkpoint.tensors(torch.float32)
    tensor.add_(1.0)
    (_, again), = checkpoint.tensors(torch.float32)
    assert name == "model.embed_tokens.weight"
    assert torch.equal(again, torch.from_numpy(embedding))
    assert path.read_bytes() == before


def test_gguf_unsupported_storage_type_names_tensor_and_type(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    source = rng.standard_normal((SHAPE["vocab"], SHAPE["hidden"])).astype(np.float32)
    path = write_gguf(tmp_path / "q5.gguf",
                      [("token_embd.weight", gguf.quants.quantize(source, QType.Q5_0), QType.Q5_0)])
    with pytest.raises(ValueError, match=r"token_embd\.weight.*Q5_0"):
        load_checkpoint(path)


def test_gguf_other_architecture_is_rejected(tmp_path: pathlib.Path) -> None:
    embedding = np.zeros((SHAPE["vocab"], SHAPE["hidden"]), dtype=np.float32)
    path = write_gguf(tmp_path / "qwen.gguf", [("token_embd.weight", embedding, None)], arch="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        load_checkpoint(path)


def test_gguf_unknown_tensor_is_rejected(tmp_path: pathlib.Path) -> None:
    embedding = np.zeros((SHAPE["vocab"], SHAPE["hidden"]), dtype=np.float32)
    odd = np.zeros(SHAPE["hidden"], dtype=np.float32)
    path = write_gguf(tmp_path / "odd.gguf",
                      [("token_embd.weight", embedding, None), ("blk.0.odd.weight", odd, None)])
    with pytest.raises(ValueError, match=r"blk\.0\.odd\.weight"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- GGUF: config


def test_gguf_config_from_metadata(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(5)
    tensors = [(name, (0.05 * rng.standard_normal(shape)).astype(np.float32), None)
               for name, shape in _weight_shapes(SHAPE).items()]
    untied = [*tensors, ("output.weight", np.zeros((SHAPE["vocab"], SHAPE["hidden"]), np.float32), None)]

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_eot_token_id(3)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    tied = load_checkpoint(write_gguf(tmp_path / "tied.gguf", tensors))
    other = load_checkpoint(write_gguf(tmp_path / "untied.gguf", untied, extra=metadata))

    config = tied.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (256, 256, 1)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["vocab_size"] == SHAPE["vocab"] and config["max_position_embeddings"] == 512
    assert config["rms_norm_eps"] == pytest.approx(1e-5) and config["rope_theta"] == 10000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tied.tensor_names()
    assert "rope_scaling" not in config
    assert other.hf_config["tie_word_embeddings"] is False and "lm_head.weight" in other.tensor_names()
    assert other.hf_config["eos_token_id"] == [2, 3]
    assert other.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    model_config = ModelConfig.from_hf_config(other.hf_config)
    assert model_config.eos_token_ids == (2, 3)
    assert model_config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_gguf_yarn_scaling_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    tensors = [(name, np.zeros(shape, np.float32), None) for name, shape in _weight_shapes(SHAPE).items()]

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(128)

    with pytest.raises(ValueError, match=r"rope\.scaling\.type='yarn'.*not supported"):
        load_checkpoint(write_gguf(tmp_path / "yarn.gguf", tensors, extra=metadata))


@pytest.mark.parametrize(("factor", "head_dim"), [(8.0, 128), (32.0, 64)])
def test_gguf_llama3_rope_frequencies_roundtrip(tmp_path: pathlib.Path, factor: float, head_dim: int) -> None:
    """``rope_freqs.weight`` (as llama.cpp writes it for Llama 3.x) becomes a rope_scaling dict that gives
    transformers the same inverse frequencies as the original Llama 3 parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, heads = 500000.0, 2
    original = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    common = dict(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                  rope_theta=theta, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**common, rope_scaling=original), "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freq_factors = (plain / scaled.double()).float().numpy()
    shape = {**SHAPE, "hidden": heads * head_dim, "heads": heads, "kv_heads": heads}

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_freq_base(theta)

    embedding = np.zeros((SHAPE["vocab"], heads * head_dim), dtype=np.float32)
    path = write_gguf(tmp_path / "llama3.gguf", [("token_embd.weight", embedding, None),
                                                  ("rope_freqs.weight", freq_factors, None)],
                      shape=shape, extra=metadata)
    checkpoint = load_checkpoint(path)
    rope_scaling = checkpoint.hf_config["rope_scaling"]
    assert rope_scaling["rope_type"] == "llama3"
    assert checkpoint.tensor_names() == ("model.embed_tokens.weight",)
    rebuilt, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**common, rope_scaling=rope_scaling), "cpu")
    torch.testing.assert_close(rebuilt, scaled, rtol=1e-6, atol=0.0)


def test_gguf_file_header_matches_gguf_reader(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(11)
    source = rng.standard_normal((SHAPE["vocab"], SHAPE["hidden"])).astype(np.float32)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_string("general.name", "tiny ✓")
        writer.add_array("test.ints", [1, -2, 3])
        writer.add_array("test.floats", [0.5, 1.5])
        writer.add_bool("test.flag", True)
        writer.add_uint64("test.big", 2**40)

    path = write_gguf(tmp_path / "header.gguf",
                      [("token_embd.weight", gguf.quants.quantize(source, QType.Q8_0), QType.Q8_0),
                       ("output_norm.weight", source[0].copy(), None)], extra=metadata)
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    expected = {key: f.contents() for key, f in reference.fields.items() if not key.startswith("GGUF.")}
    assert ours.metadata == expected
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert info.shape == tuple(int(d) for d in tensor.shape) and info.ggml_type == tensor.tensor_type
        assert np.array_equal(ours.raw_bytes(info), np.asarray(tensor.data).reshape(-1).view(np.uint8))


def test_gguf_file_rejects_non_gguf_and_truncated(tmp_path: pathlib.Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_checkpoint(junk)
    embedding = np.ones((SHAPE["vocab"], SHAPE["hidden"]), dtype=np.float32)
    full = write_gguf(tmp_path / "full.gguf", [("token_embd.weight", embedding, None)]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:-100])
    with pytest.raises(ValueError, match=r"token_embd\.weight"):
        load_checkpoint(cut)


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def transformers_gguf_reference(smollm2_gguf: pathlib.Path) -> dict[str, Any]:
    """transformers' own GGUF loading of the file: its parsed config and its dequantized HF tensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = load_checkpoint(smollm2_gguf).hf_config
    names_only = LlamaConfig(**{k: v for k, v in ours.items() if k != "architectures"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(names_only)
    return load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_gguf: pathlib.Path,
                                            transformers_gguf_reference: dict[str, Any]) -> None:
    expected = transformers_gguf_reference["tensors"]
    checkpoint = load_checkpoint(smollm2_gguf, dequantize_weights=True)
    seen = set()
    for name, tensor in checkpoint.tensors(torch.float32):
        assert name in expected, name
        if not torch.equal(tensor, expected[name]):  # identical bits are the common case; else: tight
            torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7, msg=name)
        seen.add(name)
    assert seen == set(expected)
    assert "lm_head.weight" not in seen and len(seen) == 2 + 9 * 30


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2_gguf: pathlib.Path,
                                             transformers_gguf_reference: dict[str, Any]) -> None:
    theirs = transformers_gguf_reference["config"]
    ours = load_checkpoint(smollm2_gguf).hf_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == theirs[key], key
    config = ModelConfig.from_hf_config(ours)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)


@pytest.mark.slow
def test_smollm2_header_matches_gguf_reader(smollm2_gguf: pathlib.Path) -> None:
    ours, reference = GGUFFile(smollm2_gguf), gguf.GGUFReader(smollm2_gguf)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        expected = (tensor.data_offset, tensor.n_bytes, tensor.tensor_type)
        assert (info.offset, info.nbytes, info.ggml_type) == expected, tensor.name


# ----------------------------------------------------------------------------- Hugging Face directories


def _tiny_hf_model(tie: bool = False) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("shard_size", "tie"), [(None, False), ("20KB", False), (None, True)])
def test_hf_directory_roundtrip(tmp_path: pathlib.Path, shard_size: str | None, tie: bool) -> None:
    model = _tiny_hf_model(tie)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_size is not None)

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.format == "hf" and checkpoint.local_path == tmp_path
    assert checkpoint.hf_config == json.loads((tmp_path / "config.json").read_text())
    state = model.state_dict()
    expected_names = {name for name in state if not (tie and name == "lm_head.weight")}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = dict(checkpoint.tensors(dtype))
        assert set(loaded) == expected_names == set(checkpoint.tensor_names())
        for name, tensor in loaded.items():
            assert tensor.dtype == dtype
            assert torch.equal(tensor, state[name].to(dtype)), name


def test_hf_directory_keeps_integer_tensors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    packed = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    scales = torch.ones(3, dtype=torch.float16)
    save_file({"w.qweight": packed, "w.scales": scales}, tmp_path / "model.safetensors")
    loaded = dict(load_checkpoint(tmp_path).tensors(torch.float32))
    assert loaded["w.qweight"].dtype == torch.int32 and torch.equal(loaded["w.qweight"], packed)
    assert loaded["w.scales"].dtype == torch.float32


# ----------------------------------------------------------------------------- resolution and errors


def test_missing_local_path_is_named(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(str(missing))


def test_directory_without_config(tmp_path: pathlib.Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_checkpoint(tmp_path)


def test_directory_without_weights_and_bin_only(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.bin"):
        load_checkpoint(tmp_path)


def test_missing_shard_is_named(tmp_path: pathlib.Path) -> None:
    _tiny_hf_model().save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_checkpoint(tmp_path)


def test_directory_holding_one_gguf(tmp_path: pathlib.Path) -> None:
    embedding = np.ones((SHAPE["vocab"], SHAPE["hidden"]), dtype=np.float32)
    path = write_gguf(tmp_path / "only.gguf", [("token_embd.weight", embedding, None)])
    checkpoint = load_checkpoint(tmp_path)
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.local_path == path and checkpoint.format == "gguf"
    write_gguf(tmp_path / "second.gguf", [("token_embd.weight", embedding, None)])
    with pytest.raises(ValueError, match=r"second\.gguf"):
        load_checkpoint(tmp_path)


def test_hub_id_offline_not_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as info:
        load_checkpoint("example-org/not-cached-model", cache_dir=tmp_path / "hub")
    assert "local path" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_hub_id_in_local_cache_works_offline(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--tiny-llama"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = _tiny_hf_model()
    model.save_pretrained(snapshot, safe_serialization=True)

    assert resolve_model_path("example-org/tiny-llama", cache_dir=tmp_path / "hub") == snapshot
    checkpoint = load_checkpoint("example-org/tiny-llama", cache_dir=tmp_path / "hub")
    state = model.state_dict()
    assert checkpoint.local_path == snapshot
    assert all(torch.equal(tensor, state[name]) for name, tensor in checkpoint.tensors(torch.float32))


def test_local_path_wins_over_hub_id(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == pathlib.Path("org/name")
    assert resolve_model_path(os.fspath(local)) == local


def test_bad_model_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="model"):
        resolve_model_path("")
    weights = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_checkpoint(weights)
    checkpoint = load_checkpoint(write_gguf(tmp_path / "d.gguf", [
        ("token_embd.weight", np.zeros((SHAPE["vocab"], SHAPE["hidden"]), np.float32), None)]))
    with pytest.raises(ValueError, match="dtype"):
        checkpoint.tensors(torch.int8)
