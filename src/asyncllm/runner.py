"""ModelRunner: turns a scheduled step into tensors, runs the model and samples. Knows nothing of asyncio.

The runner owns the KV pool tensors: per layer a key and a value cache of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. ``step`` reads the sequences' token ids and block
tables but never mutates them; the engine calls it on one worker thread at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import AttentionMetadata
from asyncllm.models import CausalLM
from asyncllm.sampling import Sampler, SamplerOutput, SamplingRow
from asyncllm.scheduler import ScheduledChunk


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_model(cls, config: ModelConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(num_blocks, block_size, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   dtype)


class ModelRunner:
    """Runs one model over a paged KV pool; ``step`` is the only hot entry point."""

    def __init__(self, model: CausalLM, spec: KVCacheSpec, *, device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # Zeroed, not empty: batched decode reads padding slots (masked out, weight 0) and 0 * NaN from
        # uninitialised memory would poison the output.
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=spec.dtype, device=device), torch.zeros(shape, dtype=spec.dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def step(self, chunks: Sequence[ScheduledChunk], rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Run ``chunks`` through the model; sample one token for each chunk that ends its sequence.

        ``rows`` holds one sampling row per sampling chunk, in chunk order.
        """
        input_ids, positions, meta, logits_index = self._prepare(chunks)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        logits = self.model.compute_logits(hidden.index_select(0, logits_index))
        return self.sampler(logits, rows, self.generator)

    def _prepare(
        self, chunks: Sequence[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        size = self.spec.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_index: list[int] = []
        for chunk in chunks:
            seq, begin, n = chunk.seq, chunk.start, chunk.num_tokens
            end = begin + n
            table = seq.block_table
            tokens.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            slots.extend(table[p // size] * size + p % size for p in range(begin, end))
            starts.append(starts[-1] + n)
            query_lens.append(n)
            seq_lens.append(end)
            if chunk.samples:
                logits_index.append(starts[-1] - 1)
        width = max(-(-length // size) for length in seq_lens)
        tables = [chunk.seq.block_table[:width] + [0] * (width - min(width, len(chunk.seq.block_table)))
                  for chunk in chunks]
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return (
            torch.tensor(tokens, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
            torch.tensor(logits_index, dtype=torch.int64, device=device),
        )
