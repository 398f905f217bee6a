"""Token embedding and the LM head (its own matrix, or the embedding's when tied).

Both store their matrix as the kernel bundle's ``prepare_weight`` lays it out after loading (K-major on
CPU, for the head's small-batch GEMV); a tied head is re-pointed at the embedding's matrix by the model
once both are laid out (``tie_to``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, empty_parameter, load_unsharded


def _laid_out(param: nn.Parameter, ops: KernelOps) -> nn.Parameter:
    laid_out = ops.prepare_weight(param.data)
    return param if laid_out is param.data else nn.Parameter(laid_out, requires_grad=False)


class VocabEmbedding(nn.Module):
    """Rows of ``weight`` ``[vocab_size, hidden_size]`` looked up by token id."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self, vocab_size: int, hidden_size: int, ops: KernelOps, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ops = ops
        self.weight = empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)

    def process_weights_after_loading(self) -> None:
        self.weight = _laid_out(self.weight, self.ops)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """Projects hidden states ``[N, H]`` to float32 logits ``[N, V]``.

    When ``tied_to`` is given, ``weight`` *is* that embedding's parameter (one tensor, registered first under
    the embedding's name, so it appears once in ``named_parameters``); otherwise the head owns its matrix.
    The matmul runs in the weight dtype; the result is cast to float32.
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
        self.weight = (
            tied_to.weight if tied_to is not None
            else empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)

    def process_weights_after_loading(self) -> None:
        if not self.tied:
            self.weight = _laid_out(self.weight, self.ops)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share ``embedding``'s (laid out) matrix; the head must have been built tied to it."""
        if not self.tied:
            raise ValueError("tie_to: this head owns its matrix")
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.weight, None).float()

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
