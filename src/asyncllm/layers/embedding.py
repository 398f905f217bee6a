"""Token embedding and the LM head (its own matrix, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels.bundle import LinearOp
from asyncllm.layers.weights import ShardId, empty_parameter, load_unsharded


class VocabEmbedding(nn.Module):
    """Rows of ``weight`` ``[vocab_size, hidden_size]`` looked up by token id."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)

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
        dtype: torch.dtype,
        device: torch.device,
        matmul: LinearOp = F.linear,
    ) -> None:
        super().__init__()
        self.matmul = matmul
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.matmul(hidden, self.weight, None).float()

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
