"""Activation-aware weight quantization (AWQ): the two searches, on plain tensors.

A linear ``y = W x`` is unchanged by ``W' = W diag(s)``, ``x' = x / s`` (the division folded into whatever
produces ``x``: a norm's weight or the previous linear's output rows), but its quantization error is not:
scaling up the input channels that carry large activations gives their weights more of the quantization
grid, and those channels dominate the output ("important weights are protected by scaling").

``search_scales``: for each point ``r`` of a grid over ``[0, 1)`` the candidate is
``s = mean|x|**r / (w_norm**(1 - r) + 1e-4)``, clamped to at least ``1e-4`` and normalised to a geometric
mid-range of 1 (``s / sqrt(max(s) * min(s))``), where ``mean|x|`` is the per-channel mean activation
magnitude and ``w_norm`` the per-channel mean of each weight group's magnitudes relative to the group's
largest. Each candidate replaces every linear of the group by ``Q(W s) / s`` (``Q`` the round-to-nearest
quantize-dequantize of the final scheme), runs the block that consumes them on the cached input, and
scores the mean squared error against the block's full-precision output. The identity ``s = 1`` (plain
round-to-nearest) is always a candidate, so the chosen scales never score worse than RTN on the calibration
data. The linears' weights are restored before returning.

``search_clip``: per output row and group, the largest magnitude ``m`` kept by clamping the weight to
``[-m, m]`` before quantizing, chosen among ``m = max|w| (1 - i / grid)`` for ``i < shrink * grid`` by the
squared error of that group's partial outputs on a subsample of the cached inputs. ``i = 0`` (no
clipping) is a candidate, so clipping never scores worse on those inputs either.

Everything runs in float32 on the tensors' device without host synchronisation inside the grid loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SCALE_GRID = 20
"""Scale exponents tried: ``r = i / SCALE_GRID`` for ``i`` in ``0 .. SCALE_GRID - 1``."""
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
"""Clip ratios tried: ``1 - i / CLIP_GRID`` for ``i < CLIP_MAX_SHRINK * CLIP_GRID`` (1.0 down to 0.55)."""
CLIP_SAMPLE_TOKENS = 512
"""Input rows (evenly spaced) the clip search scores on."""
_CLIP_CHUNK_ELEMENTS = 1 << 24
"""Largest ``groups * tokens * rows`` partial-output tensor the clip search materialises (64 MiB of float32)."""


@dataclass(frozen=True)
class QuantScheme:
    """How the final weights are quantized: ``bits`` per code, asymmetric unless ``symmetric``, and scales
    rounded to ``scale_dtype`` (``None``: kept in float32); the group size is per linear."""

    bits: int
    symmetric: bool
    scale_dtype: torch.dtype | None = torch.float16

    def fake_quantize(self, weight: torch.Tensor, group_size: int) -> torch.Tensor:
        """``weight`` quantized to codes and back, in float32: ``quantize_rtn(...).dequantize()`` (what the
        stored checkpoint will compute), in fewer passes and without its checks (the search's hot loop)."""
        rows, cols = (int(d) for d in weight.shape)
        maxq = float((1 << self.bits) - 1)
        grouped = weight.float().reshape(rows, cols // group_size, group_size)
        low = grouped.amin(dim=-1, keepdim=True).clamp_(max=0.0)
        high = grouped.amax(dim=-1, keepdim=True).clamp_(min=0.0)
        empty = (low == 0) & (high == 0)
        low = low.masked_fill_(empty, -1.0)
        high = high.masked_fill_(empty, 1.0)
        scales = 2.0 * torch.maximum(-low, high) / maxq if self.symmetric else (high - low) / maxq
        if self.scale_dtype is not None:
            scales = scales.clamp_(min=torch.finfo(self.scale_dtype).tiny).to(self.scale_dtype).float()
        offset = float(1 << (self.bits - 1))
        zeros = torch.full_like(scales, offset) if self.symmetric else torch.round(-low / scales).clamp_(0.0, maxq)
        codes = torch.round(grouped / scales).add_(zeros).clamp_(0.0, maxq)
        return codes.sub_(zeros).mul_(scales).reshape(rows, cols)


@dataclass(frozen=True)
class ScaleSearch:
    """The outcome of ``search_scales``: the chosen per-input-channel ``scales`` ``[K]``, the exponent that
    produced them (``None``: the identity won), and the block error of the identity and of the choice."""

    scales: torch.Tensor
    ratio: float | None
    rtn_error: float
    error: float


def activation_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation per input channel of ``x`` ``[T, K]``: ``[K]`` float32."""
    return x.detach().abs().float().reshape(-1, x.shape[-1]).mean(0)


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of each weight's magnitude relative to the largest in its group: ``[K]``."""
    stacked = torch.cat([w.detach().float() for w in weights], dim=0)
    rows, cols = stacked.shape
    grouped = stacked.abs().reshape(rows, cols // group_size, group_size)
    relative = grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return relative.reshape(rows, cols).mean(0)


def candidate_scales(x_magnitude: torch.Tensor, w_magnitude: torch.Tensor, ratio: float) -> torch.Tensor:
    """The scales of grid point ``ratio`` (see the module docstring)."""
    scales = (x_magnitude.pow(ratio) / (w_magnitude.pow(1.0 - ratio) + 1e-4)).clamp(min=1e-4)
    return scales / torch.sqrt(scales.max() * scales.min())


def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    scheme: QuantScheme,
    block: Callable[[], torch.Tensor],
    reference: torch.Tensor,
    *,
    grid: int = SCALE_GRID,
) -> ScaleSearch:
    """The AWQ scales for the linears whose weight tensors are ``weights`` (each ``[N_i, K]``, modified in
    place while searching and restored before returning) sharing the input ``x`` ``[T, K]``.

    ``block()`` recomputes, from the cached input, the output of the module that consumes them, whose
    full-precision value is ``reference``; ``group_sizes[i]`` is linear ``i``'s quantization group."""
    if len(weights) != len(group_sizes) or not weights:
        raise ValueError("weights/group_sizes: expected one group size per weight, at least one weight")
    k = int(x.shape[-1])
    for i, w in enumerate(weights):
        if w.dim() != 2 or int(w.shape[1]) != k:
            raise ValueError(f"weights[{i}]: expected [N, {k}] (the input's channels), got {tuple(w.shape)}")
    originals = [w.detach().clone() for w in weights]
    x_magnitude = activation_magnitude(x)
    w_magnitude = weight_magnitude(originals, min(group_sizes))

    def error_with(scales: torch.Tensor | None) -> float:
        for w, original, group in zip(weights, originals, group_sizes, strict=True):
            if scales is None:
                w.copy_(scheme.fake_quantize(original, group))
            else:
                w.copy_(scheme.fake_quantize(original * scales, group) / scales)
        out = block()
        return float((out.float() - reference.float()).pow(2).mean())

    try:
        rtn_error = error_with(None)
        best = ScaleSearch(torch.ones(k, device=x.device), None, rtn_error, rtn_error)
        for i in range(grid):
            ratio = i / grid
            scales = candidate_scales(x_magnitude, w_magnitude, ratio)
            if not bool(torch.isfinite(scales).all()):
                continue
            error = error_with(scales)
            if error < best.error:
                best = ScaleSearch(scales, ratio, rtn_error, error)
    finally:
        for w, original in zip(weights, originals, strict=True):
            w.copy_(original)
    return best


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    scheme: QuantScheme,
    *,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
    sample_tokens: int = CLIP_SAMPLE_TOKENS,
) -> torch.Tensor:
    """The clip magnitudes ``[N, K / group_size]`` for ``weight`` ``[N, K]`` with input ``x`` ``[T, K]`` (see the
    module docstring); ``apply_clip`` applies them."""
    n, k = (int(d) for d in weight.shape)
    if int(x.shape[-1]) != k:
        raise ValueError(f"x: expected [T, {k}] (the weight's inputs), got {tuple(x.shape)}")
    rows = x.reshape(-1, k).float()
    step = max(1, rows.shape[0] // sample_tokens)
    sample = rows[::step][:sample_tokens]
    groups = k // group_size
    # [groups, T', G] @ [groups, G, rows] -> each group's partial outputs [groups, T', rows], by batched GEMM
    sample_groups = sample.reshape(-1, groups, group_size).transpose(0, 1)
    w = weight.detach().float()
    best = torch.empty(n, groups, device=w.device)
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // max(1, groups * sample.shape[0]))
    steps = max(1, int(max_shrink * grid))

    def partial_outputs(block: torch.Tensor) -> torch.Tensor:
        return torch.bmm(sample_groups, block.reshape(-1, groups, group_size).permute(1, 2, 0))

    for start in range(0, n, chunk):
        block = w[start:start + chunk]
        rows_here = int(block.shape[0])
        grouped = block.reshape(rows_here, groups, group_size)
        reference = partial_outputs(block)
        original_max = grouped.abs().amax(dim=-1, keepdim=True)
        best_error = torch.full((rows_here, groups), float("inf"), device=w.device)
        best_max = original_max.squeeze(-1).clone()
        for i in range(steps):
            limit = original_max * (1.0 - i / grid)
            clipped = torch.maximum(torch.minimum(grouped, limit), -limit).reshape(rows_here, k)
            quantized = scheme.fake_quantize(clipped, group_size)
            error = (partial_outputs(quantized) - reference).pow(2).mean(dim=1).transpose(0, 1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better, limit.squeeze(-1), best_max)
        best[start:start + chunk] = best_max
    return best


def apply_clip(weight: torch.Tensor, limits: torch.Tensor) -> None:
    """Clamp ``weight`` ``[N, K]`` in place to ``[-limit, limit]`` per row and group (``limits`` ``[N, K/G]``)."""
    n, k = (int(d) for d in weight.shape)
    groups = int(limits.shape[1])
    grouped = weight.data.reshape(n, groups, k // groups) if weight.is_contiguous() else None
    bound = limits.to(weight.dtype).unsqueeze(-1)
    if grouped is not None:
        grouped.copy_(torch.maximum(torch.minimum(grouped, bound), -bound))
        return
    clipped = torch.maximum(torch.minimum(weight.detach().reshape(n, groups, k // groups), bound), -bound)
    weight.data.copy_(clipped.reshape(n, k))
