"""Paged KV cache bookkeeping (pure Python): block refcounts, prefix cache, eviction."""

from asyncllm.kv.block_manager import BlockManager, OutOfBlocks
from asyncllm.kv.prefix_cache import ROOT_KEY, PrefixCache, chain_key

__all__ = ["ROOT_KEY", "BlockManager", "OutOfBlocks", "PrefixCache", "chain_key"]
