"""Rotary position embedding in the "rotate half" (GPT-NeoX / Hugging Face Llama) layout."""

from __future__ import annotations

import torch


def rotate_half_tables(
    cos_sin_cache: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``positions`` as factors of ``x * cos + rotate_half_swapped(x) * sin``: ``[T, R]``
    ``[cos | cos]`` and ``[-sin | sin]`` in ``dtype`` (``R`` the rotated width, the cache's row width)."""
    cos_sin = cos_sin_cache.index_select(0, positions).to(dtype)
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, :half], cos_sin[:, half:]
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` by their token positions ``[T]``.

    ``cos_sin_cache`` is ``[max_positions, R]`` with ``R <= D`` even: the first ``R/2`` columns are cos,
    the last ``R/2`` sin, per frequency. The first ``R`` dims of each head rotate (pairs ``i`` and
    ``i + R/2``); dims past ``R`` pass through. Returns new tensors; fast versions may work in place.
    """
    cos_sin = cos_sin_cache.index_select(0, positions)
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot = x[..., : 2 * half].float()
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if 2 * half == x.shape[-1]:
            return out
        return torch.cat((out, x[..., 2 * half :]), dim=-1)

    return rotate(q), rotate(k)
