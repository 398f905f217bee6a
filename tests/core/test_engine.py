"""AsyncEngine behaviour on a tiny random Llama: batching equivalence, preemption, cancellation,
sessions, streaming and error handling. References are the same requests run alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncllm import AsyncEngine, EngineClosedError, SamplingParams, SessionBusyError

from ..adapters._support import async_wait_until
from ._tokenizers import word_piece_only_bias

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over",
    "In 1492,",
    "Rivers of the world:",
    "def fibonacci(n):",
    "Dear diary, today I",
    "Bonjour, je m'appelle",
    "東京は日本の首都です。",
    "The answer is 42 because",
    "Ingredients: flour, sugar,",
    "Knock knock. Who's there?",
    "A B C D E F G",
    "Hello",
    "Once upon a time there was a very long prompt that spans several KV blocks " * 3,
    "emoji 🎉🚀 party",
    "Summary:",
]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


async def alone(engine: AsyncEngine, prompts: list[str], **params: Any) -> list[list[int]]:
    return [(await engine.generate(p, **params)).token_ids for p in prompts]


async def test_concurrent_greedy_requests_match_running_alone(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        expected = await alone(engine, PROMPTS, **GREEDY)
        results = await asyncio.gather(*(engine.generate(p, **GREEDY) for p in PROMPTS))
        assert [r.token_ids for r in results] == expected
        assert all(r.finish_reason == "length" and len(r.token_ids) == 24 for r in results)
        assert engine.stats().kv_blocks_used == 0


async def test_preemption_keeps_greedy_output_identical(make_tiny_engine: Any) -> None:
    # the same block size: a cache whose contents depend on it (anchored int4 keys) stores the same values
    reference = make_tiny_engine(enable_prefix_caching=False, block_size=8)
    async with reference:
        expected = await alone(reference, PROMPTS, **GREEDY)
    # 24 blocks of 8 tokens cannot hold 16 sequences of 30-80 tokens at once: preemption must happen
    async with make_tiny_engine(num_kv_blocks=24, block_size=8) as engine:
        results = await asyncio.gather(*(engine.generate(p, **GREEDY) for p in PROMPTS))
        assert engine.stats().num_preemptions > 0
        assert [r.token_ids for r in results] == expected
        assert engine.stats().kv_blocks_used == 0


async def test_chunked_prefill_matches_single_step_prefill(make_tiny_engine: Any) -> None:
    prompt = PROMPTS[13]
    async with make_tiny_engine() as engine:
        expected = (await engine.generate(prompt, **GREEDY)).token_ids
    async with make_tiny_engine(max_num_batched_tokens=7, enable_prefix_caching=False) as engine:
        assert (await engine.generate(prompt, **GREEDY)).token_ids == expected


async def test_prefix_cache_reports_cached_tokens_and_keeps_output(make_tiny_engine: Any) -> None:
    prompt = PROMPTS[13]
    async with make_tiny_engine() as engine:
        first = await engine.generate(prompt, **GREEDY)
        second = await engine.generate(prompt, **GREEDY)
        assert first.usage.cached_tokens == 0
        assert second.usage.cached_tokens >= (first.usage.prompt_tokens - 1) // 16 * 16
        assert second.token_ids == first.token_ids


async def test_session_turn_equals_stateless_generation_and_reuses_kv(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        # Random weights happily spell a word with byte pieces; a real model does not, and only then does the
        # re-rendered transcript repeat the reply's ids. Keep the replies to pieces that re-encode as is.
        params = {"temperature": 0.0, "max_tokens": 12, "logit_bias": word_piece_only_bias(engine.tokenizer)}
        async with engine.session(system="Be brief.") as chat:
            c1 = await chat.send("Name a river.", **params)
            c2 = await chat.send("How long is it?", **params)
            transcript = chat.messages
        first_turn = engine.tokenizer.apply_chat_template(transcript[:2]) + c1.token_ids
        assert engine.tokenizer.apply_chat_template(transcript[:4])[:len(first_turn)] == first_turn
        assert c2.usage.cached_tokens >= c1.usage.prompt_tokens + c1.usage.completion_tokens
        assert [m["role"] for m in transcript] == ["system", "user", "assistant", "user", "assistant"]
        assert transcript[2]["content"] == c1.text and transcript[4]["content"] == c2.text
        assert engine.stats().kv_blocks_used == 0
    async with make_tiny_engine(enable_prefix_caching=False) as stateless:
        again = await stateless.generate(transcript[:4], **params)
    assert again.token_ids == c2.token_ids
    assert again.usage.cached_tokens == 0


async def test_session_stream_and_concurrent_turn_error(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        chat = engine.session()
        stream = chat.stream("Tell me a story.", temperature=0.0, max_tokens=8)
        with pytest.raises(SessionBusyError):
            chat.stream("another", max_tokens=2)
        text = "".join([delta async for delta in stream])
        assert chat.messages[-1] == {"role": "assistant", "content": text}
        await chat.close()
        await async_wait_until(lambda: engine.stats().kv_blocks_used == 0)


@pytest.mark.parametrize("how", ["break", "cancel", "aclose", "abort"])
async def test_cancellation_frees_blocks_and_spares_others(make_tiny_engine: Any, how: str) -> None:
    params = {**GREEDY, "max_tokens": 40}
    async with make_tiny_engine() as engine:
        expected = await alone(engine, PROMPTS[:3], **params)
        victim_outputs: list[str] = []

        async def victim() -> None:
            stream = engine.stream_detailed(PROMPTS[13], **params)
            async for out in stream:
                victim_outputs.append(out.text)
                if len(victim_outputs) == 3:
                    if how == "break":
                        break
                    if how == "aclose":
                        await stream.aclose()
                        return
                    if how == "abort":
                        engine.abort(stream.request_id)
            if how == "abort":
                assert stream.completion is not None and stream.completion.finish_reason == "abort"

        task = asyncio.create_task(victim())
        others = asyncio.gather(*(engine.generate(p, **params) for p in PROMPTS[:3]))
        if how == "cancel":
            await async_wait_until(lambda: len(victim_outputs) >= 3)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        results = await others
        assert [r.token_ids for r in results] == expected
        assert len(victim_outputs) < 40
        await async_wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
        assert engine.stats().kv_blocks_used == 0


async def test_slow_consumer_gets_coalesced_deltas(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        expected = await engine.generate(PROMPTS[0], **GREEDY)
        outputs = []
        async for out in engine.stream_detailed(PROMPTS[0], **GREEDY):
            outputs.append(out)
            if len(outputs) == 1:  # stop reading until the engine has generated everything
                await async_wait_until(lambda: engine.stats().running == 0)
        assert [t for o in outputs for t in o.token_ids] == expected.token_ids
        assert "".join(o.text for o in outputs) == expected.text
        assert len(outputs) < len(expected.token_ids)


async def test_text_deltas_concatenate_to_full_decode(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        for prompt in (PROMPTS[7], PROMPTS[14]):
            stream = engine.stream(prompt, **GREEDY)
            text = "".join([d async for d in stream])
            assert stream.completion is not None
            assert text == engine.tokenizer.decode(stream.completion.token_ids)


async def test_stop_string_is_never_emitted(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        full = await engine.generate(PROMPTS[1], **GREEDY)
        text = full.text
        begin = next(i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].strip())
        stop = text[begin : begin + 3]
        cut = text.index(stop)
        deltas = [d async for d in engine.stream(PROMPTS[1], **GREEDY, stop=[stop])]
        assert "".join(deltas) == full.text[:cut]
        assert all(stop not in d for d in deltas)


async def test_seeded_sampling_is_reproducible_across_batches(make_tiny_engine: Any) -> None:
    params = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 16, "seed": 1234, "ignore_eos": True}
    async with make_tiny_engine() as engine:
        solo = await engine.generate(PROMPTS[0], **params)
        crowd = await asyncio.gather(
            engine.generate(PROMPTS[0], **params),
            *(engine.generate(p, temperature=1.0, max_tokens=16) for p in PROMPTS[1:8]),
        )
        assert crowd[0].token_ids == solo.token_ids


async def test_unseeded_sampling_differs_between_engines_and_a_seed_pins_it(make_tiny_engine: Any) -> None:
    """Without a seed every engine draws differently (no fixed default seed); ``seed`` reproduces, and an
    explicit engine seed reproduces its unseeded requests."""
    params = {"temperature": 1.5, "max_tokens": 8, "ignore_eos": True}
    replies, seeded, engine_seeded = [], [], []
    for _ in range(8):
        async with make_tiny_engine() as engine:
            replies.append(tuple((await engine.generate(PROMPTS[0], **params)).token_ids))
            seeded.append(tuple((await engine.generate(PROMPTS[0], **params, seed=7)).token_ids))
    for _ in range(2):
        async with make_tiny_engine(seed=11) as engine:
            engine_seeded.append(tuple((await engine.generate(PROMPTS[0], **params)).token_ids))
    assert len(set(replies)) > 1
    assert len(set(seeded)) == 1
    assert engine_seeded[0] == engine_seeded[1]


async def test_logprobs_on_detailed_stream(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        c = await engine.generate(PROMPTS[0], temperature=0.0, max_tokens=5, logprobs=3)
        assert c.logprobs is not None and len(c.logprobs) == 5
        for token, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert lp.token_id == token and len(lp.top) == 3
            assert lp.top[0][0] == token  # greedy picks the most likely token
            assert lp.logprob == pytest.approx(lp.top[0][1])


async def test_bad_input_raises_and_engine_keeps_serving(make_tiny_engine: Any) -> None:
    async with make_tiny_engine(kv_cache_tokens=512) as engine:
        with pytest.raises(ValueError, match="temperature"):
            engine.stream("hi", temperature=-1)
        with pytest.raises(ValueError, match="max_tokens"):
            await engine.generate("hi", max_tokens=0)
        with pytest.raises(ValueError, match="prompt"):
            await engine.generate("")
        with pytest.raises(ValueError, match=r"prompt\[1\]"):
            await engine.generate([1, -5, 3])
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.generate("hello " * 600)
        with pytest.raises(ValueError, match="max_tokens"):
            await engine.generate("hello", max_tokens=10_000)
        with pytest.raises(ValueError, match="stop_token_ids"):
            await engine.generate("hello", stop_token_ids=[10**9])
        with pytest.raises(ValueError, match="logit_bias"):
            await engine.generate("hello", logit_bias={-3: 1.0})
        with pytest.raises(TypeError, match="bogus"):
            await engine.generate("hello", bogus=1)
        ok = await engine.generate("hello", max_tokens=3, temperature=0)
        assert len(ok.token_ids) <= 3


async def test_aclose_ends_inflight_requests_with_clear_error(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    stream = engine.stream("Once upon a time", max_tokens=500, ignore_eos=True)
    await stream.__anext__()
    await engine.aclose()
    with pytest.raises(EngineClosedError):
        async for _ in stream:
            pass
    with pytest.raises(EngineClosedError):
        await engine.generate("again")


async def test_event_loop_stays_responsive_during_model_steps(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    step = engine._runner.step
    loop = asyncio.get_running_loop()
    loop_ran_during_step: list[bool] = []

    def blocking_step(*args: Any) -> Any:
        # The step does not return until the event loop has run a task: it would wait forever (here: time
        # out) if model work blocked the loop instead of running on the worker thread.
        task = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop)
        try:
            task.result(timeout=30)
            loop_ran_during_step.append(True)
        except TimeoutError:
            loop_ran_during_step.append(False)
        return step(*args)

    engine._runner.step = blocking_step  # type: ignore[method-assign]
    async with engine:
        await engine.generate("hello", max_tokens=4, temperature=0, ignore_eos=True)
    assert len(loop_ran_during_step) >= 4 and all(loop_ran_during_step)


async def test_params_object_and_keyword_overrides(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        base = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        a = await engine.generate("hello", params=base)
        b = await engine.generate("hello", params=base, max_tokens=3)
        assert len(a.token_ids) == 6 and b.token_ids == a.token_ids[:3]


async def test_garbage_in_unused_kv_slots_does_not_leak_into_outputs(make_tiny_engine: Any) -> None:
    """Padding slots read by batched decode are masked; NaN there must not reach any output."""
    async with make_tiny_engine() as engine:
        expected = await alone(engine, PROMPTS[:4], **GREEDY)
    engine = make_tiny_engine()
    for cache in engine._runner.kv_caches:
        cache.key.fill_(float("nan"))
        cache.value.fill_(float("nan"))
    async with engine:
        results = await asyncio.gather(*(engine.generate(p, **GREEDY) for p in PROMPTS[:4]))
    assert [r.token_ids for r in results] == expected


async def test_closing_a_session_mid_turn_leaks_nothing(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        chat = engine.session()
        stream = chat.stream_detailed("Tell me everything.", max_tokens=30, ignore_eos=True)
        await stream.__anext__()
        await chat.close()
        async for _ in stream:  # the turn may finish or be cut short; either way nothing stays pinned
            pass
        await async_wait_until(lambda: engine.stats().running == 0)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.sessions_pinned == 0


async def test_run_on_model_thread_runs_between_steps_on_the_model_thread(make_tiny_engine: Any) -> None:
    import threading

    async with make_tiny_engine() as engine:
        names = await asyncio.gather(
            engine.run_on_model_thread(lambda: threading.current_thread().name),
            engine.generate("hello", max_tokens=4, temperature=0),
        )
        assert names[0].startswith("asyncllm-model") and names[0] != threading.current_thread().name


def test_an_unknown_engine_keyword_is_a_type_error_listing_the_fields(make_tiny_engine: Any,
                                                                      tmp_path: Any) -> None:
    from asyncllm import AsyncEngine

    with pytest.raises(TypeError, match="max_batch_size") as info:
        AsyncEngine.from_pretrained(tmp_path / "never-loaded.gguf", max_batch_size=8)
    assert "max_num_seqs" in str(info.value) and "kv_cache_tokens" in str(info.value)
    with pytest.raises(TypeError, match=r"valid EngineConfig fields: .*max_num_seqs"):
        make_tiny_engine(max_num_seq=8)
