"""Tensor parallelism end to end on CPU (gloo, spawned worker processes): a tiny random Llama (GQA, 2 KV
heads) and a tiny random Qwen2 (QKV bias, tied embeddings, one KV head: replicated on both ranks) at
``tensor_parallel_size=2`` against the same checkpoint on one rank and against Hugging Face transformers;
then what a dead worker, a worker that cannot start and ``aclose`` leave behind.

Each spawned group costs seconds (every rank imports torch), so each model's group is started once.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine
from asyncllm.builder import build_runner, load_model
from asyncllm.config import EngineConfig
from asyncllm.distributed.driver import TensorParallelRunner
from asyncllm.engine import EngineClosedError
from asyncllm.runner import ModelRunner
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import SequenceState

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["Hello world", "Name three rivers. How long is it?", "Once upon a time there was"]
LOGIT_TOL = 1e-5


def _config(**overrides: Any) -> EngineConfig:
    return EngineConfig(device="cpu", kv_cache_tokens=2048, seed=0, load_progress=False, **overrides)


def _write_dir(directory: Path, hf_config: dict[str, Any], model: Any, tokenizer: Any) -> Path:
    from safetensors.torch import save_file

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "float32"}))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"))
    write_tokenizer_files(directory, tokenizer)
    return directory


def _hf_model(kind: str, vocab_size: int, **overrides: Any) -> tuple[dict[str, Any], Any]:
    import transformers

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=False, rope_theta=10000.0)
    settings.update(overrides)
    config_class, model_class, architecture = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, "LlamaForCausalLM"),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, "Qwen2ForCausalLM"),
    }[kind]
    config = config_class(**settings)
    torch.manual_seed(7)
    model = model_class(config).eval()
    if kind == "qwen2":  # random biases, so that slicing them per rank matters
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    hf_config = config.to_dict()
    hf_config["architectures"] = [architecture]
    return hf_config, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer: Any) -> tuple[Path, Any]:
    hf_config, model = _hf_model("llama", chat_tokenizer.vocab_size)
    return _write_dir(tmp_path_factory.mktemp("tp") / "llama", hf_config, model, chat_tokenizer), model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer: Any) -> tuple[Path, Any]:
    hf_config, model = _hf_model("qwen2", chat_tokenizer.vocab_size, num_key_value_heads=1, tie_word_embeddings=True)
    return _write_dir(tmp_path_factory.mktemp("tp") / "qwen2", hf_config, model, chat_tokenizer), model


@pytest.fixture(scope="module")
def llama_tp(llama: tuple[Path, Any]) -> Iterator[TensorParallelRunner]:
    runner = TensorParallelRunner.start(str(llama[0]), _config(tensor_parallel_size=2))
    yield runner
    runner.close()


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def _hf_greedy(model: Any, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation and the logits of every position (prompt and generated), by full forwards."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        logits = model(torch.tensor([tokens])).logits[0].float()
    return tokens[len(ids):], logits


def _run_steps(runner: ModelRunner | TensorParallelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill ``prompts`` (the first in two chunks, the first chunk not sampling), then ``steps`` batched
    greedy decode steps; the logits ``[len(prompts), V]`` of every sampling step."""
    seqs = []
    for i, ids in enumerate(prompts):
        seq = SequenceState(f"s{i}", list(ids), None, max_total_tokens=len(ids) + steps + 1)
        seq.block_table = list(range(8 * i, 8 * i + 8))
        seqs.append(seq)
    split = len(prompts[0]) // 2
    runner.forward_logits([ScheduledChunk(seqs[0], 0, split)])
    chunks = [ScheduledChunk(seqs[0], split, len(prompts[0]) - split)]
    chunks += [ScheduledChunk(seq, 0, len(seq.token_ids)) for seq in seqs[1:]]
    out = []
    for _ in range(steps + 1):
        logits = runner.forward_logits(chunks).clone()
        out.append(logits)
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.token_ids.append(token)
        chunks = [ScheduledChunk(seq, len(seq.token_ids) - 1, 1) for seq in seqs]
    return out


