"""The checkpoint writers' directories read back through ``load_hf_dir`` and ``codes_stream`` give exactly
the writers' dequantized reference, and that reference loads into the transformers model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.loaders.hf_dir import load_hf_dir
from asyncllm.quant.codes_stream import CODE_MINS, CODE_SCALES, CODE_ZEROS, CODES, INPUT_PERM, codes_stream
from asyncllm.quant.hf_config import quant_spec_from_hf_config
from asyncllm.quant.packed import QuantCodes

from ._writers import model_class, quantized_prefix, tiny_model, write_awq, write_compressed_tensors, write_gptq

CASES: list[tuple[str, Callable[..., dict[str, torch.Tensor]], dict[str, Any]]] = [
    ("awq-llama", write_awq, {}),
    ("awq-qwen2-channel-sharded", write_awq, {"family": "qwen2", "group_size": None, "shards": 3}),
    ("gptq-llama-sym4", write_gptq, {}),
    ("gptq-qwen2-asym8-actorder", write_gptq, {"family": "qwen2", "bits": 8, "sym": False, "desc_act": True,
                                               "shards": 2}),
    ("gptq-llama-asym4-v2-actorder", write_gptq, {"sym": False, "desc_act": True, "checkpoint_format": "gptq_v2"}),
    ("ct-llama-sym4", write_compressed_tensors, {}),
    ("ct-qwen2-asym8-channel", write_compressed_tensors, {"family": "qwen2", "bits": 8, "group_size": None,
                                                           "symmetric": False, "shards": 2}),
    ("ct-llama-asym4-naive", write_compressed_tensors, {"symmetric": False, "fmt": "naive-quantized"}),
]


def _restore(tensors: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    scales = tensors.pop(f"{prefix}.{CODE_SCALES}")
    codes = tensors.pop(f"{prefix}.{CODES}")
    exact = QuantCodes(codes, scales, tensors.pop(f"{prefix}.{CODE_ZEROS}"), tensors.pop(f"{prefix}.{CODE_MINS}"),
                       bits=bits, group_size=codes.shape[1] // scales.shape[1])
    weight = exact.dequantize()
    perm = tensors.pop(f"{prefix}.{INPUT_PERM}", None)
    if perm is None:
        return weight
    restored = torch.empty_like(weight)
    restored[:, perm] = weight
    return restored


@pytest.mark.parametrize(("writer", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_checkpoint_reads_back_exactly(tmp_path: Path, writer: Callable[..., dict[str, torch.Tensor]],
                                       kwargs: dict[str, Any]) -> None:
    if writer is write_compressed_tensors:
        pytest.importorskip("compressed_tensors")
    reference = writer(tmp_path, **kwargs)
    checkpoint = load_hf_dir(tmp_path)
    spec = quant_spec_from_hf_config(checkpoint.hf_config)
    assert spec is not None
    streamed = dict(codes_stream(spec, checkpoint.tensors(torch.float32)))
    quantized = {quantized_prefix(name) for name in reference} - {None}
    assert len(quantized) == 14
    assert any(name.endswith(INPUT_PERM) for name in streamed) == bool(kwargs.get("desc_act"))
    for name, expected in reference.items():
        prefix = quantized_prefix(name)
        if prefix is not None or name == "lm_head.weight":
            assert spec.is_quantized(name.removesuffix(".weight")) == (prefix is not None), name
        got = _restore(streamed, prefix, spec.bits) if prefix is not None else streamed.pop(name)
        assert torch.equal(got, expected), name
    assert not streamed, sorted(streamed)
    _, original = tiny_model(kwargs.get("family", "llama"))
    for name in reference:
        if quantized_prefix(name) is not None:  # round-to-nearest stays close to the random weights
            assert (reference[name] - original[name]).norm() < 0.15 * original[name].norm(), name
    model = model_class(kwargs.get("family", "llama"))
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{k: v for k, v in checkpoint.hf_config.items() if k != "quantization_config"})
    model(config).load_state_dict(reference, strict=True)
