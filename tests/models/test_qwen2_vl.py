"""Qwen2-VL against Hugging Face's ``Qwen2VLForConditionalGeneration`` and ``Qwen2VLProcessor``: a tiny random
model (2 vision blocks of width 32 over 4-px patches merged 2x2, a 2-layer Qwen2 decoder with head_dim 16
and ``mrope_section`` [2, 3, 3]) saved with a ``Qwen2VLImageProcessor`` and the test tokenizer into one
directory, which our loader reads (its image processor included). Images of different sizes take
different patch grids, hence different token counts and M-RoPE positions. The HF reference inputs come
from the HF processor (``%``, ``#`` and ``&`` stand for the vision start, image and vision end tokens)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine, EngineConfig
from asyncllm.builder import load_model
from asyncllm.config import ModelConfig
from asyncllm.hf_image_processor import HFImageProcessor
from asyncllm.images import expand_image_tokens
from asyncllm.models import Qwen2VLForConditionalGeneration
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import SequenceState

ATOL = 1e-4
IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN = 5, 6, 7, 8  # "#", "$", "%", "&" in the test tokenizer
SIZES = {"wide": (20, 45), "tall": (41, 22), "square": (30, 30)}  # (height, width)
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
TEXTS = {
    0: "Name three rivers.",
    1: "look at %#& and tell me a story",
    2: "compare %#& with %#& now",
}
IMAGES = {0: [], 1: [("wide", 1)], 2: [("tall", 2), ("square", 3)]}
TAIL = [17, 42, 9, 88]  # decoded one token a step after the prompt


def picture(kind: str, seed: int = 0) -> Any:
    from PIL import Image

    height, width = SIZES[kind]
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy())


def images_of(count: int) -> list[Any]:
    return [picture(kind, seed) for kind, seed in IMAGES[count]]


def hf_qwen2_vl(vocab: int) -> Any:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        text_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rms_norm_eps": 1e-5, "initializer_range": 0.2, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 3, 3]}},
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=START_TOKEN,
        vision_end_token_id=END_TOKEN, tie_word_embeddings=False, initializer_range=0.2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def hf_processor(directory: Path) -> Any:
    """HF's Qwen2-VL processor over the saved image processor and tokenizer. Its video processor needs
    torchvision, which these tests do without: the constructor's class check is skipped for it."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.image_token, tokenizer.video_token = "#", "$"
    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(directory), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def checkpoint(chat_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    from transformers import Qwen2VLImageProcessor

    from asyncllm.loaders.hf_dir_writer import write_tokenizer_files

    assert [chat_tokenizer.encode(c, add_special_tokens=False) for c in "#$%&"] == [[5], [6], [7], [8]]
    hf = hf_qwen2_vl(chat_tokenizer.vocab_size)
    directory = tmp_path_factory.mktemp("qwen2-vl")
    hf.save_pretrained(directory, safe_serialization=True)
    Qwen2VLImageProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, patch_size=4, merge_size=2,
                          temporal_patch_size=2).save_pretrained(directory)
    write_tokenizer_files(directory, chat_tokenizer)
    return directory, hf, hf_processor(directory)


@pytest.fixture(scope="module")
def bundles(checkpoint: tuple[Path, Any, Any]) -> dict[str, Qwen2VLForConditionalGeneration]:
    """The checkpoint loaded by our loader over the reference ops (``"torch"``) and the CPU fast path
    (``"auto"``)."""
    out = {}
    for backend in ("torch", "auto"):
        model, _ = load_model(checkpoint[0], EngineConfig(device="cpu", dtype="float32", kernel_backend=backend))
        assert isinstance(model, Qwen2VLForConditionalGeneration)
        out[backend] = model
    return out


def hf_inputs(processor: Any, count: int) -> dict[str, torch.Tensor]:
    return dict(processor(text=[TEXTS[count]], images=images_of(count) or None, return_tensors="pt"))


def unexpanded_ids(processor: Any, count: int) -> list[int]:
    return processor.tokenizer(TEXTS[count])["input_ids"]


def sequence(model: Any, processor: Any, count: int, name: str = "r") -> SequenceState:
    ids, spans = expand_image_tokens(unexpanded_ids(processor, count), images_of(count), model.image_processor)
    seq = SequenceState(f"{name}{count}", ids, None, 512, images=spans)
    seq.block_table = list(range(40))
    return seq


def runner(model: Any, num_blocks: int = 40) -> ModelRunner:
    spec = KVCacheSpec.for_model(model.config, num_blocks=num_blocks, block_size=4, dtype=torch.float32)
    return ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=160)


def hf_logits(hf: Any, processor: Any, count: int, tail: list[int]) -> torch.Tensor:
    inputs = hf_inputs(processor, count)
    inputs.pop("attention_mask")
    types = inputs.pop("mm_token_type_ids")
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tail], dtype=torch.int64).view(1, -1)], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([types, torch.zeros(1, len(tail), dtype=types.dtype)], dim=1)
    with torch.no_grad():
        return hf(**inputs).logits[0].float()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("count", [0, 1, 2])
