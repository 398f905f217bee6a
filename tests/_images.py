"""Small random test images, encoded as PNG bytes or as base64 ``data:`` URLs."""

from __future__ import annotations

import base64
import io

import torch


def png_bytes(seed: int = 1, width: int = 48, height: int = 40) -> bytes:
    """A ``width`` x ``height`` RGB image of seeded random pixels, PNG-encoded."""
    from PIL import Image

    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
