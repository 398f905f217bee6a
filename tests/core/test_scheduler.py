"""Scheduler invariants under random workloads: no leak, exact refcounts, no deadlock, correct KV reuse."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kv import BlockManager
from asyncllm.kv.pins import PinRegistry
from asyncllm.scheduler import Scheduler, droppable_blocks
from asyncllm.sequence import SequenceState, SequenceStatus

from ._sim import SimulatedKV, next_token, run_step

_ids = itertools.count()


def make_seq(tokens: list[int], max_new: int, session: str | None = None) -> SequenceState:
    return SequenceState(f"r{next(_ids)}", list(tokens), None, max_total_tokens=len(tokens) + max_new,
                         session_id=session)


def make_scheduler(num_blocks: int, block_size: int, *, max_seqs: int = 8, budget: int = 16,
                   prefix_caching: bool = True, sessions: tuple[str, ...] = (),
                   sliding_window: int | None = None) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    pins = PinRegistry(blocks)
    for session in sessions:
        pins.open(session)
    return Scheduler(blocks, pins, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                     sliding_window=sliding_window)


def drain(scheduler: Scheduler, kv: SimulatedKV, max_new: dict[str, int], limit: int = 2000) -> int:
    """Run until idle, finishing sequences at their token limit; returns the number of steps."""
    for steps in range(limit):
        if not scheduler.has_work:
            return steps
        sampled = run_step(scheduler, kv)
        if not sampled and scheduler.has_work and not scheduler.running:
            raise AssertionError("scheduler made no progress: deadlock")
        for chunk in sampled:
            seq = chunk.seq
            if seq.num_output_tokens >= max_new[seq.request_id]:
                scheduler.finish(seq, "length")
        scheduler.blocks.check_invariants(scheduler.holders())
    raise AssertionError("did not finish within the step limit")


def reference_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=10),
    max_new=st.integers(1, 12),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
def test_random_workload_finishes_without_leaks(
    prompts: list[list[int]], max_new: int, num_blocks: int, block_size: int, budget: int, max_seqs: int,
    prefix_caching: bool,
) -> None:
    scheduler = make_scheduler(num_blocks, block_size, max_seqs=max_seqs, budget=budget,
                               prefix_caching=prefix_caching)
    kv = SimulatedKV(block_size)
    seqs, limits = [], {}
    for prompt in prompts:
        seq = make_seq(prompt, max_new)
        if scheduler.blocks.blocks_needed(seq.max_total_tokens) > num_blocks:
            with pytest.raises(ValueError, match="KV blocks"):
                scheduler.add(seq)
            continue
        scheduler.add(seq)
        seqs.append(seq)
        limits[seq.request_id] = max_new
    drain(scheduler, kv, limits)
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED
        assert seq.output_token_ids == reference_output(seq.token_ids[: seq.num_prompt_tokens], max_new)
    assert scheduler.blocks.num_referenced == 0
    scheduler.blocks.check_invariants([])


def test_preemption_happens_and_output_is_unchanged() -> None:
    """A pool too small for all sequences at once forces recompute; outputs stay exact."""
    scheduler = make_scheduler(num_blocks=10, block_size=2, max_seqs=8, budget=64)
    kv = SimulatedKV(2)
    prompts = [[i % 4, (i + 1) % 4, 2, 3, i % 3] for i in range(6)]
    seqs = [make_seq(p, 10) for p in prompts]
    for seq in seqs:
        scheduler.add(seq)
    drain(scheduler, kv, {s.request_id: 10 for s in seqs})
    assert scheduler.num_preemptions > 0
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.token_ids[: seq.num_prompt_tokens], 10)
    assert scheduler.blocks.num_referenced == 0


def test_prefix_cache_reuses_shared_prefix() -> None:
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    kv = SimulatedKV(4)
    shared = [1, 2, 3, 0, 1, 2, 3, 0, 2, 2]
    first = make_seq([*shared, 1], 3)
    scheduler.add(first)
    drain(scheduler, kv, {first.request_id: 3})
    second = make_seq([*shared, 3], 3)
    scheduler.add(second)
    drain(scheduler, kv, {second.request_id: 3})
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 8  # two full blocks of the shared prefix


def test_session_pin_is_reused_and_survives_until_released() -> None:
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64, prefix_caching=False, sessions=("s",))
    kv = SimulatedKV(4)
    turn1 = make_seq([1, 2, 3, 1, 2, 3, 0], 5, session="s")
    scheduler.add(turn1)
    drain(scheduler, kv, {turn1.request_id: 5})
    pinned = turn1.num_computed_tokens
    assert "s" in scheduler.pins and scheduler.blocks.num_referenced > 0
    # the next turn extends the whole history; everything computed before is reused, even without prefix caching
    turn2 = make_seq([*turn1.token_ids, 2, 2, 1], 4, session="s")
    scheduler.add(turn2)
    drain(scheduler, kv, {turn2.request_id: 4})
    assert turn2.num_cached_tokens == pinned
    # a turn whose history diverges mid-way reuses exactly the common prefix
    history = list(turn2.token_ids)
    history[9] = (history[9] + 1) % 4
    turn3 = make_seq(history, 2, session="s")
    scheduler.add(turn3)
    drain(scheduler, kv, {turn3.request_id: 2})
    assert turn3.num_cached_tokens == 9
    scheduler.pins.release("s")
    assert scheduler.blocks.num_referenced == 0


def test_idle_session_pins_are_evicted_under_pressure() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2, budget=64, sessions=("s0", "s1", "s2"))
    kv = SimulatedKV(2)
    sessions = []
    for i in range(3):
        seq = make_seq([i, 1, 2, 3, 0], 2, session=f"s{i}")
        scheduler.add(seq)
        drain(scheduler, kv, {seq.request_id: 2})
        sessions.append(seq)
    big = make_seq([3, 3, 3, 3, 3, 3, 3, 3, 3, 3], 4)
    scheduler.add(big)
    drain(scheduler, kv, {big.request_id: 4})
    assert big.is_finished and len(scheduler.pins) < 3
    for i in range(3):
        scheduler.pins.release(f"s{i}")
    assert scheduler.blocks.num_referenced == 0


def test_request_larger_than_pool_is_rejected_at_submission() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    with pytest.raises(ValueError, match=r"prompt: .* need 5 KV blocks; the pool has 4"):
        scheduler.add(make_seq([1] * 8, 2))


def test_chunked_prefill_respects_budget_and_mixes_with_decode() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=8)
    kv = SimulatedKV(4)
    short = make_seq([1, 2], 20)
    scheduler.add(short)
    run_step(scheduler, kv)
    long = make_seq(list(range(4)) * 6, 2)
    scheduler.add(long)
    step = scheduler.schedule()
    sizes = {c.seq.request_id: c.num_tokens for c in step.chunks}
    assert sizes == {short.request_id: 1, long.request_id: 7}
    assert step.num_tokens <= 8


@settings(max_examples=40, deadline=None)
@given(
    turns=st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from(["extend", "diverge", "fresh"]),
                  st.lists(st.integers(0, 3), min_size=1, max_size=9)),
        min_size=1, max_size=10,
    ),
    num_blocks=st.integers(10, 30),
    block_size=st.sampled_from([2, 4]),
    prefix_caching=st.booleans(),
)
def test_sessions_with_prefix_cache_under_pressure_keep_kv_correct(
    turns: list[tuple[int, str, list[int]]], num_blocks: int, block_size: int, prefix_caching: bool
) -> None:
    """Random session turns (extending, rewriting history, or unrelated) interleaved with plain requests:
    the simulated KV proves every reused slot holds the right prefix; nothing leaks."""
    scheduler = make_scheduler(num_blocks, block_size, budget=12, prefix_caching=prefix_caching,
                               sessions=("s0", "s1", "s2"))
    kv = SimulatedKV(block_size)
    history: dict[str, list[int]] = {}
    for session_index, kind, new_tokens in turns:
        session = f"s{session_index}"
        past = history.get(session, [])
        if kind == "extend" or not past:
            prompt = past + new_tokens
        elif kind == "diverge":
            cut = len(past) // 2
            prompt = past[:cut] + new_tokens
        else:
            prompt = new_tokens
        prompt = prompt[-(num_blocks * block_size - 4):]
        seq = make_seq(prompt, 3, session=session)
        other = make_seq(new_tokens[::-1], 2)
        limits = {seq.request_id: 3, other.request_id: 2}
        scheduler.add(seq)
        scheduler.add(other)
        drain(scheduler, kv, limits)
        assert seq.output_token_ids == reference_output(prompt, 3)
        history[session] = list(seq.token_ids)
    for session in list(history):
        scheduler.pins.release(session)
    assert scheduler.blocks.num_referenced == 0
    scheduler.blocks.check_invariants([])


def test_diverging_session_never_overwrites_a_shared_cached_block() -> None:
    """Two sessions share full blocks through the prefix cache; when one rewrites its history in the
    middle of a shared block, the other must still read its own KV there."""
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64, sessions=("a", "b"))
    kv = SimulatedKV(4)
    prompt = [1, 2, 3, 0, 1, 2, 3, 0, 2]
    a1, b1 = make_seq(prompt, 3, session="a"), make_seq(prompt, 3, session="b")
    for seq in (a1, b1):
        scheduler.add(seq)
        drain(scheduler, kv, {seq.request_id: 3})
    assert b1.num_cached_tokens == 8
    a2 = make_seq([*a1.token_ids[:6], 3, 3, 3], 2, session="a")  # diverges inside the second block
    scheduler.add(a2)
    drain(scheduler, kv, {a2.request_id: 2})
    assert a2.num_cached_tokens == 4
    b2 = make_seq([*b1.token_ids, 1], 2, session="b")
    scheduler.add(b2)
    drain(scheduler, kv, {b2.request_id: 2})  # SimulatedKV raises if b reads a's overwritten slots
    assert b2.output_token_ids == reference_output(b2.token_ids[: b2.num_prompt_tokens], 2)


def test_turn_ending_after_its_session_closed_releases_instead_of_pinning() -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=2, budget=64, sessions=("s",))
    kv = SimulatedKV(2)
    turn = make_seq([1, 2, 3], 4, session="s")
    scheduler.add(turn)
    run_step(scheduler, kv)
    scheduler.pins.close("s")  # the session closes while its turn runs
    drain(scheduler, kv, {turn.request_id: 4})
    assert "s" not in scheduler.pins and scheduler.blocks.num_referenced == 0


# -- sliding-window models: blocks no later query reads go back to the pool -------------------------------


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=8),
    max_new=st.integers(1, 12),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(1, 24),
    window=st.integers(1, 9),
    prefix_caching=st.booleans(),
    with_session=st.booleans(),
)
def test_sliding_window_workload_drops_blocks_without_leaks(
    prompts: list[list[int]], max_new: int, num_blocks: int, block_size: int, budget: int, window: int,
    prefix_caching: bool, with_session: bool,
) -> None:
    """Every chunk finds the last ``window`` positions intact, refcounts stay exact after each step (the
    dropped blocks held by no one), and everything returns to the pool."""
    sessions = ("s",) if with_session else ()
    scheduler = make_scheduler(num_blocks, block_size, max_seqs=4, budget=budget, prefix_caching=prefix_caching,
                               sessions=sessions, sliding_window=window)
    kv = SimulatedKV(block_size, window=window)
    seqs, limits = [], {}
    for i, prompt in enumerate(prompts):
        seq = make_seq(prompt, max_new, session="s" if with_session and i == 0 else None)
        if scheduler.blocks.blocks_needed(seq.max_total_tokens) > num_blocks:
            continue
        scheduler.add(seq)
        seqs.append(seq)
        limits[seq.request_id] = max_new
    drain(scheduler, kv, limits)
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.token_ids[: seq.num_prompt_tokens], max_new)
    if with_session:
        scheduler.pins.release("s")
    assert scheduler.blocks.num_referenced == 0
    scheduler.blocks.check_invariants([])


def test_sliding_window_sequence_holds_only_the_blocks_its_window_spans() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=8, prefix_caching=False, sliding_window=8)
    kv = SimulatedKV(4, window=8)
    seq = make_seq(list(range(5)) * 6, max_new=40)  # 30 prompt tokens, prefilled in chunks of 8
    scheduler.add(seq)
    decode_peak = 0
    while seq.num_output_tokens < 40:
        run_step(scheduler, kv)
        if seq.num_output_tokens > 1:
            decode_peak = max(decode_peak, scheduler.blocks.num_referenced)
        scheduler.blocks.check_invariants(scheduler.holders())
    # admission reserves the whole prompt (8 blocks); once decoding, the window's 8 tokens span at most 3
    # blocks, plus the block the next token goes to: 4, where keeping all 70 tokens takes 18
    assert seq.num_dropped_blocks == droppable_blocks(seq.num_computed_tokens, 8, 4) > 0
    assert decode_peak <= 4
    assert scheduler.blocks.num_referenced == len(seq.block_table) - seq.num_dropped_blocks <= 3
    scheduler.finish(seq, "length")
    assert scheduler.blocks.num_referenced == 0


def test_without_a_window_every_block_is_kept() -> None:
    """Hybrid models (Gemma 2/3: global layers read the whole context) run with no window here."""
    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=8, prefix_caching=False)
    kv = SimulatedKV(4)
    seq = make_seq(list(range(5)) * 6, max_new=10)
    scheduler.add(seq)
    while seq.num_output_tokens < 10:
        run_step(scheduler, kv)
    assert seq.num_dropped_blocks == 0
    assert scheduler.blocks.num_referenced == len(seq.block_table) == scheduler.blocks.blocks_needed(40)


def test_droppable_blocks_counts_blocks_wholly_before_the_window() -> None:
    # next query at position 12 sees 5..12 (window 8): tokens 0..4 are dead, so block 0 (0..3) only
    assert droppable_blocks(12, 8, 4) == 1
    assert droppable_blocks(15, 8, 4) == 2
    assert droppable_blocks(7, 8, 4) == 0
    assert droppable_blocks(100, 1, 1) == 100
