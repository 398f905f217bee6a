"""Validated configuration dataclasses: the model's shape and the engine's resources.

Both are frozen: a config is a value, checked once in ``__post_init__``; nothing mutates it later.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from asyncllm.architectures import ArchitectureSpec, spec_for_hf_config, spec_named
from asyncllm.cpu_threads import default_num_threads

KernelBackendName = Literal["auto", "torch", "triton"]
KV_CACHE_DTYPES: dict[str, tuple[int, int] | None] = {"auto": None, "int8": (8, 8), "int4": (4, 4), "k8v4": (8, 4)}
"""``EngineConfig.kv_cache_dtype`` values and the ``(key_bits, value_bits)`` each stores (``None``: the
compute dtype)."""
QUANT_POLICIES: dict[int, str] = {0: "auto", 8: "int8", 4: "int4"}
"""``EngineConfig.quant_policy`` values (bits; 0 = off) and the ``kv_cache_dtype`` each means."""
NATIVE_KERNELS_ENV = "ASYNCLLM_NATIVE_KERNELS"


def native_kernels_default() -> bool:
    """The default of ``EngineConfig.native_kernels``: on unless ``$ASYNCLLM_NATIVE_KERNELS`` is ``0``,
    ``false``, ``off`` or ``no``. Read when a config is made, never by the kernels themselves."""
    return os.environ.get(NATIVE_KERNELS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


def _check_rope_scaling_factor(factor: object) -> None:
    _require(isinstance(factor, (int, float)) and not isinstance(factor, bool)
             and math.isfinite(factor) and factor > 0, "rope_scaling_factor",
             f"must be a finite number > 0, got {factor!r}")


@dataclass(frozen=True)
class MoeConfig:
    """The mixture-of-experts part of a decoder: ``num_experts`` experts of ``intermediate_size`` each, ``top_k``
    of them per token (softmax, top-k, renormalized when ``renormalize``), an optional shared expert (a dense
    gated MLP of ``shared_expert_intermediate_size``, 0: none, scaled by ``sigmoid(shared_expert_gate(x))``
    when ``shared_expert_gated``, else added as is), in the layers ``sparse_layers`` (the others run the dense
    MLP of ``ModelConfig.intermediate_size``).

    Invariants: ``0 < top_k <= num_experts``; sizes positive (the shared one may be 0).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    sparse_layers: tuple[int, ...]
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True

    def __post_init__(self) -> None:
        _require(self.num_experts > 0, "num_experts", f"must be positive, got {self.num_experts}")
        _require(0 < self.top_k <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, {self.num_experts}], got {self.top_k}")
        _require(self.intermediate_size > 0, "moe_intermediate_size", "must be positive")
        _require(self.shared_expert_intermediate_size >= 0, "shared_expert_intermediate_size", "must be >= 0")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], renormalize: bool | None) -> MoeConfig:
        """Mixtral (``num_local_experts``, every layer sparse) and Qwen2-MoE / Qwen3-MoE (``num_experts``,
        ``moe_intermediate_size``, Qwen2-MoE's shared expert; layer ``i`` is sparse unless listed in ``mlp_only_layers``
        and when ``(i + 1) % decoder_sparse_step == 0``) spellings; DeepSeek-MoE's (``n_routed_experts``) in
        ``_deepseek_moe``."""
        if hf.get("n_routed_experts") is not None:
            return cls._deepseek_moe(hf, renormalize)
        layers = int(hf["num_hidden_layers"])
        dense = set(hf.get("mlp_only_layers") or ())
        step = int(hf.get("decoder_sparse_step") or 1)
        return cls(
            num_experts=int(hf.get("num_local_experts") or hf.get("num_experts") or 0),
            top_k=int(hf.get("num_experts_per_tok") or 0),
            intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
            renormalize=renormalize if renormalize is not None else bool(hf.get("norm_topk_prob", False)),
            sparse_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        )

    @classmethod
    def _deepseek_moe(cls, hf: dict[str, Any], renormalize: bool | None) -> MoeConfig:
        """DeepSeek-MoE: ``n_routed_experts`` experts of ``moe_intermediate_size``; layer ``i`` is sparse when
        ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``; the ``n_shared_experts`` shared experts
        are one ungated MLP of ``n_shared_experts * moe_intermediate_size``; ``norm_topk_prob`` (default off)
        renormalizes. Only the ``"softmax"`` scoring function exists."""
        scoring = hf.get("scoring_func", "softmax")
        _require(scoring == "softmax", "scoring_func", f"only 'softmax' is supported, got {scoring!r}")
        layers = int(hf["num_hidden_layers"])
        first_dense = int(hf.get("first_k_dense_replace") or 0)
        freq = hf.get("moe_layer_freq", 1)
        _require(isinstance(freq, int) and not isinstance(freq, bool) and freq > 0, "moe_layer_freq",
                 f"must be a positive integer, got {freq!r}")
        inter = int(hf["moe_intermediate_size"])
        return cls(
            num_experts=int(hf["n_routed_experts"]),
            top_k=int(hf.get("num_experts_per_tok") or 0),
            intermediate_size=inter,
            renormalize=renormalize if renormalize is not None else bool(hf.get("norm_topk_prob", False)),
            sparse_layers=tuple(i for i in range(layers) if i >= first_dense and i % freq == 0),
            shared_expert_intermediate_size=int(hf.get("n_shared_experts") or 0) * inter,
            shared_expert_gated=False,
        )


