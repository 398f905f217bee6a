"""Rotary cos/sin tables of every scaling type against Hugging Face ``ROPE_INIT_FUNCTIONS`` directly, and the
``rope_scaling_factor`` knob (``EngineConfig`` / CLI) that extends a model's context with dynamic NTK."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from asyncllm.cli_options import engine_args, engine_overrides
from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.layers.rotary import build_cos_sin_cache

HEAD_DIM, MAX_POS, THETA = 16, 64, 10000.0
_BASE: dict[str, Any] = dict(vocab_size=32, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=32, num_hidden_layers=1, max_position_embeddings=MAX_POS)

UNSCALED = {"rope_type": "linear", "factor": 1.0}  # transformers has no "default" entry in ROPE_INIT_FUNCTIONS
CASES: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.5 + 0.7 * i for i in range(HEAD_DIM // 2)]},
}


def _hf_rows(rope: dict[str, Any], positions: range, seq_len: int | None = None) -> torch.Tensor:
    config = LlamaConfig(**_BASE, rope_parameters={**rope, "rope_theta": THETA})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", seq_len=seq_len)
    freqs = torch.outer(torch.tensor(list(positions), dtype=torch.float32), inv_freq.float())
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor


@pytest.mark.parametrize("case", sorted(CASES))
def test_cos_sin_table_matches_hf_rope_init(case: str) -> None:
    rope = CASES[case]
    hf_config = {**_BASE, "architectures": ["LlamaForCausalLM"], "rope_theta": THETA, "rope_scaling": rope}
    config = ModelConfig.from_hf_config(hf_config)
    assert config.head_dim == HEAD_DIM
    ours = build_cos_sin_cache(HEAD_DIM, THETA, MAX_POS, config.rope_scaling)
    kind = rope["rope_type"]
    if kind == "dynamic":  # row p: the NTK base Hugging Face uses for a sequence of max(p + 1, M) tokens
        assert ours.shape[0] == MAX_POS * 2
        torch.testing.assert_close(ours[:MAX_POS], _hf_rows(UNSCALED, range(MAX_POS)))
        for length in (MAX_POS + 1, MAX_POS + 17, 2 * MAX_POS):
            row = _hf_rows(rope, range(length - 1, length), seq_len=length)
            torch.testing.assert_close(ours[length - 1 : length], row, rtol=1e-5, atol=1e-5)
    elif kind == "longrope":  # short factors below the original length, long ones from it on
        original = rope["original_max_position_embeddings"]
        assert ours.shape[0] == MAX_POS
        torch.testing.assert_close(ours[:original], _hf_rows(rope, range(original)))
        torch.testing.assert_close(ours[original:], _hf_rows(rope, range(original, MAX_POS), seq_len=original + 1))
        assert not torch.allclose(ours[original:], _hf_rows(rope, range(original, MAX_POS)))
    else:
        expected_rows = {"linear": int(MAX_POS * 2.5), "llama3": MAX_POS,
                         "yarn": max(MAX_POS, int(rope.get("original_max_position_embeddings", 0) * 4))}[kind]
        assert ours.shape[0] == expected_rows
        torch.testing.assert_close(ours, _hf_rows(rope, range(expected_rows)), rtol=1e-5, atol=1e-5)
    if kind in ("yarn", "longrope"):  # the attention factor scales cos and sin
        assert not math.isclose(float(ours[0, 0]), 1.0)


def test_su_is_longrope_and_top_level_original_wins() -> None:
    rope = {**CASES["longrope"], "type": "su", "original_max_position_embeddings": 8}
    del rope["rope_type"]
    config = ModelConfig.from_hf_config({**_BASE, "architectures": ["Phi3ForCausalLM"], "rope_scaling": rope,
                                         "original_max_position_embeddings": 16})
    assert config.rope_scaling is not None
    assert config.rope_scaling["rope_type"] == "longrope"
    assert config.rope_scaling["original_max_position_embeddings"] == 16


@pytest.mark.parametrize("rope", [{"rope_type": "proportional", "factor": 2.0}, {"type": "ntk-by-parts"}])
def test_unsupported_rope_type_names_rope_scaling(rope: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"rope_scaling: unsupported rope_type"):
        build_cos_sin_cache(HEAD_DIM, THETA, MAX_POS, rope)


def test_partial_rotary_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_hf_config({**_BASE, "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75})


def test_rope_scaling_factor_extends_context_with_dynamic_ntk() -> None:
    config = ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"],
                                         "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    extended = config.with_rope_scaling_factor(4)
    assert extended.rope_scaling == {"rope_type": "dynamic", "factor": 4.0}
    table = build_cos_sin_cache(HEAD_DIM, THETA, MAX_POS, extended.rope_scaling)
    assert table.shape[0] == 4 * MAX_POS
    # inside the original context nothing changes; beyond it, row p uses the NTK base for p + 1 tokens
    torch.testing.assert_close(table[:MAX_POS], _hf_rows(UNSCALED, range(MAX_POS)))
    last = _hf_rows({"rope_type": "dynamic", "factor": 4.0}, range(4 * MAX_POS - 1, 4 * MAX_POS), 4 * MAX_POS)
    torch.testing.assert_close(table[-1:], last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1.5, float("inf"), float("nan"), True, "2"])
def test_rope_scaling_factor_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        EngineConfig(rope_scaling_factor=bad)
    config = ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        config.with_rope_scaling_factor(bad)


def test_cli_option_maps_to_engine_config() -> None:
    parser = argparse.ArgumentParser()
    engine_args(parser)
    assert "rope_scaling_factor" not in engine_overrides(parser.parse_args([]))
    overrides = engine_overrides(parser.parse_args(["--rope-scaling-factor", "2.5"]))
    assert EngineConfig(**overrides).rope_scaling_factor == 2.5


async def test_from_pretrained_rope_scaling_factor_grows_max_model_len(tiny_hf_dir: Any) -> None:
    from asyncllm import AsyncEngine

    plain = AsyncEngine.from_pretrained(tiny_hf_dir, device="cpu", kernel_backend="torch")
    extended = AsyncEngine.from_pretrained(tiny_hf_dir, device="cpu", kernel_backend="torch",
                                           rope_scaling_factor=2.0)
    try:
        assert extended.model_config.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
        assert plain.model_config.rope_scaling is None
        assert extended.max_model_len == 2 * plain.max_model_len == 2 * plain.model_config.max_position_embeddings
        prompt = list(range(3, 12))
        short = await plain.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        same = await extended.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert same.token_ids == short.token_ids  # within the original context nothing changes
    finally:
        await plain.aclose()
        await extended.aclose()
