"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against Hugging Face ``transformers`` on tiny random
models in float32: logits through the paged path with each kernel bundle, the router's choices, both
checkpoint spellings of the experts, and greedy generation through the engine."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from asyncllm import AsyncEngine
from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps, cpu_ops, get_kernel_ops
from asyncllm.models import CausalLM, MoeForCausalLM
from asyncllm.models.moe import MoeDecoderLayer

from ._paged import PagedSequence
from .test_llama_parity import _SHAPE, VOCAB, PagedRun, _randomize, assert_close, hf_logits, ours, random_ids

_MOE_SHAPE: dict[str, Any] = {**_SHAPE, "intermediate_size": 48, "num_experts_per_tok": 2}


def hf_mixtral(seed: int = 0, vocab_size: int = VOCAB, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = MixtralConfig(**{**_MOE_SHAPE, "vocab_size": vocab_size, "num_local_experts": 8,
                              "sliding_window": None, **overrides})
    model = MixtralForCausalLM(config).eval()
    _randomize(model, seed)
    return model


def hf_qwen2_moe(seed: int = 0, vocab_size: int = VOCAB, **overrides: Any) -> PreTrainedModel:
    """Layer 0 sparse (4 experts, a shared expert), layer 1 dense (``mlp_only_layers``)."""
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(**{**_MOE_SHAPE, "vocab_size": vocab_size, "num_experts": 4,
                               "moe_intermediate_size": 32, "shared_expert_intermediate_size": 40,
                               "mlp_only_layers": [1], "norm_topk_prob": False, **overrides})
    model = Qwen2MoeForCausalLM(config).eval()
    _randomize(model, seed)
    return model


def hf_qwen3_moe(seed: int = 0, vocab_size: int = VOCAB, **overrides: Any) -> PreTrainedModel:
    """Both layers sparse (8 experts, top 2, renormalized), per-head q/k norms, head_dim 32, GQA 4:2."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**{**_MOE_SHAPE, "vocab_size": vocab_size, "head_dim": 32, "num_experts": 8,
                               "moe_intermediate_size": 24, "norm_topk_prob": True, **overrides})
    model = Qwen3MoeForCausalLM(config).eval()
    _randomize(model, seed)
    return model


FAMILIES = {"mixtral": hf_mixtral, "qwen2_moe": hf_qwen2_moe, "qwen3_moe": hf_qwen3_moe}
OPS: dict[str, KernelOps] = {"reference": TORCH_OPS, "cpu": CPU_OPS, "cpu-torch-only": cpu_ops(native=False)}
if os.environ.get("TRITON_INTERPRET") == "1":
    OPS["triton"] = get_kernel_ops("triton", torch.device("cpu"))


@pytest.fixture(scope="module", params=[(f, o) for f in sorted(FAMILIES) for o in OPS], ids="-".join)
def pair(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, CausalLM]:
    family, ops = request.param
    hf = FAMILIES[family]()
    return hf, ours(hf, ops=OPS[ops])


def test_ragged_prefill_then_decode(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    assert isinstance(model, MoeForCausalLM)
    run = PagedRun(model)
    full = [random_ids(n, seed=200 + n) for n in (12, 8, 10)]
    prompt_lens = (7, 1, 4)
    seqs = [PagedSequence() for _ in full]
    outputs = run.step([(seq, ids[:p]) for seq, ids, p in zip(seqs, full, prompt_lens, strict=True)])
    got = [[out] for out in outputs]
    while live := [i for i, seq in enumerate(seqs) if seq.num_cached < len(full[i])]:
        for i, out in zip(live, run.step([(seqs[i], [full[i][seqs[i].num_cached]]) for i in live]), strict=True):
            got[i].append(out)
    for ids, chunks in zip(full, got, strict=True):
        assert_close(torch.cat(chunks), hf_logits(hf, ids))


def test_registry_and_sparse_layers() -> None:
    mixtral = ModelConfig.from_hf_config(hf_mixtral().config.to_dict())
    assert mixtral.architecture == "mixtral" and mixtral.moe is not None
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.renormalize) == (8, 2, True)
    assert mixtral.moe.sparse_layers == (0, 1) and mixtral.moe.shared_expert_intermediate_size == 0
    qwen = ModelConfig.from_hf_config(hf_qwen2_moe().config.to_dict())
    assert qwen.architecture == "qwen2_moe" and qwen.moe is not None and qwen.qkv_bias and not qwen.o_proj_bias
    assert (qwen.moe.num_experts, qwen.moe.intermediate_size, qwen.moe.renormalize) == (4, 32, False)
    assert qwen.moe.sparse_layers == (0,) and qwen.moe.shared_expert_intermediate_size == 40
    qwen3 = ModelConfig.from_hf_config(hf_qwen3_moe().config.to_dict())
    assert qwen3.architecture == "qwen3_moe" and qwen3.moe is not None and qwen3.qk_norm
    assert not qwen3.qkv_bias and not qwen3.o_proj_bias and qwen3.head_dim == 32
    assert (qwen3.moe.num_experts, qwen3.moe.top_k, qwen3.moe.intermediate_size) == (8, 2, 24)
    assert qwen3.moe.renormalize and qwen3.moe.sparse_layers == (0, 1)
    assert qwen3.moe.shared_expert_intermediate_size == 0
    qwen3_dense = ModelConfig.from_hf_config({**hf_qwen3_moe().config.to_dict(), "mlp_only_layers": [0],
                                              "norm_topk_prob": False})
    assert qwen3_dense.moe is not None and qwen3_dense.moe.sparse_layers == (1,) and not qwen3_dense.moe.renormalize
    qwen3_model = ours(hf_qwen3_moe())
    layer = qwen3_model.model.layers[0]
    assert isinstance(layer, MoeDecoderLayer) and layer.self_attn.q_norm is not None
    assert layer.mlp.shared_expert is None
    stepped = ModelConfig.from_hf_config({**hf_qwen2_moe().config.to_dict(), "mlp_only_layers": [],
                                          "decoder_sparse_step": 2, "num_hidden_layers": 4})
    assert stepped.moe is not None and stepped.moe.sparse_layers == (1, 3)
    model = ours(hf_qwen2_moe())
    assert [type(layer) is MoeDecoderLayer for layer in model.model.layers] == [True, False]
    assert all(layer.fused_weights() is None for layer in model.model.layers if isinstance(layer, MoeDecoderLayer))


ROUTINGS = [(family, norm) for family in sorted(FAMILIES) for norm in (False, True)
            if family != "mixtral" or not norm]  # Mixtral always renormalizes: one case


@pytest.mark.parametrize(("family", "norm_topk_prob"), ROUTINGS)
def test_routing_matches_hf_router(family: str, norm_topk_prob: bool) -> None:
    hf = FAMILIES[family](seed=3, norm_topk_prob=norm_topk_prob) if family != "mixtral" else hf_mixtral(seed=3)
    model = ours(hf)
    hidden = torch.randn(37, _SHAPE["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hf_weights, hf_ids = hf.model.layers[0].mlp.gate(hidden)
        weights, ids = model.model.layers[0].mlp.route(hidden)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), atol=1e-6, rtol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(37)) == (family == "mixtral" or norm_topk_prob)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_expert_checkpoint_names_load(family: str, tmp_path: Path) -> None:
    """``save_pretrained`` writes the per-expert names hub checkpoints use (Mixtral's ``block_sparse_moe``
    ``w1/w3/w2``, Qwen2-MoE's ``experts.N.gate_proj``); they load like the stacked in-memory tensors."""
    hf = FAMILIES[family](seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in state)
    expert_name = ".block_sparse_moe.experts.3.w1.weight" if family == "mixtral" else ".mlp.experts.3.gate_proj.weight"
    assert f"model.layers.0{expert_name}" in state
    model = ours(hf, list(state.items()), ops=CPU_OPS)
    ids = random_ids(9, seed=5)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))


