"""ModelRunner: turns a scheduled step into tensors, runs the model and samples. Knows nothing of asyncio.

The runner owns the KV pool: per layer a ``KVCache`` (keys and values of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``). On CPU the pool lives in lazily committed memory, so
it costs resident memory only for the blocks in use or cached, not its whole size up front. ``step`` reads
the sequences' token ids and block tables but never mutates them (only a sequence's image feature cache,
``SequenceState.image_features``); the engine calls it on one worker thread
at a time.

Two paths run a step. Decode-only steps that fit the configured batch sizes go through ``DecodeGraphs``
(padded static buffers, replayed as CUDA graphs on a GPU); prefill, mixed and larger steps run eagerly over
exactly-sized tensors. A model with M-RoPE positions (one that sets ``mrope_section``, Qwen2-VL) runs every
step eagerly: its positions come from each sequence's ``rope_positions`` (``[3, T]`` when a step holds
tokens whose three components differ, else their common ``[T]`` row), which the graphs' 1-D position
buffer does not carry. Either way a step's inputs reach the device through asynchronous copies from
page-locked host buffers, and the only wait on the device is the sampler reading the chosen token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asyncllm.config import ModelConfig
from asyncllm.cuda_graphs import DecodeGraphs, DecodeGraphSettings, host_staging
from asyncllm.kernels import AttentionMetadata, KVCache
from asyncllm.kernels.kv_cache import lazily_committed_zeros
from asyncllm.kernels.kv_quant import KVBits
from asyncllm.models import CausalLM
from asyncllm.models.llava import ImageEmbeds
from asyncllm.sampling import Sampler, SamplerOutput, SamplingRow
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import ImageSpan, SequenceState


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV pool's shape: ``num_blocks`` blocks of ``block_size`` tokens in each of ``num_layers`` layers;
    values in ``dtype`` (the compute dtype), or codes of ``bits`` (key and value widths, 8 / 4 each) with
    ``dtype`` scales."""

    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    bits: KVBits | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers (keys, values, any scales and anchors): exact."""
        per_layer = KVCache.bytes_per_block(self.num_kv_heads, self.head_dim, self.block_size, dtype=self.dtype,
                                            bits=self.bits)
        return self.num_layers * per_layer

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes across all layers: ``bytes_per_block`` over ``block_size``, rounded up where
        a block's anchors do not share out evenly."""
        return -(-self.bytes_per_block // self.block_size)

    @property
    def dtype_name(self) -> str:
        """``"int8"`` / ``"int4"`` / ``"k8v4"``, or the compute dtype's name (``"float32"``, ``"bfloat16"``,
        ...)."""
        return self.bits.name if self.bits is not None else str(self.dtype).removeprefix("torch.")

    @classmethod
    def for_model(
        cls, config: ModelConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
        bits: int | tuple[int, int] | None = None, num_kv_heads: int | None = None,
    ) -> KVCacheSpec:
        """The pool of ``config``'s layers; ``num_kv_heads``: the heads this process holds when it is one rank
        of a tensor-parallel group (default: all of the model's); ``bits``: 8 / 4 for keys and values, or a
        ``(key_bits, value_bits)`` pair (``None``: the compute dtype)."""
        return cls(
            num_blocks,
            block_size,
            config.num_hidden_layers,
            num_kv_heads or config.num_key_value_heads,
            config.head_dim,
            dtype,
            None if bits is None else KVBits.of(bits),
        )


@dataclass(frozen=True)
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_index: torch.Tensor | None  # None: every row samples, in order


class ModelRunner:
    """Runs one model over a paged KV pool; ``step`` is the only hot entry point.

    ``max_model_len``: the longest context the engine lets a sequence reach (see
    ``asyncllm.builder.max_model_len_for``); padded decode steps are built for it. ``decode_graphs``: the
    settings ``cuda_graphs.resolve_decode_graphs`` chose, or ``None`` to run every step eagerly. Recording
    happens here, at construction, after the KV pool exists.
    """

    def __init__(
        self,
        model: CausalLM,
        spec: KVCacheSpec,
        *,
        device: torch.device,
        max_model_len: int,
        decode_graphs: DecodeGraphSettings | None = None,
    ) -> None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 0:
            raise ValueError(f"max_model_len: must be a positive int, got {max_model_len!r}")
        if decode_graphs is not None and not isinstance(decode_graphs, DecodeGraphSettings):
            raise ValueError(
                f"decode_graphs: expected None or DecodeGraphSettings (see resolve_decode_graphs), "
                f"got {decode_graphs!r}"
            )
        self.model = model
        self.spec = spec
        self.device = device
        self.max_model_len = max_model_len
        self.kv_caches: list[KVCache] = [
            KVCache.allocate(spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
                             dtype=spec.dtype, device=device, bits=spec.bits,
                             zeros=lazily_committed_zeros if device.type == "cpu" else None)
            for _ in range(spec.num_layers)
        ]
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device)
        self.mrope = bool(getattr(model, "mrope_section", ()))
        self.graphs: DecodeGraphs | None = None
        if decode_graphs is not None and not self.mrope:
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                block_size=spec.block_size,
                max_model_len=max_model_len,
                settings=decode_graphs,
                device=device,
            )

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def close(self) -> None:
        """Nothing to stop: the model and KV pool live in this process and go with the runner (a
        tensor-parallel runner stops its worker processes here)."""

    @torch.inference_mode()
    def step(self, chunks: Sequence[ScheduledChunk], rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Run ``chunks`` through the model; sample one token for each chunk that ends its sequence.

        ``rows`` holds one sampling row per sampling chunk, in chunk order.
        """
        logits = self._logits(chunks, need_logits=bool(rows))
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        return self.sampler(logits, rows, self.generator)

    @torch.inference_mode()
    def forward_logits(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Run ``chunks`` (writing their KV) and return float32 logits ``[R, V]`` for the ``R`` chunks that
        sample, in chunk order. The tensor may be a view of a static buffer, valid until the next step."""
        return self._logits(chunks, need_logits=True)

    # -- internals -----------------------------------------------------------------------------
    def _logits(self, chunks: Sequence[ScheduledChunk], *, need_logits: bool) -> torch.Tensor:
        if not chunks:
            raise ValueError("chunks: a step needs at least one chunk")
        sample_rows = [i for i, chunk in enumerate(chunks) if chunk.samples]
        images = self._image_embeds(chunks)
        if images is None and self.graphs is not None and self.graphs.supports(chunks):
            return self.graphs.run(chunks, sample_rows)
        inputs = self._prepare(chunks, sample_rows)
        if images is None:
            hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        else:
            hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches,
                                        images)  # type: ignore[call-arg]
        if not need_logits or not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        if inputs.logits_index is not None:
            hidden = hidden.index_select(0, inputs.logits_index)
        return self.model.compute_logits(hidden)

    def _image_embeds(self, chunks: Sequence[ScheduledChunk]) -> ImageEmbeds | None:
        """The image rows of this step's tokens, or ``None`` when no chunk covers an image token.

        A sequence's images are encoded (all of them, once) by the first step whose chunk covers one of
        their tokens and kept in ``seq.image_features`` until the chunk covering the last one has run. The
        images of every sequence this step starts are encoded together (``_encode_images``)."""
        covered: list[tuple[SequenceState, int, int, int, list[int]]] = []
        starting: list[SequenceState] = []
        offset = 0
        for chunk in chunks:
            seq, begin, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            hits = [i for i, image in enumerate(seq.images) if image.start < end and begin < image.end]
            if hits:
                covered.append((seq, begin, end, offset, hits))
                if seq.image_features is None and all(seq is not s for s in starting):
                    starting.append(seq)
            offset += chunk.num_tokens
        if not covered:
            return None
        for seq, features in zip(starting, self._encode_images(starting), strict=True):
            seq.image_features = features
        index: list[int] = []
        rows: list[torch.Tensor] = []
        for seq, begin, end, offset, hits in covered:
            features: list[torch.Tensor] = seq.image_features or []  # set above or by an earlier step
            for i in hits:
                image = seq.images[i]
                lo, hi = max(begin, image.start), min(end, image.end)
                index.extend(range(offset + lo - begin, offset + hi - begin))
                rows.append(features[i][lo - image.start : hi - image.start])
            if end >= seq.images[-1].end:
                seq.image_features = None
        return ImageEmbeds(torch.tensor(index, dtype=torch.int64, device=self.device), torch.cat(rows))

    def _encode_images(self, seqs: Sequence[SequenceState]) -> list[list[torch.Tensor]]:
        """Every image of ``seqs`` as its prompt rows (per sequence, per image): the tiles of all images
        with equal pixel shapes go through one ``encode_images`` call, then each image's rows are arranged
        by ``image_rows`` and checked against its span's length."""
        images = [image for seq in seqs for image in seq.images]
        if not images:
            return [[] for _ in seqs]
        encode_grids = getattr(self.model, "encode_image_grids", None)
        if encode_grids is not None:
            grids = [image.grid for image in images]
            if any(grid is None for grid in grids):
                raise ValueError("image: this model needs each image's patch grid (image_grid_thw)")
            rows = encode_grids([image.pixels for image in images], grids)
        else:
            rows = self._encode_tiles(images)
        for image, arranged in zip(images, rows, strict=True):
            if arranged.shape[0] != image.length:
                raise ValueError(f"image: the model made {arranged.shape[0]} rows for an image of "
                                 f"{image.length} prompt tokens")
        out, at = [], 0
        for seq in seqs:
            out.append(rows[at : at + len(seq.images)])
            at += len(seq.images)
        return out

    def _encode_tiles(self, images: Sequence[ImageSpan]) -> list[torch.Tensor]:
        """Each image's rows from ``encode_images`` (one call per tile shape) and ``image_rows``."""
        encode = getattr(self.model, "encode_images", None)
        arrange = getattr(self.model, "image_rows", None)
        if encode is None or arrange is None:
            raise ValueError("images: this model takes no images")
        pixels = [image.pixels if image.pixels.dim() == 4 else image.pixels[None] for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, image_pixels in enumerate(pixels):
            groups.setdefault(tuple(image_pixels.shape[1:]), []).append(k)
        tiles: dict[int, torch.Tensor] = {}
        for members in groups.values():
            features = encode(torch.cat([pixels[k] for k in members]).to(self.device))
            for k, part in zip(members, features.split([pixels[k].shape[0] for k in members]), strict=True):
                tiles[k] = part
        return [arrange(tiles[k], image.size) for k, image in enumerate(images)]

    def _prepare(self, chunks: Sequence[ScheduledChunk], sample_rows: Sequence[int]) -> _StepInputs:
        """Exactly-sized varlen inputs, staged on the host in two packed buffers (int64: ids, positions,
        slots, logits index; int32: query starts, context lengths, block tables) and copied once each.

        With M-RoPE the positions take ``3 * T`` slots (``SequenceState.rope_positions``); when all three
        components agree for every token (text-only or decode steps) the model gets their ``[T]`` row."""
        size = self.spec.block_size
        num_seqs = len(chunks)
        query_lens = [chunk.num_tokens for chunk in chunks]
        seq_lens = [chunk.start + chunk.num_tokens for chunk in chunks]
        num_tokens = sum(query_lens)
        width = max(-(-length // size) for length in seq_lens)
        # Every row samples iff each chunk is one sampling token: hidden rows are then the logits rows.
        all_rows = num_tokens == num_seqs and len(sample_rows) == num_seqs
        num_index = 0 if all_rows else len(sample_rows)
        pos_rows = 3 if self.mrope else 1
        longs = host_staging((2 + pos_rows) * num_tokens + num_index, torch.int64, self.device)
        ints = host_staging(2 * num_seqs + 1 + num_seqs * width, torch.int32, self.device)
        lo, it = longs.numpy(), ints.numpy()
        slots_at = (1 + pos_rows) * num_tokens
        ids, pos, slots = (
            lo[:num_tokens],
            lo[num_tokens : 2 * num_tokens],
            lo[slots_at : slots_at + num_tokens],
        )
        rope = lo[num_tokens:slots_at].reshape(pos_rows, num_tokens)
        starts, lens = it[: num_seqs + 1], it[num_seqs + 1 : 2 * num_seqs + 1]
        tables = it[2 * num_seqs + 1 :].reshape(num_seqs, width)
        tables[:] = 0
        starts[0] = 0
        offset = 0
        for i, chunk in enumerate(chunks):
            seq, begin, n = chunk.seq, chunk.start, chunk.num_tokens
            end = begin + n
            used = -(-end // size)
            table = seq.block_table
            if n == 1:
                ids[offset] = seq.token_ids[begin]
                pos[offset] = begin
                slots[offset] = table[begin // size] * size + begin % size
            else:
                positions = np.arange(begin, end)
                ids[offset : offset + n] = seq.token_ids[begin:end]
                pos[offset : offset + n] = positions
                blocks = np.asarray(table[:used], dtype=np.int64)
                slots[offset : offset + n] = blocks[positions // size] * size + positions % size
            if self.mrope:
                rope[:, offset : offset + n] = seq.rope_positions(begin, end)
            tables[i, :used] = table[:used]
            offset += n
            starts[i + 1] = offset
            lens[i] = end
        ends = np.cumsum(query_lens) - 1
        lo[slots_at + num_tokens :] = ends[sample_rows] if num_index else []
        flat_positions = not self.mrope or bool((rope == rope[0]).all())
        dev_longs = longs.to(self.device, non_blocking=True)
        dev_ints = ints.to(self.device, non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=dev_longs[slots_at : slots_at + num_tokens],
            query_start_loc=dev_ints[: num_seqs + 1],
            seq_lens=dev_ints[num_seqs + 1 : 2 * num_seqs + 1],
            block_tables=dev_ints[2 * num_seqs + 1 :].view(num_seqs, width),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return _StepInputs(
            input_ids=dev_longs[:num_tokens],
            positions=(dev_longs[num_tokens : 2 * num_tokens] if flat_positions
                       else dev_longs[num_tokens:slots_at].view(pos_rows, num_tokens)),
            meta=meta,
            logits_index=dev_longs[slots_at + num_tokens :] if num_index else None,
        )
