"""Gemma 2 / Gemma 3 beyond the shared family checks of ``test_llama_parity``: a prompt several windows long
decoded past it with each kernel bundle (the window must matter: Hugging Face's logits without it differ),
a quantized KV cache with every bundle alike, and how ``config.json`` spellings map onto ``ModelConfig``."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps, KVCache, cpu_ops, get_kernel_ops
from asyncllm.models import GemmaForCausalLM

from ._paged import PagedSequence
from .test_llama_parity import (
    ATOL,
    BLOCK_SIZE,
    GEMMA_WINDOW,
    NUM_BLOCKS,
    PagedRun,
    assert_close,
    hf_gemma2,
    hf_gemma3,
    hf_logits,
    ours,
    random_ids,
)

GEMMAS = {"gemma2": hf_gemma2, "gemma3": hf_gemma3}
OPS: dict[str, KernelOps] = {"reference": TORCH_OPS, "cpu": CPU_OPS, "cpu-torch-only": cpu_ops(native=False)}
if os.environ.get("TRITON_INTERPRET") == "1":
    OPS["triton"] = get_kernel_ops("triton", torch.device("cpu"))


@pytest.fixture(scope="module", params=sorted(GEMMAS))
def reference(request: pytest.FixtureRequest) -> PreTrainedModel:
    return GEMMAS[request.param]()


def _run(model: GemmaForCausalLM, ids: list[int], prompt: int, run: PagedRun | None = None) -> torch.Tensor:
    run = run or PagedRun(model)
    seq = PagedSequence()
    chunks = run.step([(seq, ids[:prompt])])
    for t in range(prompt, len(ids)):
        chunks += run.step([(seq, [ids[t]])])
    return torch.cat(chunks)


@pytest.mark.parametrize("ops", sorted(OPS))
def test_prompt_longer_than_the_window_then_decode_matches_hf(reference: PreTrainedModel, ops: str) -> None:
    ids = random_ids(36, seed=21)
    prompt = 3 * GEMMA_WINDOW + 3
    want = hf_logits(reference, ids)
    model = ours(reference, ops=OPS[ops])
    assert isinstance(model, GemmaForCausalLM)
    assert model.config.sliding_window == GEMMA_WINDOW and model.config.sliding_layers
    got = _run(model, ids, prompt)
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3e}"


def test_the_window_matters(reference: PreTrainedModel) -> None:
    """Without its window the same model gives other logits, so the parity above checks the window."""
    ids = random_ids(30, seed=22)
    unwindowed = type(reference)(type(reference.config)(**{**reference.config.to_dict(), "sliding_window": 4096}))
    unwindowed.load_state_dict(reference.state_dict())
    unwindowed.eval()
    assert (hf_logits(unwindowed, ids) - hf_logits(reference, ids)).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_gives_the_same_logits_with_every_bundle(reference: PreTrainedModel, bits: int) -> None:
    """int8 / int4 KV: every bundle reads the same codes back alike (windows and soft-capping included)."""
    ids = random_ids(30, seed=23)
    outputs = {}
    for name, ops in OPS.items():
        model = ours(reference, ops=ops)
        run = PagedRun(model)
        config = model.config
        run.caches = [KVCache.allocate(NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim,
                                       dtype=torch.float32, device=torch.device("cpu"), bits=bits)
                      for _ in range(config.num_hidden_layers)]
        outputs[name] = _run(model, ids, 2 * GEMMA_WINDOW + 1, run)
    want = hf_logits(reference, ids)
    for name, got in outputs.items():
        assert_close(got, outputs["reference"])
        if bits == 8:  # int8 stays within a fraction of logits of a few units (int4 need not)
            assert (got - want).abs().max().item() < 0.5, name


def test_hub_style_configs_map_onto_the_model_config() -> None:
    """Older ``config.json`` spellings: ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` and
    ``sliding_window_pattern`` instead of ``layer_types`` and per-layer-type ``rope_parameters``."""
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512}
    gemma3 = ModelConfig.from_hf_config({
        **base, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "num_hidden_layers": 12,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    })
    assert gemma3.architecture == "gemma3" and gemma3.qk_norm and gemma3.tie_word_embeddings
    assert gemma3.sliding_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    assert gemma3.layer_window(5) is None and gemma3.layer_window(4) == 512 and not gemma3.all_layers_sliding
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
    assert gemma3.rope_scaling is not None and gemma3.rope_scaling["factor"] == 8.0
    assert gemma3.attn_logit_softcapping is None and gemma3.final_logit_softcapping is None
    gemma2 = ModelConfig.from_hf_config({
        **base, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "num_hidden_layers": 4,
        "rope_theta": 1e4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
    })
    assert gemma2.sliding_layers == (0, 2) and gemma2.rope_local_theta is None
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)
    assert (gemma2.hidden_act, gemma2.norm, gemma2.query_pre_attn_scalar) == ("gelu_tanh", "rms_one_plus", 16.0)
    every = ModelConfig.from_hf_config({**base, "model_type": "gemma2", "num_hidden_layers": 2,
                                        "layer_types": ["sliding_attention"] * 2})
    assert every.all_layers_sliding
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_config({**base, "model_type": "gemma2", "num_hidden_layers": 2,
                                    "layer_types": ["sliding_attention"]})


@pytest.mark.parametrize("layout", ["all-sliding", "hybrid"])
async def test_engine_drops_blocks_only_when_every_layer_slides(layout: str, chat_tokenizer: Any) -> None:
    """An all-sliding Gemma 2 generates as Hugging Face does while the engine drops the blocks behind its
    window (block size 4, window 8); the hybrid model's engine keeps every block."""
    from asyncllm import AsyncEngine

    extra = {"layer_types": ["sliding_attention"] * 2} if layout == "all-sliding" else {}
    hf = hf_gemma2(seed=12, vocab_size=chat_tokenizer.vocab_size, max_position_embeddings=128, **extra)
    prompt = random_ids(7, seed=12)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    model = ours(hf, ops=CPU_OPS)
    engine = AsyncEngine.from_model(model, chat_tokenizer, device="cpu", kv_cache_tokens=1024, block_size=4)
    scheduler = engine._scheduler
    assert scheduler.sliding_window == (GEMMA_WINDOW if layout == "all-sliding" else None)
    dropped: list[int] = []
    on_step_done = scheduler.on_step_done

    def spy(chunks: Any) -> None:
        chunks = list(chunks)
        on_step_done(chunks)
        dropped.extend(chunk.seq.num_dropped_blocks for chunk in chunks)

    scheduler.on_step_done = spy  # type: ignore[method-assign]
    async with engine:
        completion = await engine.generate(prompt, max_tokens=32, temperature=0.0, ignore_eos=True)
    assert completion.token_ids == want
    # 39 tokens: the last query sees positions 31..38, so blocks 0..6 (tokens 0..27) are dropped by then
    assert max(dropped) == (7 if layout == "all-sliding" else 0)
    assert engine._blocks.num_referenced == 0
