"""Our Llama-family model against Hugging Face ``transformers`` on tiny random models, in float32.

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
from transformers import LlamaConfig, PreTrainedModel, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen2ForCausalLM as HFQwen2

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


def ours(
    hf: PreTrainedModel, weights: Sequence[tuple[str, torch.Tensor]] | None = None, ops: KernelOps = TORCH_OPS
) -> CausalLM:
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    model = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(list(hf.state_dict().items()) if weights is None else weights)
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


FAMILIES = {"llama": hf_llama, "qwen2": hf_qwen2}
OPS = {"reference": TORCH_OPS, "cpu": CPU_OPS, "cpu-torch-only": cpu_ops(native=False)}
if os.environ.get("TRITON_INTERPRET") == "1":
    OPS["triton"] = get_kernel_ops("triton", torch.device("cpu"))


@pytest.fixture(scope="module", params=[(f, o) for f in sorted(FAMILIES) for o in OPS], ids="-".join)
def pair(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, CausalLM]:
    family, ops = request.param
    hf = FAMILIES[family]()
    return hf, ours(hf, ops=OPS[ops])


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


@torch.no_grad()
def test_dynamic_rope_beyond_max_positions_matches_hf_incremental_decode() -> None:
    max_pos, factor = 16, 2.0
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor}
    hf = hf_llama(seed=6, rope_parameters=rope, max_position_embeddings=max_pos)
    model = ours(hf)
    assert isinstance(model, LlamaForCausalLM)
    assert model.max_positions == int(max_pos * factor)
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
        {**hf.config.to_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
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
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: \['LlamaForCausalLM'"):
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
    ],
)
def test_registry_resolves_family_flags(hf_class: str, expected: tuple[str, bool, bool]) -> None:
    config = ModelConfig.from_hf_config({**_SHAPE, "architectures": [hf_class], "attention_bias": False})
    assert (config.architecture, config.qkv_bias, config.o_proj_bias) == expected
    # Llama reads attention_bias for both projections; Qwen2's biases are fixed by the family
    biased = ModelConfig.from_hf_config({**_SHAPE, "architectures": [hf_class], "attention_bias": True})
    assert (biased.qkv_bias, biased.o_proj_bias) == ((True, True) if hf_class != "Qwen2ForCausalLM" else (True, False))
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
