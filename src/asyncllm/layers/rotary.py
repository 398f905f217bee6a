"""Rotary position embedding: the cos/sin cache for each scaling type, and the module applying it.

Cache layout (what ``ops.rotary`` expects): ``[max_positions, head_dim]`` float32, row ``p`` holding
``cos(p * inv_freq)`` in its first ``head_dim / 2`` columns and ``sin(p * inv_freq)`` in the rest.
Frequencies follow Hugging Face ``transformers`` step for step in float32, so positions rotate exactly as
the reference implementation rotates them.

Scaling types (``rope_scaling["rope_type"]``; ``"type"`` is accepted as the older key):

- ``None`` / ``"default"``: ``inv_freq[i] = theta ** (-2i / D)``; ``max_position_embeddings`` rows.
- ``"linear"``: ``inv_freq / factor`` (positions interpolated); ``max_position_embeddings * factor`` rows.
- ``"llama3"``: wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
  by ``factor``, those shorter than ``... / high_freq_factor`` kept, those between smoothly blended;
  ``max_position_embeddings`` rows (already the extended length).
- ``"dynamic"`` (NTK-aware): within ``max_position_embeddings`` (``M``) the frequencies are the default
  ones, exactly as Hugging Face uses for any sequence of at most ``M`` tokens. Beyond it the cache has
  ``M * factor`` rows and row ``p >= M`` uses the NTK base for a sequence of ``p + 1`` tokens,
  ``theta * (factor * (p + 1) / M - (factor - 1)) ** (D / (D - 2))``. This equals what Hugging Face computes
  when it decodes token by token with a KV cache past ``M`` (each new token is rotated with the base of the
  length reached so far, and cached keys keep their rotation). It differs from Hugging Face's *single*
  forward over a prompt longer than ``M``, which rotates every token with the base of the full length: a
  fixed cache cannot depend on the batch, and keys already in the paged cache cannot be re-rotated.
- ``"yarn"``: per-dimension blend of interpolated (``/ factor``) and original frequencies over the ramp
  between ``beta_fast`` and ``beta_slow`` rotations at ``original_max_position_embeddings`` (``O``), cos and
  sin multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or the ``mscale`` /
  ``mscale_all_dim`` ratio); ``max(M, O * factor)`` rows.
- ``"longrope"`` (``"su"`` in older Phi-3 configs): ``inv_freq / short_factor`` for rows below ``O`` and
  ``inv_freq / long_factor`` from row ``O`` on, cos and sin multiplied by ``attention_factor`` (default
  ``sqrt(1 + ln(factor) / ln(O))`` with ``factor = M / O`` when unset); ``M`` rows. As for ``"dynamic"``,
  row ``p`` is what Hugging Face uses for a sequence of ``p + 1`` tokens (its token-by-token decode); a
  single Hugging Face forward over a prompt longer than ``O`` rotates all of it with the long factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from asyncllm.kernels import KernelOps
from asyncllm.mrope import mrope_cos_sin, section_components

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type_of(rope_scaling: Mapping[str, Any] | None) -> str:
    """The scaling type named by a ``rope_scaling`` dict (``"default"`` for ``None``); unknown types raise."""
    if rope_scaling is None:
        return "default"
    rope_type = str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))
    rope_type = "longrope" if rope_type == "su" else rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling: unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    return rope_type


def _param(rope_scaling: Mapping[str, Any], key: str) -> float:
    value = rope_scaling.get(key)
    if value is None:
        raise ValueError(f"rope_scaling.{key}: required for rope_type {rope_type_of(rope_scaling)!r}")
    value = float(value)
    if not value > 0:
        raise ValueError(f"rope_scaling.{key}: must be positive, got {value}")
    return value


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent interpolation of ``inv_freq``."""
    factor = _param(rope_scaling, "factor")
    low_freq_factor = _param(rope_scaling, "low_freq_factor")
    high_freq_factor = _param(rope_scaling, "high_freq_factor")
    old_context = _param(rope_scaling, "original_max_position_embeddings")
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"rope_scaling.high_freq_factor: must exceed low_freq_factor={low_freq_factor}, "
            f"got {high_freq_factor}"
        )
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def yarn_inv_freq(
    head_dim: int, theta: float, max_position_embeddings: int, rope_scaling: Mapping[str, Any]
) -> tuple[torch.Tensor, float]:
    """YaRN's ``inv_freq`` and attention factor, step for step as Hugging Face computes them."""
    factor = _param(rope_scaling, "factor")
    original = float(rope_scaling.get("original_max_position_embeddings") or max_position_embeddings)

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        weight, weight_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        attention_factor = (mscale(factor, float(weight)) / mscale(factor, float(weight_all))
                            if weight and weight_all else mscale(factor))
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope_cache(
    head_dim: int, theta: float, max_position_embeddings: int, rope_scaling: Mapping[str, Any]
) -> torch.Tensor:
    original = int(_param(rope_scaling, "original_max_position_embeddings"))
    factor = rope_scaling.get("factor")
    factor = max_position_embeddings / original if factor is None else float(factor)
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    rows = []
    for key, start, end in (("short_factor", 0, min(original, max_position_embeddings)),
                            ("long_factor", original, max_position_embeddings)):
        ext = rope_scaling.get(key)
        if ext is None or len(ext) != head_dim // 2:
            raise ValueError(f"rope_scaling.{key}: expected {head_dim // 2} values for longrope, got {ext!r}")
        inv_freq = 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta**shape)
        positions = torch.arange(start, max(start, end), dtype=torch.int64).float()
        rows.append(_cos_sin(torch.outer(positions, inv_freq)) * float(attention_factor))
    return torch.cat(rows, dim=0)