def _check_against_one_rank_and_hf(parallel: TensorParallelRunner, path: Path, hf: Any, prompts: list[list[int]],
                                   steps: int) -> tuple[float, float]:
    """Run ``prompts`` (prefill, then ``steps`` batched decodes) on ``parallel`` and on one rank of the same
    checkpoint; assert the logits agree within ``LOGIT_TOL`` with each other and with HF's greedy run,
    and the greedy tokens with HF's. Returns the worst differences (vs one rank, vs HF)."""
    config = _config()
    single = build_runner(load_model(path, config)[0], config)
    parallel_logits = _run_steps(parallel, prompts, steps)
    single_logits = _run_steps(single, prompts, steps)
    worst_single = max(float((a - b).abs().max()) for a, b in zip(parallel_logits, single_logits, strict=True))
    assert worst_single <= LOGIT_TOL, worst_single
    worst_hf = 0.0
    for i, ids in enumerate(prompts):
        tokens, hf_logits = _hf_greedy(hf, ids, steps)
        ours = torch.stack([step[i] for step in parallel_logits])  # prompt's last position, then decodes
        assert ours.argmax(-1).tolist() == [*tokens, int(hf_logits[-1].argmax())]
        worst_hf = max(worst_hf, float((ours - hf_logits[len(ids) - 1:]).abs().max()))
    assert worst_hf <= LOGIT_TOL, worst_hf
    return worst_single, worst_hf


def test_llama_logits_match_one_rank_and_transformers(llama: tuple[Path, Any], llama_tp: TensorParallelRunner,
                                                      chat_tokenizer: Any) -> None:
    path, hf = llama
    prompts = [chat_tokenizer.encode(p) for p in PROMPTS]
    worst_single, worst_hf = _check_against_one_rank_and_hf(llama_tp, path, hf, prompts, steps=4)
    print(f"max |logit diff| TP=2 vs TP=1: {worst_single:.2e}, vs transformers: {worst_hf:.2e}")


def test_quantized_kv_cache_splits_its_heads_across_ranks(llama: tuple[Path, Any], chat_tokenizer: Any) -> None:
    """An int4 cache (anchored, grouped keys) on 2 ranks, each holding one of the 2 KV heads with its anchors
    and pairs, gives one rank's logits over the same cache through chunked prefill and batched decode."""
    path, _ = llama
    prompts = [chat_tokenizer.encode(p) for p in PROMPTS]
    config = _config(kv_cache_dtype="int4")
    single = build_runner(load_model(path, config)[0], config)
    assert single.kv_caches[0].key_anchors is not None
    parallel = TensorParallelRunner.start(str(path), _config(tensor_parallel_size=2, kv_cache_dtype="int4"))
    try:
        parallel_logits = _run_steps(parallel, prompts, steps=4)
    finally:
        parallel.close()
    single_logits = _run_steps(single, prompts, steps=4)
    worst = max(float((a - b).abs().max()) for a, b in zip(parallel_logits, single_logits, strict=True))
    # the ranks' keys differ from one rank's by float rounding only; a code may flip at a rounding boundary
    assert worst <= 1e-3, worst
    print(f"max |logit diff| int4 cache, TP=2 vs TP=1: {worst:.2e}")
    assert [x.argmax(-1).tolist() for x in parallel_logits] == [x.argmax(-1).tolist() for x in single_logits]


