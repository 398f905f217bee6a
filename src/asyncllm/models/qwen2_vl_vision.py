"""Qwen2-VL's vision tower, named as Hugging Face names it (``visual.*``): variable-size images as patch grids.

Input: the patches of several images, ``[N, C * T * P * P]`` (the image processor's ``pixel_values``,
``T = temporal_patch_size`` copies of an image's frame, ``P = patch_size``), with each image's patch grid
``(t, h, w)`` (``t * h * w`` rows, ordered so that every ``merge x merge`` block of neighbouring patches is
consecutive). Steps, as Hugging Face's ``Qwen2VisionTransformerPretrainedModel``:

1. ``patch_embed``: the Conv3d with kernel = stride = ``(T, P, P)`` and no bias, i.e. one linear map of
   each patch row to ``embed_dim``;
2. 2D rotary: each row's ``(row, col)`` in its image's patch grid; the first half of a head's rotary
   frequencies rotate by the row, the second by the column (``head_dim / 4`` frequencies each, base
   10000), "rotate half" over the whole head;
3. ``blocks``: pre-LayerNorm (eps 1e-6) blocks, ``x + proj(attn(norm1(x)))``, ``x + fc2(act(fc1(norm2(x))))``;
   attention (fused ``qkv`` with bias) is bidirectional within each frame of each image only;
4. ``merger``: LayerNorm ``ln_q``, then each ``merge ** 2`` consecutive rows concatenated and mapped by
   ``mlp.0 -> GELU -> mlp.2`` to the decoder's width: ``t * h * w / merge ** 2`` prompt rows per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.config import VisionConfig
from asyncllm.models.vision_encoder import activation

VISION_ROPE_THETA = 10000.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_inv_freq(config: VisionConfig, device: torch.device | None = None) -> torch.Tensor:
    """The float32 frequencies of the tower's 2D rotary: ``head_dim / 4`` of them, base 10000."""
    quarter = config.hidden_size // config.num_attention_heads // 2
    return 1.0 / (VISION_ROPE_THETA ** (torch.arange(0, quarter, 2, dtype=torch.float, device=device) / quarter))


def patch_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """``[t * h * w, 2]`` int64 ``(row, col)`` of each patch row of one image, in the processor's order
    (``merge x merge`` blocks consecutive, blocks row-major, frames one after another)."""
    t, h, w = grid
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    rows, cols = rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)
    return torch.stack((rows, cols), dim=-1).repeat(t, 1)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        t, p = config.temporal_patch_size, config.patch_size
        self.proj = nn.Conv3d(config.num_channels, config.hidden_size, kernel_size=(t, p, p), stride=(t, p, p),
                              bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self.qkv(x).view(rows, 3, self.num_heads, -1).unbind(1)
        cos, sin = cos[:, None], sin[:, None]
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        outs = [F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
                for qs, ks, vs in zip(q.split(list(lengths)), k.split(list(lengths)), v.split(list(lengths)),
                                      strict=True)]
        return self.proj(torch.cat([out.transpose(0, 1) for out in outs]).reshape(rows, -1))


class VisionMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMlp(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.merged_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class Qwen2VisionTower(nn.Module):
    """Patches of several images -> their prompt rows (see the module docstring)."""

    inv_freq: torch.Tensor

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.merger = PatchMerger(config)
        self.register_buffer("inv_freq", vision_inv_freq(config), persistent=False)

    def forward(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """``[sum(t*h*w), C*T*P*P]`` patches of the images whose patch grids are ``grids`` ->
        ``[sum(t*h*w) / merge**2, merged_size]`` rows, image after image."""
        merge = self.config.spatial_merge_size
        expected = sum(t * h * w for t, h, w in grids)
        if patches.dim() != 2 or patches.shape[0] != expected:
            raise ValueError(f"pixel_values: expected [{expected}, C*T*P*P] patches for grids {list(grids)}, "
                             f"got {tuple(patches.shape)}")
        positions = torch.cat([patch_positions(grid, merge) for grid in grids]).to(self.inv_freq.device)
        freqs = (positions[..., None].float() * self.inv_freq.float()).flatten(1)  # [N, head_dim / 2]: rows, then cols
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        x = self.patch_embed(patches.to(self.inv_freq.device))
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.merger(x)
