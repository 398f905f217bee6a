"""LLaVA-NeXT against Hugging Face's ``LlavaNextForConditionalGeneration`` and ``LlavaNextProcessor``: a tiny
random CLIP tower (32-px tiles, 8-px patches: 16 rows a tile), projector and 2-layer decoder saved with a
``LlavaNextImageProcessor`` and the test tokenizer into one directory, which our loader reads (its image
processor included). Images of different sizes tile differently (1x2, 2x1, 2x2 grids; the wide and tall
ones are padded into their grid, so their features are cropped again), so each takes another number of
prompt tokens. The HF reference inputs come from the HF processor."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asyncllm import AsyncEngine, EngineConfig
from asyncllm.builder import load_model
from asyncllm.config import ModelConfig
from asyncllm.hf_image_processor import HFImageProcessor
from asyncllm.images import expand_image_tokens
from asyncllm.models import LlavaNextForConditionalGeneration
from asyncllm.models.llava import ImageEmbeds
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import SequenceState

from ._paged import BlockPool, PagedSequence, build_step, make_kv_caches

ATOL = 1e-4
IMAGE_TEXT = "#"  # one byte, one token (id 5) of the test tokenizer, in no merge
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
SIZES = {"wide": (20, 90), "tall": (90, 25), "square": (50, 50)}  # (height, width)
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
TEXTS = {
    0: "Name three rivers.",
    1: "look at # and tell me a story",
    2: "compare # with # now",
}


def picture(kind: str, seed: int = 0) -> Any:
    from PIL import Image

    height, width = SIZES[kind]
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy())


IMAGES = {0: [], 1: [("wide", 1)], 2: [("tall", 2), ("square", 3)]}


def images_of(count: int) -> list[Any]:
    return [picture(kind, seed) for kind, seed in IMAGES[count]]


def hf_next(vocab: int, image_token: int, text_type: str = "llama") -> Any:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
        Qwen2Config,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16, initializer_range=0.2)
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text_type]
    text = text_class(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # the random init leaves the newline row small; make it matter
        model.model.image_newline.normal_(0, 1)
    return model


def write_checkpoint(directory: Path, hf: Any, tokenizer: Any) -> Any:
    """Save ``hf`` with an image processor and ``tokenizer`` into ``directory``; return the HF processor
    built from those files."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    hf.save_pretrained(directory, safe_serialization=True)
    LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_grid_pinpoints=PINPOINTS).save_pretrained(directory)
    write_tokenizer_files(directory, tokenizer)
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessor.from_pretrained(directory),
                              tokenizer=AutoTokenizer.from_pretrained(directory), patch_size=8,
                              vision_feature_select_strategy="default", image_token=IMAGE_TEXT,
                              num_additional_image_tokens=1)  # the class token, as real checkpoints set


