"""The CPU bundle's faster decode paths against the module path of the same model.

One model definition runs every step; the CPU bundle adds, per decode step, a native attention plan and
a flat pass per fusable layer: one C call for steps of up to ``native_layer_max_rows`` rows, a short
sequence of torch calls otherwise. HF parity of every bundle is in ``test_llama_parity.py``; here: which
steps and layers take which pass, that each writes the same KV and returns the same hidden states as the
module path on the same inputs, and that anything the fused passes do not implement keeps the modules.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from asyncllm.kernels import CPU_OPS, TORCH_OPS, AttentionMetadata, KernelOps, KVCache, cpu_ops
from asyncllm.kernels.cpu import k_major_layout, split_gemv
from asyncllm.kernels.cpu_fused import TorchDecodeStep
from asyncllm.kernels.native_layer import NativeDecodeStep
from asyncllm.layers.linear import UnquantizedLinearMethod
from asyncllm.models import CausalLM, build_model

from ..kernels.native_support import require_native_kernels
from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches
from .test_llama_parity import hf_llama, hf_qwen2, ours, random_ids

BLOCK_SIZE = 4
MODULES_ONLY = cpu_ops(native=False, fused_layers=False)
BUNDLES = {
    "native-layer": CPU_OPS,
    "torch-pass-native-attention": cpu_ops(native_layer_max_rows=0),
    "torch-pass": cpu_ops(native=False),
}


class _FusedCalls:
    """Counts fused layer calls while installed: ``layers`` those in C, ``torch_layers`` the torch passes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.layers: list[int] = []
        self.torch_layers: list[int] = []
        for step_class, calls in ((NativeDecodeStep, self.layers), (TorchDecodeStep, self.torch_layers)):
            original = step_class.run

            def counted(step: object, layer: int, *args: object, original=original, calls=calls) -> None:
                calls.append(layer)
                original(step, layer, *args)

            monkeypatch.setattr(step_class, "run", counted)


def _prefilled(model: CausalLM, prompt_lens: Sequence[int],
               bits: tuple[int, int] | None = None) -> tuple[BlockPool, list[PagedSequence], list[KVCache]]:
    config = model.config
    caches = make_kv_caches(config.num_hidden_layers, 64, BLOCK_SIZE, config.num_key_value_heads, config.head_dim,
                            bits=bits)
    pool = BlockPool(64, BLOCK_SIZE, seed=3)
    seqs = [PagedSequence() for _ in prompt_lens]
    positions, meta = build_step(pool, [(seq, n) for seq, n in zip(seqs, prompt_lens, strict=True)])
    ids = torch.tensor([t for n in prompt_lens for t in random_ids(n, seed=n)])
    with torch.no_grad():
        model.forward(ids, positions, meta, caches)
    return pool, seqs, caches


def _decode_step(pool: BlockPool, seqs: Sequence[PagedSequence]) -> tuple[torch.Tensor, AttentionMetadata]:
    return build_step(pool, [(seq, 1) for seq in seqs])


