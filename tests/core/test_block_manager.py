"""Block manager and prefix cache: refcount invariants, verified hits, LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kv import ROOT_KEY, BlockManager, OutOfBlocks, chain_key


def test_allocate_release_roundtrip() -> None:
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert bm.num_available == 0
    with pytest.raises(OutOfBlocks):
        bm.allocate(1)
    bm.check_invariants([a, b])
    bm.release(a)
    bm.release(b)
    assert bm.num_available == 8 and bm.num_referenced == 0
    bm.check_invariants([])


def test_release_more_than_acquired_is_an_error() -> None:
    bm = BlockManager(2, 4)
    blocks = bm.allocate(1)
    bm.release(blocks)
    with pytest.raises(ValueError, match="released more often"):
        bm.release(blocks)


def test_prefix_hit_requires_matching_chain() -> None:
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5]
    table = bm.allocate(3)
    k0 = bm.register_full_block(table[0], ROOT_KEY, tokens[0:2])
    bm.register_full_block(table[1], k0, tokens[2:4])
    bm.release(table)
    blocks, keys = bm.match_prefix(tokens, max_tokens=len(tokens) - 1)
    assert blocks == table[:2] and keys[0] == k0
    # a different first block breaks the chain even though the second block's tokens match
    assert bm.match_prefix([9, 9, 3, 4, 5], max_tokens=4) == ([], [])
    # max_tokens caps the match to whole blocks below it
    assert bm.match_prefix(tokens, max_tokens=3)[0] == table[:1]


def test_hash_collision_is_verified_against_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncllm.kv.prefix_cache as pc

    monkeypatch.setattr(pc, "chain_key", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(4, 2)
    table = bm.allocate(1)
    bm.register_full_block(table[0], ROOT_KEY, [1, 2])
    bm.release(table)
    assert bm.match_prefix([7, 8, 0], max_tokens=2) == ([], [])
    assert bm.match_prefix([1, 2, 0], max_tokens=2)[0] == table


def test_lru_eviction_prefers_oldest_and_chain_tails() -> None:
    bm = BlockManager(4, 1)
    first = bm.allocate(2)
    parent = ROOT_KEY
    for i, block in enumerate(first):
        parent = bm.register_full_block(block, parent, [i])
    bm.release(first)  # tail released first -> evicted first
    other = bm.allocate(2)  # takes the two free blocks
    assert set(other).isdisjoint(first)
    evicted = bm.allocate(1)
    assert evicted == [first[1]]
    assert bm.match_prefix([0, 1, 2], max_tokens=2)[0] == [first[0]]


def test_acquire_of_free_block_is_rejected() -> None:
    bm = BlockManager(2, 2)
    with pytest.raises(ValueError, match="free"):
        bm.acquire([0])


def test_chain_key_depends_on_parent() -> None:
    assert chain_key(ROOT_KEY, [1, 2]) != chain_key(chain_key(ROOT_KEY, [0, 0]), [1, 2])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_operations_keep_refcounts_exact(data: st.DataObject) -> None:
    """Refcount of every block == number of tables holding it, through random alloc/acquire/release."""
    size = 2
    bm = BlockManager(12, size)
    tables: list[list[int]] = []
    tokens_of: list[list[int]] = []
    for _ in range(data.draw(st.integers(5, 40))):
        op = data.draw(st.sampled_from(["alloc", "release", "share"]))
        if op == "alloc":
            tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=8))
            hits, keys = bm.match_prefix(tokens, max_tokens=len(tokens) - 1)
            need = bm.blocks_needed(len(tokens)) - len(hits)
            evictable_hits = sum(1 for b in hits if bm.ref_count(b) == 0)
            if need > bm.num_available - evictable_hits:
                continue
            bm.acquire(hits)
            table = hits + bm.allocate(need)
            parent = keys[-1] if keys else ROOT_KEY
            for i in range(len(hits), len(tokens) // size):
                parent = bm.register_full_block(table[i], parent, tokens[i * size : (i + 1) * size])
            tables.append(table)
            tokens_of.append(tokens)
        elif op == "release" and tables:
            i = data.draw(st.integers(0, len(tables) - 1))
            bm.release(tables.pop(i))
            tokens_of.pop(i)
        elif op == "share" and tables:
            i = data.draw(st.integers(0, len(tables) - 1))
            full = len(tokens_of[i]) // size
            hits, _ = bm.match_prefix(tokens_of[i], max_tokens=full * size)
            bm.acquire(hits)
            tables.append(hits)
            tokens_of.append(tokens_of[i][: len(hits) * size])
        bm.check_invariants(tables)
    for table in tables:
        bm.release(table)
    bm.check_invariants([])
    assert bm.num_referenced == 0