@pytest.fixture(scope="module")
def checkpoint(chat_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    image_token = chat_tokenizer.encode(IMAGE_TEXT, add_special_tokens=False)
    assert len(image_token) == 1
    hf = hf_next(chat_tokenizer.vocab_size, image_token[0])
    directory = tmp_path_factory.mktemp("llava-next")
    return directory, hf, write_checkpoint(directory, hf, chat_tokenizer)


@pytest.fixture(scope="module")
def bundles(checkpoint: tuple[Path, Any, Any]) -> dict[str, LlavaNextForConditionalGeneration]:
    """The checkpoint loaded by our loader over the reference ops (``"torch"``) and the CPU fast path
    (``"auto"``)."""
    out = {}
    for backend in ("torch", "auto"):
        model, _ = load_model(checkpoint[0], EngineConfig(device="cpu", dtype="float32", kernel_backend=backend))
        assert isinstance(model, LlavaNextForConditionalGeneration)
        out[backend] = model
    return out


@pytest.fixture(scope="module")
def ours(bundles: dict[str, LlavaNextForConditionalGeneration]) -> LlavaNextForConditionalGeneration:
    return bundles["torch"]


def hf_inputs(processor: Any, count: int) -> dict[str, torch.Tensor]:
    images = images_of(count)
    return dict(processor(text=[TEXTS[count]], images=images or None, return_tensors="pt"))


def unexpanded_ids(processor: Any, count: int) -> list[int]:
    return processor.tokenizer(TEXTS[count])["input_ids"]


@torch.no_grad()
def paged_logits(model: LlavaNextForConditionalGeneration, ids: list[int], prompt: int,
                 images: list[Any]) -> torch.Tensor:
    """Prefill ``ids[:prompt]`` (its images' rows from our processor and encoder), then decode the rest one
    token a step; logits of every position."""
    expanded, spans = expand_image_tokens(ids[:prompt], images, model.image_processor)
    ids = expanded + ids[prompt:]
    prompt = len(expanded)
    config = model.config
    pool = BlockPool(128, 4, seed=1)
    caches = make_kv_caches(config.num_hidden_layers, 128, 4, config.num_key_value_heads, config.head_dim)
    seq = PagedSequence()
    embeds = None
    if spans:
        rows = [model.image_rows(model.encode_images(span.pixels), span.size) for span in spans]
        index = torch.cat([torch.arange(span.start, span.end) for span in spans])
        embeds = ImageEmbeds(index, torch.cat(rows))
    out = []
    steps = [(0, prompt, embeds), *((t, t + 1, None) for t in range(prompt, len(ids)))]
    for begin, end, step_images in steps:
        positions, meta = build_step(pool, [(seq, end - begin)])
        hidden = model.forward(torch.tensor(ids[begin:end]), positions, meta, caches, step_images)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("count", [0, 1, 2])
def test_prompt_tokens_and_logits_match_hf(checkpoint: tuple[Path, Any, Any], bundles: dict[str, Any], count: int,
                                           backend: str) -> None:
    """Our image-token expansion gives the HF processor's prompt; prefill + 4 decode steps give HF's logits
    (reference ops and the CPU fast path)."""
    _, hf, processor = checkpoint
    ours = bundles[backend]
    inputs = hf_inputs(processor, count)
    want_ids = inputs["input_ids"][0].tolist()
    expanded, spans = expand_image_tokens(unexpanded_ids(processor, count), images_of(count), ours.image_processor)
    assert expanded == want_ids
    assert len(spans) == count and len({span.length for span in spans}) == count  # sizes tile differently
    tail = [7, 42, 9, 88]
    with torch.no_grad():
        full = {**inputs, "input_ids": torch.tensor([want_ids + tail])}
        full.pop("attention_mask")
        want = hf(**full).logits[0].float()
    got = paged_logits(ours, unexpanded_ids(processor, count) + tail, len(unexpanded_ids(processor, count)),
                       images_of(count))
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3e}"


def test_image_newline_and_unpadding_change_the_rows(ours: Any) -> None:
    """The packed rows are base tile + unpadded grid with a newline after each row: their count follows the
    image's aspect ratio, and every row-end holds ``image_newline``."""
    span = expand_image_tokens([5], [picture("wide", 1)], ours.image_processor)[1][0]
    with torch.no_grad():
        rows = ours.image_rows(ours.encode_images(span.pixels), span.size)
    # 20x90 -> the 32x64 pinpoint: a 1x2 grid of 4x8 features, cropped to the 2 middle rows (20/90 of 8
    # is 1.8 rows, padding (4 - 1) // 2 = 1 row each side), each row of 8 followed by a newline
    assert span.pixels.shape[0] == 3
    assert rows.shape[0] == span.length == 16 + 2 * 9
    newline_rows = rows[16:].view(2, 9, -1)[:, -1]
    assert torch.equal(newline_rows, ours.image_newline.expand_as(newline_rows))