def _with_upper_bound_lengths(meta: AttentionMetadata, bound: int) -> AttentionMetadata:
    """Host-side lengths as a padded decode step records them: every sequence at the upper bound, block
    tables as wide as the bound (trailing entries 0)."""
    tables = torch.zeros(meta.num_seqs, bound // BLOCK_SIZE, dtype=torch.int32)
    tables[:, : meta.block_tables.shape[1]] = meta.block_tables
    return AttentionMetadata(
        **{**meta.__dict__, "block_tables": tables, "seq_lens_cpu": (bound,) * meta.num_seqs, "max_seq_len": bound}
    )


def _pair(family: str, ops: KernelOps) -> tuple[CausalLM, CausalLM]:
    """(model on ``ops``, the same weights on the modules-only CPU bundle)."""
    hf = hf_llama() if family == "llama" else hf_qwen2()
    return ours(hf, ops=ops), ours(hf, ops=MODULES_ONLY)


def _assert_step_matches(
    fast: CausalLM, modules: CausalLM, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
    caches: list[KVCache],
) -> None:
    """``fast`` returns and writes what ``modules`` returns and writes on a copy of the same caches; ``caches``
    advance by the step."""
    module_caches = copy.deepcopy(caches)
    with torch.no_grad():
        expected = modules.forward(ids, positions, meta, module_caches)
        got = fast.forward(ids, positions, meta, caches)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for cache, ref in zip(caches, module_caches, strict=True):
        if cache.is_quantized:
            # the same codes and pairs, up to a value on a rounding boundary under another division order
            every_block = torch.arange(cache.num_blocks)
            for got_kv, ref_kv in zip(cache.read_blocks(every_block), ref.read_blocks(every_block), strict=True):
                step = max(float(cache.key_scales.abs().max()), float(cache.value_scales.abs().max()))
                torch.testing.assert_close(got_kv, ref_kv, rtol=0, atol=step)
            torch.testing.assert_close(cache.key_scales, ref.key_scales, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(cache.value_scales, ref.value_scales, rtol=1e-6, atol=1e-6)
            if ref.key_anchors is not None:  # 4-bit keys: each block's first token, as written
                assert cache.key_anchors is not None
                torch.testing.assert_close(cache.key_anchors, ref.key_anchors, rtol=1e-5, atol=1e-5)
            assert (cache.key != ref.key).float().mean() < 1e-3
            continue
        torch.testing.assert_close(cache.key, ref.key, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(cache.value, ref.value, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "prompt_lens", [(6,), (5, 9, 2), (7, 7), (3, 8, 5, 6, 1, 4)], ids=["one", "ragged", "equal", "six-rows"]
)
@pytest.mark.parametrize("host_lengths", ["exact", "upper-bound"])
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_decode_steps_match_the_module_path(
    family: str, prompt_lens: tuple[int, ...], host_lengths: str, bundle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if bundle != "torch-pass":
        require_native_kernels()
    fast, modules = _pair(family, BUNDLES[bundle])
    pool, seqs, caches = _prefilled(fast, prompt_lens)
    calls = _FusedCalls(monkeypatch)
    for step in range(3):  # crosses a block boundary for every prompt length above
        positions, meta = _decode_step(pool, seqs)
        if host_lengths == "upper-bound":
            meta = _with_upper_bound_lengths(meta, 40)
        ids = torch.tensor(random_ids(len(seqs), seed=50 + step))
        _assert_step_matches(fast, modules, ids, positions, meta, caches)
    in_c = bundle == "native-layer" and len(prompt_lens) <= 4
    assert calls.layers == ([0, 1] * 3 if in_c else [])
    assert calls.torch_layers == ([] if in_c else [0, 1] * 3)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (8, 4)], ids=["int8", "int4", "k8v4"])
@pytest.mark.parametrize("prompt_lens", [(5, 9, 2), (3, 8, 5, 6, 1, 4)], ids=["ragged", "six-rows"])
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_quantized_cache_decode_steps_match_the_module_path(
    bits: tuple[int, int], prompt_lens: tuple[int, ...], bundle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused passes write codes and read them in place as the modules do (quantize on write, dequantize
    the gathered blocks), with the C layer taking the steps it takes for plain caches."""
    if bundle != "torch-pass":
        require_native_kernels()
    fast, modules = _pair("llama", BUNDLES[bundle])
    pool, seqs, caches = _prefilled(fast, prompt_lens, bits=bits)
    calls = _FusedCalls(monkeypatch)
    for step in range(3):
        positions, meta = _decode_step(pool, seqs)
        ids = torch.tensor(random_ids(len(seqs), seed=70 + step))
        _assert_step_matches(fast, modules, ids, positions, meta, caches)
    in_c = bundle == "native-layer" and len(prompt_lens) <= 4
    assert calls.layers == ([0, 1] * 3 if in_c else [])
    assert calls.torch_layers == ([] if in_c else [0, 1] * 3)


def test_the_native_plan_is_attached_once_per_decode_step_only() -> None:
    require_native_kernels()
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (5, 3))
    _, prefill_meta = build_step(pool, [(PagedSequence(), 4)])
    assert CPU_OPS.plan_attention(prefill_meta, caches[0], 4).plan is None
    _, meta = _decode_step(pool, seqs)
    planned = CPU_OPS.plan_attention(meta, caches[0], 4)
    assert planned.plan is not None and planned.plan.max_len == max(meta.seq_lens_cpu)
    assert MODULES_ONLY.plan_attention(meta, caches[0], 4).plan is None
    assert TORCH_OPS.plan_attention(meta, caches[0], 4) is meta


def test_prefill_and_other_bundles_never_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = hf_llama()
    calls = _FusedCalls(monkeypatch)
    _prefilled(ours(hf, ops=CPU_OPS), (5, 3))  # a prefill step
    for ops in (TORCH_OPS, MODULES_ONLY, cpu_ops(native=True, fused_layers=False)):
        model = ours(hf, ops=ops)
        pool, seqs, caches = _prefilled(model, (5,))
        positions, meta = _decode_step(pool, seqs)
        with torch.no_grad():
            model.forward(torch.tensor([1]), positions, meta, caches)
    assert calls.layers == calls.torch_layers == []


def test_steps_beyond_the_row_limit_take_the_torch_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native_kernels()
    hf = hf_llama()
    two_rows = ours(hf, ops=cpu_ops(native_layer_max_rows=2))
    pool, seqs, caches = _prefilled(two_rows, (3, 4, 5))
    calls = _FusedCalls(monkeypatch)
    positions, meta = _decode_step(pool, seqs)
    _assert_step_matches(two_rows, ours(hf, ops=MODULES_ONLY), torch.tensor([1, 2, 3]), positions, meta, caches)
    assert calls.layers == [] and calls.torch_layers == [0, 1]


def test_unwritten_slot_runs_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (5, 6))
    positions, meta = _decode_step(pool, seqs)
    slots = meta.slot_mapping.clone()
    slots[1] = -1
    meta = AttentionMetadata(**{**meta.__dict__, "slot_mapping": slots})
    before = copy.deepcopy(caches)
    calls = _FusedCalls(monkeypatch)
    with torch.no_grad():
        model.forward(torch.tensor([3, 4]), positions, meta, caches)
    assert calls.layers == calls.torch_layers == []
    written = int(slots[0])
    for cache, old in zip(caches, before, strict=True):
        changed = (cache.key != old.key).flatten(1).any(dim=1) | (cache.value != old.value).flatten(1).any(dim=1)
        assert changed.nonzero().flatten().tolist() == [written // BLOCK_SIZE]


class _Scale(nn.Module):
    """A module the fused kernel does not implement (a stand-in for a q/k norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.5 * x


def test_a_layer_with_an_extra_module_is_never_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1 gains a module that changes its output: that layer runs as modules (and so is right), the
    other stays fused."""
    require_native_kernels()
    hf = hf_llama()
    fast, modules = ours(hf, ops=CPU_OPS), ours(hf, ops=MODULES_ONLY)
    for model in (fast, modules):
        attn = model.model.layers[1].self_attn
        attn.scale_qkv = scale = _Scale()
        project = attn.qkv_proj.forward
        attn.qkv_proj.forward = lambda x, project=project, scale=scale: scale(project(x))  # 1.5 * qkv
    assert fast.model.layers[1].fused_weights() is None
    assert fast.model.layers[0].fused_weights() is not None
    pool, seqs, caches = _prefilled(fast, (5,))
    calls = _FusedCalls(monkeypatch)
    positions, meta = _decode_step(pool, seqs)
    _assert_step_matches(fast, modules, torch.tensor([9]), positions, meta, caches)
    assert calls.layers == [0] and calls.torch_layers == []


def test_a_non_dense_linear_method_is_never_fused() -> None:
    model = ours(hf_llama(), ops=CPU_OPS)
    down = model.model.layers[0].mlp.down_proj

    class Other(UnquantizedLinearMethod):
        """Stands in for a quantized method: same math, but not the dense method the C layer reads."""

    down.method = Other(CPU_OPS)
    assert model.model.layers[0].fused_weights() is None
    assert model.model.layers[1].fused_weights() is not None


def test_non_float32_models_run_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = hf_llama()
    model = build_model(ours(hf).config, CPU_OPS, dtype=torch.bfloat16, device=torch.device("cpu"))
    model.load_weights(list(hf.state_dict().items()))
    assert all(p.is_contiguous() for p in model.parameters())  # no K-major layout outside float32
    caches = [KVCache(c.key.bfloat16(), c.value.bfloat16()) for c in make_kv_caches(2, 64, BLOCK_SIZE, 2, 16)]
    pool, seqs = BlockPool(64, BLOCK_SIZE), [PagedSequence()]
    positions, meta = build_step(pool, [(seqs[0], 5)])
    calls = _FusedCalls(monkeypatch)
    with torch.no_grad():
        model.forward(torch.tensor(random_ids(5, seed=1)), positions, meta, caches)
        positions, meta = _decode_step(pool, seqs)
        model.forward(torch.tensor([2]), positions, meta, caches)
    assert calls.layers == calls.torch_layers == []


@pytest.mark.parametrize("k_major", [True, False], ids=["k-major", "row-major"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("splits", [2, 3])
def test_split_gemv_matches_float64(k_major: bool, rows: int, splits: int) -> None:
    generator = torch.Generator().manual_seed(rows * 10 + splits)
    weight = torch.randn(48, 36, generator=generator)  # 48 and 36 are divisible by 2 and 3
    stored = weight.t().contiguous().t() if k_major else weight
    x = torch.randn(rows, 36, generator=generator)
    got = split_gemv(x, stored, splits)
    assert got is not None
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)


def test_split_gemv_needs_a_divisible_size() -> None:
    weight = torch.randn(10, 7)
    x = torch.randn(1, 7)
    assert split_gemv(x, weight.t().contiguous().t(), 2) is None  # K-major, K = 7
    assert split_gemv(x, weight, 3) is None  # row-major, N = 10
    assert split_gemv(x, weight, 1) is None
    got = split_gemv(x, weight, 2)
    assert got is not None
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_linear_matches_float64_at_each_thread_count(rows: int, threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(rows)
        weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
        x = torch.randn(rows, 24, generator=generator)
        expected = x.double() @ weight.double().T + bias.double()
        for stored in (weight, k_major_layout(weight)):
            got = CPU_OPS.linear(x, stored, bias)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cpu_float32_models_store_wide_weights_k_major(tied: bool) -> None:
    hf = hf_llama(seed=5, tie_word_embeddings=tied)
    model = ours(hf, ops=CPU_OPS)
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert weight.stride() == (1, weight.shape[0])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for layer in model.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
            n, _ = linear.weight.shape
            assert linear.weight.stride() == (1, n)
        assert layer.mlp.down_proj.weight.is_contiguous()  # N < K: row-major
    reference = ours(hf, ops=TORCH_OPS)
    assert all(param.is_contiguous() for param in reference.parameters())
    hidden = torch.randn(3, hf.config.hidden_size)
    expected = hidden.double() @ hf.lm_head.weight.double().T
    for rows in (1, 2, 3):  # split head GEMV, then oneDNN on the strided weight
        got = model.compute_logits(hidden[:rows])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[:rows], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_matches_the_modules_at_each_thread_count(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native attention and layer take their OpenMP team size from torch's thread count."""
    require_native_kernels()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, modules = _pair("llama", CPU_OPS)
        pool, seqs, caches = _prefilled(fast, (6, 3))
        positions, meta = _decode_step(pool, seqs)
        calls = _FusedCalls(monkeypatch)
        _assert_step_matches(fast, modules, torch.tensor(random_ids(2, seed=9)), positions, meta, caches)
        assert calls.layers == [0, 1]
    finally:
        torch.set_num_threads(previous)


def test_native_layer_step_rejects_tensors_that_do_not_fit() -> None:
    """The C layer trusts every pointer and index it gets; the step checks them first."""
    require_native_kernels()
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (6,))
    positions, meta = _decode_step(pool, seqs)
    meta = CPU_OPS.plan_attention(meta, caches[0], model.config.num_attention_heads)
    step = model.model._fused_step(positions, meta, caches)
    assert step is not None and step.covers(0)
    hidden = model.config.hidden_size
    bad = [
        ("residual", torch.zeros(1, hidden + 1), caches[0]),
        ("residual", torch.zeros(1, hidden, dtype=torch.float64), caches[0]),
        ("residual", torch.zeros(1, 2 * hidden)[:, ::2], caches[0]),
        ("residual", torch.zeros(2, hidden), caches[0]),
        ("cache", torch.zeros(1, hidden), KVCache(caches[0].key[:-1], caches[0].value[:-1])),
        ("cache", torch.zeros(1, hidden), KVCache(caches[0].key.double(), caches[0].value.double())),
    ]
    for field, residual, cache in bad:
        with pytest.raises(ValueError, match=field):
            step.run(0, residual, cache)
    bad_slots = AttentionMetadata(**{**meta.__dict__, "slot_mapping": meta.slot_mapping + 64 * BLOCK_SIZE})
    with pytest.raises(ValueError, match="slot_mapping"):
        model.model._fused_step(positions, bad_slots, caches)
    step.run(0, torch.zeros(1, hidden), caches[0])


def test_a_layer_not_laid_out_for_the_c_layer_runs_as_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native_kernels()
    hf = hf_llama()
    model, modules = ours(hf, ops=CPU_OPS), ours(hf, ops=MODULES_ONLY)
    qkv = model.model.layers[0].self_attn.qkv_proj
    qkv.weight = nn.Parameter(qkv.weight.detach().contiguous(), requires_grad=False)  # row-major now
    pool, seqs, caches = _prefilled(model, (4,))
    calls = _FusedCalls(monkeypatch)
    positions, meta = _decode_step(pool, seqs)
    _assert_step_matches(model, modules, torch.tensor([5]), positions, meta, caches)
    assert calls.layers == [1] and calls.torch_layers == []
