"""LLaVA-1.5-style models against Hugging Face's ``LlavaForConditionalGeneration``: a tiny random CLIP tower
(32x32 images, 8x8 patches: 16 image tokens), projector and 2-layer Llama, a prompt holding one image, run
through our paged path (prefill, then decode steps) with the reference and the CPU kernel bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps
from asyncllm.models import LlavaForConditionalGeneration, build_model
from asyncllm.models.llava import ImageEmbeds

from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches

ATOL = 1e-4
VOCAB = 128
IMAGE_TOKEN = 100
NUM_IMAGE_TOKENS = 16
OPS: dict[str, KernelOps] = {"reference": TORCH_OPS, "cpu": CPU_OPS}


def hf_llava(vocab: int = VOCAB, **overrides: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16, initializer_range=0.2)
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, initializer_range=0.2)
    settings: dict[str, Any] = dict(image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    settings.update(overrides)
    config = LlavaConfig(vision_config=vision, text_config=text, **settings)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def prompt_ids(seed: int = 3) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    before = torch.randint(0, IMAGE_TOKEN, (5,), generator=gen).tolist()
    after = torch.randint(0, IMAGE_TOKEN, (6,), generator=gen).tolist()
    return before + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + after


def pixels(seed: int = 5) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def ours(hf: Any, weights: list[tuple[str, torch.Tensor]], ops: KernelOps) -> LlavaForConditionalGeneration:
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    model = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, LlavaForConditionalGeneration)
    model.load_weights(weights)
    return model


@torch.no_grad()
def paged_logits(model: LlavaForConditionalGeneration, ids: list[int], prompt: int,
                 pixel_values: torch.Tensor) -> torch.Tensor:
    config = model.config
    pool = BlockPool(64, 4, seed=1)
    caches = make_kv_caches(config.num_hidden_layers, 64, 4, config.num_key_value_heads, config.head_dim)
    seq = PagedSequence()
    rows = model.encode_images(pixel_values)[0]
    index = torch.tensor([i for i, t in enumerate(ids[:prompt]) if t == IMAGE_TOKEN])
    out = []
    steps = [(0, prompt, ImageEmbeds(index, rows)), *((t, t + 1, None) for t in range(prompt, len(ids)))]
    for begin, end, images in steps:
        positions, meta = build_step(pool, [(seq, end - begin)])
        hidden = model.forward(torch.tensor(ids[begin:end]), positions, meta, caches, images)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@pytest.fixture(scope="module")
def reference() -> Any:
    return hf_llava()


@pytest.fixture(scope="module")
def saved(reference: Any, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, torch.Tensor]]:
    """The tensors as ``save_pretrained`` writes them (the original ``language_model.model.*`` layout)."""
    from safetensors.torch import load_file

    directory: Path = tmp_path_factory.mktemp("llava")
    reference.save_pretrained(directory, safe_serialization=True)
    return list(load_file(str(directory / "model.safetensors")).items())


@pytest.mark.parametrize("ops", sorted(OPS))
def test_prefill_with_an_image_then_decode_matches_hf(reference: Any, saved: list, ops: str) -> None:
    ids = [*prompt_ids(), 7, 42, 9, 88]
    prompt = len(ids) - 4
    want = reference(input_ids=torch.tensor([ids]), pixel_values=pixels()).logits[0].float()
    got = paged_logits(ours(reference, saved, OPS[ops]), ids, prompt, pixels())
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3e}"
    # the image matters: another image gives other logits
    other = reference(input_ids=torch.tensor([ids]), pixel_values=pixels(seed=6)).logits[0].float()
    assert (other - want).abs().max().item() > 100 * ATOL


def test_both_checkpoint_layouts_load(reference: Any, saved: list) -> None:
    """The in-memory state dict uses the newer ``model.language_model.*`` / ``model.vision_tower.*`` names."""
    saved_names = {name for name, _ in saved}
    assert any(n.startswith("language_model.model.") for n in saved_names)
    new = list(reference.state_dict().items())
    assert any(n.startswith("model.language_model.") for n, _ in new)
    a, b = ours(reference, saved, TORCH_OPS), ours(reference, new, TORCH_OPS)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="missing"):
        ours(reference, [(n, t) for n, t in saved if "multi_modal_projector.linear_2" not in n], TORCH_OPS)


def test_feature_layers_and_full_strategy_match_hf() -> None:
    """Several feature layers concatenated, and the class token kept (``"full"``: 17 image tokens)."""
    hf = hf_llava(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
    model = ours(hf, list(hf.state_dict().items()), TORCH_OPS)
    assert model.vision.num_image_tokens == NUM_IMAGE_TOKENS + 1
    want = hf.model.get_image_features(pixel_values=pixels(), vision_feature_layer=[-3, -1],
                                       vision_feature_select_strategy="full")
    want = want.pooler_output if hasattr(want, "pooler_output") else want
    want = torch.cat(list(want)) if isinstance(want, (list, tuple)) else want
    with torch.no_grad():
        got = model.encode_images(pixels())
    assert (got.reshape(want.shape) - want).abs().max().item() <= ATOL
