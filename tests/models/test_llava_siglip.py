"""LLaVA-1.5 and LLaVA-NeXT with a SigLIP vision tower against Hugging Face: tiny random checkpoints (a
3-layer ``SiglipVisionConfig`` tower, 32-px images or tiles, 8-px patches: 16 patch rows, no class token;
2-layer Llama decoder) saved with their image processor (``SiglipImageProcessor`` /
``LlavaNextImageProcessor``) and the test tokenizer, read by our loader. Our image-token expansion equals the
HF processor's prompt; prefill plus decode steps through the paged cache give HF's logits with 0, 1 and 2
images; the engine's greedy tokens equal HF ``generate``.

HF's ``"default"`` strategy drops the first row of every tile whatever the tower, so a SigLIP LLaVA-1.5
image takes 15 tokens under ``"default"`` and 16 under ``"full"``. With tiling, only the pairings whose
tiles keep exactly their 16 patch rows (CLIP + ``"default"``, SigLIP + ``"full"``) can be laid out into the
tile grid; the others are refused (and fail in HF's ``pack_image_features`` too)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine, EngineConfig
from asyncllm.builder import load_model
from asyncllm.config import ModelConfig, VisionConfig
from asyncllm.hf_image_processor import HFImageProcessor
from asyncllm.images import BuiltinImageProcessor, expand_image_tokens
from asyncllm.kernels import TORCH_OPS
from asyncllm.models import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, build_model
from asyncllm.models.siglip import SiglipVisionTower

from .test_llava_next import GREEDY, IMAGE_TEXT, PINPOINTS, TEXTS, images_of, paged_logits, unexpanded_ids

ATOL = 1e-4
COUNTS = (0, 1, 2)
TAIL = [7, 42, 9, 88]  # decoded one token a step after the prompt
LLAVA_VARIANTS = {"full-last": ("full", -1), "default-two-layers": ("default", [-3, -1])}


def siglip_config() -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)


def text_config(vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)


def spread_vision_weights(model: Any) -> Any:
    """SigLIP's init leaves biases near zero and layer norms at identity; randomize them so that every
    bias, norm and the position embeddings move the features (a tower skipping one would not match)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.model.vision_tower.named_parameters():
            if name.endswith("bias") or "norm" in name or "position_embedding" in name:
                base = 1.0 if name.endswith("weight") and "norm" in name else 0.0
                param.copy_(base + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


def hf_llava(vocab: int, image_token: int, strategy: str, layer: int | list[int]) -> Any:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=siglip_config(), text_config=text_config(vocab), image_token_id=image_token,
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return spread_vision_weights(LlavaForConditionalGeneration(config))


def hf_next(vocab: int, image_token: int) -> Any:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=siglip_config(), text_config=text_config(vocab),
                             image_token_index=image_token, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                             vision_feature_select_strategy="full", tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = spread_vision_weights(LlavaNextForConditionalGeneration(config))
    with torch.no_grad():
        model.model.image_newline.normal_(0, 1)
    return model


def save_llava(directory: Path, hf: Any, tokenizer: Any) -> Any:
    """Save ``hf`` (LLaVA-1.5) with a SigLIP image processor and ``tokenizer``; the HF processor from them."""
    from transformers import AutoTokenizer, LlavaProcessor, SiglipImageProcessor

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    hf.save_pretrained(directory, safe_serialization=True)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    write_tokenizer_files(directory, tokenizer)
    return LlavaProcessor(image_processor=SiglipImageProcessor.from_pretrained(directory),
                          tokenizer=AutoTokenizer.from_pretrained(directory), patch_size=8,
                          vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
                          image_token=IMAGE_TEXT, num_additional_image_tokens=0)  # no class token


def save_next(directory: Path, hf: Any, tokenizer: Any) -> Any:
    """Save ``hf`` (LLaVA-NeXT) with a tiling image processor (SigLIP's mean and std) and ``tokenizer``."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    hf.save_pretrained(directory, safe_serialization=True)
    LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(directory)
    write_tokenizer_files(directory, tokenizer)
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessor.from_pretrained(directory),
                              tokenizer=AutoTokenizer.from_pretrained(directory), patch_size=8,
                              vision_feature_select_strategy="full", image_token=IMAGE_TEXT,
                              num_additional_image_tokens=0)


Checkpoint = tuple[Path, Any, Any, Any]  # directory, HF model, HF processor, our model


def checkpoint(directory: Path, hf: Any, processor: Any) -> Checkpoint:
    model, _ = load_model(directory, EngineConfig(device="cpu", dtype="float32", kernel_backend="torch"))
    return directory, hf, processor, model


@pytest.fixture(scope="module")
def image_token(chat_tokenizer: Any) -> int:
    ids = chat_tokenizer.encode(IMAGE_TEXT, add_special_tokens=False)
    assert len(ids) == 1
    return int(ids[0])


@pytest.fixture(scope="module", params=sorted(LLAVA_VARIANTS))
def llava(request: pytest.FixtureRequest, chat_tokenizer: Any, image_token: int,
          tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    strategy, layer = LLAVA_VARIANTS[request.param]
    hf = hf_llava(chat_tokenizer.vocab_size, image_token, strategy, layer)
    directory = tmp_path_factory.mktemp(f"llava-siglip-{request.param}")
    return checkpoint(directory, hf, save_llava(directory, hf, chat_tokenizer))


@pytest.fixture(scope="module")
def llava_next(chat_tokenizer: Any, image_token: int, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    hf = hf_next(chat_tokenizer.vocab_size, image_token)
    directory = tmp_path_factory.mktemp("llava-next-siglip")
    return checkpoint(directory, hf, save_next(directory, hf, chat_tokenizer))


def check_logits(ckpt: Checkpoint, count: int) -> float:
    """Expanded prompt equals HF's; prefill + decode logits equal HF's; returns the max abs difference."""
    _, hf, processor, ours = ckpt
    assert isinstance(ours.vision_tower, SiglipVisionTower)
    images = images_of(count)
    inputs = dict(processor(text=[TEXTS[count]], images=images or None, return_tensors="pt"))
    want_ids = inputs["input_ids"][0].tolist()
    ids = unexpanded_ids(processor, count)
    expanded, spans = expand_image_tokens(ids, images, ours.image_processor)
    assert expanded == want_ids
    assert len(spans) == count
    inputs.pop("attention_mask")
    inputs["input_ids"] = torch.tensor([want_ids + TAIL])
    with torch.no_grad():
        want = hf(**inputs).logits[0].float()
    got = paged_logits(ours, ids + TAIL, len(ids), images)
    diff = (got - want).abs().max().item()
    label = (f"{type(hf).__name__} {hf.config.vision_feature_select_strategy} "
             f"layer {hf.config.vision_feature_layer}")
    print(f"{label}: max abs logit diff vs HF, {count} image(s): {diff:.3e}")
    assert diff <= ATOL, f"max abs diff {diff:.3e}"
    return diff


@pytest.mark.parametrize("count", COUNTS)
def test_llava_siglip_prompt_and_logits_match_hf(llava: Checkpoint, count: int) -> None:
    _, hf, _, ours = llava
    side_rows = 16 - (hf.config.vision_feature_select_strategy == "default")  # HF drops a patch row
    assert ours.vision.num_image_tokens == side_rows
    check_logits(llava, count)


@pytest.mark.parametrize("count", COUNTS)
def test_llava_next_siglip_full_prompt_and_logits_match_hf(llava_next: Checkpoint, count: int) -> None:
    assert isinstance(llava_next[3], LlavaNextForConditionalGeneration)
    check_logits(llava_next, count)


def test_the_image_and_every_tower_part_matter(llava: Checkpoint) -> None:
    """Another image, or a tower that skips its position embeddings or applies ``post_layernorm``, gives
    other features: the parity above could not hold by accident."""
    _, hf, processor, ours = llava
    pixels = processor.image_processor(images=images_of(2), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a, b = ours.encode_images(pixels[:1]), ours.encode_images(pixels[1:])
        assert (a - b).abs().max().item() > 1e-2
        tower = hf.model.vision_tower
        final = tower(pixels[:1], output_hidden_states=True)
        assert (final.last_hidden_state - final.hidden_states[-1]).abs().max().item() > 1e-2
        saved = ours.vision_tower.embeddings.position_embedding.weight.clone()
        ours.vision_tower.embeddings.position_embedding.weight.zero_()
        try:
            assert (ours.encode_images(pixels[:1]) - a).abs().max().item() > 1e-2
        finally:
            ours.vision_tower.embeddings.position_embedding.weight.copy_(saved)


async def _engine_matches_generate(ckpt: Checkpoint) -> None:
    directory, hf, processor, _ = ckpt
    want = {}
    for count in COUNTS:
        inputs = processor(text=[TEXTS[count]], images=images_of(count) or None, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
        want[count] = out[0, inputs["input_ids"].shape[1]:].tolist()
    settings = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 4096}
    async with AsyncEngine.from_pretrained(directory, **settings) as engine:
        assert isinstance(engine.model.image_processor, HFImageProcessor)  # type: ignore[attr-defined]
        results = await asyncio.gather(*(
            engine.generate(unexpanded_ids(processor, count), images=images_of(count), **GREEDY) for count in COUNTS))
    for count, result in zip(COUNTS, results, strict=True):
        assert result.token_ids == want[count], count


async def test_llava_siglip_engine_greedy_equals_hf_generate(llava: Checkpoint) -> None:
    await _engine_matches_generate(llava)


async def test_llava_next_siglip_engine_greedy_equals_hf_generate(llava_next: Checkpoint) -> None:
    await _engine_matches_generate(llava_next)


def test_both_tower_weight_layouts_load(llava: Checkpoint) -> None:
    """transformers 5 saves the tower as ``vision_tower.*``; older versions as ``vision_tower.vision_model.*``.
    Both load alike; the pooling ``head`` and ``post_layernorm`` are skipped, a missing tower tensor is not."""
    from safetensors.torch import load_file

    directory, _, _, ours = llava
    saved = load_file(str(directory / "model.safetensors"))
    assert any(name.startswith("vision_tower.head.") for name in saved)
    older = [(name.replace("vision_tower.", "vision_tower.vision_model.", 1), tensor) for name, tensor in saved.items()]
    config = ModelConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    other = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(other, LlavaForConditionalGeneration)
    other.load_weights(older)
    for (name, p), (_, q) in zip(ours.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="missing"):
        other.load_weights([(n, t) for n, t in older if "embeddings.patch_embedding.bias" not in n])


def _llava_config(tiled: bool, model_type: str, strategy: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlavaNextForConditionalGeneration" if tiled else "LlavaForConditionalGeneration"],
        "image_token_index": 5, "vision_feature_select_strategy": strategy,
        "vision_config": {"model_type": model_type, "image_size": 32, "patch_size": 8},
        "text_config": {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
                        "num_hidden_layers": 1, "num_attention_heads": 2},
    }
    if tiled:
        config["image_grid_pinpoints"] = PINPOINTS
    return config


def test_unknown_tower_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vision_config\.model_type.*'dinov2_model'"):
        ModelConfig.from_hf_config(_llava_config(False, "dinov2_model", "default"))


def test_tower_defaults_follow_the_model_type() -> None:
    """Fields missing from ``vision_config`` take SigLIP's defaults (patch 16, ``gelu_pytorch_tanh``,
    eps 1e-6), as ``SiglipVisionConfig`` fills them."""
    from transformers import SiglipVisionConfig

    vision = ModelConfig.from_hf_config({**_llava_config(False, "siglip_vision_model", "full"),
                                         "vision_config": {"model_type": "siglip_vision_model"}}).vision
    assert vision is not None
    hf = SiglipVisionConfig()
    assert vision.tower == "siglip" and not vision.class_token
    assert (vision.patch_size, vision.image_size, vision.hidden_act, vision.layer_norm_eps) == (
        hf.patch_size, hf.image_size, hf.hidden_act, hf.layer_norm_eps)


@pytest.mark.parametrize(("model_type", "strategy", "rows"), [
    ("clip_vision_model", "full", 17),  # the class token's row is kept
    ("siglip_vision_model", "default", 15),  # the first patch row is dropped
])
def test_tiling_needs_whole_patch_grids(llava_next: Checkpoint, model_type: str, strategy: str, rows: int) -> None:
    """A tile whose rows are not its 4x4 patch grid cannot be tiled: we refuse the config, and HF's own
    ``pack_image_features`` fails on such tile features."""
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        ModelConfig.from_hf_config(_llava_config(True, model_type, strategy))
    ModelConfig.from_hf_config(_llava_config(False, model_type, strategy))  # untiled, both are fine
    hf = llava_next[1]
    features = torch.randn(3, rows, hf.config.text_config.hidden_size)  # a 20x90 image: base + 1x2 grid
    with torch.no_grad(), pytest.raises(RuntimeError):
        hf.model.pack_image_features([features], torch.tensor([[20, 90]]), strategy,
                                     image_newline=hf.model.image_newline)


def test_builtin_preprocessing_refuses_raw_images_for_siglip() -> None:
    """Without ``preprocessor_config.json`` only ready pixel values are taken (CLIP's resize and
    normalization would be wrong for SigLIP)."""
    from PIL import Image

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8, image_token_id=5, select_strategy="full", tower="siglip")
    processor = BuiltinImageProcessor(vision)
    assert processor.prepare(torch.zeros(3, 32, 32)).num_tokens == 16
    with pytest.raises(ValueError, match=r"preprocessor_config\.json"):
        processor.prepare(Image.new("RGB", (40, 30)))