def test_row_layout_equals_hf_pack_image_features(checkpoint: tuple[Path, Any, Any], ours: Any) -> None:
    """For images of many sizes (every grid, padding cropped from the top/bottom or the sides), our
    token count and row layout equal HF's ``pack_image_features`` on the same random tile features."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from asyncllm import anyres

    _, hf, _ = checkpoint
    vision = ours.vision
    gen = torch.Generator().manual_seed(0)
    for height, width in [(20, 90), (90, 25), (50, 50), (33, 100), (100, 33), (64, 60), (7, 200), (31, 32)]:
        tiles = image_size_to_num_patches((height, width), PINPOINTS, 32)
        features = torch.randn(tiles, 16, ours.config.hidden_size, generator=gen)
        with torch.no_grad():
            (want,), _ = hf.model.pack_image_features([features], torch.tensor([[height, width]]), "default",
                                                      image_newline=ours.image_newline)
            got = ours.image_rows(features, (height, width))
        assert anyres.num_tiles((height, width), vision.image_grid_pinpoints, 32) == tiles
        assert anyres.num_image_tokens((height, width), vision.image_grid_pinpoints, 32, 4) == want.shape[0]
        assert torch.equal(got, want), (height, width)


def _runner(model: Any) -> ModelRunner:
    config = model.config
    spec = KVCacheSpec.for_model(config, num_blocks=96, block_size=8, dtype=torch.float32)
    return ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=512)


def _sequences(model: Any, processor: Any, counts: list[int]) -> list[SequenceState]:
    seqs, next_block = [], 0
    for count in counts:
        ids, spans = expand_image_tokens(unexpanded_ids(processor, count), images_of(count), model.image_processor)
        seq = SequenceState(f"r{count}", ids, None, 512, images=spans)
        blocks = -(-len(ids) // 8)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
    return seqs


def test_one_encoder_call_for_all_images_of_a_step(checkpoint: tuple[Path, Any, Any], ours: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A step prefilling a text-only, a one-image and a two-image prompt encodes the three images' tiles in
    one vision-tower call; the last-token logits equal the prompts run one step each and HF's."""
    _, hf, processor = checkpoint
    calls: list[int] = []
    encode = ours.encode_images
    monkeypatch.setattr(ours, "encode_images", lambda pixels: (calls.append(pixels.shape[0]), encode(pixels))[1])
    counts = [0, 1, 2]
    seqs = _sequences(ours, processor, counts)
    batched = _runner(ours).forward_logits([ScheduledChunk(seq, 0, len(seq.token_ids)) for seq in seqs]).clone()
    assert calls == [sum(span.pixels.shape[0] for seq in seqs for span in seq.images)]
    assert all(seq.image_features is None for seq in seqs)  # dropped once the last image token ran
    calls.clear()
    for row, seq in zip(batched, _sequences(ours, processor, counts), strict=True):
        alone = _runner(ours).forward_logits([ScheduledChunk(seq, 0, len(seq.token_ids))])[0]
        assert (alone - row).abs().max().item() <= 1e-5
    assert len(calls) == 2  # one per prompt with images
    for row, count in zip(batched, counts, strict=True):
        inputs = hf_inputs(processor, count)
        inputs.pop("attention_mask")
        with torch.no_grad():
            want = hf(**inputs).logits[0, -1].float()
        assert (row - want).abs().max().item() <= ATOL


def test_chunked_prefill_splitting_an_image_keeps_its_features(checkpoint: tuple[Path, Any, Any],
                                                               ours: Any) -> None:
    """Chunks that cut through both images of a prompt: the images are encoded once, on the first chunk
    that covers one, and the last-token logits equal one whole-prompt step."""
    _, _, processor = checkpoint
    (seq,) = _sequences(ours, processor, [2])
    whole = _runner(ours).forward_logits([ScheduledChunk(seq, 0, len(seq.token_ids))])[0].clone()
    runner = _runner(ours)
    (seq,) = _sequences(ours, processor, [2])
    begin = 0
    logits = None
    for size in (5, 23, 31, 40, 1000):
        size = min(size, len(seq.token_ids) - begin)
        logits = runner.forward_logits([ScheduledChunk(seq, begin, size)])
        begin += size
        if begin == len(seq.token_ids):
            break
    assert logits is not None and logits.shape[0] == 1
    assert (logits[0] - whole).abs().max().item() <= 1e-5


def hf_generate(hf: Any, processor: Any, count: int) -> list[int]:
    inputs = hf_inputs(processor, count)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def make_engine(directory: Path, **overrides: Any) -> AsyncEngine:
    settings = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 4096, **overrides}
    return AsyncEngine.from_pretrained(directory, **settings)


async def test_engine_batches_image_and_text_requests_like_hf(checkpoint: tuple[Path, Any, Any]) -> None:
    directory, hf, processor = checkpoint
    want = {count: hf_generate(hf, processor, count) for count in (0, 1, 2)}
    async with make_engine(directory) as engine:
        assert isinstance(engine.model.image_processor, HFImageProcessor)  # type: ignore[attr-defined]
        results = await asyncio.gather(*(
            engine.generate(unexpanded_ids(processor, count), images=images_of(count), **GREEDY)
            for count in (0, 1, 2)))
    for count, result in zip((0, 1, 2), results, strict=True):
        assert result.token_ids == want[count], count
        assert result.usage.prompt_tokens == hf_inputs(processor, count)["input_ids"].shape[1]