@dataclass(frozen=True)
class VisionConfig:
    """A LLaVA-style image path: a vision encoder (``config.json``'s ``vision_config``; ``tower`` ``"clip"``
    or ``"siglip"``, from its ``model_type``) whose hidden states of ``feature_layers`` (indices into the
    encoder's hidden states, 0 being the embeddings; several are concatenated) feed a two-layer projector
    into the decoder's embedding space.

    ``select_strategy``: ``"default"`` drops the first row of every tile's features (CLIP's class token; a
    SigLIP tower has none, and Hugging Face drops its first patch row all the same), ``"full"`` keeps every
    row. ``image_token_id``: the prompt token each of an image's feature rows replaces.

    ``image_grid_pinpoints`` (LLaVA-NeXT; empty for LLaVA-1.5): the ``(height, width)`` resolutions an image
    is tiled at (``asyncllm.anyres``); an image then takes a number of tokens that depends on its size, and
    ``num_image_tokens`` is only the base tile's share.

    Invariants: ``tower`` is ``"clip"`` or ``"siglip"``; ``image_size`` is a multiple of ``patch_size``;
    ``hidden_size % num_attention_heads == 0``; every pinpoint is a positive multiple of ``image_size`` on
    both sides, and when tiled every tile keeps exactly its ``feature_side ** 2`` patch rows (CLIP with
    ``"default"``, SigLIP with ``"full"``: the only pairings whose rows Hugging Face's ``pack_image_features``
    lays out into the tile grid).

    Qwen2-VL (``tower`` ``"qwen2_vl"``, ``from_qwen2_vl_config``): images of any size are cut into
    ``patch_size`` patches over ``temporal_patch_size`` frames (``[num_patches, C * T * P * P]``) and every
    ``spatial_merge_size ** 2`` neighbouring patches merge into one prompt token of the decoder's width
    (``merged_size``); ``hidden_size`` is the tower's width (``embed_dim``), ``intermediate_size``
    ``embed_dim * mlp_ratio``. ``image_size`` is then the smallest side an image can take
    (``patch_size * spatial_merge_size``: one token); the image processor decides each image's grid.
    ``vision_start_token_id`` / ``vision_end_token_id``: the tokens a chat image part is wrapped in
    (``None``: the image token stands alone, as for LLaVA).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)
    select_strategy: str = "default"
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    tower: str = "clip"
    spatial_merge_size: int = 1
    temporal_patch_size: int = 1
    merged_size: int = 0
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def __post_init__(self) -> None:
        _require(self.tower in ("clip", "siglip", "qwen2_vl"), "vision_config.model_type",
                 f"tower must be 'clip', 'siglip' or 'qwen2_vl', got {self.tower!r}")
        for name in ("spatial_merge_size", "temporal_patch_size"):
            _require(getattr(self, name) > 0, f"vision_config.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "image_size", "patch_size", "num_channels"):
            _require(getattr(self, name) > 0, f"vision_config.{name}", f"must be positive, got {getattr(self, name)}")
        _require(self.image_size % self.patch_size == 0, "vision_config.patch_size",
                 f"{self.patch_size} does not divide image_size={self.image_size}")
        _require(self.hidden_size % self.num_attention_heads == 0, "vision_config.num_attention_heads",
                 f"{self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
        _require(self.select_strategy in ("default", "full"), "vision_feature_select_strategy",
                 f"must be 'default' or 'full', got {self.select_strategy!r}")
        _require(self.hidden_act in VISION_ACTIVATIONS, "vision_config.hidden_act",
                 f"must be one of {', '.join(map(repr, VISION_ACTIVATIONS))}, got {self.hidden_act!r}")
        _require(self.projector_hidden_act == "gelu", "projector_hidden_act",
                 f"only 'gelu' is supported, got {self.projector_hidden_act!r}")
        _require(self.rows_per_tile > 0, "vision_feature_select_strategy",
                 f"'default' drops the only row of a {self.num_patches}-patch SigLIP tile; use 'full'")
        layers = self.num_hidden_layers
        _require(len(self.feature_layers) > 0 and all(-layers - 1 <= i <= layers for i in self.feature_layers),
                 "vision_feature_layer", f"must index the {layers + 1} hidden states, got {self.feature_layers}")
        for pin in self.image_grid_pinpoints:
            _require(len(pin) == 2 and all(p > 0 and p % self.image_size == 0 for p in pin), "image_grid_pinpoints",
                     f"each must be (height, width), multiples of image_size={self.image_size}, got {pin!r}")
        if self.image_grid_pinpoints and self.rows_per_tile != self.num_patches:
            wanted = "default" if self.class_token else "full"
            tower_name = "CLIP" if self.class_token else "SigLIP"
            effect = "keeps the class token's row" if self.class_token else "drops the first patch row"
            raise ValueError(
                f"vision_feature_select_strategy: tiled (anyres) images with a {tower_name} tower need "
                f"{wanted!r}; {self.select_strategy!r} {effect}, so a tile's rows no longer form its "
                f"{self.feature_side}x{self.feature_side} feature grid (Hugging Face's LLaVA-NeXT cannot lay them "
                f"out either)"
            )

    @property
    def patch_grid(self) -> bool:
        """Whether images are variable-size patch grids with M-RoPE positions (Qwen2-VL)."""
        return self.tower == "qwen2_vl"

    @classmethod
    def from_qwen2_vl_config(cls, hf: dict[str, Any]) -> VisionConfig:
        """From a Qwen2-VL ``config.json`` dict (``vision_config`` with transformers' defaults for what it
        omits; ``image_token_id`` at the top level)."""
        vision = hf.get("vision_config") or {}
        defaults = _QWEN2_VL_VISION_DEFAULTS

        def read(name: str) -> Any:
            return vision.get(name, defaults[name])

        image_token = hf.get("image_token_id")
        _require(image_token is not None, "image_token_id", "missing")
        embed_dim, merge, patch = int(read("embed_dim")), int(read("spatial_merge_size")), int(read("patch_size"))
        return cls(
            hidden_size=embed_dim,
            intermediate_size=int(embed_dim * float(read("mlp_ratio"))),
            num_hidden_layers=int(read("depth")),
            num_attention_heads=int(read("num_heads")),
            image_size=patch * merge,
            patch_size=patch,
            image_token_id=int(image_token),
            feature_layers=(-1,),
            select_strategy="full",
            num_channels=int(vision.get("in_chans", read("in_channels"))),  # "in_chans" in early configs
            layer_norm_eps=1e-6,
            hidden_act=str(read("hidden_act")),
            tower="qwen2_vl",
            spatial_merge_size=merge,
            temporal_patch_size=int(read("temporal_patch_size")),
            merged_size=int(read("hidden_size")),
            vision_start_token_id=hf.get("vision_start_token_id"),
            vision_end_token_id=hf.get("vision_end_token_id"),
        )

    @property
    def tiled(self) -> bool:
        """Whether images are tiled at ``image_grid_pinpoints`` (LLaVA-NeXT's anyres)."""
        return bool(self.image_grid_pinpoints)

    @property
    def class_token(self) -> bool:
        """Whether the tower prepends a class token's row to the patch rows (CLIP does, SigLIP does not)."""
        return self.tower == "clip"

    @property
    def feature_side(self) -> int:
        """Feature rows along one side of a tile: ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def rows_per_tile(self) -> int:
        """The feature rows one tile keeps: the tower's rows (patches, plus the class token for CLIP), less
        the first under ``"default"``."""
        return self.num_patches + int(self.class_token) - int(self.select_strategy == "default")

    @property
    def num_image_tokens(self) -> int:
        """The prompt tokens (feature rows) one untiled image takes (Qwen2-VL: the fewest an image takes,
        one; its processor decides the real count)."""
        return 1 if self.patch_grid else self.rows_per_tile

    def image_text(self, id_to_token: Callable[[int], str | None]) -> str | None:
        """The text a chat image part becomes: the image token's, between the vision start and end tokens'
        when the model has them; ``None`` when the tokenizer lacks one of them."""
        ids = [self.vision_start_token_id, self.image_token_id, self.vision_end_token_id]
        texts = [id_to_token(i) for i in ids if i is not None]
        return None if any(text is None for text in texts) else "".join(texts)  # type: ignore[arg-type]

    @classmethod
    def from_llava_config(cls, hf: dict[str, Any], *, tiled: bool = False) -> VisionConfig:
        """From a LLaVA ``config.json`` dict; ``tiled`` (LLaVA-NeXT) also reads ``image_grid_pinpoints``.
        Values missing from ``vision_config`` take the defaults of its ``model_type``'s Hugging Face config
        class (``clip_vision_model`` when absent)."""
        vision = hf.get("vision_config") or {}
        pinpoints = hf.get("image_grid_pinpoints") if tiled else ()
        _require(not tiled or (isinstance(pinpoints, list) and len(pinpoints) > 0), "image_grid_pinpoints",
                 f"must be a non-empty list of [height, width], got {pinpoints!r}")
        model_type = vision.get("model_type", "clip_vision_model")
        _require(model_type in VISION_TOWERS, "vision_config.model_type",
                 f"must be one of {', '.join(map(repr, VISION_TOWERS))}, got {model_type!r}")
        tower = VISION_TOWERS[model_type]
        defaults = _TOWER_DEFAULTS[tower]

        def read(name: str) -> Any:
            return vision.get(name, defaults[name])

        layer = hf.get("vision_feature_layer", -2)
        image_token = hf.get("image_token_id", hf.get("image_token_index"))
        _require(image_token is not None, "image_token_id", "missing")
        return cls(
            hidden_size=int(read("hidden_size")),
            intermediate_size=int(read("intermediate_size")),
            num_hidden_layers=int(read("num_hidden_layers")),
            num_attention_heads=int(read("num_attention_heads")),
            image_size=int(read("image_size")),
            patch_size=int(read("patch_size")),
            image_token_id=int(image_token),
            feature_layers=(int(layer),) if isinstance(layer, int) else tuple(int(i) for i in layer),
            select_strategy=str(hf.get("vision_feature_select_strategy", "default")),
            num_channels=int(read("num_channels")),
            layer_norm_eps=float(read("layer_norm_eps")),
            hidden_act=str(read("hidden_act")),
            projector_hidden_act=str(hf.get("projector_hidden_act", "gelu")),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)),
            image_grid_pinpoints=tuple(tuple(int(v) for v in pin) for pin in pinpoints or ()),
            tower=tower,
        )


VISION_TOWERS: Mapping[str, str] = MappingProxyType({"clip_vision_model": "clip", "siglip_vision_model": "siglip"})
"""``vision_config.model_type`` -> ``VisionConfig.tower``."""

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
"""The ``vision_config.hidden_act`` values the towers implement."""

_QWEN2_VL_VISION_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    # transformers' Qwen2VLVisionConfig defaults
    "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
    "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
})

_SHARED_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "image_size": 224, "num_channels": 3}
_TOWER_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # transformers' CLIPVisionConfig and SiglipVisionConfig defaults
    "clip": MappingProxyType({**_SHARED_DEFAULTS, "patch_size": 32, "layer_norm_eps": 1e-5,
                              "hidden_act": "quick_gelu"}),
    "siglip": MappingProxyType({**_SHARED_DEFAULTS, "patch_size": 16, "layer_norm_eps": 1e-6,
                                "hidden_act": "gelu_pytorch_tanh"}),
})


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder, in Hugging Face ``config.json`` terms, and its family's flags.

    ``architecture`` names a family of the registry (``asyncllm.architectures``); ``qkv_bias``,
    ``o_proj_bias``, ``qk_norm``, ``checkpoint_layout``, ``hidden_act`` and ``norm`` are its flags resolved
    against the checkpoint's config (see ``ArchitectureSpec``). ``moe`` is set for mixture-of-experts
    families only.

    Read for the families that use them (Gemma 2/3; ``None`` / empty elsewhere): ``query_pre_attn_scalar``
    (attention scale ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``),
    ``attn_logit_softcapping`` / ``final_logit_softcapping`` (``cap * tanh(x / cap)`` on attention scores /
    on the logits), ``sliding_window`` and ``sliding_layers`` (the layers that attend to only the last
    ``sliding_window`` positions), and ``rope_local_theta`` (the rotary base of the sliding layers, which
    take no rotary scaling; ``None``: every layer rotates alike).

    ``vision``: the image path of a vision-language family (LLaVA, Qwen2-VL); ``None`` for text-only models.
    ``mrope_section``: Qwen2-VL's split of the rotary frequencies among the ``(t, h, w)`` position
    components (``asyncllm.mrope``); empty for 1-D rotary.

    Invariants: ``num_attention_heads % num_key_value_heads == 0``; ``head_dim`` is even (rotary pairs);
    ``architecture`` is registered.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    checkpoint_layout: str = "llama"
    hidden_act: str = "silu"
    norm: str = "rms"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    vision: VisionConfig | None = None
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 f"must be positive or None, got {self.sliding_window}")
        _require(all(0 <= i < self.num_hidden_layers for i in self.sliding_layers), "layer_types",
                 f"sliding layers {self.sliding_layers} outside [0, {self.num_hidden_layers})")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, f"must be positive or None, got {value}")
        spec_named(self.architecture)

    def with_rope_scaling_factor(self, factor: float) -> ModelConfig:
        """This config with its context extended ``factor`` times by dynamic NTK rotary scaling
        (``EngineConfig.rope_scaling_factor``), replacing any scaling of its own; positions below
        ``max_position_embeddings`` keep their unscaled rotation (see ``layers.rotary``)."""
        _check_rope_scaling_factor(factor)
        return dataclasses.replace(self, rope_scaling={"rope_type": "dynamic", "factor": float(factor)})

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (``None``: it attends to its whole context)."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def all_layers_sliding(self) -> bool:
        """Whether every layer has a sliding window (then no layer reads keys older than it)."""
        return self.sliding_window is not None and len(set(self.sliding_layers)) == self.num_hidden_layers

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict, resolving its family's flags from the registry;
        unknown architectures raise ``ValueError``."""
        spec = spec_for_hf_config(hf)
        vision = None
        flags = spec  # the family whose flags the decoder takes: a vision-language model's text family
        if spec.model in ("llava", "llava_next"):
            vision = VisionConfig.from_llava_config(hf, tiled=spec.model == "llava_next")
            text = hf.get("text_config") or {}
            text_type = text.get("model_type", "llama")
            flags = _text_family(text_type)
            _require(flags is not None and flags.model == "llama", "text_config.model_type",
                     f"only Llama-style decoders (llama, mistral, qwen2, ...) are supported, got {text_type!r}")
            hf = {**text, "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
        mrope_section: tuple[int, ...] = ()
        if spec.model == "qwen2_vl":
            vision = VisionConfig.from_qwen2_vl_config(hf)
            hf, mrope_section = _qwen2_vl_text(hf)
        gemma = _gemma_fields(hf) if spec.model == "gemma" else {}
        if gemma:
            hf = gemma.pop("hf")
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None and isinstance(hf.get("rope_parameters"), dict):
            rope_theta = hf["rope_parameters"].get("rope_theta")
            if rope_scaling is None and hf["rope_parameters"].get("rope_type", "default") != "default":
                rope_scaling = dict(hf["rope_parameters"])
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_type = "longrope" if rope_type == "su" else rope_type
            rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        if rope_scaling is not None and rope_scaling["rope_type"] in ("llama3", "yarn", "longrope"):
            # As Hugging Face: a top-level original_max_position_embeddings (Phi-3) wins over the dict's.
            original = hf.get("original_max_position_embeddings") or rope_scaling.get(
                "original_max_position_embeddings") or hf.get("max_position_embeddings", 4096)
            rope_scaling["original_max_position_embeddings"] = int(original)
        rope_parameters = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
        partial = hf.get("partial_rotary_factor", rope_parameters.get("partial_rotary_factor", 1.0))
        _require(partial is None or float(partial) == 1.0, "partial_rotary_factor",
                 f"partial rotary embeddings are not supported, got {partial}")
        # InternLM2 names its attention bias flag "bias".
        attention_bias = bool(hf.get("attention_bias", hf.get("bias", False)))
        return cls(
            architecture=spec.name,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=(
                flags.tie_word_embeddings if flags.tie_word_embeddings is not None
                else bool(hf.get("tie_word_embeddings", False))
            ),
            qkv_bias=flags.qkv_bias if flags.qkv_bias is not None else attention_bias,
            o_proj_bias=flags.o_proj_bias if flags.o_proj_bias is not None else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=flags.qk_norm,
            checkpoint_layout=flags.checkpoint_layout,
            hidden_act=flags.activation,
            norm=flags.norm,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            moe=MoeConfig.from_hf_config(hf, spec.moe_renormalize) if spec.model == "moe" else None,
            vision=vision,
            mrope_section=mrope_section,
            **gemma,
        )


def _qwen2_vl_text(hf: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """A Qwen2-VL config's decoder fields (nested under ``text_config`` as transformers 5 saves them, or
    at the top level as older checkpoints do) with the M-RoPE scaling entry removed, and its
    ``mrope_section`` (required: ``rope_scaling`` / ``rope_parameters``)."""
    text = hf.get("text_config")
    fields = {**hf, **text} if isinstance(text, dict) else dict(hf)
    fields.pop("text_config", None)
    fields.pop("vision_config", None)
    # as transformers reads it: tied when either the top level or text_config says so
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings")) or bool(fields.get("tie_word_embeddings"))
    section = None
    for key in ("rope_scaling", "rope_parameters"):
        rope = fields.get(key)
        if not isinstance(rope, dict):
            continue
        rope = dict(rope)
        section = rope.pop("mrope_section", section)
        if rope.get("rope_type", rope.get("type")) == "mrope":
            rope["rope_type"] = "default"
            rope.pop("type", None)
        fields[key] = rope
    if fields.get("rope_scaling") is not None and fields["rope_scaling"].get("rope_type", "default") == "default":
        fields["rope_scaling"] = None
    _require(isinstance(section, list) and all(isinstance(v, int) for v in section), "rope_scaling.mrope_section",
             f"Qwen2-VL needs a list of ints, got {section!r}")
    return fields, tuple(section)  # type: ignore[arg-type]


def _text_family(model_type: str) -> ArchitectureSpec | None:
    """The registered family of a vision-language config's ``text_config.model_type`` (``None``: unknown)."""
    try:
        return spec_for_hf_config({"model_type": model_type})
    except ValueError:
        return None


def _gemma_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3's own ``config.json`` fields as ``ModelConfig`` fields, plus (``"hf"``) the config with its
    global rotary settings where the generic parser reads them.

    Layer ``i`` slides when ``layer_types[i] == "sliding_attention"``; without ``layer_types``, unless
    ``(i + 1) % sliding_window_pattern == 0`` (Gemma 2 alternates: pattern 2; Gemma 3: 6). The sliding
    layers' rotary base is ``rope_local_base_freq``, or, in the per-layer-type ``rope_parameters`` of newer
    configs, the ``sliding_attention`` entry's ``rope_theta``; the global layers' come from ``rope_theta`` /
    ``rope_scaling`` or the ``full_attention`` entry.
    """
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:
        default_pattern = 6 if hf.get("model_type") == "gemma3_text" or "rope_local_base_freq" in hf else 2
        pattern = int(hf.get("sliding_window_pattern") or default_pattern)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    _require(len(types) == layers and set(types) <= {"sliding_attention", "full_attention"}, "layer_types",
             f"expected {layers} of 'sliding_attention' / 'full_attention', got {types!r}")
    window = hf.get("sliding_window")
    local_theta = hf.get("rope_local_base_freq")
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        local = rope.get("sliding_attention") or {}
        local_type = local.get("rope_type", "default")
        _require(local_type == "default", "rope_parameters",
                 f"sliding layers' rotary scaling {local_type!r} is not supported")
        local_theta = local.get("rope_theta", local_theta)
        hf = {**hf, "rope_parameters": rope["full_attention"]}
    elif hf.get("model_type") == "gemma3_text" and local_theta is None:
        local_theta = 10000.0
    scalar = hf.get("query_pre_attn_scalar")
    caps = {name: (float(hf[name]) if hf.get(name) else None)
            for name in ("attn_logit_softcapping", "final_logit_softcapping")}
    return {
        "hf": {"tie_word_embeddings": True, **hf},  # Gemma checkpoints ship no LM head unless they say so
        "query_pre_attn_scalar": None if scalar is None else float(scalar),
        "sliding_window": int(window) if window else None,
        "sliding_layers": tuple(i for i, kind in enumerate(types) if kind == "sliding_attention") if window else (),
        "rope_local_theta": None if local_theta is None else float(local_theta),
        **caps,
    }


@dataclass(frozen=True)
class EngineConfig:
    """Resources and policy of one engine.

    ``num_kv_blocks``: explicit pool size; when ``None`` it is derived from ``kv_cache_tokens`` on CPU or
    ``gpu_memory_fraction`` on CUDA. ``max_num_batched_tokens`` is the per-step token budget shared by
    decodes and prefill chunks.

    ``cuda_graph_batch_sizes``: the decode batch sizes captured as CUDA graphs on a CUDA device (a decode
    batch is padded up to the next captured size; larger batches and prefill steps run eagerly).
    ``enforce_eager``: never capture CUDA graphs.

    ``native_kernels``: on CPU, run the C decode kernels where they build (default from
    ``$ASYNCLLM_NATIVE_KERNELS``); ``native_layer_max_rows``: decode steps of up to this many rows run each
    fusable decoder layer as one C call (0: never), a machine-tuned threshold (see ``kernels.cpu_native``).

    ``seed``: seeds the engine's shared generator, which every request without its own
    ``SamplingParams.seed`` draws from. ``None`` (the default) takes a fresh random seed per engine, so
    unseeded sampling differs from one run to the next; an int makes the unseeded requests of a run
    reproducible as long as the same requests are submitted in the same order. A request's own ``seed`` is
    reproducible whatever the engine seed.

    ``rope_scaling_factor``: extend the model's context this many times with dynamic NTK rotary scaling
    (``ModelConfig.with_rope_scaling_factor``): the model's positions, hence ``max_model_len``, grow by the
    factor; a scaling in the checkpoint's own config is replaced only when this is set.
    ``num_threads``: the CPU threads of torch's intra-op ops and the native C kernels, set process-wide
    (``torch.set_num_threads``) when the engine is built; ``None`` (the default) is
    ``cpu_threads.default_num_threads()``: the CPUs this process may use (affinity, cgroup quota,
    physical cores, the least of them). ``adaptive_threads``: on CPU, before each step, run on fewer threads
    (at least 1) while other processes keep the allowed CPUs busy, and on ``num_threads`` again once they
    stop (``thread_governor``).

    ``load_progress``: while ``from_pretrained`` loads the weights, show a progress bar over the tensors on
    stderr when stderr is a terminal and loading takes over a second (``load_progress.DELAY_S``).

    ``max_images_per_request`` / ``max_image_pixels``: what one request to a vision-language model may
    hold: at most this many images (in a session turn: every image of the transcript), each of at most
    this many pixels (width times height of the encoded image, checked before it is decoded); more is a
    ``ValueError`` naming the field.

    ``dequantize_weights``: decode a weight-only quantized checkpoint (GGUF block types, AWQ, GPTQ,
    compressed-tensors) to dense weights in ``dtype`` at load, instead of keeping its weights packed.

    ``kv_cache_dtype``: ``"auto"`` stores keys and values in the compute dtype; ``"int8"`` / ``"int4"``
    quantize them as they are written (per token and KV head, scale and zero point beside each block in the
    compute dtype; 4-bit keys as residuals against their block's first token with a pair per 16 dimensions:
    ``kernels.kv_quant``), so the same memory holds about 1.9x / 2.8x the tokens of a 16-bit cache;
    ``"k8v4"`` keeps keys in int8 and values in int4 (about 2.5x). ``quant_policy`` is the int8 /
    int4 choice in bits (``8`` / ``4``, ``0`` = off), for those used to that name; giving both, they must
    agree (``k8v4`` has no ``quant_policy`` spelling). ``kv_cache_bytes``: the KV pool's memory budget in bytes (all
    layers, keys, values and scales); when set it sizes the pool instead of ``kv_cache_tokens`` /
    ``gpu_memory_fraction`` (``num_kv_blocks`` still wins).

    ``tensor_parallel_size``: split the model over this many ranks, each a worker process the engine
    starts (``asyncllm.distributed``; ``from_pretrained`` only): CUDA rank ``r`` runs on ``cuda:r`` over NCCL,
    CPU ranks over gloo. With more than one rank, ``device`` must be ``auto``, ``cpu`` or ``cuda`` (not one
    GPU), ``num_threads`` counts threads per rank, and CUDA graphs, the fused CPU decode layer and the thread
    governor are off.
    """

    device: str = "auto"
    dtype: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_tokens: int = 32768
    gpu_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kernel_backend: KernelBackendName = "auto"
    seed: int | None = None
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    enforce_eager: bool = False
    native_kernels: bool = field(default_factory=native_kernels_default)
    native_layer_max_rows: int = 4
    dequantize_weights: bool = False
    kv_cache_dtype: str = "auto"
    quant_policy: int = 0
    kv_cache_bytes: int | None = None
    rope_scaling_factor: float | None = None
    num_threads: int | None = None
    adaptive_threads: bool = True
    load_progress: bool = True
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and (self.block_size & (self.block_size - 1)) == 0, "block_size",
                 f"must be a positive power of two, got {self.block_size}")
        _require(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be positive")
        _require(self.kv_cache_tokens > 0, "kv_cache_tokens", "must be positive")
        _require(0.0 < self.gpu_memory_fraction <= 1.0, "gpu_memory_fraction", "must be in (0, 1]")
        _require(self.max_num_seqs > 0, "max_num_seqs", "must be positive")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be positive")
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        _require(self.kernel_backend in ("auto", "torch", "triton"), "kernel_backend",
                 f"must be 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
                 f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        sizes = self.cuda_graph_batch_sizes
        _require(isinstance(sizes, tuple) and len(sizes) > 0, "cuda_graph_batch_sizes",
                 f"must be a non-empty tuple of positive ints, got {sizes!r}")
        _require(all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes),
                 "cuda_graph_batch_sizes", f"must hold positive ints, got {sizes!r}")
        _require(len(set(sizes)) == len(sizes), "cuda_graph_batch_sizes",
                 f"must not repeat a size, got {sizes!r}")
        _require(isinstance(self.enforce_eager, bool), "enforce_eager",
                 f"must be a bool, got {self.enforce_eager!r}")
        _require(isinstance(self.native_kernels, bool), "native_kernels",
                 f"must be a bool, got {self.native_kernels!r}")
        _require(isinstance(self.native_layer_max_rows, int) and self.native_layer_max_rows >= 0,
                 "native_layer_max_rows", f"must be an int >= 0, got {self.native_layer_max_rows!r}")
        _require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
                 "seed", f"must be an int or None, got {self.seed!r}")
        _require(isinstance(self.dequantize_weights, bool), "dequantize_weights",
                 f"must be a bool, got {self.dequantize_weights!r}")
        if self.rope_scaling_factor is not None:
            _check_rope_scaling_factor(self.rope_scaling_factor)
        _require(self.num_threads is None or (isinstance(self.num_threads, int)
                                               and not isinstance(self.num_threads, bool)
                                               and self.num_threads >= 1),
                 "num_threads", f"must be an int >= 1 or None, got {self.num_threads!r}")
        _require(isinstance(self.adaptive_threads, bool), "adaptive_threads",
                 f"must be a bool, got {self.adaptive_threads!r}")
        _require(isinstance(self.load_progress, bool), "load_progress",
                 f"must be a bool, got {self.load_progress!r}")
        for name in ("max_images_per_request", "max_image_pixels"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     f"must be an int >= 1, got {value!r}")
        if self.dtype is not None:
            _require(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _require(isinstance(self.kv_cache_dtype, str) and self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _require(not isinstance(self.quant_policy, bool) and self.quant_policy in QUANT_POLICIES, "quant_policy",
                 f"must be 0 (off), 8 (int8) or 4 (int4), got {self.quant_policy!r}")
        _require(self.quant_policy == 0 or self.kv_cache_dtype in ("auto", QUANT_POLICIES[self.quant_policy]),
                 "quant_policy", f"{self.quant_policy} means kv_cache_dtype={QUANT_POLICIES[self.quant_policy]!r}, "
                 f"which contradicts kv_cache_dtype={self.kv_cache_dtype!r}")
        _require(self.kv_cache_bytes is None or (isinstance(self.kv_cache_bytes, int) and self.kv_cache_bytes > 0),
                 "kv_cache_bytes", f"must be a positive int or None, got {self.kv_cache_bytes!r}")
        _require(isinstance(self.tensor_parallel_size, int) and not isinstance(self.tensor_parallel_size, bool)
                 and self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 f"must be an int >= 1, got {self.tensor_parallel_size!r}")
        _require(self.tensor_parallel_size == 1 or self.device in ("auto", "cpu", "cuda"), "tensor_parallel_size",
                 f"{self.tensor_parallel_size} ranks run on cuda:0..{self.tensor_parallel_size - 1} or on the CPU: "
                 f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def kv_cache_bits(self) -> tuple[int, int] | None:
        """Bits per cached key and per cached value (8 or 4 each), or ``None`` for a cache in the compute
        dtype."""
        return KV_CACHE_DTYPES[QUANT_POLICIES[self.quant_policy] if self.quant_policy else self.kv_cache_dtype]

    def resolved_num_threads(self) -> int:
        """``num_threads``, or the CPUs this process may use (``cpu_threads.default_num_threads``)."""
        return self.num_threads if self.num_threads is not None else default_num_threads()

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        """float32 on CPU (bf16 matmul is far slower there); bfloat16 on CUDA unless set."""
        _require(isinstance(self.native_kernels, bool), "native_kernels",
                 f"must be a bool, got {self.native_kernels!r}")
        _require(isinstance(self.native_layer_max_rows, int) and self.native_layer_max_rows >= 0,
                 "native_layer_max_rows", f"must be an int >= 0, got {self.native_layer_max_rows!r}")
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
