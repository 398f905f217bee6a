"""The flat CPU decode loop (``LlamaCpuDecoder``) against the module path it replaces for decode steps.

HF parity of decode steps with the CPU bundle is in ``test_llama_parity.py``; here: which steps take the
flat loop, that it writes the same KV and returns the same hidden states as ``LlamaModel.forward`` on the
same inputs, and that everything else falls back to the module path.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch

from asyncllm.kernels import CPU_OPS, TORCH_OPS, AttentionMetadata
from asyncllm.kernels.native_build import NATIVE_KERNELS_ENV
from asyncllm.layers.linear import Linear
from asyncllm.models import LlamaForCausalLM, build_model
from asyncllm.models.llama_decode import DecodeProjection, LlamaCpuDecoder, decode_projection

from ..kernels.native_support import require_native_kernels
from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches
from .test_llama_parity import hf_llama, hf_qwen2, ours, random_ids

BLOCK_SIZE = 4


class _Counter:
    """Counts ``LlamaCpuDecoder.forward`` calls while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = LlamaCpuDecoder.forward

        def counted(decoder: LlamaCpuDecoder, *args: object) -> torch.Tensor:
            self.calls += 1
            return original(decoder, *args)

        monkeypatch.setattr(LlamaCpuDecoder, "forward", counted)


@pytest.fixture(params=["native", "torch"])
def attention(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which attention the decoder runs: the native paged kernel, or torch ops over gathered K/V."""
    if request.param == "torch":
        monkeypatch.setenv(NATIVE_KERNELS_ENV, "0")
    else:
        require_native_kernels()
    return str(request.param)


def _assert_attention(decoder: LlamaCpuDecoder | None, attention: str) -> None:
    """The decoder runs the backend asked for: with the native kernels, attention in C and, for steps of
    up to ``NATIVE_LAYER_MAX_ROWS`` rows, each whole layer in C."""
    assert decoder is not None
    assert (decoder.native_attention() is not None) == (attention == "native")
    assert (decoder.native_layers() is not None) == (attention == "native")


def _prefilled(  # type: ignore[no-untyped-def]
    model: LlamaForCausalLM, prompt_lens: Sequence[int], *, consecutive: bool = False
):
    config = model.config
    caches = make_kv_caches(config.num_hidden_layers, 64, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    pool = BlockPool(64, BLOCK_SIZE, seed=3, consecutive=consecutive)
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


def _assert_step_matches_module_path(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """``model.forward`` (the flat loop for a decode step) returns and writes what ``LlamaModel.forward``
    returns and writes on a copy of the same caches; ``caches`` advance by the step."""
    module_caches = copy.deepcopy(caches)
    with torch.no_grad():
        expected = model.model(ids, positions, meta, module_caches)
        got = model.forward(ids, positions, meta, caches)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, module_caches, strict=True):
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "prompt_lens", [(6,), (5, 9, 2), (7, 7), (3, 8, 5, 6, 1, 4)], ids=["one", "ragged", "equal", "six-rows"]
)
@pytest.mark.parametrize("host_lengths", ["exact", "upper-bound"])
def test_decode_step_matches_module_path(
    family: str, prompt_lens: tuple[int, ...], host_lengths: str, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = hf_llama() if family == "llama" else hf_qwen2()
    model = ours(hf, ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, prompt_lens)
    _assert_attention(model._decoder(), attention)
    counter = _Counter(monkeypatch)
    for step in range(3):  # crosses a block boundary for every prompt length above
        positions, meta = _decode_step(pool, seqs)
        if host_lengths == "upper-bound":
            meta = _with_upper_bound_lengths(meta, 40)
        ids = torch.tensor(random_ids(len(seqs), seed=50 + step))
        _assert_step_matches_module_path(model, ids, positions, meta, caches)
    assert counter.calls == 3


@pytest.mark.parametrize("blocks", ["consecutive", "scattered"])
@pytest.mark.parametrize("host_lengths", ["exact", "upper-bound"])
def test_single_sequence_reads_consecutive_blocks_without_a_gather(
    blocks: str, host_lengths: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch attention's layout choice (the native kernel never gathers)."""
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "0")
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (6,), consecutive=blocks == "consecutive")
    decoder = model._decoder()
    assert decoder is not None
    counter = _Counter(monkeypatch)
    for step in range(4):  # crosses a block boundary
        positions, meta = _decode_step(pool, seqs)
        table = seqs[0].block_table
        assert (table == list(range(table[0], table[0] + len(table)))) == (blocks == "consecutive")
        if host_lengths == "upper-bound":
            meta = _with_upper_bound_lengths(meta, 40)
        tables = decoder._tables(positions, meta, caches[0][0])
        assert (tables.gather is None) == (blocks == "consecutive")
        assert tables.context == 6 + step + 1
        _assert_step_matches_module_path(model, torch.tensor(random_ids(1, seed=70 + step)), positions, meta, caches)
    assert counter.calls == 4


