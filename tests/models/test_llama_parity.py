"""Our Llama-family model against Hugging Face ``transformers`` on tiny random models, in float32.

Families: Llama, Qwen2, Qwen3 (q/k norms, ``head_dim`` != hidden / heads), Phi-3 (fused checkpoint
projections, LongRoPE), InternLM2 (a HF Llama converted here to InternLM2's published names and ``wqkv``
packing, since ``transformers`` does not ship InternLM2) and Gemma 2 / Gemma 3 (their own model definition:
sandwich norms, GELU, soft-capping, sliding-window layers with a window of 8 that the prompts here exceed,
Gemma 3's per-layer-type rotary).

HF runs each sequence alone with eager attention over the whole sequence; ours runs flat varlen batches
through the paged KV cache (block size 4, shuffled block ids) through its one model path, with each kernel
bundle: the torch reference, the CPU fast path with its native C kernels (decode attention planned per step,
decode layers fused) and without them, and the Triton kernels under the interpreter (on a machine without
a GPU; with one, the CUDA-marked kernel tests run them compiled).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers import LlamaForCausalLM as HFLlama
from transformers import Phi3ForCausalLM as HFPhi3
from transformers import Qwen2ForCausalLM as HFQwen2
from transformers import Qwen3ForCausalLM as HFQwen3

from asyncllm.architectures import ARCHITECTURES
from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps, cpu_ops, get_kernel_ops
from asyncllm.models import CausalLM, LlamaForCausalLM, build_model, model_definitions

from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches

ATOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 64
VOCAB = 256

_SHAPE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)


def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Weights large enough that logits vary by O(1); norms and biases away from their 1/0 init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.1 * noise)


def hf_llama(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = HFLlama(LlamaConfig(**{**_SHAPE, **overrides})).eval()
    _randomize(model, seed)
    return model


def hf_qwen2(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = HFQwen2(Qwen2Config(**{**_SHAPE, "tie_word_embeddings": True, **overrides})).eval()
    _randomize(model, seed)
    return model


def hf_qwen3(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = HFQwen3(Qwen3Config(**{**_SHAPE, "head_dim": 32, **overrides})).eval()
    _randomize(model, seed)
    return model


PHI3_ROPE: dict[str, Any] = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
    "long_factor": [1.2, 1.5, 2.0, 2.8, 3.9, 5.3, 7.0, 9.1],
}


def hf_phi3(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Phi-3 with LongRoPE: 64 positions from an original 16, so the attention factor is not 1."""
    torch.manual_seed(seed)
    settings = {**_SHAPE, "rope_parameters": PHI3_ROPE, "original_max_position_embeddings": 16,
                "sliding_window": None, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    model = HFPhi3(Phi3Config(**{**settings, **overrides})).eval()
    _randomize(model, seed)
    return model


GEMMA_WINDOW = 8


def hf_gemma2(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Gemma 2: layer 0 slides (window 8), layer 1 is global; soft-capping small enough to bite."""
    torch.manual_seed(seed)
    settings = {**_SHAPE, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": GEMMA_WINDOW,
                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}
    model = Gemma2ForCausalLM(Gemma2Config(**{**settings, **overrides})).eval()
    _randomize(model, seed)
    return model


GEMMA3_ROPE: dict[str, Any] = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}


def hf_gemma3(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Gemma 3 text: two sliding layers (window 8, local rotary base) then a global one (linear rope scaling)."""
    torch.manual_seed(seed)
    settings = {**_SHAPE, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 24,
                "sliding_window": GEMMA_WINDOW, "rope_parameters": GEMMA3_ROPE,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**settings, **overrides})).eval()
    _randomize(model, seed)
    return model


