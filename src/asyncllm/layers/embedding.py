"""Token embedding and the LM head (its own matrix, or the embedding's when tied).

Dense: both store their matrix as the kernel bundle's ``prepare_weight`` lays it out after loading
(K-major on CPU, for the head's small-batch GEMV). Weight-only quantized (``quant`` given, e.g. a GGUF
``Q8_0`` token table): the matrix loads as codes and is kept packed (``quant.packed_linear``); the
embedding dequantizes only the rows it looks up and the head multiplies with the bundle's
``quantized_linear``. A tied head is re-pointed at the embedding's matrix by the model once both are
laid out (``tie_to``).

Tensor parallelism (``parallel`` with more than one rank) splits the vocabulary: each rank holds
``parallel_state.vocab_range`` rows (padded with zero rows to the same count on every rank) and loads only
those from the full checkpoint matrix. The embedding looks up the ids it holds, zeroes the others and sums
over the ranks (one all-reduce); the head computes its rows' logits and gathers every rank's (one
all-gather), so every rank returns the full ``[N, V]`` logits. Packed (quantized) tables are not split:
``ValueError`` naming ``tensor_parallel_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.distributed.parallel_state import SINGLE, TensorParallel, vocab_range
from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, empty_parameter, load_unsharded
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import PackedWeight
from asyncllm.quant.packed_linear import CodeLoadTracker, create_code_parameters, pack_code_parameters


def _refuse_packed(parallel: TensorParallel, quant: LayerQuant | None, what: str) -> None:
    if parallel.is_parallel and quant is not None:
        raise ValueError(f"tensor_parallel_size: the quantized {what} cannot be split over {parallel.size} ranks "
                         f"yet; load with dequantize_weights=True or serve on one rank")


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId, parallel: TensorParallel,
                     vocab_size: int) -> None:
    """Copy this rank's vocabulary rows of the full ``loaded`` matrix into ``param``, zeroing the padding."""
    if not parallel.is_parallel:
        load_unsharded(param, loaded, shard_id)
        return
    if loaded.dim() != 2 or loaded.shape[0] != vocab_size or loaded.shape[1] != param.shape[1]:
        raise ValueError(f"weight: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                         f"({vocab_size}, {param.shape[1]})")
    start, count, _ = vocab_range(vocab_size, parallel)
    load_unsharded(param, torch.cat([loaded[start:start + count].to(param.dtype),
                                     loaded.new_zeros((param.shape[0] - count, param.shape[1]), dtype=param.dtype)]),
                   shard_id)


def _laid_out(param: nn.Parameter, ops: KernelOps) -> nn.Parameter:
    laid_out = ops.prepare_weight(param.data)
    return param if laid_out is param.data else nn.Parameter(laid_out, requires_grad=False)


class VocabEmbedding(nn.Module):
    """Rows of the ``[vocab_size, hidden_size]`` matrix looked up by token id: ``weight`` when dense, the
    packed codes when ``quant`` is given (rows dequantized to ``dtype`` on lookup). With ``parallel``, the
    rank's ``vocab_range`` rows (``weight`` is ``[padded, hidden_size]``)."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self, vocab_size: int, hidden_size: int, ops: KernelOps, *, dtype: torch.dtype, device: torch.device,
        quant: LayerQuant | None = None, parallel: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        _refuse_packed(parallel, quant, "token embedding")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ops = ops
        self.dtype = dtype
        self.quant = quant
        self.parallel = parallel
        self.vocab_start, self.vocab_count, rows = vocab_range(vocab_size, parallel)
        self.packed: PackedWeight | None = None
        if quant is None:
            self.weight = empty_parameter(rows, hidden_size, dtype=dtype, device=device)
        else:
            create_code_parameters(self, vocab_size, hidden_size, quant, device)
            self._tracker = CodeLoadTracker(self, self.shard_ids)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        _load_vocab_rows(param, loaded, shard_id, self.parallel, self.vocab_size)
        if self.quant is not None and self._tracker.loaded(param, shard_id):
            self.process_weights_after_loading()  # pack now: see quant.packed_linear

    def process_weights_after_loading(self) -> None:
        if self.quant is None:
            self.weight = _laid_out(self.weight, self.ops)
        elif self.packed is None:
            self.packed = pack_code_parameters(self, self.quant, "embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(input_ids, self.dtype)
        if not self.parallel.is_parallel:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.vocab_count)
        rows = F.embedding(torch.where(held, local, 0), self.weight)
        return self.parallel.all_reduce(rows.mul_(held.unsqueeze(-1).to(rows.dtype)))

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """Projects hidden states ``[N, H]`` to float32 logits ``[N, V]``.

    When ``tied_to`` is given, the head multiplies by that embedding's matrix (dense: ``weight`` *is* the
    embedding's parameter, registered first under the embedding's name, so it appears once in
    ``named_parameters``; packed: the embedding's ``packed`` weight); otherwise the head owns its matrix,
    dense or (``quant`` given) packed. The matmul runs in the weight dtype (packed: the hidden states'
    dtype); the result is cast to float32. With ``parallel``, the rank multiplies by its vocabulary rows and
    the ranks' logits are gathered: every rank returns the full ``[N, V]``.
    """

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tied_to: VocabEmbedding | None,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
        quant: LayerQuant | None = None,
        parallel: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.ops = ops
        _refuse_packed(parallel, None if tied_to is not None else quant, "LM head")
        if tied_to is not None and tied_to.parallel != parallel:
            raise ValueError("tied_to: the embedding is split over other ranks than the head")
        if tied_to is not None and (tied_to.vocab_size, tied_to.hidden_size) != (vocab_size, hidden_size):
            raise ValueError(
                f"tied_to: embedding is {tied_to.vocab_size}x{tied_to.hidden_size}, "
                f"head is {vocab_size}x{hidden_size}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tied = tied_to is not None
        self.quant = None if tied_to is not None else quant
        self.parallel = parallel
        _, _, rows = vocab_range(vocab_size, parallel)
        self.packed: PackedWeight | None = None
        if tied_to is not None:
            if tied_to.quant is None:
                self.weight = tied_to.weight
        elif quant is None:
            self.weight = empty_parameter(rows, hidden_size, dtype=dtype, device=device)
        else:
            create_code_parameters(self, vocab_size, hidden_size, quant, device)
            self._tracker = CodeLoadTracker(self, self.shard_ids)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        _load_vocab_rows(param, loaded, shard_id, self.parallel, self.vocab_size)
        if self.quant is not None and self._tracker.loaded(param, shard_id):
            self.process_weights_after_loading()  # pack now: see quant.packed_linear

    def process_weights_after_loading(self) -> None:
        if self.tied:
            return
        if self.quant is None:
            self.weight = _laid_out(self.weight, self.ops)
        elif self.packed is None:
            self.packed = pack_code_parameters(self, self.quant, "lm_head")

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share ``embedding``'s (laid out or packed) matrix; the head must have been built tied to it."""
        if not self.tied:
            raise ValueError("tie_to: this head owns its matrix")
        if embedding.packed is not None:
            self.packed = embedding.packed
        else:
            self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.ops.quantized_linear(hidden, self.packed, None).float()
        logits = self.ops.linear(hidden, self.weight, None).float()
        if not self.parallel.is_parallel:
            return logits
        return self.parallel.all_gather_last(logits)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
