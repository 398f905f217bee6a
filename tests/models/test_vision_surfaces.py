"""Images through the Python surfaces over a tiny random LLaVA loaded from a directory: the engine's
per-request limits (count, pixels, undecodable data) as ``ValueError`` naming the field, a bad request
beside a good concurrent one, session turns that reuse an image's KV, and the pipeline's image prompts
against ``engine.generate`` with the same images."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from asyncllm import EngineConfig, pipeline
from asyncllm.image_inputs import ImageLimits, load_image

from .._images import png_bytes
from ..conftest import LLAVA_IMAGE_TEXT

GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
NUM_IMAGE_TOKENS = 16


def ask(image: Any, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("field", ["max_images_per_request", "max_image_pixels"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_image_limits_are_validated(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be an int >= 1"):
        EngineConfig(**{field: value})


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    """A 40x48 PNG against 1919 pixels: refused from its header alone (``load_image`` never decodes it),
    and accepted at exactly its size."""
    data = png_bytes(width=48, height=40)
    with pytest.raises(ValueError, match=r"^images\[2\]: 48x40 = 1920 pixels exceed max_image_pixels=1919"):
        load_image(data, ImageLimits(max_images=1, max_pixels=1919), "images[2]")
    assert load_image(data, ImageLimits(max_images=1, max_pixels=1920)).size == (48, 40)


async def test_limits_and_undecodable_images_are_value_errors_naming_the_field(make_llava_engine: Any) -> None:
    image = png_bytes()
    async with make_llava_engine(max_images_per_request=2, max_image_pixels=48 * 40) as engine:
        three = [{"role": "user", "content": [{"type": "image", "image": image}] * 3}]
        with pytest.raises(ValueError, match=r"^images: 3 images exceed max_images_per_request=2"):
            await engine.generate(three, **GREEDY)
        with pytest.raises(ValueError, match=r"^images\[0\]: 49x40 = 1960 pixels exceed max_image_pixels=1920"):
            await engine.generate(ask(png_bytes(width=49)), **GREEDY)
        with pytest.raises(ValueError, match=r"^images\[1\]: cannot be decoded as an image"):
            await engine.generate(f"{LLAVA_IMAGE_TEXT} and {LLAVA_IMAGE_TEXT}", images=[image, b"not an image"],
                                  **GREEDY)
        with pytest.raises(ValueError, match=r"^images\[0\]: cannot be decoded as an image"):
            await engine.generate(ask(image[:100]), **GREEDY)  # a truncated PNG: its header reads, its data not
        assert engine.stats().kv_blocks_used == 0 and engine.stats().waiting == 0


async def test_a_text_only_model_refuses_images(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        with pytest.raises(ValueError, match=r"^images: this model takes no images"):
            await engine.generate(ask(png_bytes()), **GREEDY)


async def test_a_bad_image_request_does_not_fail_its_concurrent_neighbour(make_llava_engine: Any) -> None:
    async with make_llava_engine(enable_prefix_caching=False) as engine:
        alone = await engine.generate(ask(png_bytes(seed=2)), **GREEDY)

        async def bad() -> None:
            await asyncio.sleep(0)
            with pytest.raises(ValueError, match=r"^images\[0\]"):
                await engine.generate(ask(b"\x89PNG broken"), **GREEDY)

        good, _ = await asyncio.gather(engine.generate(ask(png_bytes(seed=2)), **GREEDY), bad())
    assert good.token_ids == alone.token_ids and good.finish_reason == "length"


class _SlowProcessor:
    """Wraps an image processor: records the thread each image is prepared on and takes ``delay`` seconds."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.threads = inner, delay, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, image: Any) -> Any:
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        return self.inner.prepare(image)


async def test_images_are_prepared_off_the_event_loop(make_llava_engine: Any) -> None:
    """Decoding and preprocessing run on the model thread: the loop keeps ticking through a slow image, a
    stream's errors still name the image, and a session turn whose image cannot be decoded leaves the
    session usable."""
    async with make_llava_engine() as engine:
        slow = _SlowProcessor(engine.model.image_processor, delay=0.3)
        engine.model.image_processor = slow
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            result = await engine.generate(ask(png_bytes(seed=6)), **GREEDY)
        finally:
            task.cancel()
        assert len(result.token_ids) == 8
        assert slow.threads and threading.get_ident() not in slow.threads
        assert ticks >= 10  # the loop ran through the 0.3 s of preparation, not blocked by it
        slow.delay = 0.0
        stream = engine.stream(ask(b"\x89PNG broken"), **GREEDY)  # handed out before the image is read
        with pytest.raises(ValueError, match=r"^images\[0\]: cannot be decoded"):
            async for _ in stream:
                pass
        async with engine.session() as chat:
            with pytest.raises(ValueError, match=r"^images\[0\]"):
                await chat.send([{"type": "image", "image": b"junk"}], **GREEDY)
            assert not chat.busy and chat.messages == []
            assert len((await chat.send([{"type": "image", "image": png_bytes(seed=6)}], **GREEDY)).token_ids) == 8
        assert engine.stats().kv_blocks_used == 0 and engine.stats().waiting == 0