def internlm2_checkpoint(hf: PreTrainedModel) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """A HF Llama as an InternLM2 checkpoint (config dict, tensors), written from InternLM2's published
    layout: ``wqkv`` rows grouped per KV head (its query heads, then its key head, then its value head)."""
    config = hf.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    groups = heads // kv_heads
    names = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    state = hf.state_dict()
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, tensor in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            q = tensor.reshape(kv_heads, groups, head_dim, -1)
            k = state[name.replace("q_proj", "k_proj")].reshape(kv_heads, 1, head_dim, -1)
            v = state[name.replace("q_proj", "v_proj")].reshape(kv_heads, 1, head_dim, -1)
            wqkv = torch.cat((q, k, v), dim=1).reshape(-1, config.hidden_size)
            tensors.append((name.replace("self_attn.q_proj", "attention.wqkv"), wqkv))
            continue
        for old, new in names.items():
            name = name.replace(f".{old}.", f".{new}.")
        name = name.replace("model.embed_tokens.", "model.tok_embeddings.").replace("lm_head.", "output.")
        tensors.append((name, tensor))
    hf_config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        **{key: getattr(config, key) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")},
        "rope_theta": config.rope_parameters["rope_theta"],
    }
    return hf_config, tensors


def hf_internlm2(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """The reference of an InternLM2 checkpoint: a HF Llama with dynamic NTK rope (its InternLM2 form comes
    from ``internlm2_checkpoint``)."""
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    return hf_llama(seed, **{"rope_parameters": rope, "tie_word_embeddings": False, **overrides})


def checkpoint_of(family: str, hf: PreTrainedModel) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """The config dict and tensors our loader reads for ``family``'s reference model ``hf``."""
    if family == "internlm2":
        return internlm2_checkpoint(hf)
    return hf.config.to_dict(), list(hf.state_dict().items())


def ours(
    hf: PreTrainedModel, weights: Sequence[tuple[str, torch.Tensor]] | None = None, ops: KernelOps = TORCH_OPS,
    *, family: str | None = None,
) -> CausalLM:
    """Our model of ``hf`` (its ``family``'s checkpoint form when given, else ``hf``'s own config and
    ``weights`` or state dict)."""
    if family is not None:
        hf_config, tensors = checkpoint_of(family, hf)
    else:
        hf_config, tensors = hf.config.to_dict(), list(hf.state_dict().items()) if weights is None else weights
    config = ModelConfig.from_hf_config(hf_config)
    model = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(tensors)
    return model


@torch.no_grad()
def hf_logits(hf: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([list(ids)])).logits[0].float()


class PagedRun:
    """Drives our model step by step over a shared paged cache."""

    def __init__(self, model: CausalLM) -> None:
        config = model.config
        self.model = model
        self.pool = BlockPool(NUM_BLOCKS, BLOCK_SIZE, seed=1)
        self.caches = make_kv_caches(
            config.num_hidden_layers, NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim
        )

    @torch.no_grad()
    def step(self, batch: Sequence[tuple[PagedSequence, Sequence[int]]]) -> list[torch.Tensor]:
        """Feeds each sequence its new ids in one flat batch; returns each sequence's logits rows."""
        positions, meta = build_step(self.pool, [(seq, len(ids)) for seq, ids in batch])
        input_ids = torch.tensor([t for _, ids in batch for t in ids], dtype=torch.int64)
        hidden = self.model.forward(input_ids, positions, meta, self.caches)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(input_ids), VOCAB)
        return list(logits.split([len(ids) for _, ids in batch]))


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3e} > {ATOL}"


FAMILIES = {"llama": hf_llama, "qwen2": hf_qwen2, "qwen3": hf_qwen3, "phi3": hf_phi3, "internlm2": hf_internlm2,
            "gemma2": hf_gemma2, "gemma3": hf_gemma3}
OPS = {"reference": TORCH_OPS, "cpu": CPU_OPS, "cpu-torch-only": cpu_ops(native=False)}
if os.environ.get("TRITON_INTERPRET") == "1":
    OPS["triton"] = get_kernel_ops("triton", torch.device("cpu"))


@pytest.fixture(scope="module", params=[(f, o) for f in sorted(FAMILIES) for o in OPS], ids="-".join)
def pair(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, CausalLM]:
    family, ops = request.param
    hf = FAMILIES[family]()
    model = ours(hf, ops=OPS[ops], family=family)
    assert model.config.architecture == family
    return hf, model


def test_single_prefill(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    ids = random_ids(13, seed=1)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))