async def test_llama_engine_concurrent_requests_and_session(llama: tuple[Path, Any], llama_tp: TensorParallelRunner,
                                                            chat_tokenizer: Any) -> None:
    """Runs last on the shared group: the engine's ``aclose`` stops its workers."""
    path, _ = llama
    config = _config(tensor_parallel_size=2)
    pids = llama_tp.pids
    assert len(pids) == 2 and _alive(pids) == pids
    parallel = AsyncEngine(llama_tp, chat_tokenizer, llama_tp.model.config, config)
    single = AsyncEngine.from_pretrained(path, config=_config())
    try:
        results = []
        for engine in (parallel, single):
            greedy = [engine.generate(p, max_tokens=10, temperature=0, logprobs=5) for p in PROMPTS]
            # sampled: one request with its own seed (its generator's state travels to rank 0 and back),
            # one drawing from the engine's seeded generator
            sampled = [engine.generate(PROMPTS[0], max_tokens=10, temperature=0.9, seed=5),
                       engine.generate(PROMPTS[1], max_tokens=10, temperature=0.9)]
            outs = await asyncio.gather(*greedy, *sampled)
            async with engine.session(system="You are terse.") as chat:
                first = await chat.send("Name three rivers.", max_tokens=6, temperature=0)
                second = await chat.send("Which is longest?", max_tokens=6, temperature=0)
            results.append((outs, first, second))
        (p_outs, p_first, p_second), (s_outs, s_first, s_second) = results
        assert [o.token_ids for o in p_outs] == [o.token_ids for o in s_outs]
        assert (p_outs[3].token_ids, p_outs[4].token_ids) != (p_outs[0].token_ids, p_outs[1].token_ids)  # sampled
        for p_out, s_out in zip(p_outs, s_outs, strict=True):
            for p_lp, s_lp in zip(p_out.logprobs or [], s_out.logprobs or [], strict=True):
                assert [t for t, _ in p_lp.top] == [t for t, _ in s_lp.top]
                assert max(abs(a - b) for (_, a), (_, b) in zip(p_lp.top, s_lp.top, strict=True)) <= LOGIT_TOL
        assert (p_first.token_ids, p_second.token_ids) == (s_first.token_ids, s_second.token_ids)
        assert p_second.usage.cached_tokens > 0 and p_second.usage.cached_tokens == s_second.usage.cached_tokens
        stats = parallel.stats()
        assert stats.kv_blocks_used == 0 and parallel.failure is None
        assert stats.kv_bytes_per_token * 2 == single.stats().kv_bytes_per_token  # each rank: one of 2 KV heads
    finally:
        await parallel.aclose()
        await single.aclose()
    assert _alive(pids) == []
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


async def test_qwen2_replicated_kv_head_then_a_killed_worker_fails_every_request(
        qwen2: tuple[Path, Any], chat_tokenizer: Any) -> None:
    path, hf = qwen2
    before = {p.pid for p in multiprocessing.active_children()}
    engine = AsyncEngine.from_pretrained(path, config=_config(tensor_parallel_size=2))
    workers = {p.name: p.pid for p in multiprocessing.active_children() if p.pid not in before}
    assert sorted(workers) == ["asyncllm-tp-rank0", "asyncllm-tp-rank1"]
    pids = [workers["asyncllm-tp-rank0"], workers["asyncllm-tp-rank1"]]
    try:
        outs = await asyncio.gather(*(engine.generate(p, max_tokens=8, temperature=0, logprobs=5) for p in PROMPTS))
        worst = 0.0
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ids = engine.encode_prompt(prompt)
            tokens, hf_logits = _hf_greedy(hf, ids, len(out.token_ids))
            assert out.token_ids == tokens
            hf_logprobs = torch.log_softmax(hf_logits[len(ids) - 1:], dim=-1)
            for step, lp in enumerate(out.logprobs or []):
                worst = max(worst, *(abs(value - float(hf_logprobs[step, token])) for token, value in lp.top))
        assert worst <= LOGIT_TOL, worst
        print(f"qwen2 max |logprob diff| TP=2 vs transformers: {worst:.2e}")

        # a long generation in flight on two requests; one rank is killed after the first tokens arrive
        streams = [engine.stream_detailed(p, max_tokens=400, temperature=0, ignore_eos=True) for p in PROMPTS[:2]]
        started = asyncio.Event()

        async def consume(stream: Any) -> BaseException | None:
            try:
                async for _ in stream:
                    started.set()
            except Exception as error:
                return error
            return None

        tasks = [asyncio.create_task(consume(s)) for s in streams]
        await asyncio.wait_for(started.wait(), 30)
        os.kill(pids[1], signal.SIGKILL)
        errors = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for error in errors:
            assert isinstance(error, EngineClosedError), error
            assert "rank 1" in str(error) and "SIGKILL" in str(error)
        assert engine.failure is not None and not engine.is_running
        with pytest.raises(EngineClosedError, match="rank 1"):
            await asyncio.wait_for(engine.generate("Hello", max_tokens=2), 5)
    finally:
        await engine.aclose()
    assert _alive(pids) == []


