"""Rotary-scaling settings of a GGUF file, expressed as a Hugging Face ``rope_scaling`` dict.

GGUF keeps linear and YaRN scaling as ``{arch}.rope.scaling.*`` metadata, but Llama-3-style scaling
as a ``rope_freqs.weight`` tensor of per-frequency divisors. YaRN (and any other named type) is not
supported by the model's rotary embedding and raises ``ValueError`` naming it. Those divisors are matched against the
Llama 3 formula over a small grid of its parameters; a match reproduces every divisor (to float32
precision), so the rotary frequencies the model computes from the returned dict equal the file's.
Anything that cannot be represented exactly raises ``ValueError``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

_LOW_FREQ_FACTORS = (1.0, 0.5, 2.0, 4.0, 8.0)
_HIGH_FREQ_FACTORS = (4.0, 1.0, 2.0, 8.0, 16.0, 32.0)
_ORIGINAL_CONTEXTS = (8192, *(2**k for k in range(10, 19) if 2**k != 8192))
_MATCH_TOLERANCE = 1e-5


def llama3_freq_factors(
    rope_theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """The per-frequency divisors of Llama 3 rope scaling (float64, ``head_dim // 2`` values)."""
    inv_freq = rope_theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    context = original_max_position_embeddings
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisors = torch.where(wavelen > context / low_freq_factor, factor, medium)
    return torch.where(wavelen < context / high_freq_factor, 1.0, divisors)


def _llama3_from_factors(
    freq_factors: torch.Tensor, rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    if freq_factors.numel() != head_dim // 2:
        raise ValueError(
            f"rope_freqs.weight has {freq_factors.numel()} values, expected head_dim/2 = {head_dim // 2}"
        )
    factor = float(freq_factors.max())
    if torch.all(freq_factors == 1.0):
        return None
    for low, high, context in itertools.product(_LOW_FREQ_FACTORS, _HIGH_FREQ_FACTORS, _ORIGINAL_CONTEXTS):
        if high <= low:
            continue
        expected = llama3_freq_factors(rope_theta, head_dim, factor, low, high, context)
        if torch.allclose(freq_factors, expected, rtol=_MATCH_TOLERANCE, atol=0.0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": context}
    raise ValueError("rope_freqs.weight does not follow Llama 3 rope scaling; per-frequency rotary factors "
                     "of other forms are not supported")


def rope_scaling_from_metadata(
    metadata: dict[str, Any], prefix: str, freq_factors: torch.Tensor | None, rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    """The Hugging Face ``rope_scaling`` dict for a GGUF file, or ``None`` for plain rotary embeddings.

    ``prefix`` is the architecture key prefix (``"llama."``); ``freq_factors`` the ``rope_freqs.weight``
    tensor if the file has one.
    """
    scaling_type = metadata.get(prefix + "rope.scaling.type")
    factor = metadata.get(prefix + "rope.scaling.factor", metadata.get(prefix + "rope.scale_linear"))
    if freq_factors is not None:
        if scaling_type not in (None, "none"):
            raise ValueError(
                f"GGUF file has both rope_freqs.weight and {prefix}rope.scaling.type={scaling_type!r}"
            )
        return _llama3_from_factors(freq_factors.to(torch.float64).reshape(-1), rope_theta, head_dim)
    if scaling_type is None:
        scaling_type = "linear" if factor is not None else "none"
    if scaling_type == "none" or factor is None or float(factor) == 1.0:
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(
        f"{prefix}rope.scaling.type={scaling_type!r}: this rotary scaling is not supported "
        "(supported: none, linear, and Llama 3 scaling through rope_freqs.weight)"
    )
