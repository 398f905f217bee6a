"""The transformer encoder that CLIP's and SigLIP's vision towers share: bidirectional pre-layernorm layers
(``layer_norm1 -> self_attn (q/k/v/out projections with biases) -> residual``, ``layer_norm2 -> mlp (fc1 ->
activation -> fc2) -> residual``), named as Hugging Face names them (``encoder.layers.N.*``).

``VisionEncoder.forward`` returns the hidden states a LLaVA projector reads: index 0 is the encoder's input
(the tower's embeddings), index ``i`` the output of layer ``i``; no final layer norm is applied (Hugging
Face's towers record their hidden states before ``post_layernorm``). Layers past the last wanted index
are not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.config import VisionConfig


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)`` (CLIP's ``quick_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The module for a ``vision_config.hidden_act`` (one of ``config.VISION_ACTIVATIONS``)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"vision_config.hidden_act: unsupported {name!r}")


class EncoderAttention(nn.Module):
    """Multi-head self-attention over all rows (no mask), scaled by ``head_dim ** -0.5``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class EncoderMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = EncoderAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EncoderMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """``config.num_hidden_layers`` encoder layers; ``forward(embeddings)`` returns the hidden states of
    ``config.feature_layers`` (Python-style indices into the ``num_hidden_layers + 1`` states, see the module
    docstring), concatenated along the feature axis."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        total = config.num_hidden_layers + 1
        self._wanted: Sequence[int] = tuple(i % total for i in config.feature_layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        states = {0: hidden}
        for index, layer in enumerate(self.layers[: max(self._wanted)], start=1):
            hidden = layer(hidden)
            states[index] = hidden
        return torch.cat([states[i] for i in self._wanted], dim=-1)


def check_pixels(pixels: torch.Tensor, config: VisionConfig) -> None:
    """Raise ``ValueError`` naming ``pixel_values`` unless ``pixels`` is ``[N, C, S, S]`` for ``config``."""
    size = config.image_size
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (config.num_channels, size, size):
        raise ValueError(
            f"pixel_values: expected [N, {config.num_channels}, {size}, {size}], got {tuple(pixels.shape)}"
        )