async def test_prefix_cache_keys_tiled_images_by_what_the_model_sees(checkpoint: tuple[Path, Any, Any]) -> None:
    directory, _, processor = checkpoint
    ids = unexpanded_ids(processor, 1)
    before = ids.index(5)
    async with make_engine(directory, block_size=4) as engine:
        first = await engine.generate(ids, images=[picture("wide", 1)], **GREEDY)
        other = await engine.generate(ids, images=[picture("wide", 9)], **GREEDY)
        again = await engine.generate(ids, images=[picture("wide", 1)], **GREEDY)
    assert first.usage.cached_tokens == 0
    assert other.usage.cached_tokens == before // 4 * 4  # only the text before the image
    assert other.token_ids != first.token_ids
    image_tokens = first.usage.prompt_tokens - len(ids) + 1
    assert again.usage.cached_tokens >= before + image_tokens - 4
    assert again.usage.cached_tokens > before + image_tokens // 2
    assert again.token_ids == first.token_ids


async def test_session_turn_two_reuses_the_image_kv_of_turn_one(checkpoint: tuple[Path, Any, Any]) -> None:
    directory, _, _ = checkpoint
    parts = [{"type": "text", "text": "look at "}, {"type": "image", "image": picture("tall", 4)},
             {"type": "text", "text": " please"}]
    async with make_engine(directory, block_size=4) as engine:
        session = engine.session()
        one = await session.send(parts, **GREEDY)
        two = await session.send("and now tell me a story", **GREEDY)
        transcript = [*session.messages[:-2], session.messages[-2]]
        await session.close()
        fresh = await engine.generate([*transcript[:2], {"role": "user", "content": "and now tell me a story"}],
                                      **GREEDY)
        ids = engine.encode_prompt([{"role": "user", "content": "look at # please"}])
    assert one.usage.cached_tokens == 0
    image_end = ids.index(5) + (one.usage.prompt_tokens - len(ids) + 1)
    # everything of turn 1's prompt in full blocks (4 tokens) is reused, its image included
    assert two.usage.cached_tokens >= one.usage.prompt_tokens // 4 * 4 >= image_end
    assert two.token_ids == fresh.token_ids


@pytest.mark.parametrize("text_type", ["qwen2", "mistral"])
def test_other_decoders_match_hf(chat_tokenizer: Any, tmp_path: Path, text_type: str) -> None:
    """The decoder's flags come from text_config's family (Qwen2: q/k/v biases; Mistral: Llama's)."""
    hf = hf_next(chat_tokenizer.vocab_size, 5, text_type=text_type)
    processor = write_checkpoint(tmp_path, hf, chat_tokenizer)
    model, _ = load_model(tmp_path, EngineConfig(device="cpu", dtype="float32", kernel_backend="torch"))
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert model.config.qkv_bias == (text_type == "qwen2")
    inputs = hf_inputs(processor, 2)
    inputs.pop("attention_mask")
    with torch.no_grad():
        want = hf(**inputs).logits[0].float()
    got = paged_logits(model, unexpanded_ids(processor, 2), len(unexpanded_ids(processor, 2)), images_of(2))
    assert (got - want).abs().max().item() <= ATOL


def test_bad_inputs_raise_value_errors(ours: Any) -> None:
    with pytest.raises(ValueError, match="image_sizes"):
        expand_image_tokens([5], [torch.zeros(3, 32, 32)], ours.image_processor)
    with pytest.raises(ValueError, match="tiles"):
        expand_image_tokens([5], [{"pixel_values": torch.zeros(2, 3, 32, 32), "image_sizes": [64, 64]}],
                            ours.image_processor)
    with pytest.raises(ValueError, match="image tokens"):
        expand_image_tokens([5, 5], [picture("wide")], ours.image_processor)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ModelConfig.from_hf_config({"architectures": ["LlavaNextForConditionalGeneration"],
                                    "image_token_index": 5, "image_grid_pinpoints": [[40, 64]],
                                    "vision_config": {"image_size": 32, "patch_size": 8},
                                    "text_config": {"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
                                                    "intermediate_size": 8, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2}})


def test_ready_pixel_values_equal_the_processed_image(checkpoint: tuple[Path, Any, Any], ours: Any) -> None:
    """HF processor output for one image, passed as ready ``pixel_values`` + ``image_sizes``, gives the
    same span (and prefix-cache digest) as the image itself; another image gives another digest."""
    _, _, processor = checkpoint
    out = processor.image_processor(images=[picture("square", 3)], return_tensors="pt")
    ready = expand_image_tokens([5], [dict(out)], ours.image_processor)[1][0]
    direct = expand_image_tokens([5], [picture("square", 3)], ours.image_processor)[1][0]
    other = expand_image_tokens([5], [picture("square", 4)], ours.image_processor)[1][0]
    assert ready.digest == direct.digest != other.digest
    assert ready.length == direct.length and torch.equal(ready.pixels, direct.pixels)
    assert np.array_equal(np.array(ready.size), np.array(SIZES["square"]))
