"""DeepSeek-MoE (``DeepseekForCausalLM``, model_type ``deepseek``) against an exact Hugging Face reference.

``transformers`` does not ship DeepSeek-MoE (its modeling code is remote code on the hub), so the reference is a
tiny random ``Qwen2MoeForCausalLM`` whose function is DeepSeek-MoE's, and whose state dict the tests rewrite as
a DeepSeek checkpoint (names and ``config.json`` keys as the published DeepSeek-MoE code reads them):

- attention: both are Llama attention with rotary; Qwen2-MoE's q/k/v bias is switched off (``qkv_bias=False``),
  as DeepSeek's ``attention_bias`` is off;
- routing: both take a softmax over ``x @ gate.T``, the top ``num_experts_per_tok``, unnormalized when
  ``norm_topk_prob`` is off (DeepSeek-MoE 16B's setting);
- dense layers: Qwen2-MoE's ``mlp_only_layers = [0, .., k-1]`` are DeepSeek's ``first_k_dense_replace = k``
  (``moe_layer_freq = 1``), both a gated MLP of ``intermediate_size``;
- shared expert: Qwen2-MoE adds ``sigmoid(shared_expert_gate(x)) * shared(x)``; with that gate's weight zero
  the sigmoid is exactly 0.5, and since ``down_proj`` is linear, ``0.5 * shared(x)`` is exactly the MLP with
  ``down_proj`` halved (a power of two: no rounding). DeepSeek adds its shared experts' MLP ungated, so the
  DeepSeek checkpoint carries ``mlp.shared_experts`` with the halved ``down_proj`` and no gate tensor, of width
  ``n_shared_experts * moe_intermediate_size`` (2 * 16 = Qwen2-MoE's ``shared_expert_intermediate_size``).

So the two compute the same function up to float rounding in the order of operations.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, Qwen2MoeConfig, Qwen2MoeForCausalLM

from asyncllm import AsyncEngine
from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps
from asyncllm.models import CausalLM, MoeForCausalLM, build_model
from asyncllm.models.moe import MoeDecoderLayer

from ._paged import PagedSequence
from .test_llama_parity import _SHAPE, VOCAB, PagedRun, _randomize, assert_close, hf_logits, random_ids

N_ROUTED, N_SHARED, MOE_INTER, FIRST_DENSE, LAYERS = 6, 2, 16, 1, 3
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(?:\.weight)?$")


def hf_reference(seed: int = 0, vocab_size: int = VOCAB) -> PreTrainedModel:
    """Qwen2-MoE standing in for DeepSeek-MoE (module docstring): layer 0 dense, layers 1-2 sparse."""
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(**{**_SHAPE, "vocab_size": vocab_size, "num_hidden_layers": LAYERS,
                               "intermediate_size": 48, "num_experts": N_ROUTED, "num_experts_per_tok": 2,
                               "moe_intermediate_size": MOE_INTER,
                               "shared_expert_intermediate_size": N_SHARED * MOE_INTER,
                               "mlp_only_layers": list(range(FIRST_DENSE)), "norm_topk_prob": False,
                               "qkv_bias": False})
    model = Qwen2MoeForCausalLM(config).eval()
    _randomize(model, seed)
    with torch.no_grad():
        for layer in model.model.layers[FIRST_DENSE:]:
            layer.mlp.shared_expert_gate.weight.zero_()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    return model


def deepseek_checkpoint(hf: PreTrainedModel) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """``hf`` as a DeepSeek-MoE ``config.json`` dict and per-expert tensors (module docstring)."""
    c = hf.config
    ours_of_hf = ModelConfig.from_hf_config(c.to_dict())
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": MOE_INTER, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "n_shared_experts": N_SHARED, "n_routed_experts": N_ROUTED, "num_experts_per_tok": c.num_experts_per_tok,
        "moe_layer_freq": 1, "first_k_dense_replace": FIRST_DENSE, "norm_topk_prob": False,
        "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": ours_of_hf.rope_theta, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, tensor in hf.state_dict().items():
        stacked = _STACKED.match(name)
        if stacked is not None:
            base, kind = stacked.groups()
            for expert, weight in enumerate(tensor.unbind(0)):
                if kind == "down_proj":
                    tensors.append((f"{base}.{expert}.down_proj.weight", weight.clone()))
                else:
                    gate, up = weight.chunk(2, dim=0)
                    tensors += [(f"{base}.{expert}.gate_proj.weight", gate.clone()),
                                (f"{base}.{expert}.up_proj.weight", up.clone())]
        elif name.endswith(".mlp.shared_expert_gate.weight"):
            assert not tensor.any()
        elif ".mlp.shared_expert." in name:
            name = name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
            tensors.append((name, tensor * 0.5 if name.endswith(".down_proj.weight") else tensor.clone()))
        else:
            tensors.append((name, tensor.clone()))
    return config, tensors


def ours_deepseek(hf: PreTrainedModel, ops: KernelOps = TORCH_OPS) -> CausalLM:
    config_dict, tensors = deepseek_checkpoint(hf)
    config = ModelConfig.from_hf_config(config_dict)
    model = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(tensors)
    return model


OPS: dict[str, KernelOps] = {"reference": TORCH_OPS, "cpu": CPU_OPS}


@pytest.fixture(scope="module", params=sorted(OPS))
def pair(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, CausalLM]:
    hf = hf_reference()
    return hf, ours_deepseek(hf, OPS[request.param])


def test_config_and_layers() -> None:
    config_dict, _ = deepseek_checkpoint(hf_reference())
    config = ModelConfig.from_hf_config(config_dict)
    assert config.architecture == "deepseek" and config.moe is not None
    assert not config.qkv_bias and not config.o_proj_bias and not config.qk_norm
    moe = config.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.renormalize) == (N_ROUTED, 2, MOE_INTER, False)
    assert moe.sparse_layers == (1, 2) and moe.shared_expert_intermediate_size == N_SHARED * MOE_INTER
    assert not moe.shared_expert_gated
    assert ModelConfig.from_hf_config({**config_dict, "architectures": None}).architecture == "deepseek"
    freq = ModelConfig.from_hf_config({**config_dict, "num_hidden_layers": 7, "first_k_dense_replace": 2,
                                       "moe_layer_freq": 2, "n_shared_experts": None, "norm_topk_prob": True})
    assert freq.moe is not None and freq.moe.sparse_layers == (2, 4, 6)
    assert freq.moe.shared_expert_intermediate_size == 0 and freq.moe.renormalize
    with pytest.raises(ValueError, match="scoring_func"):
        ModelConfig.from_hf_config({**config_dict, "scoring_func": "sigmoid"})
    model = ours_deepseek(hf_reference())
    assert isinstance(model, MoeForCausalLM)
    assert [type(layer) is MoeDecoderLayer for layer in model.model.layers] == [False, True, True]
    block = model.model.layers[1].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is None


def test_ragged_prefill_then_decode(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    run = PagedRun(model)
    full = [random_ids(n, seed=300 + n) for n in (12, 8, 10)]
    prompt_lens = (7, 1, 4)
    seqs = [PagedSequence() for _ in full]
    outputs = run.step([(seq, ids[:p]) for seq, ids, p in zip(seqs, full, prompt_lens, strict=True)])
    got = [[out] for out in outputs]
    while live := [i for i, seq in enumerate(seqs) if seq.num_cached < len(full[i])]:
        for i, out in zip(live, run.step([(seqs[i], [full[i][seqs[i].num_cached]]) for i in live]), strict=True):
            got[i].append(out)
    for ids, chunks in zip(full, got, strict=True):
        assert_close(torch.cat(chunks), hf_logits(hf, ids))


def test_routing_matches_hf_router() -> None:
    hf = hf_reference(seed=3)
    model = ours_deepseek(hf)
    hidden = torch.randn(37, _SHAPE["hidden_size"], generator=torch.Generator().manual_seed(3))
    for index in range(FIRST_DENSE, LAYERS):
        with torch.no_grad():
            _, hf_weights, hf_ids = hf.model.layers[index].mlp.gate(hidden)
            weights, ids = model.model.layers[index].mlp.route(hidden)
        assert torch.equal(ids, hf_ids)
        torch.testing.assert_close(weights, hf_weights.float(), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(weights.sum(-1), torch.ones(37))


def test_greedy_generation_matches_hf_generate(chat_tokenizer: Any) -> None:
    hf = hf_reference(seed=7, vocab_size=chat_tokenizer.vocab_size)
    prompts = [[t % chat_tokenizer.vocab_size for t in random_ids(n, seed=70 + n)] for n in (5, 11)]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    engine = AsyncEngine.from_model(ours_deepseek(hf, CPU_OPS), chat_tokenizer, device="cpu", num_kv_blocks=64,
                                    block_size=4)

    async def run() -> list[Any]:
        async with engine:
            return await asyncio.gather(*(engine.generate(p, temperature=0.0, max_tokens=32, ignore_eos=True)
                                          for p in prompts))

    for completion, want in zip(asyncio.run(run()), expected, strict=True):
        assert completion.token_ids == want