def _cos_sin(freqs: torch.Tensor) -> torch.Tensor:
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def build_cos_sin_cache(
    head_dim: int,
    rope_theta: float,
    max_position_embeddings: int,
    rope_scaling: Mapping[str, Any] | None,
) -> torch.Tensor:
    """The ``[max_positions, head_dim]`` float32 cos/sin cache for one model (see the module docstring)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: must be positive and even, got {head_dim}")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta: must be positive, got {rope_theta}")
    if max_position_embeddings <= 0:
        raise ValueError(f"max_position_embeddings: must be positive, got {max_position_embeddings}")
    rope_type = rope_type_of(rope_scaling)
    inv_freq = default_inv_freq(head_dim, rope_theta)
    num_positions = max_position_embeddings
    if rope_scaling is not None and rope_type == "linear":
        factor = _param(rope_scaling, "factor")
        inv_freq = inv_freq / factor
        num_positions = max(max_position_embeddings, int(max_position_embeddings * factor))
    elif rope_scaling is not None and rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_scaling is not None and rope_type == "longrope":
        return _longrope_cache(head_dim, rope_theta, max_position_embeddings, rope_scaling)
    attention_factor = 1.0
    if rope_scaling is not None and rope_type == "yarn":
        inv_freq, attention_factor = yarn_inv_freq(head_dim, rope_theta, max_position_embeddings, rope_scaling)
        original = rope_scaling.get("original_max_position_embeddings") or max_position_embeddings
        num_positions = max(max_position_embeddings, int(float(original) * _param(rope_scaling, "factor")))
    positions = torch.arange(num_positions, dtype=torch.int64).float()
    cache = _cos_sin(torch.outer(positions, inv_freq))
    if attention_factor != 1.0:
        cache = cache * attention_factor
    if rope_scaling is not None and rope_type == "dynamic":
        factor = _param(rope_scaling, "factor")
        extended = _dynamic_ntk_rows(head_dim, rope_theta, max_position_embeddings, factor)
        cache = torch.cat((cache, extended), dim=0)
    return cache


def _dynamic_ntk_rows(head_dim: int, theta: float, max_positions: int, factor: float) -> torch.Tensor:
    """Rows ``M .. M * factor - 1``: row ``p`` uses the NTK base for a sequence of ``p + 1`` tokens."""
    end = int(max_positions * factor)
    if end <= max_positions:
        return torch.empty(0, head_dim)
    seq_lens = torch.arange(max_positions + 1, end + 1, dtype=torch.int64)
    bases = theta * ((factor * seq_lens / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (bases[:, None] ** exponents[None, :])
    positions = (seq_lens - 1).float()
    return _cos_sin(positions[:, None] * inv_freq)


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys by token position through ``ops.rotary`` and a fixed cos/sin cache.

    One instance is shared by every attention layer of a model. Positions must lie in
    ``[0, max_positions)``; the cache is a non-persistent float32 buffer (not part of any checkpoint),
    computed at construction, so build the module on its real device rather than on ``meta``.

    ``mrope_section`` (Qwen2-VL's M-RoPE, see ``asyncllm.mrope``): positions may then also be ``[3, T]``;
    their per-token cos/sin rows are gathered from the cache in torch (``mrope_cos_sin``) and handed to
    ``ops.rotary`` as a ``[T, R]`` cache indexed by ``arange(T)``, so every kernel bundle rotates them
    unchanged. ``[T]`` positions (three equal components) take the plain path.
    """

    cos_sin_cache: torch.Tensor
    mrope_components: torch.Tensor | None

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        max_position_embeddings: int,
        rope_scaling: Mapping[str, Any] | None,
        ops: KernelOps,
        *,
        device: torch.device,
        mrope_section: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = rope_type_of(rope_scaling)
        self.ops = ops
        cache = build_cos_sin_cache(head_dim, rope_theta, max_position_embeddings, rope_scaling)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)
        components = section_components(mrope_section, cache.shape[1]).to(device) if mrope_section else None
        self.register_buffer("mrope_components", components, persistent=False)

    @property
    def max_positions(self) -> int:
        return int(self.cos_sin_cache.shape[0])

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hk, D]``, ``positions`` ``[T]`` int64 (or ``[3, T]`` with
        ``mrope_section``) -> rotated ``(q, k)``.

        ``q``/``k`` may be strided views (of a fused QKV output); fast kernels rotate them in place.
        """
        if positions.dim() == 1:
            return self.ops.rotary(q, k, positions, self.cos_sin_cache)
        if self.mrope_components is None:
            raise ValueError(f"positions: expected [T], got {tuple(positions.shape)} (no mrope_section)")
        table = mrope_cos_sin(self.cos_sin_cache, positions, self.mrope_components)
        index = torch.arange(table.shape[0], device=positions.device)
        return self.ops.rotary(q, k, index, table)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, type={self.rope_type}, max_positions={self.max_positions}"