async def test_a_stream_closed_while_its_images_are_prepared_runs_nothing(make_llava_engine: Any) -> None:
    async with make_llava_engine() as engine:
        slow = _SlowProcessor(engine.model.image_processor, delay=0.3)
        engine.model.image_processor = slow
        task = asyncio.create_task(engine.generate(ask(png_bytes(seed=7)), **GREEDY))
        while not slow.threads:
            await asyncio.sleep(0.01)
        task.cancel()  # during the preparation
        with pytest.raises(asyncio.CancelledError):
            await task
        stream = engine.stream_detailed(ask(png_bytes(seed=7)), **GREEDY)
        first = asyncio.create_task(stream.__anext__())
        while len(slow.threads) < 2:
            await asyncio.sleep(0.01)
        await stream.aclose()  # from another task, during the preparation: the request ends as aborted
        assert (await first).finish_reason == "abort"
        for _ in range(100):
            stats = engine.stats()
            if stats.running == stats.waiting == stats.kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


async def test_a_session_turn_about_the_same_image_reuses_its_kv(make_llava_engine: Any) -> None:
    """Turn 2 (text only, about the image of turn 1) reuses every token of turn 1, image tokens included,
    and answers as a fresh engine does for the whole transcript."""
    image = png_bytes(seed=3)
    turn1 = [{"type": "text", "text": "Look: "}, {"type": "image", "image": image}]
    async with make_llava_engine(block_size=4) as engine, engine.session() as session:
        first = await session.send(turn1, **GREEDY)
        second = await session.send("And its colour?", **GREEDY)
        transcript = session.messages
    assert first.usage.prompt_tokens > NUM_IMAGE_TOKENS and first.usage.cached_tokens == 0
    # turn 1's prompt and reply, image tokens included, are in the pinned KV: all of it is reused
    assert second.usage.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens - 4
    assert transcript[0]["content"] == turn1
    async with make_llava_engine(enable_prefix_caching=False) as fresh:
        want = await fresh.generate([*transcript[:2], {"role": "user", "content": "And its colour?"}], **GREEDY)
    assert second.token_ids == want.token_ids
    assert second.usage.prompt_tokens == want.usage.prompt_tokens


async def _generate_each(make_llava_engine: Any, prompts: list[tuple[Any, list[Any]]]) -> list[list[int]]:
    async with make_llava_engine(enable_prefix_caching=False) as engine:
        return [(await engine.generate(p, images=images, **GREEDY)).token_ids for p, images in prompts]


def test_pipeline_image_prompts_equal_engine_generate(make_llava_engine: Any) -> None:
    """``(text, image)``, ``(text, [images])`` and ``{"prompt", "images"}``: the image token is put in front
    of text that holds none, one per image; chat messages take image parts."""
    a, b = png_bytes(seed=4), png_bytes(seed=5)
    tag = LLAVA_IMAGE_TEXT
    want = asyncio.run(_generate_each(make_llava_engine, [
        (f"{tag}\nDescribe it.", [a]), (f"{tag}\n{tag}\nCompare them.", [a, b]),
        (f"Before {tag} after", [b]), (ask(a), []),
    ]))
    with pipeline(make_llava_engine()) as pipe:
        one = pipe(("Describe it.", a), **GREEDY)
        batch = pipe([("Describe it.", a), ("Compare them.", [a, b]), {"prompt": f"Before {tag} after", "images": [b]}],
                     **GREEDY)
        chat = pipe.chat(ask(a), **GREEDY)
        streamed = pipe.stream(("Describe it.", [a]), **GREEDY)
        text = "".join(streamed)
        with pytest.raises(ValueError, match=r"^prompts\[1\]: images\[0\]: cannot be decoded"):
            pipe([("Describe it.", a), ("Describe it.", b"junk")], **GREEDY)
        with pytest.raises(ValueError, match=r"^prompts: prompt: an image prompt is a \(text, image\) pair"):
            pipe(("Describe it.", a, b), **GREEDY)
        with pytest.raises(ValueError, match=r"^prompts: prompt: unknown key 'image'"):
            pipe({"prompt": "Describe it.", "image": a}, **GREEDY)
    assert one.token_ids == want[0]
    assert [c.token_ids for c in batch] == want[:3]
    assert chat.token_ids == want[3]
    assert streamed.completion is not None and streamed.completion.token_ids == want[0] and text == one.text
    assert len({tuple(w) for w in want}) == 4  # the images and texts matter: four different answers
