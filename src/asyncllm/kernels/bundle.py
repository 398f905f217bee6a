"""``KernelOps``: the bundle of ops a model may call, one implementation per backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyncllm.kernels.metadata import AttentionMetadata

RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AddRmsNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SiluAndMul = Callable[[torch.Tensor], torch.Tensor]
WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
LinearOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


@dataclass(frozen=True)
class KernelOps:
    """The ops a model may call. Every member has the signature of its ``*_reference`` function."""

    name: str
    rms_norm: RmsNorm
    add_rms_norm: AddRmsNorm
    rotary: Rotary
    silu_and_mul: SiluAndMul
    write_kv: WriteKV
    paged_attention: PagedAttention
    linear: LinearOp = F.linear


