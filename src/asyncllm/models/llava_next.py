"""LLaVA-NeXT (Hugging Face ``LlavaNextForConditionalGeneration``): LLaVA-1.5's vision tower (CLIP with the
``"default"`` feature strategy, or SigLIP with ``"full"``: either way a tile keeps exactly its patch rows),
projector and decoder, with images tiled at several resolutions ("anyres", see ``asyncllm.anyres``).

An image arrives as ``[1 + rows * cols, C, S, S]`` tiles: a downscaled copy of the whole image, then the
``rows x cols`` grid cut from the image fitted (aspect ratio kept, padded) into the best of the
``image_grid_pinpoints``. Every tile is encoded and projected like a LLaVA-1.5 image (``side x side`` rows,
``side = S // patch_size``). ``image_rows`` lays the grid tiles' rows out as one
``rows*side x cols*side`` feature map, crops the padding off (to the original aspect ratio), appends the
learned ``image_newline`` row after every feature row, and puts the base tile's rows first. The row count
therefore depends on the image's size; ``anyres.num_image_tokens`` computes it before encoding.
"""

from __future__ import annotations

import torch
from torch import nn

from asyncllm import anyres
from asyncllm.config import ModelConfig
from asyncllm.kernels import KernelOps
from asyncllm.models.llava import LlavaForConditionalGeneration
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with anyres tiling and a newline row per feature row (see the module docstring)."""

    definition = "llava_next"

    def __init__(
        self,
        config: ModelConfig,
        ops: KernelOps,
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantization: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        super().__init__(config, ops, dtype=dtype, device=device, quantization=quantization)
        if not self.vision.tiled:
            raise ValueError("image_grid_pinpoints: LLaVA-NeXT needs at least one grid resolution")
        self.image_newline = nn.Parameter(torch.empty(config.hidden_size, dtype=dtype, device=device))

    def image_rows(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's prompt rows from its tiles' ``encode_images`` output ``[1 + rows*cols, side**2, H]``
        (base tile first); ``size`` is the original ``(height, width)``, which decides the grid and the
        crop. Returns ``[anyres.num_image_tokens(size, ...), H]``."""
        vision = self.vision
        side = vision.feature_side
        rows, cols = anyres.grid_shape(size, vision.image_grid_pinpoints, vision.image_size)
        if features.shape[0] != 1 + rows * cols or features.shape[1] != side * side:
            raise ValueError(f"image: an image of size {size} has {1 + rows * cols} tiles of {side * side} rows, "
                             f"got features {tuple(features.shape)}")
        width = features.shape[-1]
        grid = features[1:].view(rows, cols, side, side, width).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, width)
        height, kept = anyres.unpadded_shape(size, rows * side, cols * side)
        top, left = (rows * side - height) // 2, (cols * side - kept) // 2
        grid = grid[top : top + height, left : left + kept]
        newline = self.image_newline.to(grid.dtype).expand(height, 1, width)
        return torch.cat([features[0], torch.cat([grid, newline], dim=1).reshape(-1, width)])