def test_prefill_and_reference_bundle_skip_the_flat_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = hf_llama()
    counter = _Counter(monkeypatch)
    cpu_model = ours(hf, ops=CPU_OPS)
    _prefilled(cpu_model, (5, 3))  # a prefill step
    reference = ours(hf, ops=TORCH_OPS)
    pool, seqs, caches = _prefilled(reference, (5,))
    positions, meta = _decode_step(pool, seqs)
    with torch.no_grad():
        reference.forward(torch.tensor([1]), positions, meta, caches)
    assert counter.calls == 0


def test_unwritten_slot_falls_back_to_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (5, 6))
    positions, meta = _decode_step(pool, seqs)
    slots = meta.slot_mapping.clone()
    slots[1] = -1
    meta = AttentionMetadata(**{**meta.__dict__, "slot_mapping": slots})
    before = [(k.clone(), v.clone()) for k, v in caches]
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        model.forward(torch.tensor([3, 4]), positions, meta, caches)
    assert counter.calls == 0
    written = int(slots[0])
    for (k, v), (k0, v0) in zip(caches, before, strict=True):
        changed = (k != k0).flatten(1).any(dim=1) | (v != v0).flatten(1).any(dim=1)
        assert changed.nonzero().flatten().tolist() == [written // BLOCK_SIZE]


def test_replaced_linear_disables_the_flat_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ours(hf_llama(), ops=CPU_OPS)
    down = model.model.layers[1].mlp.down_proj

    class Doubled(type(down)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    down.__class__ = Doubled
    assert not LlamaCpuDecoder.supports(model.model, model.lm_head)
    pool, seqs, caches = _prefilled(model, (4,))
    positions, meta = _decode_step(pool, seqs)
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        model.forward(torch.tensor([7]), positions, meta, caches)
    assert counter.calls == 0


def test_non_float32_models_keep_the_module_path() -> None:
    hf = hf_llama()
    config = ours(hf).config
    model = build_model(config, CPU_OPS, dtype=torch.bfloat16, device=torch.device("cpu"))
    model.load_weights(list(hf.state_dict().items()))
    assert not LlamaCpuDecoder.supports(model.model, model.lm_head)
    cpu = ours(hf, ops=CPU_OPS)
    assert LlamaCpuDecoder.supports(cpu.model, cpu.lm_head)


def _split(linear: Linear, threads: int) -> DecodeProjection:
    return decode_projection(linear.matmul, linear.weight, linear.bias, threads)


def _linear_with(weight: torch.Tensor, bias: torch.Tensor | None, *, k_major: bool) -> Linear:
    out_features, in_features = weight.shape
    linear = Linear(in_features, out_features, bias=bias is not None, dtype=torch.float32,
                    device=torch.device("cpu"), matmul=CPU_OPS.linear)
    if k_major:
        linear.weight = torch.nn.Parameter(torch.empty(in_features, out_features).t(), requires_grad=False)
    linear.weight.data.copy_(weight)
    if bias is not None:
        assert linear.bias is not None
        linear.bias.data.copy_(bias)
    return linear


@pytest.mark.parametrize("k_major", [True, False], ids=["k-major", "row-major"])
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_gemv_projection_matches_float64(k_major: bool, rows: int, threads: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows * 10 + threads)
    weight = torch.randn(48, 36, generator=generator)
    bias = torch.randn(48, generator=generator) if with_bias else None
    x = torch.randn(rows, 36, generator=generator)
    projection = _split(_linear_with(weight, bias, k_major=k_major), threads)
    assert projection.k_major == k_major
    assert projection.splits == (threads if threads > 1 else 1)  # 48 and 36 are divisible by 2 and 3
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(projection(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_split_gemv_needs_a_divisible_size() -> None:
    weight = torch.randn(10, 7)
    assert _split(_linear_with(weight, None, k_major=True), 2).splits == 1  # K = 7
    assert _split(_linear_with(weight, None, k_major=False), 2).splits == 2  # N = 10
    assert _split(_linear_with(weight, None, k_major=False), 3).splits == 1  # N = 10
    x = torch.randn(1, 7)
    for k_major in (True, False):
        for threads in (2, 3):
            got = _split(_linear_with(weight, None, k_major=k_major), threads)(x)
            torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cpu_float32_models_store_attention_gate_up_embedding_and_head_k_major(tied: bool) -> None:
    hf = hf_llama(seed=5, tie_word_embeddings=tied)
    model = ours(hf, ops=CPU_OPS)
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert weight.stride() == (1, weight.shape[0])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for layer in model.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
            n, _ = linear.weight.shape
            assert linear.weight.stride() == (1, n)
        assert layer.mlp.down_proj.weight.is_contiguous()
    reference = ours(hf, ops=TORCH_OPS)
    assert all(param.is_contiguous() for param in reference.parameters())
    hidden = torch.randn(3, hf.config.hidden_size)
    expected = hidden.double() @ hf.lm_head.weight.double().T
    for rows in (1, 2, 3):  # split head GEMV, then oneDNN on the strided weight
        got = model.compute_logits(hidden[:rows])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[:rows], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_matches_module_path_at_each_thread_count(threads: int, attention: str) -> None:
    """The split GEMVs are chosen from the thread count when the decoder is built; the native attention
    takes its OpenMP team size from the same count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = ours(hf_llama(), ops=CPU_OPS)
        pool, seqs, caches = _prefilled(model, (6, 3))
        positions, meta = _decode_step(pool, seqs)
        decoder = model._decoder()
        _assert_attention(decoder, attention)
        assert decoder is not None
        assert {layer.qkv.splits for layer in decoder.layers} == {threads}
        _assert_step_matches_module_path(model, torch.tensor(random_ids(2, seed=9)), positions, meta, caches)
    finally:
        torch.set_num_threads(previous)


def test_native_layers_reject_steps_that_do_not_fit_them() -> None:
    """The C layer trusts every pointer and index it gets; its binding checks them first."""
    require_native_kernels()
    model = ours(hf_llama(), ops=CPU_OPS)
    pool, seqs, caches = _prefilled(model, (6,))
    positions, meta = _decode_step(pool, seqs)
    decoder = model._decoder()
    assert decoder is not None
    layers = decoder.native_layers()
    assert layers is not None
    tables = decoder._tables(positions, meta, caches[0][0])
    assert tables.native is not None
    hidden = model.config.hidden_size
    residual = torch.zeros(1, hidden)
    slots = meta.slot_mapping.long()
    good = {"residual": residual, "cos": tables.cos, "sin": tables.sin, "slots": slots, "kv_caches": caches,
            "plan": tables.native}
    bad: list[tuple[str, dict[str, object]]] = [
        ("residual", {"residual": torch.zeros(1, hidden + 1)}),
        ("residual", {"residual": torch.zeros(1, hidden, dtype=torch.float64)}),
        ("residual", {"residual": torch.zeros(1, 2 * hidden)[:, ::2]}),
        ("plan", {"residual": torch.zeros(2, hidden)}),
        ("cos", {"cos": tables.cos[..., :-1]}),
        ("sin", {"sin": tables.sin.double()}),
        ("slots", {"slots": slots.int()}),
        ("slots", {"slots": slots + pool.num_blocks * BLOCK_SIZE}),
        ("slots", {"slots": slots - 10_000}),
        ("kv_caches", {"kv_caches": caches[:-1]}),
        ("kv_caches", {"kv_caches": [(k[:-1], v) for k, v in caches]}),
    ]
    for field, change in bad:
        with pytest.raises(ValueError, match=field):
            layers.run(**{**good, **change})  # type: ignore[arg-type]
    layers.run(**good)  # type: ignore[arg-type]


def test_native_layers_need_the_k_major_layout() -> None:
    """A model whose weights are not laid out for the C layer keeps the torch path for its layers."""
    require_native_kernels()
    model = ours(hf_llama(), ops=CPU_OPS)
    assert isinstance(model, LlamaForCausalLM)
    first = model.model.layers[0].self_attn.qkv_proj
    first.weight = torch.nn.Parameter(first.weight.detach().contiguous())  # row-major now
    decoder = LlamaCpuDecoder(model.model, model.lm_head)
    assert decoder.native_attention() is not None
    assert decoder.native_layers() is None