def test_flat_batch_of_different_lengths(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    prompts = [random_ids(n, seed=n) for n in (7, 1, 12, 4)]
    outputs = PagedRun(model).step([(PagedSequence(), ids) for ids in prompts])
    for ids, logits in zip(prompts, outputs, strict=True):
        assert_close(logits, hf_logits(hf, ids))


def test_prefill_then_decode_across_blocks(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    run = PagedRun(model)
    full = [random_ids(n, seed=100 + n) for n in (14, 9, 11)]
    prompt_lens = (3, 5, 2)
    seqs = [PagedSequence() for _ in full]
    outputs = run.step([(seq, ids[:p]) for seq, ids, p in zip(seqs, full, prompt_lens, strict=True)])
    got: list[list[torch.Tensor]] = [[out] for out in outputs]
    while True:
        live = [i for i, seq in enumerate(seqs) if seq.num_cached < len(full[i])]
        if not live:
            break
        step_out = run.step([(seqs[i], [full[i][seqs[i].num_cached]]) for i in live])
        for i, out in zip(live, step_out, strict=True):
            got[i].append(out)
    assert all(len(seq.block_table) >= 3 for seq in seqs)
    for ids, chunks in zip(full, got, strict=True):
        assert_close(torch.cat(chunks), hf_logits(hf, ids))


def test_chunked_prefill_mixed_with_decode(pair: tuple[PreTrainedModel, CausalLM]) -> None:
    hf, model = pair
    run = PagedRun(model)
    long_ids, short_ids = random_ids(11, seed=7), random_ids(6, seed=8)
    long_seq, short_seq = PagedSequence(), PagedSequence()
    first_long, first_short = run.step([(long_seq, long_ids[:6]), (short_seq, short_ids[:5])])
    second_short, second_long = run.step([(short_seq, short_ids[5:]), (long_seq, long_ids[6:])])
    assert_close(torch.cat([first_long, second_long]), hf_logits(hf, long_ids))
    assert_close(torch.cat([first_short, second_short]), hf_logits(hf, short_ids))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tied: bool) -> None:
    hf = hf_llama(seed=3, tie_word_embeddings=tied)
    model = ours(hf)
    assert isinstance(model, LlamaForCausalLM)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = random_ids(10, seed=3)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))


def test_tied_embeddings_accept_missing_and_ignore_present_lm_head() -> None:
    hf = hf_llama(seed=4, tie_word_embeddings=True)
    ids = random_ids(9, seed=4)
    expected = hf_logits(hf, ids)
    state = hf.state_dict()
    without_head = [(k, v) for k, v in state.items() if k != "lm_head.weight"]
    (logits,) = PagedRun(ours(hf, without_head)).step([(PagedSequence(), ids)])
    assert_close(logits, expected)
    other_head = [*without_head, ("lm_head.weight", torch.randn(VOCAB, 64))]
    (logits,) = PagedRun(ours(hf, other_head)).step([(PagedSequence(), ids)])
    assert_close(logits, expected)


ROPE_CASES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_hf(case: str) -> None:
    max_pos = 256 if case == "llama3" else 64
    hf = hf_llama(seed=5, rope_parameters=ROPE_CASES[case], max_position_embeddings=max_pos)
    model = ours(hf)
    assert model.config.rope_scaling is not None and model.config.rope_scaling["rope_type"] == case
    run = PagedRun(model)
    ids = random_ids(60, seed=5)
    seq = PagedSequence()
    chunks = run.step([(seq, ids[:50])])
    for t in range(50, 60):
        chunks += run.step([(seq, [ids[t]])])
    assert_close(torch.cat(chunks), hf_logits(hf, ids))