def test_prompt_tokens_and_logits_match_hf(checkpoint: tuple[Path, Any, Any], bundles: dict[str, Any], count: int,
                                           backend: str) -> None:
    """Our image-token expansion gives the HF processor's prompt; prefill (chunked through the images) and
    4 decode steps through the runner and the paged cache give HF's logits at every prompt-end and decode
    position."""
    _, hf, processor = checkpoint
    model = bundles[backend]
    seq = sequence(model, processor, count)
    assert seq.token_ids == hf_inputs(processor, count)["input_ids"][0].tolist()
    assert len({span.length for span in seq.images}) == count  # the sizes take different grids
    want = hf_logits(hf, processor, count, TAIL)
    run, prompt = runner(model), len(seq.token_ids)
    got, begin = [], 0
    for size in (7, 13, 1000):  # chunks that cut through the images
        size = min(size, prompt - begin)
        logits = run.forward_logits([ScheduledChunk(seq, begin, size)])
        begin += size
        if begin == prompt:
            got.append(logits[0].clone())
            break
    for token in TAIL:
        seq.token_ids.append(token)
        got.append(run.forward_logits([ScheduledChunk(seq, len(seq.token_ids) - 1, 1)])[0].clone())
    diff = (torch.stack(got) - want[prompt - 1 :]).abs().max().item()
    print(f"qwen2-vl {count} image(s), {backend}: max abs logit diff {diff:.2e}")
    assert diff <= ATOL, f"max abs diff {diff:.3e}"


def test_positions_equal_hf_rope_index(checkpoint: tuple[Path, Any, Any], bundles: dict[str, Any]) -> None:
    """A sequence's M-RoPE positions and delta are HF's ``get_rope_index`` (two images of different grids);
    tokens after the prompt continue at offset + delta."""
    _, hf, processor = checkpoint
    seq = sequence(bundles["torch"], processor, 2)
    inputs = hf_inputs(processor, 2)
    want, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"])
    assert seq.mrope_positions.tolist() == want[:, 0].tolist()
    assert seq.rope_delta == int(delta) < 0
    end = len(seq.token_ids)
    assert seq.rope_positions(end - 2, end + 2).tolist() == [
        [int(want[c, 0, -2]), int(want[c, 0, -1]), end + seq.rope_delta, end + 1 + seq.rope_delta] for c in range(3)]


def test_one_tower_call_for_all_images_of_a_step(checkpoint: tuple[Path, Any, Any], bundles: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A step prefilling a text-only, a one-image and a two-image prompt encodes the three images in one
    tower call; each last-token row equals HF's."""
    _, hf, processor = checkpoint
    model = bundles["torch"]
    calls: list[int] = []
    encode = model.encode_image_grids
    monkeypatch.setattr(model, "encode_image_grids",
                        lambda patches, grids: (calls.append(len(grids)), encode(patches, grids))[1])
    seqs = [sequence(model, processor, count) for count in (0, 1, 2)]
    for k, seq in enumerate(seqs):
        seq.block_table = list(range(40 * k, 40 * k + 40))
    rows = runner(model, 120).forward_logits([ScheduledChunk(seq, 0, len(seq.token_ids)) for seq in seqs])
    assert calls == [3]
    for row, count in zip(rows, (0, 1, 2), strict=True):
        assert (row - hf_logits(hf, processor, count, [])[-1]).abs().max().item() <= ATOL


def hf_generate(hf: Any, processor: Any, count: int) -> list[int]:
    inputs = hf_inputs(processor, count)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def make_engine(directory: Path, **overrides: Any) -> AsyncEngine:
    settings = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 2048, **overrides}
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


async def test_prefix_cache_reuses_the_same_image_only(checkpoint: tuple[Path, Any, Any]) -> None:
    """Same text, another image of the same size: only the blocks before the image are reused; the same
    image again: its blocks are reused too, and the output (rotated at the reused M-RoPE positions) is
    unchanged."""
    directory, _, processor = checkpoint
    ids = unexpanded_ids(processor, 1)
    before = ids.index(IMAGE_TOKEN)
    async with make_engine(directory, block_size=4) as engine:
        first = await engine.generate(ids, images=[picture("wide", 1)], **GREEDY)
        other = await engine.generate(ids, images=[picture("wide", 9)], **GREEDY)
        again = await engine.generate(ids, images=[picture("wide", 1)], **GREEDY)
    assert first.usage.cached_tokens == 0
    assert other.usage.cached_tokens == before // 4 * 4
    assert other.token_ids != first.token_ids
    image_tokens = first.usage.prompt_tokens - len(ids) + 1
    assert again.usage.cached_tokens >= before + image_tokens
    assert again.token_ids == first.token_ids


