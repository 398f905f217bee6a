"""Token embedding and the LM head (its own matrix, or the embedding's when tied).

Dense: both store their matrix as the kernel bundle's ``prepare_weight`` lays it out after loading
(K-major on CPU, for the head's small-batch GEMV). Weight-only quantized (``quant`` given, e.g. a GGUF
``Q8_0`` token table): the matrix loads as codes and is kept packed (``quant.packed_linear``); the
embedding dequantizes only the rows it looks up and the head multiplies with the bundle's
``quantized_linear``. A tied head is re-pointed at the embedding's matrix by the model once both are
laid out (``tie_to``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, empty_parameter, load_unsharded
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import PackedWeight
from asyncllm.quant.packed_linear import CodeLoadTracker, create_code_parameters, pack_code_parameters


def _laid_out(param: nn.Parameter, ops: KernelOps) -> nn.Parameter:
    laid_out = ops.prepare_weight(param.data)
    return param if laid_out is param.data else nn.Parameter(laid_out, requires_grad=False)


class VocabEmbedding(nn.Module):
    """Rows of the ``[vocab_size, hidden_size]`` matrix looked up by token id: ``weight`` when dense, the
    packed codes when ``quant`` is given (rows dequantized to ``dtype`` on lookup)."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self, vocab_size: int, hidden_size: int, ops: KernelOps, *, dtype: torch.dtype, device: torch.device,
        quant: LayerQuant | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ops = ops
        self.dtype = dtype
        self.quant = quant
        self.packed: PackedWeight | None = None
        if quant is None:
            self.weight = empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)
        else:
            create_code_parameters(self, vocab_size, hidden_size, quant, device)
            self._tracker = CodeLoadTracker(self, self.shard_ids)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)
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
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """Projects hidden states ``[N, H]`` to float32 logits ``[N, V]``.

    When ``tied_to`` is given, the head multiplies by that embedding's matrix (dense: ``weight`` *is* the
    embedding's parameter, registered first under the embedding's name, so it appears once in
    ``named_parameters``; packed: the embedding's ``packed`` weight); otherwise the head owns its matrix,
    dense or (``quant`` given) packed. The matmul runs in the weight dtype (packed: the hidden states'
    dtype); the result is cast to float32.
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
    ) -> None:
        super().__init__()
        self.ops = ops
        if tied_to is not None and (tied_to.vocab_size, tied_to.hidden_size) != (vocab_size, hidden_size):
            raise ValueError(
                f"tied_to: embedding is {tied_to.vocab_size}x{tied_to.hidden_size}, "
                f"head is {vocab_size}x{hidden_size}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tied = tied_to is not None
        self.quant = None if tied_to is not None else quant
        self.packed: PackedWeight | None = None
        if tied_to is not None:
            if tied_to.quant is None:
                self.weight = tied_to.weight
        elif quant is None:
            self.weight = empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)
        else:
            create_code_parameters(self, vocab_size, hidden_size, quant, device)
            self._tracker = CodeLoadTracker(self, self.shard_ids)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)
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
        return self.ops.linear(hidden, self.weight, None).float()

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
