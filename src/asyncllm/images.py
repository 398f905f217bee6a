"""Images in prompts: loading (PIL images, encoded bytes, file paths or ready pixel tensors), CLIP-style
preprocessing, and expanding each image's placeholder token to the rows its features take."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import torch

from asyncllm.config import VisionConfig
from asyncllm.sequence import ImageSpan

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixels(image: Any, vision: VisionConfig) -> torch.Tensor:
    """``[C, S, S]`` float32 pixels of ``image``: a tensor of that shape is taken as already preprocessed;
    a PIL image, encoded bytes or a path is resized (shortest side to ``S``, bicubic), center-cropped and
    normalized with CLIP's mean and std, as LLaVA-1.5's image processor does."""
    size = vision.image_size
    if isinstance(image, torch.Tensor):
        pixels = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if tuple(pixels.shape) != (vision.num_channels, size, size):
            raise ValueError(f"image: expected pixels [{vision.num_channels}, {size}, {size}], "
                             f"got {tuple(image.shape)}")
        return pixels.float()
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL image, bytes, a path or a pixel tensor, got {type(image).__name__}")
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def pixel_digest(pixels: torch.Tensor) -> int:
    """A 62-bit hash of the pixel values (their bytes as float32)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def expand_image_tokens(
    token_ids: Sequence[int], images: Sequence[Any], vision: VisionConfig
) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """Replace the ``k``-th image placeholder token of ``token_ids`` by ``num_image_tokens`` copies and
    describe where image ``k`` sits; the prompt must hold exactly one placeholder per image (a prompt
    already expanded, with ``num_image_tokens`` consecutive placeholders per image, is accepted too)."""
    token = vision.image_token_id
    n = vision.num_image_tokens
    places = [i for i, t in enumerate(token_ids) if t == token]
    if len(places) == len(images) * n and n > 1:
        starts = places[::n]
        if all(places[j * n : (j + 1) * n] == list(range(s, s + n)) for j, s in enumerate(starts)):
            out, starts_out = list(token_ids), starts
        else:
            raise ValueError(f"prompt: image placeholders must come in runs of {n}")
    elif len(places) == len(images):
        out, starts_out = [], []
        for t in token_ids:
            if t == token:
                starts_out.append(len(out))
                out.extend([token] * n)
            else:
                out.append(t)
    else:
        raise ValueError(f"prompt: {len(places)} image tokens (id {token}) for {len(images)} images")
    spans = []
    for start, image in zip(starts_out, images, strict=True):
        pixels = to_pixels(image, vision)
        spans.append(ImageSpan(start, n, pixels, pixel_digest(pixels)))
    return out, tuple(spans)
