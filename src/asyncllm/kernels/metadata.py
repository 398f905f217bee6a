"""Attention metadata for one model step over a flattened (varlen) batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and where its KV lives.

    A step runs ``B`` sequences whose new ("query") tokens are concatenated into ``T`` rows.
    Sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``; its context is
    ``seq_lens[i]`` tokens, the last ``query_len`` of which are the new tokens (already written
    to the cache by ``write_kv`` before attention runs). Token ``j`` of sequence ``i`` sits in
    slot ``block_tables[i, j // block_size] * block_size + j % block_size``.

    Invariants: ``query_lens[i] >= 1``; ``query_lens[i] <= seq_lens[i]``; unused trailing entries
    of ``block_tables`` rows are 0 and never read; ``slot_mapping[t] == -1`` means "do not write".
    The ``*_cpu`` lists mirror the tensors on the host so that no step needs a device sync to read them.
    In padded decode steps (CUDA graphs) ``seq_lens_cpu`` and ``max_seq_len`` are upper bounds, good for
    sizing grids and buffers; code that needs each sequence's exact length reads ``seq_lens``.

    ``plan`` is a kernel bundle's own per-step state, attached by its ``plan_attention`` before the layers
    run (the CPU bundle's validated native decode layout); ``None`` when the bundle keeps none.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    max_query_len: int
    max_seq_len: int
    plan: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True)
class AttentionOptions:
    """Per-layer variations of paged attention, the same for every step (``None`` or the default: plain causal).

    ``window``: sliding-window attention; a query at position ``p`` sees only keys at ``p - window < k <= p``
    (``None`` or ``0``: every earlier key). ``softcap``: attention-logit soft-capping, each scaled score ``s``
    replaced by ``softcap * tanh(s / softcap)`` before the softmax (``None``: none).
    """

    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 0:
            raise ValueError(f"window: must be >= 0 (0: full attention), got {self.window}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap: must be positive, got {self.softcap}")

    @property
    def sliding_window(self) -> int:
        """The window, ``0`` for full attention."""
        return self.window or 0

    @property
    def is_plain(self) -> bool:
        return not self.window and self.softcap is None


def plain_options(options: AttentionOptions | None) -> bool:
    """Whether ``options`` asks for plain causal attention (no window, no soft-capping)."""
    return options is None or options.is_plain