def test_awq_qwen2_splits_its_packed_groups_across_ranks(tmp_path: Path) -> None:
    """A quantized checkpoint (AWQ, 4-bit, groups of 32; Qwen2: q/k/v bias): each rank keeps its rows of the
    column-split layers and whole groups of the row-split ones; logits match one rank (1e-5) and transformers
    on the exactly dequantized weights within the CPU fast path's int8 activation rounding on steps of few
    rows (the bound ``tests/quant/test_quantized_models.py`` holds one rank to), with the same greedy tokens."""
    import transformers

    from asyncllm.builder import model_from_checkpoint
    from asyncllm.loaders import load_checkpoint

    from ..quant._writers import TINY, write_awq
    from ..quant.test_quantized_models import DECODE_TOLERANCE

    path = tmp_path / "awq"
    path.mkdir()
    reference = write_awq(path, "qwen2", group_size=32)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    hf.load_state_dict(reference)
    prompts = [[1, 5, 9, 200, 17, 33, 4], [7, 250, 3]]
    runner = TensorParallelRunner.start(str(path), _config(tensor_parallel_size=2))
    try:
        assert runner.model.quantization_name == "awq"
        parallel_logits = _run_steps(runner, prompts, 2)
    finally:
        runner.close()
    config = _config()
    single = build_runner(model_from_checkpoint(load_checkpoint(path), config), config)
    single_logits = _run_steps(single, prompts, 2)
    worst_single = max(float((a - b).abs().max()) for a, b in zip(parallel_logits, single_logits, strict=True))
    assert worst_single <= LOGIT_TOL, worst_single
    print(f"awq max |logit diff| TP=2 vs TP=1: {worst_single:.2e}")
    for i, ids in enumerate(prompts):
        tokens, hf_logits = _hf_greedy(hf, ids, 2)
        ours = torch.stack([step[i] for step in parallel_logits])
        assert ours.argmax(-1).tolist()[:2] == tokens
        expected = hf_logits[len(ids) - 1:]
        scale = float(expected.abs().max())
        torch.testing.assert_close(ours, expected, rtol=DECODE_TOLERANCE, atol=DECODE_TOLERANCE * scale)


def test_a_worker_startup_error_is_raised_in_the_caller(tmp_path: Path, chat_tokenizer: Any) -> None:
    # 129 intermediate features do not split over 2 ranks; the ranks find out while building their layers
    hf_config, model = _hf_model("llama", chat_tokenizer.vocab_size, intermediate_size=129)
    path = _write_dir(tmp_path / "odd", hf_config, model, chat_tokenizer)
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 does not divide") as raised:
        AsyncEngine.from_pretrained(path, config=_config(tensor_parallel_size=2))
    assert "129" in str(raised.value)
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_from_model_refuses_several_ranks(llama: tuple[Path, Any], chat_tokenizer: Any) -> None:
    model, tokenizer = load_model(llama[0], _config())
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        AsyncEngine.from_model(model, tokenizer, config=_config(tensor_parallel_size=2))
