"""A tiny random LLaVA served by the engine: greedy output with an image equals Hugging Face's ``generate``
(also with chunked prefill splitting the image tokens), and the prefix cache keys image tokens by the
image's pixels (same text, another image: nothing reused; the same image again: reused)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine, ModelConfig
from asyncllm.kernels import TORCH_OPS
from asyncllm.models import build_model

from .test_llava_parity import IMAGE_TOKEN, NUM_IMAGE_TOKENS, hf_llava, pixels

GREEDY = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(chat_tokenizer: Any) -> Any:
    return hf_llava(vocab=chat_tokenizer.vocab_size)


def make_engine(reference: Any, tokenizer: Any, **overrides: Any) -> AsyncEngine:
    config = ModelConfig.from_hf_config(reference.config.to_dict())
    model = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(reference.state_dict().items())
    overrides.setdefault("device", "cpu")
    overrides.setdefault("kv_cache_tokens", 2048)
    return AsyncEngine.from_model(model, tokenizer, **overrides)  # type: ignore[arg-type]


def prompt(text_seed: int = 3) -> list[int]:
    gen = torch.Generator().manual_seed(text_seed)
    before = torch.randint(3, IMAGE_TOKEN, (21,), generator=gen).tolist()
    after = torch.randint(3, IMAGE_TOKEN, (6,), generator=gen).tolist()
    return [*before, IMAGE_TOKEN, *after]


def hf_generate(reference: Any, ids: list[int], image: torch.Tensor) -> list[int]:
    expanded = [t for token in ids for t in ([token] * NUM_IMAGE_TOKENS if token == IMAGE_TOKEN else [token])]
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([expanded]), pixel_values=image, max_new_tokens=16,
                                 do_sample=False)
    return out[0, len(expanded):].tolist()


@pytest.mark.parametrize("chunk", [None, 11])
async def test_greedy_generation_with_an_image_matches_hf(reference: Any, chat_tokenizer: Any,
                                                          chunk: int | None) -> None:
    want = hf_generate(reference, prompt(), pixels())
    overrides = {"max_num_batched_tokens": chunk} if chunk else {}
    async with make_engine(reference, chat_tokenizer, **overrides) as engine:
        got = await engine.generate(prompt(), images=[pixels()], **GREEDY)
    assert got.token_ids == want
    assert got.usage.prompt_tokens == len(prompt()) - 1 + NUM_IMAGE_TOKENS


async def test_prefix_cache_keys_image_tokens_by_pixels(reference: Any, chat_tokenizer: Any) -> None:
    async with make_engine(reference, chat_tokenizer, block_size=4) as engine:
        first = await engine.generate(prompt(), images=[pixels(seed=5)], **GREEDY)
        other = await engine.generate(prompt(), images=[pixels(seed=6)], **GREEDY)
        again = await engine.generate(prompt(), images=[pixels(seed=5)], **GREEDY)
    assert first.usage.cached_tokens == 0
    # only the 20 text tokens before the image (5 full blocks) are shared with another image
    assert other.usage.cached_tokens == 20
    assert other.token_ids != first.token_ids
    assert again.usage.cached_tokens >= 20 + NUM_IMAGE_TOKENS
    assert again.token_ids == first.token_ids


async def test_image_count_must_match_the_placeholders(reference: Any, chat_tokenizer: Any) -> None:
    async with make_engine(reference, chat_tokenizer) as engine:
        with pytest.raises(ValueError, match="image tokens"):
            await engine.generate(prompt(), images=[pixels(), pixels()], **GREEDY)


async def test_chat_messages_take_image_parts(chat_tokenizer: Any) -> None:
    """An image part (PIL image or its encoded bytes) is the image token's text in the rendered prompt,
    expanded like a placeholder in a token prompt; the pixels are CLIP-preprocessed."""
    import io

    from PIL import Image

    from asyncllm.images import to_pixels

    reference = hf_llava(vocab=chat_tokenizer.vocab_size, image_token_id=5)  # '#': one character, one token
    image = Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(1)) * 255)
                            .to(torch.uint8).numpy())
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    parts = [{"type": "text", "text": "look at "}, {"type": "image", "image": image}, {"type": "text", "text": " now"}]
    async with make_engine(reference, chat_tokenizer) as engine:
        ids = engine.encode_prompt([{"role": "user", "content": "look at # now"}])
        vision = engine.model_config.vision
        assert vision is not None and ids.count(5) == 1
        pixels_of = to_pixels(image, vision)
        assert pixels_of.shape == (3, 32, 32)
        want = await engine.generate(ids, images=[pixels_of], **GREEDY)
        got = await engine.generate([{"role": "user", "content": parts}], **GREEDY)
        parts[1] = {"type": "image", "image": encoded.getvalue()}
        from_bytes = await engine.generate([{"role": "user", "content": parts}], **GREEDY)
    assert got.token_ids == want.token_ids == from_bytes.token_ids
    assert got.usage.prompt_tokens == len(ids) - 1 + NUM_IMAGE_TOKENS
    assert got.usage.cached_tokens == from_bytes.usage.cached_tokens > 0


async def test_two_requests_with_images_share_one_encoder_call(reference: Any, chat_tokenizer: Any) -> None:
    """Two prompts with an image each, prefilled in one step: one vision-tower call over both images, and
    each output equals Hugging Face's for its image alone."""
    import asyncio

    want = [hf_generate(reference, prompt(seed), pixels(seed=seed)) for seed in (5, 6)]
    engine = make_engine(reference, chat_tokenizer)
    calls: list[int] = []
    model = engine.model
    encode = model.encode_images  # type: ignore[attr-defined]

    def counting(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return encode(batch)

    model.encode_images = counting  # type: ignore[attr-defined]
    async with engine:
        got = await asyncio.gather(*(engine.generate(prompt(seed), images=[pixels(seed=seed)], **GREEDY)
                                     for seed in (5, 6)))
    assert calls == [2]
    assert [g.token_ids for g in got] == want


def test_checkpoint_image_processor_makes_the_pixels(tmp_path: Any) -> None:
    """With ``preprocessor_config.json`` the checkpoint's own ``CLIPImageProcessor`` makes the pixels (here
    configured unlike the built-in path: no center crop, other mean/std); without one, the built-in CLIP
    preprocessing. Different images get different digests, the same image the same one."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from asyncllm.config import VisionConfig
    from asyncllm.hf_image_processor import HFImageProcessor, load_image_processor
    from asyncllm.images import BuiltinImageProcessor, to_pixels

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, image_token_id=IMAGE_TOKEN)
    gen = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(40, 56, 3, generator=gen) * 255).to(torch.uint8).numpy()) for _ in "ab"]
    assert isinstance(load_image_processor(tmp_path, vision), BuiltinImageProcessor)
    builtin = load_image_processor(tmp_path, vision).prepare(images[0])
    assert torch.equal(builtin.pixels[0], to_pixels(images[0], vision))
    hf = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, image_mean=[0.5] * 3,
                            image_std=[0.25] * 3)
    hf.save_pretrained(tmp_path)
    processor = load_image_processor(tmp_path, vision)
    assert isinstance(processor, HFImageProcessor)
    first, second, again = (processor.prepare(image) for image in (images[0], images[1], images[0]))
    want = hf(images=[images[0]], return_tensors="pt")["pixel_values"]
    assert torch.equal(first.pixels, want.float())
    assert not torch.allclose(first.pixels, builtin.pixels, atol=1e-2)
    assert first.num_tokens == NUM_IMAGE_TOKENS and first.size == (40, 56)
    assert first.digest == again.digest != second.digest
    assert first.digest != builtin.digest
