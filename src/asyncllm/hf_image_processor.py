"""The checkpoint's own image processor: when a model directory holds ``preprocessor_config.json``,
Hugging Face ``transformers`` builds the processor it names (``CLIPImageProcessor``,
``LlavaNextImageProcessor``, ...) from that directory, offline, and it makes the pixel values (and, for a
tiled model, the image sizes and tiles); without one, the built-in CLIP preprocessing is used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asyncllm.config import VisionConfig
from asyncllm.images import BuiltinImageProcessor, ImageProcessor, PreparedImage, open_image, ready_image

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class HFImageProcessor:
    """Prepares images with a ``transformers`` image processor (one image per call); ready pixel values
    (see ``asyncllm.images``) pass through unchanged."""

    def __init__(self, processor: Any, vision: VisionConfig) -> None:
        self.processor = processor
        self.vision = vision

    def prepare(self, image: Any) -> PreparedImage:
        ready = ready_image(image, self.vision)
        if ready is not None:
            return ready
        picture = open_image(image)
        out = self.processor(images=[picture], return_tensors="pt")
        sizes = out.get("image_sizes")
        features = {"pixel_values": out["pixel_values"],
                    "image_sizes": sizes if sizes is not None else [[picture.height, picture.width]]}
        if "image_grid_thw" in out:  # Qwen2-VL: patches and their grid
            features["image_grid_thw"] = out["image_grid_thw"]
        result = ready_image(features, self.vision)
        if result is None:  # pragma: no cover - a mapping always yields a result
            raise ValueError("image: the image processor returned no pixel values")
        return result


def load_image_processor(path: str | os.PathLike[str], vision: VisionConfig) -> ImageProcessor:
    """The image processor of the checkpoint directory ``path``: ``transformers``' own when ``path`` holds
    ``preprocessor_config.json`` (loaded from local files only), else ``BuiltinImageProcessor``."""
    directory = Path(path)
    if not (directory.is_dir() and (directory / PREPROCESSOR_CONFIG).is_file()):
        return BuiltinImageProcessor(vision)
    try:
        from transformers import AutoImageProcessor
    except ImportError as error:
        raise ImportError(f"{directory / PREPROCESSOR_CONFIG}: reading it needs the transformers package") from error
    processor = AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
    return HFImageProcessor(processor, vision)
