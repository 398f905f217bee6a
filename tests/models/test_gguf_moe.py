"""Mixture-of-experts GGUF files (``qwen2moe``, ``qwen3moe``, and ``llama`` with experts, i.e. Mixtral), written
here with ``gguf.GGUFWriter`` in llama.cpp's layout (``convert_hf_to_gguf.py``: experts stacked per projection,
Mixtral's q/k rows permuted for pairwise rotary) from a tiny random Hugging Face model, loaded and run against
that model's logits."""

from __future__ import annotations

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
from asyncllm.loaders.gguf import gguf_spec
from asyncllm.loaders.gguf_file import GGUFFile
from asyncllm.models import MoeForCausalLM, build_model
from asyncllm.quant.config import UNQUANTIZED

from ._paged import PagedSequence
from .test_gguf_families import _GLOBAL, _LAYER, _llama_cpp_permute, write_family_gguf
from .test_llama_parity import PagedRun, assert_close, hf_llama, hf_logits, random_ids
from .test_moe_parity import hf_mixtral, hf_qwen2_moe, hf_qwen3_moe

_SHARED = {"mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
           "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
           "mlp.gate": "ffn_gate_inp"}
_F16 = gguf.GGMLQuantizationType.F16
_Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _gguf_tensors(arch: str, hf: PreTrainedModel) -> dict[str, np.ndarray]:
    """``hf``'s tensors under llama.cpp's names and layouts for ``arch``."""
    config = hf.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name in _GLOBAL:
            tensors[_GLOBAL[name]] = array
            continue
        _, _, layer, *parts = name.split(".")
        module = ".".join(parts)
        if module == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            gate, up = np.split(array, 2, axis=1)
            tensors[f"blk.{layer}.ffn_gate_exps.weight"] = gate
            tensors[f"blk.{layer}.ffn_up_exps.weight"] = up
        elif module == "mlp.experts.down_proj":
            tensors[f"blk.{layer}.ffn_down_exps.weight"] = array
        else:
            *path, kind = parts
            key = ".".join(path)
            gguf_module = _SHARED.get(key) or _LAYER[key]
            if arch == "llama" and gguf_module in ("attn_q", "attn_k"):
                array = _llama_cpp_permute(array, heads if gguf_module == "attn_q" else kv_heads)
            tensors[f"blk.{layer}.{gguf_module}.{kind}"] = array
    return tensors


def write_moe_gguf(path: pathlib.Path, arch: str, hf: PreTrainedModel,
                   storage: gguf.GGMLQuantizationType | None = None) -> pathlib.Path:
    """A GGUF file of ``hf`` as llama.cpp writes ``arch``; ``storage`` (F16, Q8_0) stores the 2D and 3D weights
    whose rows allow it in that type (the rest stay F32), as llama.cpp's quantizer does."""
    config = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch != "llama":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, array in _gguf_tensors(arch, hf).items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if storage is not None and array.ndim >= 2 and name.endswith(".weight") and "norm" not in name \
                and array.shape[-1] % 32 == 0:
            if storage == _F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, storage), raw_dtype=storage)
            continue
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _round_like_storage(hf: PreTrainedModel, storage: gguf.GGMLQuantizationType) -> None:
    """Set ``hf``'s weights to what ``write_moe_gguf`` stores in ``storage``, so the file and ``hf`` hold one
    model (blocks run along rows, which the GGUF layout keeps: experts split, not transposed)."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim >= 2 and "norm" not in name and param.shape[-1] % 32 == 0:
                array = np.ascontiguousarray(param.numpy())
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, storage), storage)))


CASES: dict[str, tuple[str, Any]] = {
    "qwen3moe": ("qwen3moe", lambda: hf_qwen3_moe(seed=31)),
    "qwen2moe": ("qwen2moe", lambda: hf_qwen2_moe(seed=32, mlp_only_layers=[])),
    "qwen2moe-dense-layer": ("qwen2moe", lambda: hf_qwen2_moe(seed=33)),
    "mixtral": ("llama", lambda: hf_mixtral(seed=34)),
}
FAMILY = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "llama": "mixtral"}


def _run(checkpoint: Any, hf: PreTrainedModel, seed: int) -> None:
    config = ModelConfig.from_hf_config(checkpoint.hf_config)
    model = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, MoeForCausalLM)
    model.load_weights(checkpoint.tensors(torch.float32))
    run, seq = PagedRun(model), PagedSequence()
    ids = random_ids(14, seed=seed)
    chunks = run.step([(seq, ids[:8])])
    for t in range(8, len(ids)):
        chunks += run.step([(seq, [ids[t]])])
    assert_close(torch.cat(chunks), hf_logits(hf, ids))


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_gguf_matches_hf(tmp_path: pathlib.Path, case: str) -> None:
    arch, make = CASES[case]
    hf = make()
    checkpoint = load_checkpoint(write_moe_gguf(tmp_path / f"{case}.gguf", arch, hf))
    config = ModelConfig.from_hf_config(checkpoint.hf_config)
    want = ModelConfig.from_hf_config(hf.config.to_dict())
    assert config.architecture == FAMILY[arch] == want.architecture
    assert config.moe == want.moe and config.qk_norm == want.qk_norm and config.qkv_bias == want.qkv_bias
    _run(checkpoint, hf, seed=30)


@pytest.mark.parametrize("storage", [_F16, _Q8_0], ids=lambda t: t.name)
def test_moe_gguf_half_and_quantized_weights_load_as_floats(tmp_path: pathlib.Path,
                                                            storage: gguf.GGMLQuantizationType) -> None:
    """F16 and block-quantized expert tensors are decoded to floats at load: the model is the file's."""
    hf = hf_qwen3_moe(seed=35, hidden_size=64, moe_intermediate_size=32)
    _round_like_storage(hf, storage)
    path = write_moe_gguf(tmp_path / "q.gguf", "qwen3moe", hf, storage)
    checkpoint = load_checkpoint(path)
    stored = {name: info.ggml_type for name, info in GGUFFile(path).tensors.items()}
    assert stored["blk.0.ffn_gate_exps.weight"] == stored["blk.1.ffn_down_exps.weight"] == storage
    assert checkpoint.quantization == UNQUANTIZED  # nothing kept as codes
    _run(checkpoint, hf, seed=36)


def test_llama_file_without_experts_stays_llama(tmp_path: pathlib.Path) -> None:
    checkpoint = load_checkpoint(write_family_gguf(tmp_path / "llama.gguf", "llama", hf_llama(seed=37)))
    assert ModelConfig.from_hf_config(checkpoint.hf_config).architecture == "llama"


def test_gguf_family_follows_expert_count() -> None:
    assert gguf_spec({"general.architecture": "llama", "llama.expert_count": 8}).name == "mixtral"
    assert gguf_spec({"general.architecture": "llama", "llama.expert_count": 0}).name == "llama"
    assert gguf_spec({"general.architecture": "qwen3moe", "qwen3moe.expert_count": 8}).name == "qwen3_moe"
    with pytest.raises(ValueError, match=r"qwen2\.expert_count=4"):
        gguf_spec({"general.architecture": "qwen2", "qwen2.expert_count": 4})