@pytest.mark.parametrize("family", ["llama-dynamic", "internlm2", "phi3"])
@torch.no_grad()
def test_length_dependent_rope_beyond_original_length_matches_hf_incremental_decode(family: str) -> None:
    """Dynamic NTK (past ``max_position_embeddings``) and LongRoPE (past the original length): each token is
    rotated as HF rotates it when decoding token by token with a KV cache."""
    max_pos, factor = 16, 2.0
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor}
    if family == "phi3":
        hf = hf_phi3(seed=6, max_position_embeddings=32)
        model = ours(hf, family=family)
        assert model.max_positions == 32
    else:
        hf = (hf_internlm2 if family == "internlm2" else hf_llama)(
            seed=6, rope_parameters=rope, max_position_embeddings=max_pos)
        model = ours(hf, family="internlm2" if family == "internlm2" else None)
        assert model.max_positions == int(max_pos * factor)
    assert isinstance(model, LlamaForCausalLM)
    ids = random_ids(28, seed=6)
    prompt = 10
    out = hf(input_ids=torch.tensor([ids[:prompt]]), use_cache=True)
    expected = [out.logits[0]]
    for t in range(prompt, len(ids)):
        out = hf(input_ids=torch.tensor([[ids[t]]]), past_key_values=out.past_key_values, use_cache=True)
        expected.append(out.logits[0])
    run = PagedRun(model)
    seq = PagedSequence()
    chunks = run.step([(seq, ids[:prompt])])
    for t in range(prompt, len(ids)):
        chunks += run.step([(seq, [ids[t]])])
    assert_close(torch.cat(chunks), torch.cat(expected))


def test_unsupported_rope_type_is_rejected() -> None:
    hf = hf_llama(seed=0)
    config = ModelConfig.from_hf_config(
        {**hf.config.to_dict(), "rope_scaling": {"rope_type": "proportional", "factor": 2.0}}
    )
    with pytest.raises(ValueError, match="rope_scaling"):
        build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def llama_state() -> tuple[PreTrainedModel, list[tuple[str, torch.Tensor]]]:
    hf = hf_llama(seed=2)
    return hf, list(hf.state_dict().items())


def _fresh(hf: PreTrainedModel) -> CausalLM:
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    return build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))


def test_load_weights_reports_missing_names(
    llama_state: tuple[PreTrainedModel, list[tuple[str, torch.Tensor]]],
) -> None:
    hf, state = llama_state
    dropped = {
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "lm_head.weight",
    }
    with pytest.raises(ValueError, match="missing") as info:
        _fresh(hf).load_weights([(k, v) for k, v in state if k not in dropped])
    for name in dropped:
        assert repr(name) in str(info.value)
    assert "q_proj" not in str(info.value)


def test_load_weights_reports_unexpected_names(
    llama_state: tuple[PreTrainedModel, list[tuple[str, torch.Tensor]]],
) -> None:
    hf, state = llama_state
    extra = [("model.layers.0.self_attn.foo.weight", torch.zeros(3)), ("model.extra.bias", torch.zeros(2))]
    with pytest.raises(ValueError, match="unexpected") as info:
        _fresh(hf).load_weights([*state, *extra])
    for name, _ in extra:
        assert repr(name) in str(info.value)
    assert "missing parameters []" in str(info.value)


def test_load_weights_rejects_wrong_shape_and_skips_inv_freq(
    llama_state: tuple[PreTrainedModel, list[tuple[str, torch.Tensor]]],
) -> None:
    hf, state = llama_state
    bad = [(k, torch.zeros(3, 3) if k.endswith("layers.0.self_attn.v_proj.weight") else v) for k, v in state]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight"):
        _fresh(hf).load_weights(bad)
    inv_freq = ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    model = _fresh(hf)
    model.load_weights([*state, inv_freq])
    ids = random_ids(5, seed=2)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))


