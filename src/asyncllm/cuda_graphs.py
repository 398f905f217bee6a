"""Decode steps over static, padded input buffers, replayed as CUDA graphs.

A decode-only step of ``n`` sequences is padded up to the smallest configured batch size ``b >= n``. The
step's inputs are copied into fixed device buffers (token ids, positions, slots, context lengths, block
tables) and the forward pass plus the LM head, recorded once per ``b``, is replayed: one launch instead of
hundreds. The recorded attention metadata is built for the longest context the engine allows
(``max_seq_len == max_model_len``), which the decode kernels accept as an upper bound, so one graph serves
every context length.

Padded rows (``n <= i < b``) hold token 0 at position 0 with slot ``-1`` (the KV write skips it) and a
context of length 1 read through an all-zero block table row (block 0, whatever it holds). Their outputs
are never returned. Rows are independent in every layer, so padding cannot change the real rows.

Sampling stays outside the graph: ``DecodeGraphs.run`` returns float32 logits that live in the graph's
static output buffer until the next step.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from asyncllm.config import EngineConfig
from asyncllm.kernels import AttentionMetadata, KVCache
from asyncllm.models import CausalLM
from asyncllm.scheduler import ScheduledChunk

logger = logging.getLogger("asyncllm")


DEFAULT_BATCH_SIZES: tuple[int, ...] = EngineConfig.cuda_graph_batch_sizes
"""The decode batch sizes captured unless configured otherwise."""

def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{name}: must be a non-empty sequence of positive ints, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must hold positive ints, got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: must not repeat a size, got {values!r}")
    return tuple(sorted(values))


@dataclass(frozen=True)
class DecodeGraphSettings:
    """How decode steps are padded and whether they are recorded.

    ``batch_sizes``: the padded batch sizes (kept sorted ascending). ``capture``: record CUDA graphs (needs
    a CUDA device and graph-safe kernels); with ``False`` the same padded static-buffer step runs eagerly,
    on any device. The longest context a padded step may carry is the runner's ``max_model_len``.
    """

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    capture: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", _positive_ints("batch_sizes", self.batch_sizes))
        if not isinstance(self.capture, bool):
            raise ValueError(f"capture: must be a bool, got {self.capture!r}")

    @classmethod
    def from_engine_config(cls, config: EngineConfig) -> DecodeGraphSettings | None:
        """The settings ``config`` asks for (``None`` with ``enforce_eager``). Sizes beyond what
        ``max_num_seqs`` can use are dropped: the smallest size ``>= max_num_seqs`` is the last kept."""
        if config.enforce_eager:
            return None
        sizes = sorted(config.cuda_graph_batch_sizes)
        kept = [b for b in sizes if b < config.max_num_seqs]
        kept += [b for b in sizes if b >= config.max_num_seqs][:1]
        return cls(batch_sizes=tuple(kept))


DecodeGraphsOption = DecodeGraphSettings | Literal["auto"] | None


def graph_safe(model: CausalLM) -> bool:
    """Whether the model's kernel bundle can be recorded in a CUDA graph (its ``graph_safe`` capability)."""
    ops = getattr(model, "ops", None)
    return bool(getattr(ops, "graph_safe", False))


def resolve_decode_graphs(
    model: CausalLM,
    device: torch.device,
    option: DecodeGraphsOption = "auto",
    *,
    config: EngineConfig | None = None,
) -> DecodeGraphSettings | None:
    """Decide how a runner serving ``model`` on ``device`` runs decode steps; the one place that decides.

    ``"auto"``: on a CUDA device with graph-safe kernels, the settings ``config`` asks for
    (``DecodeGraphSettings.from_engine_config``; the defaults without a config), else ``None`` (every step
    eager). ``None``: every step eager. A ``DecodeGraphSettings`` is returned as given, after checking that
    ``capture=True`` has a CUDA device and graph-safe kernels (``ValueError`` otherwise).
    """
    if option == "auto":
        if device.type != "cuda" or not graph_safe(model):
            return None
        return DecodeGraphSettings() if config is None else DecodeGraphSettings.from_engine_config(config)
    if option is None:
        return None
    if not isinstance(option, DecodeGraphSettings):
        raise ValueError(f"decode_graphs: expected 'auto', None or DecodeGraphSettings, got {option!r}")
    if option.capture and device.type != "cuda":
        raise ValueError(
            f"decode_graphs: capture needs a CUDA device, got {device}; "
            "use capture=False to run the padded steps eagerly"
        )
    if option.capture and not graph_safe(model):
        ops = getattr(getattr(model, "ops", None), "name", None)
        raise ValueError(
            f"decode_graphs: capture needs graph-safe kernels (a bundle with graph_safe, e.g. 'triton'), "
            f"the model uses {ops!r}"
        )
    return option