def test_missing_expert_is_reported() -> None:
    hf = hf_mixtral(seed=6)
    state = [(k, v) for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(ValueError, match=r"missing parameters \['model\.layers\.1\.mlp\.experts\.down\.weight"):
        ours(hf, state)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches_hf_generate(family: str, chat_tokenizer: Any) -> None:
    hf = FAMILIES[family](seed=7, vocab_size=chat_tokenizer.vocab_size)
    prompts = [random_ids(n, seed=70 + n) for n in (5, 11)]
    prompts = [[t % chat_tokenizer.vocab_size for t in p] for p in prompts]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    engine = AsyncEngine.from_model(ours(hf, ops=CPU_OPS), chat_tokenizer, device="cpu", num_kv_blocks=64,
                                    block_size=4)

    async def run() -> list[Any]:
        async with engine:
            return await asyncio.gather(*(engine.generate(p, temperature=0.0, max_tokens=32, ignore_eos=True)
                                          for p in prompts))

    for completion, want in zip(asyncio.run(run()), expected, strict=True):
        assert completion.token_ids == want


def test_saved_directory_loads_through_the_checkpoint_loader(tmp_path: Path) -> None:
    from asyncllm.builder import model_from_checkpoint
    from asyncllm.config import EngineConfig
    from asyncllm.loaders import load_checkpoint

    hf = hf_qwen2_moe(seed=8)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = model_from_checkpoint(load_checkpoint(tmp_path), EngineConfig(device="cpu", dtype="float32"))
    assert isinstance(model, MoeForCausalLM) and model.config.architecture == "qwen2_moe"
    ids = random_ids(8, seed=8)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))
