"""LLaVA-1.5-style vision-language models: a CLIP vision encoder, a two-layer projector and a Llama decoder.

An image (``[1, 3, S, S]`` pixels, normalized as the checkpoint's image processor does) runs through the
vision encoder; the hidden states of the configured layer(s) (``VisionConfig.feature_layers``, the class
token's row dropped under the ``"default"`` strategy) are projected (``linear -> gelu -> linear``) to
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
import torch.nn.functional as F
from torch import nn

from asyncllm.config import ModelConfig, VisionConfig
from asyncllm.images import BuiltinImageProcessor, ImageProcessor
from asyncllm.kernels import AttentionMetadata, KernelOps, KVCache
from asyncllm.models.llama import LlamaForCausalLM
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig


@dataclass(frozen=True)
class ImageEmbeds:
    """Rows to place in a step's embedded tokens: ``rows[i]`` replaces the embedding of flat token
    ``index[i]`` (``index`` ``[K]`` int64, ``rows`` ``[K, H]`` in the model's dtype)."""

    index: torch.Tensor
    rows: torch.Tensor


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return _QuickGELU()
    return nn.GELU()


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
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


class ClipMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = _activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """CLIP's vision transformer (pre-layernorm, no pooling head): ``[N, C, S, S]`` pixels -> the hidden
    states of ``config.feature_layers``, concatenated along the feature axis."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_hidden_layers))
        total = config.num_hidden_layers + 1
        self._wanted = [i % total for i in config.feature_layers]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"pixel_values: expected [N, {self.config.num_channels}, {size}, {size}], got {tuple(pixels.shape)}"
            )
        hidden = self.pre_layrnorm(self.embeddings(pixels))
        states = {0: hidden}
        last = max(self._wanted)
        for index, layer in enumerate(self.encoder.layers[:last], start=1):
            hidden = layer(hidden)
            states[index] = hidden
        return torch.cat([states[i] for i in self._wanted], dim=-1)


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
    CLIP preprocessing unless the loader sets the checkpoint's own)."""

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
            tower = ClipVisionTower(config.vision)
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
        """``[N, C, S, S]`` pixels -> ``[N, num_image_tokens, hidden_size]`` rows for the decoder."""
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
        ``LlamaForCausalLM.load_weights``, the vision tower's and projector's by name. The tower's unused
        ``post_layernorm`` is skipped; unexpected or missing names and wrong shapes raise ``ValueError``."""
        vision: dict[str, torch.Tensor] = {}

        def language() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                part, mapped = to_llava_names(name)
                if part == "language":
                    yield mapped, tensor
                elif not mapped.startswith("vision_tower.post_layernorm."):
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
