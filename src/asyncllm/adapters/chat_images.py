"""The images of one chat request: read their URLs, check and preprocess them, before the request is
submitted, so that a bad image is a 400 naming its request field and never reaches the engine's loop.

Reading URLs (base64 decoding, allow-listed fetches) runs in worker threads; decoding and preprocessing run
on the engine's model thread (``AsyncEngine.run_on_model_thread``), between model steps. The event loop only
waits, so other requests keep streaming meanwhile.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from asyncllm.adapters.errors import APIError, field_of, from_value_error, invalid
from asyncllm.adapters.openai_schema import Message, image_refs
from asyncllm.engine import AsyncEngine
from asyncllm.image_inputs import ImageFetchPolicy, ImageURL, check_image_count, read_image_url

_IMAGE_INDEX = re.compile(r"images\[(\d+)\]")


def part_field(ref: ImageURL) -> str:
    """The content part an image came from (``messages[i].content[j]``)."""
    return ref.field.removesuffix(".image_url.url")


def image_error(error: ValueError, fields: list[str]) -> APIError:
    """A 400 for an engine image error: ``images[k]`` becomes the field of image ``k``, ``images``
    (the count) becomes ``messages``."""
    message = str(error)
    field = field_of(message)
    match = _IMAGE_INDEX.fullmatch(field or "")
    if match and int(match.group(1)) < len(fields):
        param = fields[int(match.group(1))]
        return invalid(param + message[len(field or ""):], param)
    return from_value_error(error, {"images": "messages", "prompt": "messages"})


async def resolve_images(engine: AsyncEngine, messages: list[Message], policy: ImageFetchPolicy) -> list[Message]:
    """``messages`` with each ``ImageURL`` part replaced by the prepared image (what the engine takes
    and the prefix cache keys), after checking the model takes images, the count and every image against the
    engine's limits. Messages without images are returned unchanged."""
    refs = image_refs(messages)
    if not refs:
        return messages
    fields = [part_field(ref) for ref in refs]
    if engine.model_config.vision is None:
        raise invalid(f"{fields[0]}: this model takes no images; send text content only", fields[0])
    try:
        check_image_count(len(refs), engine.image_limits)
    except ValueError as error:
        raise image_error(error, fields) from None
    read = await asyncio.gather(*(asyncio.to_thread(read_image_url, ref, policy) for ref in refs),
                                return_exceptions=True)
    for result in read:  # every read has ended; report the first bad image in prompt order
        if isinstance(result, ValueError):
            raise from_value_error(result) from None
        if isinstance(result, BaseException):
            raise result
    data = [result for result in read if isinstance(result, bytes)]
    try:
        pixels = await engine.run_on_model_thread(engine.prepare_images, data)
    except ValueError as error:
        raise image_error(error, fields) from None
    by_ref = dict(zip((id(ref) for ref in refs), pixels, strict=True))
    out: list[Message] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [_with_pixels(part, by_ref) for part in content]
        out.append({**message, "content": content})
    return out


def _with_pixels(part: dict[str, Any], by_ref: dict[int, Any]) -> dict[str, Any]:
    if part["type"] == "image" and id(part["image"]) in by_ref:
        return {"type": "image", "image": by_ref[id(part["image"])]}
    return part
