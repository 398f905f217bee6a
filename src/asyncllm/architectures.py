"""The architecture registry: every model family asyncllm serves, in one table.

Each ``ArchitectureSpec`` names a family, the Hugging Face ``architectures`` / ``model_type`` values and the
GGUF ``general.architecture`` values that map to it, which model definition runs it (``model``, a key of
``asyncllm.models``), and the flags in which families sharing a definition differ. ``ModelConfig`` copies
the flags in (``ModelConfig.from_hf_config``), so model code reads them from its config, never from the
family's name.

Adding a family that differs from an existing one only in flags is one entry here (plus tests against
its reference implementation); a family needing new layers also adds a model definition under
``models/`` and names it in ``model``. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

NormKind = Literal["rms", "rms_one_plus"]
ActivationKind = Literal["silu", "gelu_tanh"]
RopeKind = Literal["neox"]
CheckpointLayout = Literal["llama", "phi3", "internlm2"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One family. Flags left ``None`` are read from ``config.json``:

    - ``qkv_bias`` / ``o_proj_bias``: a bias on the fused q/k/v projection / on the output projection
      (``None``: ``attention_bias``, as Llama and Mistral read it for both);
    - ``qk_norm``: an RMSNorm over each head of q and k before rotary (Qwen3-style);
    - ``checkpoint_layout``: how the checkpoint names and packs the Llama tensors (``"llama"``: separate
      ``q/k/v_proj`` and ``gate/up_proj``; ``"phi3"``: fused ``qkv_proj`` and ``gate_up_proj``;
      ``"internlm2"``: ``wqkv`` grouped per KV head, ``wo``, ``w1/w3/w2``; see
      ``asyncllm.models.checkpoint_layouts``);
    - ``tie_word_embeddings``: the LM head shares the embedding (``None``: ``tie_word_embeddings``);
    - ``norm`` / ``activation``: the normalisation (``"rms_one_plus"``: RMSNorm scaled by ``1 + weight``, in
      float32) and the gated MLP's activation (``"gelu_tanh"``: GELU with the tanh approximation);
    - ``rope``: how rotary pairs dimensions (``"neox"``: rotate-half, the HF layout);
    - ``moe_renormalize``: for mixture-of-experts families (``model="moe"``), whether the top-k routing
      weights are renormalized to sum to one (``None``: ``norm_topk_prob``).
    """

    name: str
    model: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...] = ()
    qkv_bias: bool | None = None
    o_proj_bias: bool | None = None
    qk_norm: bool = False
    checkpoint_layout: CheckpointLayout = "llama"
    tie_word_embeddings: bool | None = None
    norm: NormKind = "rms"
    activation: ActivationKind = "silu"
    rope: RopeKind = "neox"
    moe_renormalize: bool | None = None


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        name="llama", model="llama", hf_architectures=("LlamaForCausalLM",), hf_model_types=("llama",),
        gguf_architectures=("llama",),
    ),
    ArchitectureSpec(
        name="mistral", model="llama", hf_architectures=("MistralForCausalLM",), hf_model_types=("mistral",),
    ),
    ArchitectureSpec(
        name="qwen2", model="llama", hf_architectures=("Qwen2ForCausalLM",), hf_model_types=("qwen2",),
        gguf_architectures=("qwen2",), qkv_bias=True, o_proj_bias=False,
    ),
    ArchitectureSpec(
        name="qwen3", model="llama", hf_architectures=("Qwen3ForCausalLM",), hf_model_types=("qwen3",),
        gguf_architectures=("qwen3",), qk_norm=True,
    ),
    ArchitectureSpec(
        name="phi3", model="llama", hf_architectures=("Phi3ForCausalLM",), hf_model_types=("phi3",),
        gguf_architectures=("phi3",), qkv_bias=False, o_proj_bias=False, checkpoint_layout="phi3",
    ),
    ArchitectureSpec(
        name="internlm2", model="llama", hf_architectures=("InternLM2ForCausalLM",),
        hf_model_types=("internlm2",), gguf_architectures=("internlm2",), checkpoint_layout="internlm2",
    ),
    # mixture of experts (models/moe.py)
    ArchitectureSpec(
        name="mixtral", model="moe", hf_architectures=("MixtralForCausalLM",), hf_model_types=("mixtral",),
        moe_renormalize=True,
    ),
    ArchitectureSpec(
        name="qwen2_moe", model="moe", hf_architectures=("Qwen2MoeForCausalLM",), hf_model_types=("qwen2_moe",),
        gguf_architectures=("qwen2moe",), qkv_bias=True, o_proj_bias=False,
    ),
    ArchitectureSpec(
        name="qwen3_moe", model="moe", hf_architectures=("Qwen3MoeForCausalLM",), hf_model_types=("qwen3_moe",),
        gguf_architectures=("qwen3moe",), qk_norm=True,
    ),
    ArchitectureSpec(
        name="deepseek", model="moe", hf_architectures=("DeepseekForCausalLM",), hf_model_types=("deepseek",),
    ),
    # sandwich-normed decoders with sliding-window layers (models/gemma.py)
    ArchitectureSpec(
        name="gemma2", model="gemma", hf_architectures=("Gemma2ForCausalLM",), hf_model_types=("gemma2",),
        gguf_architectures=("gemma2",), norm="rms_one_plus", activation="gelu_tanh",
    ),
    ArchitectureSpec(
        name="gemma3", model="gemma", hf_architectures=("Gemma3ForCausalLM",), hf_model_types=("gemma3_text",),
        gguf_architectures=("gemma3",), qk_norm=True, norm="rms_one_plus", activation="gelu_tanh",
    ),
    # vision-language: a CLIP or SigLIP vision tower and projector in front of a Llama decoder (models/llava.py);
    # config.json nests the decoder's shape under text_config
    ArchitectureSpec(
        name="llava", model="llava", hf_architectures=("LlavaForConditionalGeneration",),
        hf_model_types=("llava",),
    ),
    # LLaVA-NeXT: the same parts, images tiled at several resolutions (anyres) with a newline row per
    # feature row (models/llava_next.py); the decoder's flags come from text_config's own family
    ArchitectureSpec(
        name="llava_next", model="llava_next", hf_architectures=("LlavaNextForConditionalGeneration",),
        hf_model_types=("llava_next",),
    ),
    # Qwen2-VL: a patch-grid vision tower with a patch merger in front of a Qwen2 decoder whose rotary
    # positions have three components (M-RoPE; models/qwen2_vl.py, asyncllm.mrope)
    ArchitectureSpec(
        name="qwen2_vl", model="qwen2_vl", hf_architectures=("Qwen2VLForConditionalGeneration",),
        hf_model_types=("qwen2_vl",), qkv_bias=True, o_proj_bias=False,
    ),
)