def test_config_layouts_and_bad_inputs(checkpoint: tuple[Path, Any, Any], bundles: dict[str, Any]) -> None:
    """The nested (transformers 5) and flat (older) config layouts read alike; videos, images without
    their grid and configs without ``mrope_section`` raise ``ValueError`` naming the field."""
    _, hf, _ = checkpoint
    nested = hf.config.to_dict()
    text = nested["text_config"]
    rope = text["rope_parameters"]
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **text,
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "rope_theta": rope["rope_theta"], "model_type": "qwen2_vl"}
    flat.pop("rope_parameters")
    assert ModelConfig.from_hf_config(flat) == ModelConfig.from_hf_config(nested)
    config = ModelConfig.from_hf_config(nested)
    assert config.mrope_section == (2, 3, 3) and config.rope_scaling is None and config.qkv_bias
    assert not config.tie_word_embeddings
    assert ModelConfig.from_hf_config({**nested, "tie_word_embeddings": True}).tie_word_embeddings
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.from_hf_config({**flat, "rope_scaling": None})
    processor = bundles["torch"].image_processor
    with pytest.raises(ValueError, match="pixel_values_videos"):
        processor.prepare({"pixel_values_videos": torch.zeros(16, 96), "video_grid_thw": [[2, 2, 4]]})
    with pytest.raises(ValueError, match="image_grid_thw"):
        processor.prepare(torch.zeros(16, 96))
    with pytest.raises(ValueError, match="pixel_values"):
        processor.prepare({"pixel_values": torch.zeros(15, 96), "image_grid_thw": [[1, 4, 4]]})
    with pytest.raises(ValueError, match="image_grid_thw"):
        processor.prepare({"pixel_values": torch.zeros(12, 96), "image_grid_thw": [[1, 3, 4]]})


async def test_chat_image_parts_are_wrapped_in_vision_tokens(checkpoint: tuple[Path, Any, Any]) -> None:
    """A chat image part becomes vision start, image and vision end tokens (as Qwen2-VL's chat template
    writes them), and generates as the same prompt written out with ``images=``."""
    directory, _, _ = checkpoint
    messages = [{"role": "user", "content": [{"type": "text", "text": "look at "},
                                             {"type": "image", "image": picture("wide", 1)},
                                             {"type": "text", "text": " please"}]}]
    async with make_engine(directory) as engine:
        ids, images = engine.encode_with_images(messages)
        written = engine.encode_prompt([{"role": "user", "content": "look at %#& please"}])
        chat = await engine.generate(messages, **GREEDY)
        plain = await engine.generate(written, images=[picture("wide", 1)], **GREEDY)
    at = ids.index(IMAGE_TOKEN)
    assert ids == written and ids[at - 1 : at + 2] == [START_TOKEN, IMAGE_TOKEN, END_TOKEN] and len(images) == 1
    assert chat.token_ids == plain.token_ids and chat.usage.prompt_tokens == plain.usage.prompt_tokens


def test_older_checkpoint_names_and_fields_load_alike(checkpoint: tuple[Path, Any, Any],
                                                      bundles: dict[str, Any]) -> None:
    """Tensors named as earlier transformers saved them (``model.*``, ``visual.*``) and the ``in_chans``
    field of early vision configs give the same model; a missing tower tensor raises ``ValueError``."""
    from asyncllm.kernels import TORCH_OPS
    from asyncllm.models import build_model

    _, hf, _ = checkpoint
    nested = hf.config.to_dict()
    vision = {k: v for k, v in nested["vision_config"].items() if k != "in_channels"}
    config = ModelConfig.from_hf_config({**nested, "vision_config": {**vision, "in_chans": 3}})
    assert config == bundles["torch"].config
    old = {name.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tensor
           for name, tensor in hf.state_dict().items()}
    model = build_model(config, TORCH_OPS, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(old.items())
    ours = dict(bundles["torch"].state_dict())
    assert all(torch.equal(tensor, ours[name]) for name, tensor in model.state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        model.load_weights((k, v) for k, v in old.items() if k != "visual.merger.ln_q.bias")


def test_decode_graph_settings_leave_mrope_steps_eager(checkpoint: tuple[Path, Any, Any],
                                                       bundles: dict[str, Any]) -> None:
    """Padded decode buffers hold 1-D offsets without the rope delta, so a runner given decode-graph
    settings for an M-RoPE model builds none and decodes eagerly, at HF's positions."""
    from asyncllm.cuda_graphs import DecodeGraphSettings

    _, hf, processor = checkpoint
    model = bundles["auto"]
    spec = KVCacheSpec.for_model(model.config, num_blocks=40, block_size=4, dtype=torch.float32)
    run = ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=160,
                      decode_graphs=DecodeGraphSettings(batch_sizes=(1, 2), capture=False))
    assert run.graphs is None
    seq = sequence(model, processor, 2)
    run.forward_logits([ScheduledChunk(seq, 0, len(seq.token_ids))])
    seq.token_ids.append(TAIL[0])
    got = run.forward_logits([ScheduledChunk(seq, len(seq.token_ids) - 1, 1)])[0]
    assert seq.rope_delta != 0
    assert (got - hf_logits(hf, processor, 2, TAIL[:1])[-1]).abs().max().item() <= ATOL
