"""Shared fixtures: the real SmolLM2 GGUF (fetched by .ci/run) for the tests marked ``slow``, and a tiny
random Llama with an in-memory tokenizer for the engine and server tests, which need no download."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.assets import DEFAULT_MODEL_FILE, cache_dir

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter; the switch is read when a kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

MISSING_GGUF = (
    "needs the SmolLM2 GGUF: run `asyncllm fetch-default` (or set ASYNCLLM_TEST_GGUF); .ci/run fetches it"
)


def smollm2_path() -> Path | None:
    explicit = os.environ.get("ASYNCLLM_TEST_GGUF")
    path = Path(explicit) if explicit else cache_dir() / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip(MISSING_GGUF)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    from asyncllm.tokenizer import Tokenizer

    return Tokenizer.from_path(smollm2_gguf)


def tiny_llama_state(vocab_size: int, *, seed: int = 0, **overrides: Any) -> tuple[dict[str, Any], dict]:
    """A random-weight HF Llama (fp32) as (config dict, state dict); init spread wide enough that greedy
    decoding has clear winners."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        initializer_range=0.2, tie_word_embeddings=False, rope_theta=10000.0,
    )
    settings.update(overrides)
    config = LlamaConfig(**settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    hf_config = config.to_dict()
    hf_config["architectures"] = ["LlamaForCausalLM"]
    return hf_config, model.state_dict()


@pytest.fixture(scope="session")
def chat_tokenizer() -> Any:
    """A small Llama-2-style tokenizer with a ChatML template, trained in memory (see ``_tokenizers``)."""
    from .core._tokenizers import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_parts(chat_tokenizer: Any) -> tuple[Any, dict[str, Any], dict]:
    hf_config, state = tiny_llama_state(chat_tokenizer.vocab_size)
    return chat_tokenizer, hf_config, state


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> Path:
    """The tiny random Llama of ``tiny_model_parts`` as a Hugging Face directory with its tokenizer files
    (float32 safetensors), for tests that load a model from a path."""
    import json

    from safetensors.torch import save_file

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    tokenizer, hf_config, state = tiny_model_parts
    directory = tmp_path_factory.mktemp("tiny-hf") / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "float32"}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    write_tokenizer_files(directory, tokenizer)
    return directory


@pytest.fixture
def make_tiny_engine(tiny_model_parts: tuple[Any, dict[str, Any], dict]) -> Callable[..., Any]:
    """Factory: ``make_tiny_engine(**engine_config_overrides)`` -> an unstarted AsyncEngine on CPU."""
    from asyncllm import AsyncEngine, ModelConfig
    from asyncllm.kernels import TORCH_OPS
    from asyncllm.models import build_model

    tokenizer, hf_config, state = tiny_model_parts

    def make(**overrides: Any) -> AsyncEngine:
        config = ModelConfig.from_hf_config(hf_config)
        model = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
        model.load_weights(state.items())
        overrides.setdefault("device", "cpu")
        overrides.setdefault("kv_cache_tokens", 4096)
        return AsyncEngine.from_model(model, tokenizer, **overrides)

    return make


LLAVA_IMAGE_TEXT = "#"
"""The image token of the tiny LLaVA: ``#``, one character and one token of the chat tokenizer."""


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer: Any) -> Path:
    """A tiny random Hugging Face ``LlavaForConditionalGeneration`` (32x32 images, 16 image tokens, image
    token ``#``) saved with its tokenizer files, for tests that load a vision-language model from a path."""
    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    from .models.test_llava_parity import hf_llava

    image_token = chat_tokenizer.encode(LLAVA_IMAGE_TEXT, add_special_tokens=False)
    assert len(image_token) == 1
    directory = tmp_path_factory.mktemp("tiny-llava") / "llava"
    hf_llava(vocab=chat_tokenizer.vocab_size, image_token_id=image_token[0]).save_pretrained(directory)
    write_tokenizer_files(directory, chat_tokenizer)
    return directory


@pytest.fixture
def make_llava_engine(tiny_llava_dir: Path) -> Callable[..., Any]:
    """Factory: ``make_llava_engine(**engine_config_overrides)`` -> an unstarted tiny LLaVA engine on CPU."""
    from asyncllm import AsyncEngine

    def make(**overrides: Any) -> AsyncEngine:
        overrides.setdefault("device", "cpu")
        overrides.setdefault("kv_cache_tokens", 2048)
        return AsyncEngine.from_pretrained(tiny_llava_dir, **overrides)

    return make