def test_unknown_architectures_are_rejected_by_name() -> None:
    config = ModelConfig.from_hf_config(hf_llama().config.to_dict())
    with pytest.raises(ValueError, match=r"architecture: unsupported 'gpt2'"):
        dataclasses.replace(config, architecture="gpt2")
    hf_dict = {**hf_llama().config.to_dict(), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: \[.*'LlamaForCausalLM'"):
        ModelConfig.from_hf_config(hf_dict)


def test_every_registered_family_has_a_model_definition() -> None:
    definitions = model_definitions()
    for spec in ARCHITECTURES:
        assert spec.model in definitions, spec


@pytest.mark.parametrize(
    ("hf_class", "expected"),
    [
        ("LlamaForCausalLM", ("llama", False, False)),
        ("MistralForCausalLM", ("mistral", False, False)),
        ("Qwen2ForCausalLM", ("qwen2", True, False)),
        ("Qwen3ForCausalLM", ("qwen3", False, False)),
        ("Phi3ForCausalLM", ("phi3", False, False)),
        ("InternLM2ForCausalLM", ("internlm2", False, False)),
    ],
)
def test_registry_resolves_family_flags(hf_class: str, expected: tuple[str, bool, bool]) -> None:
    config = ModelConfig.from_hf_config({**_SHAPE, "architectures": [hf_class], "attention_bias": False})
    assert (config.architecture, config.qkv_bias, config.o_proj_bias) == expected
    # Llama reads attention_bias for both projections; Qwen2's biases are fixed by the family
    biased = ModelConfig.from_hf_config({**_SHAPE, "architectures": [hf_class], "attention_bias": True})
    fixed = {"Qwen2ForCausalLM": (True, False), "Phi3ForCausalLM": (False, False)}
    assert (biased.qkv_bias, biased.o_proj_bias) == fixed.get(hf_class, (True, True))
    assert biased.qk_norm == (hf_class == "Qwen3ForCausalLM")
    by_type = ModelConfig.from_hf_config({**_SHAPE, "model_type": expected[0]})
    assert by_type.architecture == expected[0]


@pytest.mark.parametrize("ops", ["reference", "cpu"])
def test_mistral_matches_hf(ops: str) -> None:
    from transformers import MistralConfig
    from transformers import MistralForCausalLM as HFMistral

    torch.manual_seed(0)
    hf = HFMistral(MistralConfig(**{**_SHAPE, "sliding_window": None})).eval()
    _randomize(hf, 0)
    model = ours(hf, ops=OPS[ops])
    assert model.config.architecture == "mistral"
    run, seq = PagedRun(model), PagedSequence()
    ids = random_ids(9, seed=4)
    (prefill,) = run.step([(seq, ids[:6])])
    assert_close(prefill, hf_logits(hf, ids[:6]))
    for i in range(6, 9):
        (decode,) = run.step([(seq, ids[i : i + 1])])
        assert_close(decode[-1], hf_logits(hf, ids[: i + 1])[-1])


def test_llama_with_attention_bias_matches_hf() -> None:
    hf = hf_llama(attention_bias=True, mlp_bias=True)
    model = ours(hf, ops=CPU_OPS)
    assert model.config.qkv_bias and model.config.o_proj_bias and model.config.mlp_bias
    ids = random_ids(7, seed=5)
    (logits,) = PagedRun(model).step([(PagedSequence(), ids)])
    assert_close(logits, hf_logits(hf, ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_decode_layers_only_where_they_compute_the_same(family: str) -> None:
    """The fused CPU decode layer has no q/k norms: Qwen3's layers must not declare themselves fusable, nor
    Gemma's (sandwich norms, GELU, soft-capping, windows)."""
    model = ours(FAMILIES[family](), ops=CPU_OPS, family=family)
    layers = model.model.layers  # type: ignore[attr-defined]
    fusable = [layer.fused_weights() is not None for layer in layers]
    assert fusable == [family not in ("qwen3", "gemma2", "gemma3")] * model.config.num_hidden_layers


def test_qwen3_honours_config_head_dim() -> None:
    hf = hf_qwen3()
    config = ours(hf, family="qwen3").config
    assert config.head_dim == 32 != config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("family", ["qwen3", "phi3", "internlm2", "gemma2", "gemma3"])
async def test_engine_greedy_matches_hf_generate(family: str, chat_tokenizer: Any) -> None:
    from asyncllm import AsyncEngine

    vocab = chat_tokenizer.vocab_size
    # Phi-3's HF generate recomputes the whole cache with the long factors once a sequence outgrows the
    # original length, which a paged cache does not; stay within it here (row by row past it is tested above).
    extra = {"original_max_position_embeddings": 64} if family == "phi3" else {}
    hf = FAMILIES[family](seed=11, vocab_size=vocab, max_position_embeddings=128, **extra)
    prompt = random_ids(7, seed=11)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    hf_config, tensors = checkpoint_of(family, hf)
    model = build_model(ModelConfig.from_hf_config(hf_config), CPU_OPS, dtype=torch.float32,
                        device=torch.device("cpu"))
    model.load_weights(tensors)
    engine = AsyncEngine.from_model(model, chat_tokenizer, device="cpu", kv_cache_tokens=1024)
    async with engine:
        completion = await engine.generate(prompt, max_tokens=32, temperature=0.0, ignore_eos=True)
    assert completion.token_ids == want
