"""Act-order (GPTQ ``desc_act``): input channels whose groups are given by ``g_idx`` rather than position.

A checkpoint with act-order stores, per linear, ``g_idx[k]``: the group of input channel ``k``. The exact
form keeps groups contiguous instead: ``perm = argsort(g_idx, stable)`` lists the channels group by group,
the weight's columns are stored in that order (``W'[:, j] = W[:, perm[j]]``) and the layer computes
``y = x[:, perm] @ W'^T``, which equals ``x @ W^T``. This is exact only when every group has exactly
``G`` channels, i.e. ``g_idx[perm] == arange(K) // G``; ``group_permutation`` checks that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.quant.packed import QuantCodes


@dataclass(frozen=True)
class PermutedCodes:
    """A linear's exact weight: ``codes`` holds ``W'`` (columns in ``input_perm`` order when that is set, else
    ``W`` itself); ``input_perm`` is int64 ``[K]``, a permutation of ``range(K)``, or ``None``."""

    codes: QuantCodes
    input_perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        perm = self.input_perm
        if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (self.codes.shape[1],)):
            raise ValueError(f"input_perm: expected int64 [{self.codes.shape[1]}], got {perm.dtype} "
                             f"{tuple(perm.shape)}")


def trivial_groups(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``arange(K) // G``: the group of each input channel without act-order."""
    return torch.arange(in_features, device=device) // group_size


def group_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """``None`` when ``g_idx`` is the trivial ``arange(K) // G``; else the stable sort of ``g_idx`` (int64
    ``[K]``). Raises ``ValueError`` when ``g_idx`` is not 1-D integer or its groups do not each hold exactly
    ``group_size`` channels (then no contiguous form exists)."""
    if g_idx.dim() != 1 or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise ValueError(f"g_idx: expected a 1-D integer tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    k = int(g_idx.shape[0])
    if group_size <= 0 or k % group_size:
        raise ValueError(f"g_idx: {k} input channels do not split into groups of {group_size}")
    groups = g_idx.to(torch.int64)
    expected = trivial_groups(k, group_size, groups.device)
    if torch.equal(groups, expected):
        return None
    perm = torch.sort(groups, stable=True).indices
    if not torch.equal(groups[perm], expected):
        counts = torch.bincount(groups.clamp(min=0), minlength=k // group_size).tolist()
        raise ValueError(f"g_idx: act-order groups must each hold exactly {group_size} input channels in "
                         f"[0, {k // group_size}); got group sizes {counts} (min index {int(groups.min())})")
    return perm


def permute_inputs(codes: QuantCodes, g_idx: torch.Tensor | None, *, act_order: bool) -> PermutedCodes:
    """``codes`` (columns in checkpoint order, group ``g_idx[k]`` for column ``k``) in the exact contiguous
    form. A non-trivial ``g_idx`` without ``act_order`` is refused: the config promised none."""
    if g_idx is None:
        return PermutedCodes(codes)
    if tuple(g_idx.shape) != (codes.shape[1],):
        raise ValueError(f"g_idx: expected [{codes.shape[1]}] (one group per input channel), got "
                         f"{tuple(g_idx.shape)}")
    perm = group_permutation(g_idx, codes.group_size)
    if perm is None:
        return PermutedCodes(codes)
    if not act_order:
        raise ValueError("g_idx: input channels are reordered (act-order) but the config sets desc_act / "
                         "actorder off")
    permuted = QuantCodes(codes.codes[:, perm].contiguous(), codes.scales, codes.zeros, codes.mins,
                          bits=codes.bits, group_size=codes.group_size)
    return PermutedCodes(permuted, perm)
