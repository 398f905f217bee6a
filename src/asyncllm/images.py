"""Images in prompts: loading (PIL images, encoded bytes, file paths or ready pixel tensors), the built-in
CLIP preprocessing, and expanding each image's placeholder token to the rows its features take.

An ``ImageProcessor`` turns one image into a ``PreparedImage``: the ``[P, C, S, S]`` tiles the vision tower
reads (``P == 1`` for LLaVA-1.5; the base tile plus the grid for LLaVA-NeXT), the image's original size and
the number of prompt tokens its features take. ``BuiltinImageProcessor`` is the fallback used without a
checkpoint ``preprocessor_config.json`` (see ``asyncllm.hf_image_processor`` for the one that reads it).

Ready inputs are accepted by every processor: a ``[C, S, S]`` / ``[1, C, S, S]`` tensor (LLaVA-1.5), or a
mapping with ``pixel_values`` (``[P, C, S, S]`` or ``[1, P, C, S, S]``) and ``image_sizes`` (``(height,
width)`` or ``[[height, width]]``), as Hugging Face's image processor returns for one image (needed for
tiled models, whose features depend on the image size). For Qwen2-VL the mapping holds ``pixel_values``
``[t*h*w, C*T*P*P]`` (patches) and ``image_grid_thw`` (``(t, h, w)`` or ``[[t, h, w]]``), as
``Qwen2VLImageProcessor`` returns them; videos (``pixel_values_videos``) are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from asyncllm import anyres
from asyncllm.config import VisionConfig
from asyncllm.sequence import ImageSpan

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model sees it: ``pixels`` ``[P, C, S, S]`` float32 tiles, ``size`` the original
    ``(height, width)`` (it decides how tiled features are unpadded), ``num_tokens`` the prompt rows its
    features take, ``digest`` a 62-bit hash of what the model reads (the pixels, and the size when tiled).
    ``grid`` (Qwen2-VL): the image's token grid ``(t, rows, cols)`` after the spatial merge, ``t * rows *
    cols == num_tokens`` (it decides the M-RoPE positions; the digest covers it); ``None`` otherwise."""

    pixels: torch.Tensor
    size: tuple[int, int]
    num_tokens: int
    digest: int
    grid: tuple[int, int, int] | None = None


class ImageProcessor(Protocol):
    """Turns an image (see the module docstring for the accepted kinds) into a ``PreparedImage``; bad
    input raises ``ValueError`` naming ``image``."""

    vision: VisionConfig

    def prepare(self, image: Any) -> PreparedImage: ...


def open_image(image: Any) -> Any:
    """A PIL image (RGB) from a PIL image, encoded bytes or a path."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL image, bytes, a path or pixel values, got {type(image).__name__}")
    return image.convert("RGB")


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

    image = open_image(image)
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def pixel_digest(pixels: torch.Tensor, size: tuple[int, int] | None = None) -> int:
    """A 62-bit hash of the pixel values (their bytes as float32) and, when given, the image size."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    if size is not None:
        data += b"|%d,%d" % size
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def prepared(pixels: torch.Tensor, size: tuple[int, int], vision: VisionConfig) -> PreparedImage:
    """Check ``[P, C, S, S]`` tiles against ``vision`` (for a tiled model: at least as many as the grid of
    ``size`` needs, extra padding tiles dropped) and count the image's tokens."""
    side = vision.image_size
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (vision.num_channels, side, side):
        raise ValueError(f"image: expected pixel_values [P, {vision.num_channels}, {side}, {side}], "
                         f"got {tuple(pixels.shape)}")
    if not vision.tiled:
        if pixels.shape[0] != 1:
            raise ValueError(f"image: expected one [{vision.num_channels}, {side}, {side}] image, "
                             f"got {pixels.shape[0]}")
        pixels = pixels.float()
        return PreparedImage(pixels, size, vision.num_image_tokens, pixel_digest(pixels))
    tiles = anyres.num_tiles(size, vision.image_grid_pinpoints, side)
    if pixels.shape[0] < tiles:
        raise ValueError(f"image: an image of size {size} takes {tiles} tiles, got pixel_values of "
                         f"{pixels.shape[0]}")
    pixels = pixels[:tiles].float().contiguous()
    count = anyres.num_image_tokens(size, vision.image_grid_pinpoints, side, vision.feature_side)
    return PreparedImage(pixels, size, count, pixel_digest(pixels, size))


