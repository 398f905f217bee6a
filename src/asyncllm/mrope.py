"""Multimodal rotary positions (M-RoPE, Qwen2-VL): three position components ``(t, h, w)`` per token.

Positions, as Hugging Face's ``Qwen2VLModel.get_rope_index`` computes them for a prompt:

- text tokens have three equal components, counting on from where the previous part ended;
- an image of token grid ``(t, rows, cols)`` (its patches after the spatial merge; ``t * rows * cols``
  placeholder tokens, row-major) starting at position ``p`` gives its token ``(i, r, c)`` the components
  ``(p + i, p + r, p + c)``; the text after it continues from ``p + max(rows, cols)``;
- the ``rope_delta`` of a prompt of ``N`` tokens is ``max(positions) + 1 - N``: every token after the
  prompt (generated, or appended later) at offset ``k`` has three equal components ``k + rope_delta``.

Rotation: the rotary frequencies are split into ``mrope_section`` consecutive groups (their sum is
``head_dim / 2``); group ``j`` rotates by component ``j % 3``. With three equal components this is plain
one-position rotary, which is why text-only prompts and every decode token rotate exactly as 1-D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from asyncllm.sequence import ImageSpan


def prompt_positions(num_tokens: int, images: Sequence[ImageSpan]) -> tuple[np.ndarray, int]:
    """``([3, num_tokens]`` int64 positions, ``rope_delta)`` of a prompt whose images are ``images`` (in
    order, not overlapping, each with a ``grid``). Raises ``ValueError`` naming ``image`` for a span
    without a grid or whose grid does not hold its ``length`` tokens."""
    out = np.empty((3, num_tokens), dtype=np.int64)
    cursor = 0  # next token offset
    current = 0  # next position
    for image in images:
        if image.grid is None:
            raise ValueError("image: an M-RoPE model needs each image's token grid (t, rows, cols)")
        t, rows, cols = image.grid
        if t * rows * cols != image.length or image.start < cursor or image.end > num_tokens:
            raise ValueError(f"image: grid {image.grid} does not fit a span of {image.length} tokens at "
                             f"{image.start} in a prompt of {num_tokens}")
        out[:, cursor : image.start] = current + np.arange(image.start - cursor)
        current += image.start - cursor
        span = out[:, image.start : image.end]
        span[0] = current + np.repeat(np.arange(t), rows * cols)
        span[1] = current + np.tile(np.repeat(np.arange(rows), cols), t)
        span[2] = current + np.tile(np.arange(cols), t * rows)
        current += max(rows, cols)
        cursor = image.end
    out[:, cursor:] = current + np.arange(num_tokens - cursor)
    return out, int(out.max()) + 1 - num_tokens


def section_components(mrope_section: Sequence[int], rotary_dim: int) -> torch.Tensor:
    """``[rotary_dim]`` int64: for each column of a cos/sin cache row (cos half, then sin half), the
    position component (0: t, 1: h, 2: w) that rotates it. ``ValueError`` naming ``mrope_section`` when
    its sections do not add up to ``rotary_dim / 2``."""
    half = rotary_dim // 2
    if len(mrope_section) == 0 or any(s <= 0 for s in mrope_section) or sum(mrope_section) != half:
        raise ValueError(f"rope_scaling.mrope_section: positive sections summing to head_dim/2={half} "
                         f"expected, got {list(mrope_section)}")
    per_freq = torch.cat([torch.full((size,), j % 3, dtype=torch.int64) for j, size in enumerate(mrope_section)])
    return torch.cat((per_freq, per_freq))


def mrope_cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """``[T, R]`` per-token cos/sin rows for ``[3, T]`` positions: column ``c`` of token ``i`` is column
    ``c`` of the cache row ``positions[components[c], i]``. Rotating token ``i`` by row ``i`` of the
    result (positions ``arange(T)``) is M-RoPE, on any rotary kernel that takes a cos/sin cache."""
    if positions.dim() != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions: expected [3, T] for M-RoPE, got {tuple(positions.shape)}")
    num_tokens, width = positions.shape[1], cos_sin_cache.shape[1]
    rows = cos_sin_cache.index_select(0, positions.reshape(-1)).view(3, num_tokens, width)
    index = components.to(rows.device).view(1, 1, width).expand(1, num_tokens, width)
    return rows.gather(0, index)[0]
