"""Tensor parallelism beyond the Llama family, on CPU (gloo, spawned worker processes), at
``tensor_parallel_size=2``: tiny random models of Gemma 2 (a sliding layer, attention and final-logit
soft-capping, tied embeddings), Gemma 3 text (per-head q/k norms, local and global rotary), Mixtral (8
experts, top 2), Qwen2-MoE (a sparse layer with a gated shared expert, a dense layer) and Qwen3-MoE
(per-head q/k norms, renormalized routing) against the same checkpoint on one rank and against Hugging Face
transformers, through a chunked prefill and batched decode steps, and the engine's greedy tokens against
``generate``. Then the shapes that do not split and the vision models, refused before anything runs.

Each family's group is started once (every spawned rank imports torch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine
from asyncllm.config import ModelConfig
from asyncllm.distributed.driver import TensorParallelRunner
from asyncllm.distributed.parallel_state import TensorParallel
from asyncllm.kernels import TORCH_OPS
from asyncllm.models import build_model

from ..models.test_llama_parity import hf_gemma2, hf_gemma3
from ..models.test_llava_parity import hf_llava
from ..models.test_moe_parity import hf_mixtral, hf_qwen2_moe, hf_qwen3_moe
from .test_tensor_parallel import _check_against_one_rank_and_hf, _config, _write_dir

pytestmark = pytest.mark.timeout(120)

# the second prompt is longer than Gemma 2's sliding window (8), so the window matters in prefill and decode
PROMPTS = ["Hello world", "Name three rivers. How long is the longest one of them?", "Once upon a time there was"]
FAMILIES: dict[str, Callable[..., Any]] = {"gemma2": hf_gemma2, "gemma3": hf_gemma3, "mixtral": hf_mixtral,
                                           "qwen2_moe": hf_qwen2_moe, "qwen3_moe": hf_qwen3_moe}
STEPS = 4
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           chat_tokenizer: Any) -> Iterator[tuple[str, Path, Any, TensorParallelRunner]]:
    name = request.param
    hf = FAMILIES[name](vocab_size=chat_tokenizer.vocab_size, max_position_embeddings=128)
    hf_config = hf.config.to_dict()
    hf_config["architectures"] = [type(hf).__name__]
    path = _write_dir(tmp_path_factory.mktemp("tp") / name, hf_config, hf, chat_tokenizer)
    runner = TensorParallelRunner.start(str(path), _config(tensor_parallel_size=2))
    try:
        yield name, path, hf, runner
    finally:
        runner.close()


def test_logits_match_one_rank_and_transformers(family: tuple[str, Path, Any, TensorParallelRunner],
                                                chat_tokenizer: Any) -> None:
    name, path, hf, runner = family
    prompts = [chat_tokenizer.encode(p) for p in PROMPTS]
    assert len(prompts[1]) > 8
    worst_single, worst_hf = _check_against_one_rank_and_hf(runner, path, hf, prompts, STEPS)
    print(f"{name}: max |logit diff| TP=2 vs TP=1: {worst_single:.2e}, vs transformers: {worst_hf:.2e}")


async def test_engine_greedy_tokens_match_transformers_generate(
        family: tuple[str, Path, Any, TensorParallelRunner], chat_tokenizer: Any) -> None:
    """Runs last on the family's group: the engine's ``aclose`` stops its workers."""
    _, _, hf, runner = family
    engine = AsyncEngine(runner, chat_tokenizer, runner.model.config, _config(tensor_parallel_size=2))
    try:
        outs = await asyncio.gather(*(engine.generate(p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                                      for p in PROMPTS))
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ids = engine.encode_prompt(prompt)
            with torch.no_grad():
                generated = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
            assert out.token_ids == generated[0, len(ids):].tolist()
        assert engine.failure is None
    finally:
        await engine.aclose()


def _parallel_config(hf: Any) -> ModelConfig:
    hf_config = hf.config.to_dict()
    hf_config["architectures"] = [type(hf).__name__]
    return ModelConfig.from_hf_config(hf_config)


def _build_rank(config: ModelConfig, rank: int = 0, size: int = 2) -> Any:
    """Construct rank ``rank`` of ``size`` (construction and loading run no collective: no group needed)."""
    return build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"),
                       parallel=TensorParallel(rank=rank, size=size))


def test_stacked_experts_load_the_rank_slice_of_every_expert() -> None:
    """Rank 1 of 2 holds intermediate features 16..32 of each of the 4 experts' gate, up and down, and of the
    shared expert; the router and the shared gate are whole (the checkpoint stacks the experts)."""
    hf = hf_qwen2_moe()
    state = hf.state_dict()
    assert tuple(state["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 64, 64)  # stacked [E, 2I, H]
    model = _build_rank(_parallel_config(hf), rank=1)
    model.load_weights(state.items())
    block = model.model.layers[0].mlp
    gate, up = state["model.layers.0.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    assert torch.equal(block.experts.gate_up.weight, torch.cat([gate[:, 16:], up[:, 16:]], dim=1))
    assert torch.equal(block.experts.down.weight, state["model.layers.0.mlp.experts.down_proj"][:, :, 16:])
    assert torch.equal(block.gate.weight, state["model.layers.0.mlp.gate.weight"])
    assert torch.equal(block.shared_expert_gate.weight, state["model.layers.0.mlp.shared_expert_gate.weight"])
    assert torch.equal(block.shared_expert.down_proj.weight,
                       state["model.layers.0.mlp.shared_expert.down_proj.weight"][:, 20:])


@pytest.mark.parametrize("build", [
    lambda: hf_qwen2_moe(moe_intermediate_size=33),
    lambda: hf_qwen2_moe(shared_expert_intermediate_size=41),
    lambda: hf_mixtral(intermediate_size=47),
    lambda: hf_gemma2(intermediate_size=127),
    lambda: hf_gemma2(hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
], ids=["moe-intermediate", "shared-expert", "mixtral-intermediate", "gemma-intermediate", "gemma-heads"])
def test_sizes_that_do_not_divide_are_refused(build: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _build_rank(_parallel_config(build()))


def test_vision_models_stay_on_one_rank() -> None:
    hf = hf_llava()
    config = ModelConfig.from_hf_config({**hf.config.to_dict(), "architectures": ["LlavaForConditionalGeneration"]})
    with pytest.raises(ValueError, match=r"tensor_parallel_size.*one rank"):
        _build_rank(config)