def patch_grid_image(image: Mapping[str, Any], vision: VisionConfig) -> PreparedImage:
    """A Qwen2-VL image from ``pixel_values`` ``[t*h*w, C*T*P*P]`` and ``image_grid_thw`` ``(t, h, w)`` (the
    patch grid; ``h`` and ``w`` multiples of ``spatial_merge_size``). Its ``size`` is that of the resized
    image the patches cover, ``(h * P, w * P)``; the digest hashes the patches and that size (hence the
    grid, which decides the M-RoPE positions)."""
    if "pixel_values_videos" in image or "video_grid_thw" in image:
        raise ValueError("pixel_values_videos: videos are not supported; pass images")
    if "pixel_values" not in image or "image_grid_thw" not in image:
        raise ValueError("image: a Qwen2-VL image needs 'pixel_values' (patches) and 'image_grid_thw'")
    grid = torch.as_tensor(image["image_grid_thw"]).reshape(-1).tolist()
    merge = vision.spatial_merge_size
    if len(grid) != 3 or min(grid) <= 0 or grid[1] % merge or grid[2] % merge:
        raise ValueError(f"image_grid_thw: one positive (t, h, w) with h and w multiples of {merge} expected, "
                         f"got {image['image_grid_thw']!r}")
    t, h, w = (int(v) for v in grid)
    width = vision.num_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.as_tensor(image["pixel_values"])
    if tuple(pixels.shape) != (t * h * w, width):
        raise ValueError(f"pixel_values: expected [{t * h * w}, {width}] patches for image_grid_thw {(t, h, w)}, "
                         f"got {tuple(pixels.shape)}")
    pixels = pixels.float().contiguous()
    size = (h * vision.patch_size, w * vision.patch_size)
    return PreparedImage(pixels, size, t * h * w // merge**2, pixel_digest(pixels, size),
                         (t, h // merge, w // merge))


def ready_image(image: Any, vision: VisionConfig) -> PreparedImage | None:
    """``image`` as a ``PreparedImage`` when it is already pixel values (a tensor, or a mapping with
    ``pixel_values`` and ``image_sizes``, or ``image_grid_thw`` for Qwen2-VL); ``None`` when it still needs
    preprocessing."""
    if vision.patch_grid:
        if isinstance(image, torch.Tensor):
            raise ValueError("image: a Qwen2-VL image needs its patch grid; pass a mapping with 'pixel_values' "
                             "and 'image_grid_thw'")
        return patch_grid_image(image, vision) if isinstance(image, Mapping) else None
    if isinstance(image, torch.Tensor):
        if vision.tiled:
            raise ValueError("image: a tiled (LLaVA-NeXT) image needs its size; pass a mapping with "
                             "'pixel_values' and 'image_sizes'")
        pixels = to_pixels(image, vision)
        return prepared(pixels[None], (vision.image_size, vision.image_size), vision)
    if isinstance(image, Mapping):
        if "pixel_values" not in image:
            raise ValueError("image: a mapping must hold 'pixel_values' (and 'image_sizes' when tiled)")
        pixels = torch.as_tensor(image["pixel_values"])
        if pixels.dim() == 5:
            if pixels.shape[0] != 1:
                raise ValueError(f"image: pixel_values of one image expected, got {tuple(pixels.shape)}")
            pixels = pixels[0]
        elif pixels.dim() == 3:
            pixels = pixels[None]
        sizes = image.get("image_sizes")
        if sizes is None:
            if vision.tiled:
                raise ValueError("image: 'image_sizes' is missing (a tiled image's features depend on it)")
            size = (vision.image_size, vision.image_size)
        else:
            flat = torch.as_tensor(sizes).reshape(-1).tolist()
            if len(flat) != 2 or min(flat) <= 0:
                raise ValueError(f"image: image_sizes must be one positive (height, width), got {sizes!r}")
            size = (int(flat[0]), int(flat[1]))
        return prepared(pixels, size, vision)
    return None


class BuiltinImageProcessor:
    """LLaVA-1.5's CLIP preprocessing (``to_pixels``) without a checkpoint image processor. A tiled model,
    and a model with a SigLIP tower (whose images are resized and normalized differently), take ready pixel
    values only: preparing their images needs the checkpoint's ``preprocessor_config.json``."""

    def __init__(self, vision: VisionConfig) -> None:
        self.vision = vision

    def prepare(self, image: Any) -> PreparedImage:
        ready = ready_image(image, self.vision)
        if ready is not None:
            return ready
        if self.vision.patch_grid:
            raise ValueError("image: cutting an image into patches for Qwen2-VL needs the checkpoint's "
                             "preprocessor_config.json; pass ready 'pixel_values' and 'image_grid_thw' instead")
        if self.vision.tiled:
            raise ValueError("image: tiling an image for this model needs the checkpoint's "
                             "preprocessor_config.json; pass ready 'pixel_values' and 'image_sizes' instead")
        if self.vision.tower != "clip":
            raise ValueError(f"image: preparing an image for a {self.vision.tower} vision tower needs the "
                             "checkpoint's preprocessor_config.json; pass ready pixel values instead")
        image = open_image(image)
        pixels = to_pixels(image, self.vision)
        return prepared(pixels[None], (image.size[1], image.size[0]), self.vision)


def expand_image_tokens(
    token_ids: Sequence[int], images: Sequence[Any], processor: ImageProcessor | VisionConfig
) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """Replace the ``k``-th image placeholder token of ``token_ids`` by as many copies as image ``k``'s
    features take and describe where each image sits; the prompt must hold exactly one placeholder per
    image (a prompt already expanded, with each image's count of consecutive placeholders, is accepted too).
    ``processor`` prepares the images (a ``VisionConfig``: the built-in CLIP preprocessing)."""
    if isinstance(processor, VisionConfig):
        processor = BuiltinImageProcessor(processor)
    token = processor.vision.image_token_id
    places = [i for i, t in enumerate(token_ids) if t == token]
    ready = [image if isinstance(image, PreparedImage) else processor.prepare(image) for image in images]
    counts = [image.num_tokens for image in ready]
    if len(places) == sum(counts) and len(places) != len(images):
        starts_out, at = [], 0
        for count in counts:
            start = places[at]
            if places[at : at + count] != list(range(start, start + count)):
                raise ValueError(f"prompt: image placeholders must come in runs of {counts}")
            starts_out.append(start)
            at += count
        out = list(token_ids)
    elif len(places) == len(images):
        out, starts_out = [], []
        k = 0
        for t in token_ids:
            if t == token:
                starts_out.append(len(out))
                out.extend([token] * counts[k])
                k += 1
            else:
                out.append(t)
    else:
        raise ValueError(f"prompt: {len(places)} image tokens (id {token}) for {len(images)} images")
    spans = tuple(ImageSpan(start, image.num_tokens, image.pixels, image.digest, image.size, image.grid)
                  for start, image in zip(starts_out, ready, strict=True))
    return out, spans
