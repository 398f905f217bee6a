"""One bad request never fails its neighbours: extreme sampling params are refused at submission or
sampled safely, and a model step that raises fails only the requests that make it raise. References are
the innocent requests' tokens when run alone."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm import AsyncEngine, StepFailedError

NAN, INF = float("nan"), float("inf")
INNOCENT = ["Once upon a time", "Rivers of the world:", "def fibonacci(n):", "Dear diary, today I"]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
TIMEOUT = 120  # seconds; a hang fails the test instead of blocking the suite


async def alone(engine: AsyncEngine, prompts: Sequence[str], **params: Any) -> list[list[int]]:
    return [(await engine.generate(p, **params)).token_ids for p in prompts]


# ------------------------------------------------------------------------- extreme sampling parameters
EXTREMES = [5e-324, 1e-46, 1e-300, 1e300, NAN, INF, -INF, -0.0, 0.0]
FIELD_VALUES: dict[str, list[Any]] = {
    "temperature": [*EXTREMES, 0.7, 1e4, 1e-5, -1.0],
    "repetition_penalty": [*EXTREMES, 1.0, 0.01, 100.0, 1.3],
    "presence_penalty": [*EXTREMES, 2.0, -2.0, 0.5],
    "frequency_penalty": [*EXTREMES, 2.0, -2.0],
    "top_p": [*EXTREMES, 1.0, 0.5],
    "min_p": [*EXTREMES, 1.0, 0.2],
}


def field_is_valid(name: str, value: float) -> bool:
    """The documented ranges, written out independently of the implementation."""
    if not math.isfinite(value):
        return False
    low_high = {"temperature": (0.0, 1e4), "repetition_penalty": (0.01, 100.0), "presence_penalty": (-2.0, 2.0),
                "frequency_penalty": (-2.0, 2.0), "min_p": (0.0, 1.0)}
    if name == "top_p":
        return 0.0 < value <= 1.0
    low, high = low_high[name]
    return low <= value <= high


@st.composite
def request_params(draw: st.DrawFn, vocab: int) -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": 3}
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), max_size=2)):
        params[name] = draw(st.sampled_from(FIELD_VALUES[name]))
    if draw(st.booleans()):
        token = draw(st.sampled_from([0, 5, vocab - 1, vocab, -1]))
        params["logit_bias"] = {token: draw(st.sampled_from([5e-324, -100.0, 100.0, 1e300, -INF, NAN, -1e-46]))}
    params["min_tokens"] = draw(st.sampled_from([0, 2]))
    params["stop_token_ids"] = draw(st.sampled_from(["none", "all", "all_but_7", "outside"]))
    if draw(st.booleans()):
        params["seed"] = draw(st.integers(0, 100))
    return params


def expected_invalid(params: dict[str, Any], vocab: int, eos: set[int]) -> set[str]:
    bad = {name for name in FIELD_VALUES if name in params and not field_is_valid(name, params[name])}
    for token, value in (params.get("logit_bias") or {}).items():
        if not (0 <= token < vocab and math.isfinite(value) and abs(value) <= 100.0):
            bad.add("logit_bias")
    stops = params["stop_token_ids"]
    if any(not 0 <= t < vocab for t in stops):
        bad.add("stop_token_ids")
    elif not bad and params["min_tokens"] and set(range(vocab)) <= set(stops) | eos:
        bad.update({"min_tokens", "stop_token_ids"})
    return bad


def test_extreme_params_are_refused_or_served_and_neighbours_are_untouched(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine(kv_cache_tokens=1024)
    vocab = engine.model_config.vocab_size
    eos = set(engine.tokenizer.eos_token_ids) | set(engine.model_config.eos_token_ids)
    stop_lists = {"none": [], "all": list(range(vocab)), "all_but_7": [t for t in range(vocab) if t != 7],
                  "outside": [vocab]}
    assert 7 not in eos
    loop = asyncio.new_event_loop()

    async def run(raw: dict[str, Any], expected: list[list[int]]) -> None:
        params = {**raw, "stop_token_ids": stop_lists[raw["stop_token_ids"]]}
        invalid = expected_invalid(params, vocab, eos)
        innocents = [asyncio.ensure_future(engine.generate(p, **GREEDY)) for p in INNOCENT[:2]]
        await asyncio.sleep(0)
        if invalid:
            with pytest.raises(ValueError) as caught:
                engine.stream_detailed("x", **params)
            named = {part.strip() for part in str(caught.value).split(":")[0].split(",")}
            assert named and named <= invalid, (str(caught.value), invalid)
        else:
            result = await engine.generate("x", **params)
            assert result.finish_reason in ("stop", "length") and 1 <= len(result.token_ids) <= 3
            banned = eos | set(params["stop_token_ids"])
            assert not banned & set(result.token_ids[: params["min_tokens"]])
            assert all(0 <= t < vocab for t in result.token_ids)
        assert [r.token_ids for r in await asyncio.gather(*innocents)] == expected
        assert engine.stats().kv_blocks_used == 0

    try:
        expected = loop.run_until_complete(alone(engine, INNOCENT[:2], **GREEDY))

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(request_params(vocab))
        def check(raw: dict[str, Any]) -> None:
            loop.run_until_complete(asyncio.wait_for(run(raw, expected), TIMEOUT))

        check()
        # the attacker's request from the report, next to four innocent streams
        async def report() -> None:
            innocents = [asyncio.ensure_future(engine.generate(p, **GREEDY)) for p in INNOCENT]
            attack = await engine.generate("x", max_tokens=2, temperature=1e-46)
            assert len(attack.token_ids) <= 2
            assert [r.token_ids for r in await asyncio.gather(*innocents)] == alone_four

        alone_four = loop.run_until_complete(alone(engine, INNOCENT, **GREEDY))
        loop.run_until_complete(asyncio.wait_for(report(), TIMEOUT))
        assert engine.stats().kv_blocks_used == 0
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()


# -------------------------------------------------------------------------------------- fault injection
def break_steps(engine: AsyncEngine, fails: Any) -> list[tuple[int, bool]]:
    """Wrap the runner's step: run it (writing KV, drawing random numbers), then raise if ``fails(chunks)``.
    Returns a list that records, for every step that raised, its size and whether it held a partial
    prefill (a chunk that does not sample)."""
    runner = engine._runner
    real = runner.step
    raised: list[tuple[int, bool]] = []

    def step(chunks: Any, rows: Any) -> Any:
        output = real(chunks, rows)
        if fails(chunks):
            raised.append((len(chunks), not all(c.samples for c in chunks)))
            raise RuntimeError("injected fault")
        return output

    runner.step = step  # type: ignore[method-assign]
    return raised


@pytest.mark.parametrize(("after", "budget"), [(2, 2048), (1, 16)])  # 16: prefills run in chunks
async def test_a_step_failing_for_one_request_fails_only_that_request(make_tiny_engine: Any, after: int,
                                                                      budget: int) -> None:
    seeded = {"temperature": 0.9, "top_k": 20, "seed": 11, "max_tokens": 8, "ignore_eos": True}
    async with make_tiny_engine(max_num_batched_tokens=budget) as engine:
        expected = await alone(engine, INNOCENT, **GREEDY)
        expected_seeded = (await engine.generate("A seeded neighbour", **seeded)).token_ids
        bad_prompt = engine.encode_prompt("The poisoned request")

        def poisoned(chunks: Any) -> bool:  # raises once the bad request has ``after`` outputs
            return any(c.seq.token_ids[: len(bad_prompt)] == bad_prompt and c.seq.num_output_tokens >= after
                       for c in chunks)

        raised = break_steps(engine, poisoned)
        innocents = [asyncio.ensure_future(engine.generate(p, **GREEDY)) for p in INNOCENT]
        neighbour = asyncio.ensure_future(engine.generate("A seeded neighbour", **seeded))
        bad = engine.stream_detailed("The poisoned request", **GREEDY)
        received: list[int] = []
        with pytest.raises(StepFailedError, match="injected fault") as caught:
            async with asyncio.timeout(TIMEOUT):
                async for out in bad:
                    received += out.token_ids
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert len(received) == after
        results = await asyncio.wait_for(asyncio.gather(*innocents), TIMEOUT)
        assert [r.token_ids for r in results] == expected
        assert (await asyncio.wait_for(neighbour, TIMEOUT)).token_ids == expected_seeded
        assert max(size for size, _ in raised) > 1  # the fault was hit inside a shared step, then isolated
        assert any(partial for _, partial in raised) == (budget < 100)
        assert engine.stats().kv_blocks_used == 0


async def test_a_step_failing_for_everyone_fails_its_requests_then_serving_resumes(
        make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        expected = await alone(engine, INNOCENT, **GREEDY)
        broken = False
        break_steps(engine, lambda chunks: broken)
        streams = [engine.stream_detailed(p, max_tokens=100, ignore_eos=True) for p in INNOCENT[:3]]
        for stream in streams:  # every request is in flight
            await asyncio.wait_for(stream.__anext__(), TIMEOUT)
        broken = True

        async def drain(stream: Any) -> None:
            async for _ in stream:
                pass

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(drain(s) for s in streams), return_exceptions=True), TIMEOUT)
        assert all(isinstance(o, StepFailedError) and "injected fault" in str(o) for o in outcomes), outcomes
        assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0
        broken = False
        results = await asyncio.wait_for(asyncio.gather(*(engine.generate(p, **GREEDY) for p in INNOCENT)),
                                         TIMEOUT)
        assert [r.token_ids for r in results] == expected
        assert engine.is_running and engine.stats().kv_blocks_used == 0


# ------------------------------------------------------------------------------- bisection on its own
def test_bisection_fails_exactly_the_chunks_that_raise_and_keeps_every_other_result() -> None:
    from asyncllm.sampling import SamplerOutput, SamplingParams, SamplingRow
    from asyncllm.scheduler import ScheduledChunk
    from asyncllm.sequence import SequenceState
    from asyncllm.step_isolation import run_step

    chunks, rows = [], []
    for i in range(9):
        seq = SequenceState(f"r{i}", [i + 1] * 4, SamplingParams(temperature=0.0), max_total_tokens=8)
        samples = i % 3 != 1  # every third chunk is a partial prefill without a row
        chunks.append(ScheduledChunk(seq, 0, 4 if samples else 2))
        if samples:
            rows.append(SamplingRow(seq.params, [], [], None))
    bad = {"r2", "r4", "r7"}
    calls: list[int] = []

    def step(part: Any, part_rows: Any) -> SamplerOutput:
        calls.append(len(part))
        assert len(part_rows) == sum(c.samples for c in part)
        if bad & {c.seq.request_id for c in part}:
            raise RuntimeError("bad row")
        tokens = [c.seq.token_ids[0] * 10 for c in part if c.samples]  # a result tied to its chunk
        return SamplerOutput(tokens, [None] * len(tokens))

    result = run_step(step, chunks, rows)
    assert sorted(c.seq.request_id for c, _ in result.failed) == sorted(bad)
    assert all(str(error) == "bad row" for _, error in result.failed)
    assert [c.seq.request_id for c in result.chunks] == [f"r{i}" for i in (0, 1, 3, 5, 6, 8)]
    assert result.output.token_ids == [10, 40, 60, 70, 90]
    assert len(calls) < 2 * len(chunks)