def bucket_size(num_seqs: int, batch_sizes: Sequence[int]) -> int | None:
    """The smallest of ``batch_sizes`` (sorted ascending) holding ``num_seqs`` rows; ``None`` if none does."""
    if num_seqs <= 0:
        raise ValueError(f"num_seqs: must be positive, got {num_seqs}")
    index = bisect.bisect_left(batch_sizes, num_seqs)
    return batch_sizes[index] if index < len(batch_sizes) else None


def host_staging(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer for one step's inputs: page-locked when bound for a CUDA device, so that the copy
    to it can be asynchronous. A fresh buffer per step is safe: the caching host allocator does not hand
    its memory out again until the copies that read it have run."""
    return torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


@dataclass
class GraphStats:
    """Steps served per padded batch size, and what recording cost."""

    runs: dict[int, int] = field(default_factory=dict)
    capture_seconds: float = 0.0
    capture_reserved_bytes: int = 0


class DecodeGraphs:
    """Padded decode steps over static device buffers, recorded per batch size or run eagerly.

    Invariants: the static buffers and ``kv_caches`` keep their storage for this object's lifetime (a
    recorded graph holds their addresses); a padded row never writes the KV cache (its slot is ``-1``);
    ``run`` returns only real rows. Each step's inputs reach the device through one asynchronous copy per
    buffer group; nothing in ``run`` waits for the device. ``settings`` come from ``resolve_decode_graphs``,
    which checks that the model's kernels can be recorded.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: Sequence[KVCache],
        *,
        block_size: int,
        max_model_len: int,
        settings: DecodeGraphSettings,
        device: torch.device,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size: must be positive, got {block_size}")
        if max_model_len <= 0:
            raise ValueError(f"max_model_len: must be positive, got {max_model_len}")
        if settings.capture and device.type != "cuda":
            raise ValueError(
                f"decode_graphs: capture needs a CUDA device, got {device}; "
                "use capture=False to run the padded steps eagerly"
            )
        self.model = model
        self.kv_caches = list(kv_caches)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.batch_sizes = settings.batch_sizes
        self.max_batch_size = settings.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.captured = settings.capture
        self.stats = GraphStats(runs=dict.fromkeys(self.batch_sizes, 0))
        size = self.max_batch_size
        # ids | positions | slots, and seq_lens | block tables: one copy per group and step.
        self._tokens = torch.zeros(3 * size, dtype=torch.int64, device=device)
        self._lens_tables = torch.zeros(size + size * self.max_blocks, dtype=torch.int32, device=device)
        self.input_ids = self._tokens[:size]
        self.positions = self._tokens[size : 2 * size]
        self.slot_mapping = self._tokens[2 * size :]
        self.seq_lens = self._lens_tables[:size]
        self.block_tables = self._lens_tables[size:].view(size, self.max_blocks)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self._metas = {b: self._metadata(b) for b in self.batch_sizes}
        self._recorded: dict[int, _Recorded] = {}
        self._fill([], size)
        if self.captured:
            self._capture_all()

    def bucket(self, num_seqs: int) -> int | None:
        return bucket_size(num_seqs, self.batch_sizes)

    def supports(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """A decode-only step (one new token per chunk) of at most ``max_batch_size`` sequences whose
        contexts fit ``max_model_len``."""
        return 0 < len(chunks) <= self.max_batch_size and all(
            chunk.num_tokens == 1 and chunk.start < self.max_model_len for chunk in chunks
        )

    def run(self, chunks: Sequence[ScheduledChunk], sample_rows: Sequence[int]) -> torch.Tensor:
        """Run one decode step; float32 logits ``[len(sample_rows), V]`` of rows ``sample_rows`` (ascending
        chunk indices). The tensor may be a view of a static buffer, valid until the next ``run``."""
        if not self.supports(chunks):
            raise ValueError(
                f"chunks: not a decode step of 1..{self.max_batch_size} sequences within "
                f"max_model_len={self.max_model_len}"
            )
        num_seqs = len(chunks)
        size = self.bucket(num_seqs)
        if size is None:  # unreachable after supports(); kept for the type checker
            raise ValueError(f"chunks: {num_seqs} sequences exceed every batch size {self.batch_sizes}")
        self._fill(chunks, size)
        recorded = self._recorded.get(size)
        if recorded is not None:
            recorded.graph.replay()
            logits = recorded.logits
        else:
            logits = self._forward(size)
        self.stats.runs[size] += 1
        if len(sample_rows) == num_seqs:
            return logits[:num_seqs]
        index = host_staging(len(sample_rows), torch.int64, self.device)
        index.numpy()[:] = sample_rows
        return logits.index_select(0, index.to(self.device, non_blocking=True))

    # -- internals -----------------------------------------------------------------------------
    def _metadata(self, size: int) -> AttentionMetadata:
        """The metadata recorded for ``size`` rows: device views of the static buffers; host-side lengths
        are the upper bound ``max_model_len`` (decode kernels only use them to size their grids)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens_cpu=(1,) * size,
            seq_lens_cpu=(self.max_model_len,) * size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model.forward(
            self.input_ids[:size], self.positions[:size], self._metas[size], self.kv_caches
        )
        return self.model.compute_logits(hidden)

    def _fill(self, chunks: Sequence[ScheduledChunk], size: int) -> None:
        """Stage ``chunks`` (then padding up to ``size`` rows) on the host and copy into the static buffers.

        The token group is copied whole; of the table group only the ``size`` rows the step reads."""
        cap, width, block = self.max_batch_size, self.max_blocks, self.block_size
        tokens = host_staging(3 * cap, torch.int64, self.device)
        lens_tables = host_staging(cap + size * width, torch.int32, self.device)
        tok = tokens.numpy()
        tab = lens_tables.numpy()
        tok[: 2 * cap] = 0
        tok[2 * cap :] = -1
        tab[:cap] = 1
        tab[cap:] = 0
        for i, chunk in enumerate(chunks):
            seq, position = chunk.seq, chunk.start
            table = seq.block_table
            used = position // block + 1
            tok[i] = seq.token_ids[position]
            tok[cap + i] = position
            tok[2 * cap + i] = table[used - 1] * block + position % block
            tab[i] = position + 1
            row = cap + i * width
            tab[row : row + used] = table[:used]
        self._tokens.copy_(tokens, non_blocking=True)
        self._lens_tables[: cap + size * width].copy_(lens_tables, non_blocking=True)

    def _capture_all(self) -> None:
        """Record every size, largest first, into one memory pool (smaller graphs reuse the largest one's
        intermediate memory; replays never overlap, so sharing is safe). Each size first runs eagerly on a
        side stream so kernels are compiled and libraries initialised outside the recording. The static
        inputs hold padding throughout, so these runs write nothing to the KV cache."""
        device = self.device
        start = time.perf_counter()
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device), torch.inference_mode():
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            for size in reversed(self.batch_sizes):
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(size)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self._forward(size)
                self._recorded[size] = _Recorded(graph, logits)
        torch.cuda.synchronize(device)
        self.stats.capture_seconds = time.perf_counter() - start
        self.stats.capture_reserved_bytes = torch.cuda.memory_reserved(device) - reserved
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s, max_model_len %d) in %.2f s, %.1f MiB",
            len(self._recorded),
            list(self.batch_sizes),
            self.max_model_len,
            self.stats.capture_seconds,
            self.stats.capture_reserved_bytes / 2**20,
        )
