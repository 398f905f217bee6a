"""The vision tower a ``VisionConfig`` names (``tower``: ``"clip"`` or ``"siglip"``).

Every tower maps ``[N, C, S, S]`` pixels to ``[N, rows, hidden_size * len(feature_layers)]`` hidden states
(``rows``: the patches, after the class token's row for CLIP) and names, in its ``unused_weights``, the
prefixes of checkpoint tensors under it that LLaVA never reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from asyncllm.config import VisionConfig
from asyncllm.models.clip import ClipVisionTower
from asyncllm.models.siglip import SiglipVisionTower

_TOWERS: Mapping[str, type[nn.Module]] = MappingProxyType({"clip": ClipVisionTower, "siglip": SiglipVisionTower})


def build_vision_tower(config: VisionConfig) -> nn.Module:
    """The tower module for ``config.tower`` (parameters as the current default device makes them)."""
    tower = _TOWERS.get(config.tower)
    if tower is None:
        raise ValueError(f"vision_config.model_type: no vision tower {config.tower!r}")
    return tower(config)
