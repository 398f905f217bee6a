"""Qwen2-VL (Hugging Face ``Qwen2VLForConditionalGeneration``): the patch-grid vision tower of
``qwen2_vl_vision`` in front of a Qwen2 decoder (``LlamaForCausalLM`` with q/k/v biases) whose rotary
positions are M-RoPE (``asyncllm.mrope``).

An image arrives as its patches ``[t*h*w, C*T*P*P]`` and its token grid ``(t, h / merge, w / merge)``
(``ImageSpan.grid``); ``encode_image_grids`` runs the patches of all images of a step through one tower
call (attention kept within each image) and returns each image's ``t*h*w / merge**2`` prompt rows, which
``forward`` places at the image's placeholder tokens (``ImageEmbeds``). Positions are ``[3, T]`` when a
step holds tokens whose three components differ (image tokens and the text after them), else ``[T]``;
the runner takes them from each sequence's ``rope_positions``. Videos are not supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from asyncllm.config import ModelConfig
from asyncllm.images import BuiltinImageProcessor, ImageProcessor
from asyncllm.kernels import AttentionMetadata, KernelOps, KVCache
from asyncllm.models.llama import LlamaForCausalLM
from asyncllm.models.llava import ImageEmbeds
from asyncllm.models.qwen2_vl_vision import Qwen2VisionTower, vision_inv_freq
from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig


def to_qwen2_vl_names(name: str) -> tuple[str, str]:
    """``(part, name)``: ``"language"`` with the Llama checkpoint name, or ``"vision"`` with the name under
    this module's ``visual``. Reads the transformers 5 layout (``model.language_model.*``,
    ``model.visual.*``, ``lm_head.*``) and the older one (``model.*``, ``visual.*``, ``lm_head.*``)."""
    if name.startswith("model.language_model."):
        return "language", "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return "vision", name.removeprefix("model.")
    if name.startswith("visual."):
        return "vision", name
    return "language", name


class Qwen2VLForConditionalGeneration(nn.Module):
    """A Qwen2 causal LM (``language_model``) with M-RoPE positions that also takes images (see the module
    docstring). ``mrope_section`` (from the config) tells the runner to pass ``[3, T]`` positions."""

    definition = "qwen2_vl"

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
        if config.vision is None or not config.vision.patch_grid:
            raise ValueError(f"vision_config: architecture {config.architecture!r} needs a Qwen2-VL vision_config")
        if config.vision.merged_size != config.hidden_size:
            raise ValueError(f"vision_config.hidden_size: the merger must output the decoder's width "
                             f"{config.hidden_size}, got {config.vision.merged_size}")
        self.config = config
        self.vision = config.vision
        self.mrope_section = config.mrope_section
        self.language_model = LlamaForCausalLM(config, ops, dtype=dtype, device=device, quantization=quantization)
        with torch.device("meta"):
            tower = Qwen2VisionTower(config.vision)
        self.visual = tower.to_empty(device=device).to(dtype)
        self.visual.inv_freq = vision_inv_freq(config.vision, device)  # to_empty left it uninitialised
        self.image_processor: ImageProcessor = BuiltinImageProcessor(config.vision)

    @property
    def max_positions(self) -> int:
        return self.language_model.max_positions

    @property
    def image_token_id(self) -> int:
        return self.vision.image_token_id

    def encode_image_grids(self, patches: Sequence[torch.Tensor],
                           grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's prompt rows ``[t*h*w, H]`` from its patches ``[t*h*w*merge**2, C*T*P*P]`` and its
        token grid ``(t, h, w)``: one tower call for all of them."""
        merge = self.vision.spatial_merge_size
        patch_grids = [(t, h * merge, w * merge) for t, h, w in grids]
        weight = self.visual.patch_embed.proj.weight
        rows = self.visual(torch.cat([p.to(weight.device) for p in patches]), patch_grids)
        return list(rows.split([t * h * w for t, h, w in grids]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
        images: ImageEmbeds | None = None,
    ) -> torch.Tensor:
        """``positions``: ``[T]``, or ``[3, T]`` M-RoPE components; ``images`` replaces the embeddings of
        the tokens it indexes."""
        if positions.shape[-1] != input_ids.shape[0] or positions.dim() not in (1, 2):
            raise ValueError(f"positions: expected [T] or [3, T] with T={input_ids.shape[0]}, "
                             f"got {tuple(positions.shape)}")
        embeds = None
        if images is not None:
            embeds = self.language_model.model.embed_tokens(input_ids)
            embeds = embeds.index_copy(0, images.index, images.rows.to(embeds.dtype))
        return self.language_model.model(input_ids, positions, meta, kv_caches, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a Qwen2-VL checkpoint (either naming layout, see ``to_qwen2_vl_names``): the decoder's
        tensors by ``LlamaForCausalLM.load_weights``, the tower's by name; unexpected or missing names and
        wrong shapes raise ``ValueError``."""
        vision: dict[str, torch.Tensor] = {}

        def language() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                part, mapped = to_qwen2_vl_names(name)
                if part == "language":
                    yield mapped, tensor
                else:
                    vision[mapped] = tensor

        self.language_model.load_weights(language())
        params = {name: p for name, p in self.named_parameters() if name.startswith("visual.")}
        unexpected = sorted(set(vision) - set(params))
        missing = sorted(set(params) - set(vision))
        if unexpected or missing:
            raise ValueError(f"Qwen2-VL checkpoint: unexpected tensors {unexpected}, missing {missing}")
        with torch.no_grad():
            for name, param in params.items():
                tensor = vision[name]
                if tensor.shape != param.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)
