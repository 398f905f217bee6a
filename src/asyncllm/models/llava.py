"""LLaVA-1.5-style vision-language models: a vision encoder (CLIP or SigLIP, ``vision_towers``), a two-layer
projector and a Llama-family decoder.

An image (``[1, 3, S, S]`` pixels, normalized as the checkpoint's image processor does) runs through the
vision encoder; the hidden states of the configured layer(s) (``VisionConfig.feature_layers``, the first
row dropped under the ``"default"`` strategy: CLIP's class token, or SigLIP's first patch, as Hugging Face
does) are projected (``linear -> gelu -> linear``) to
``num_image_tokens`` rows of the decoder's width. The prompt holds that many image placeholder tokens
(``VisionConfig.image_token_id``) where the image goes; ``forward`` embeds the prompt and overwrites those
rows with the image's (``ImageEmbeds``), and the Llama decoder runs as for text over the paged KV cache.

``encode_images`` runs the encoder and projector over a batch of tiles (the runner batches the images of
all sequences a step needs into one call); ``image_rows`` turns one image's tiles' features into its prompt
rows (here: its single tile's rows; LLaVA-NeXT packs several, see ``llava_next``). The encoder runs
outside the kernel bundle (plain torch modules: it is a small share of a prefill's work).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asyncllm.config import ModelConfig, VisionConfig
from asyncllm.images import BuiltinImageProcessor, ImageProcessor
from asyncllm.kernels import AttentionMetadata, KernelOps, KVCache
from asyncllm.models.llama import LlamaForCausalLM
from asyncllm.models.vision_towers import build_vision_tower
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig


@dataclass(frozen=True)
class ImageEmbeds:
    """Rows to place in a step's embedded tokens: ``rows[i]`` replaces the embedding of flat token
    ``index[i]`` (``index`` ``[K]`` int64, ``rows`` ``[K, H]`` in the model's dtype)."""

    index: torch.Tensor
    rows: torch.Tensor


class LlavaProjector(nn.Module):
    def __init__(self, vision: VisionConfig, text_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision.hidden_size * len(vision.feature_layers), text_hidden,
                                  bias=vision.projector_bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=vision.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def to_llava_names(name: str) -> tuple[str, str]:
    """``(part, name)``: ``"language"`` with the Llama checkpoint name, or ``"vision"`` with the name under
    this module's ``vision_tower`` / ``multi_modal_projector``. Reads the original layout
    (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*`` or
    ``vision_tower.*``) and the newer one (``model.language_model.*``, ``model.vision_tower.*``,
    ``lm_head.*``)."""
    if name.startswith("model.language_model."):
        return "language", "model." + name.removeprefix("model.language_model.")
    if name.startswith("language_model."):
        return "language", name.removeprefix("language_model.")
    if name.startswith("lm_head."):
        return "language", name
    name = name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return "vision", "vision_tower." + name.removeprefix("vision_tower.").removeprefix("vision_model.")
    return "vision", name


class LlavaForConditionalGeneration(nn.Module):
    """A Llama causal LM (``language_model``) that also takes images: ``encode_images`` maps pixels to
    projected feature rows, ``image_rows`` arranges one image's rows, which ``forward`` places at the image
    token positions (``ImageEmbeds``). ``image_processor`` prepares images for the prompt (the built-in
    CLIP preprocessing unless the loader sets the checkpoint's own). ``vision_tower`` is the tower
    ``config.vision.tower`` names."""

    definition = "llava"

    def __init__(
        self,
        config: ModelConfig,
        ops: KernelOps,
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantization: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        super().__init__()
        if config.vision is None:
            raise ValueError(f"config: architecture {config.architecture!r} has no vision_config")
        self.config = config
        self.vision = config.vision
        self.language_model = LlamaForCausalLM(config, ops, dtype=dtype, device=device, quantization=quantization)
        with torch.device("meta"):
            tower = build_vision_tower(config.vision)
            projector = LlavaProjector(config.vision, config.hidden_size)
        self.vision_tower = tower.to_empty(device=device).to(dtype)
        self.multi_modal_projector = projector.to_empty(device=device).to(dtype)
        self.image_processor: ImageProcessor = BuiltinImageProcessor(config.vision)

    @property
    def max_positions(self) -> int:
        return self.language_model.max_positions

    @property
    def image_token_id(self) -> int:
        return self.vision.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` pixels -> ``[N, rows_per_tile, hidden_size]`` rows for the decoder."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        features = self.vision_tower(pixel_values.to(self.multi_modal_projector.linear_1.weight.device, dtype))
        if self.vision.select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def image_rows(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's prompt rows ``[num_image_tokens, H]`` from its tiles' ``encode_images`` output
        ``[1, num_image_tokens, H]`` (``size``, the original size, does not matter for untiled images)."""
        if features.shape[0] != 1:
            raise ValueError(f"image: expected one tile's features, got {features.shape[0]}")
        return features[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
        images: ImageEmbeds | None = None,
    ) -> torch.Tensor:
        """As ``LlamaForCausalLM.forward``; ``images`` replaces the embeddings of the tokens it indexes."""
        if images is None:
            return self.language_model.forward(input_ids, positions, meta, kv_caches)
        embeds = self.language_model.model.embed_tokens(input_ids)
        embeds = embeds.index_copy(0, images.index, images.rows.to(embeds.dtype))
        return self.language_model.model(input_ids, positions, meta, kv_caches, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a LLaVA checkpoint (either naming layout, see ``to_llava_names``): the decoder's tensors by
        ``LlamaForCausalLM.load_weights``, the vision tower's and projector's by name. The tensors the
        tower never reads (its ``unused_weights``: ``post_layernorm``, SigLIP's pooling ``head``) are
        skipped; unexpected or missing names and wrong shapes raise ``ValueError``."""
        vision: dict[str, torch.Tensor] = {}
        unused = tuple("vision_tower." + prefix for prefix in self.vision_tower.unused_weights)

        def language() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                part, mapped = to_llava_names(name)
                if part == "language":
                    yield mapped, tensor
                elif not mapped.startswith(unused):
                    vision[mapped] = tensor

        self.language_model.load_weights(language())
        params = {name: p for name, p in self.named_parameters() if not name.startswith("language_model.")}
        unexpected = sorted(set(vision) - set(params))
        missing = sorted(set(params) - set(vision))
        if unexpected or missing:
            raise ValueError(f"LLaVA checkpoint: unexpected tensors {unexpected}, missing {missing}")
        with torch.no_grad():
            for name, param in params.items():
                tensor = vision[name]
                if tensor.shape != param.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)
