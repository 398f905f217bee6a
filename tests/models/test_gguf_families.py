"""GGUF files of the Qwen2, Qwen3, Phi-3, InternLM2, Gemma 2 and Gemma 3 architectures, written here with
``gguf.GGUFWriter`` in llama.cpp's tensor names and layouts from a tiny random Hugging Face model, loaded and
run against that model's logits."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from asyncllm.config import ModelConfig
from asyncllm.kernels import TORCH_OPS
from asyncllm.loaders import load_checkpoint
from asyncllm.models import build_model

from ._paged import PagedSequence
from .test_llama_parity import FAMILIES, PagedRun, assert_close, hf_logits, random_ids

_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GEMMA_LAYER = {"pre_feedforward_layernorm": "ffn_norm", "post_attention_layernorm": "post_attention_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotate-half rows interleaved in pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_family_gguf(path: pathlib.Path, arch: str, hf: PreTrainedModel) -> pathlib.Path:
    config = hf.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    gemma = arch in ("gemma2", "gemma3")
    rope = config.rope_parameters["full_attention"] if arch == "gemma3" else config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    tensors = {}
    tied = config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        array = tensor.float().numpy()
        if gemma and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp's Gemma conversion folds the (1 + w) in
        if name in _GLOBAL:
            tensors[_GLOBAL[name]] = array
            continue
        _, _, layer, *module, kind = name.split(".")
        gguf_module = {**_LAYER, **(_GEMMA_LAYER if gemma else {})}[".".join(module)]
        if arch == "internlm2" and gguf_module in ("attn_q", "attn_k"):
            array = _llama_cpp_permute(array, heads if gguf_module == "attn_q" else kv_heads)
        tensors[f"blk.{layer}.{gguf_module}.{kind}"] = array
    if arch == "phi3":
        rope = config.rope_parameters
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        factor = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)))
        tensors["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)
        tensors["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
    if gemma:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is not None:
                getattr(writer, f"add_{key}")(getattr(config, key))
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "internlm2", "gemma2", "gemma3"])
def test_gguf_family_matches_hf(tmp_path: pathlib.Path, arch: str) -> None:
    overrides: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}} \
        if arch == "internlm2" else {}
    if arch in ("gemma2", "gemma3"):
        overrides["query_pre_attn_scalar"] = 16  # GGUF files carry none: head_dim below 27B, as llama.cpp
    hf = FAMILIES[arch](seed=21, **overrides)
    checkpoint = load_checkpoint(write_family_gguf(tmp_path / f"{arch}.gguf", arch, hf))
    config = ModelConfig.from_hf_config(checkpoint.hf_config)
    assert config.architecture == arch
    if arch == "phi3":
        assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "longrope"
        rope = hf.config.rope_parameters
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            assert config.rope_scaling[key] == pytest.approx(rope[key])
    model = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(checkpoint.tensors(torch.float32))
    run, seq = PagedRun(model), PagedSequence()
    ids = random_ids(15, seed=21)  # within Phi-3's original length: one HF forward uses the short factors
    chunks = run.step([(seq, ids[:9])])
    for t in range(9, len(ids)):
        chunks += run.step([(seq, [ids[t]])])
    assert_close(torch.cat(chunks), hf_logits(hf, ids))