def _index(key: str) -> dict[str, ArchitectureSpec]:
    table: dict[str, ArchitectureSpec] = {}
    for spec in ARCHITECTURES:
        for value in getattr(spec, key):
            if value in table:
                raise ValueError(f"{key}: {value!r} maps to both {table[value].name!r} and {spec.name!r}")
            table[value] = spec
    return table


_BY_NAME = {spec.name: spec for spec in ARCHITECTURES}
_BY_HF_ARCHITECTURE = _index("hf_architectures")
_BY_HF_MODEL_TYPE = _index("hf_model_types")
_BY_GGUF = _index("gguf_architectures")


def supported_hf_architectures() -> list[str]:
    return sorted(_BY_HF_ARCHITECTURE)


def supported_gguf_architectures() -> list[str]:
    return sorted(_BY_GGUF)


def spec_named(name: str) -> ArchitectureSpec:
    """The family called ``name`` (``ModelConfig.architecture``); unknown names raise ``ValueError``."""
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"architecture: unsupported {name!r}; supported: {sorted(_BY_NAME)}")
    return spec


def spec_for_hf_config(hf: Mapping[str, Any]) -> ArchitectureSpec:
    """The family of a ``config.json`` dict: its first known ``architectures`` entry, else its ``model_type``;
    neither known raises ``ValueError`` naming them and what is supported."""
    archs = hf.get("architectures") or []
    for arch in archs:
        spec = _BY_HF_ARCHITECTURE.get(arch)
        if spec is not None:
            return spec
    spec = _BY_HF_MODEL_TYPE.get(str(hf.get("model_type")))
    if spec is not None:
        return spec
    raise ValueError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {supported_hf_architectures()}"
    )


def spec_for_gguf(architecture: object) -> ArchitectureSpec:
    """The family of a GGUF file's ``general.architecture``; unknown values raise ``ValueError``."""
    spec = _BY_GGUF.get(str(architecture))
    if spec is None:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported (supported: {supported_gguf_architectures()})"
        )
    return spec
