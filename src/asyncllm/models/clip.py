"""CLIP's vision tower as LLaVA uses it (Hugging Face ``CLIPVisionModel`` without its pooling): a bias-free
patch convolution, a learned class token prepended to the patch rows, learned position embeddings (one
per row, class token included), ``pre_layrnorm``, then the shared encoder (``vision_encoder``). The
checkpoint's ``post_layernorm`` is never read: LLaVA takes hidden states from before it."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.config import VisionConfig
from asyncllm.models.vision_encoder import VisionEncoder, check_pixels


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """``[N, C, S, S]`` pixels -> ``[N, 1 + num_patches, hidden_size * len(feature_layers)]``: the hidden
    states of ``config.feature_layers``, class token's row first."""

    unused_weights = ("post_layernorm.",)
    """Prefixes (under the tower) of checkpoint tensors that LLaVA's features never pass through."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        check_pixels(pixels, self.config)
        return self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
