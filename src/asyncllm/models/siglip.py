"""SigLIP's vision tower as LLaVA uses it (Hugging Face ``SiglipVisionModel``): a patch convolution with a
bias, learned position embeddings for the patch rows (no class token), no layer norm before the shared
encoder (``vision_encoder``). LLaVA takes hidden states from before ``post_layernorm``, and never uses the
attention-pooling ``head``; the checkpoint's tensors of both are not read."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.config import VisionConfig
from asyncllm.models.vision_encoder import VisionEncoder, check_pixels


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """``[N, C, S, S]`` pixels -> ``[N, num_patches, hidden_size * len(feature_layers)]``: the hidden states
    of ``config.feature_layers``, one row per patch (row-major)."""

    unused_weights = ("post_layernorm.", "head.")
    """Prefixes (under the tower) of checkpoint tensors that LLaVA's features never pass through."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        check_pixels(pixels, self.config)
        return self.encoder(self.embeddings(pixels))
