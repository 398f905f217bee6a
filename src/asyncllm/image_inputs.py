"""Images as requests give them: per-request limits, decoding (PIL images, encoded bytes, file paths, ready
pixel tensors), ``data:`` URLs and fetching ``http(s)`` URLs from an allow-list of hosts.

Every rejection is a ``ValueError`` whose message starts with the field at fault (``images``, ``images[k]``
or the request field an URL came from), so each surface can report it as its own field. Nothing here keeps
state between calls; fetching blocks, so async callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.images import ImageProcessor, PreparedImage

__all__ = ["ImageFetchPolicy", "ImageLimits", "ImageURL", "check_image_count", "fetch_image", "load_image",
           "needs_decoding", "prepare_images", "read_image_url"]

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """What one request may hold: at most ``max_images`` images, each of at most ``max_pixels`` pixels
    (width times height, read from the encoded header before any pixel is decoded). A pixel tensor that is
    already preprocessed has the model's fixed size and is counted, not measured."""

    max_images: int
    max_pixels: int

    def __post_init__(self) -> None:
        for name in ("max_images", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def check_image_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_images:
        raise ValueError(f"images: {count} images exceed max_images_per_request={limits.max_images}")


def load_image(image: Any, limits: ImageLimits, where: str = "image") -> Any:
    """``image`` decoded: a fully loaded PIL image, or the pixel tensor unchanged. Encoded bytes and paths
    are opened lazily, their size checked against ``limits.max_pixels``, then decoded (so a truncated or
    corrupt file fails here, not later). ``ValueError`` naming ``where`` otherwise."""
    if isinstance(image, torch.Tensor):
        return image
    from PIL import Image

    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            if not image:
                raise ValueError(f"{where}: is empty")
            opened = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            opened = Image.open(image)
        elif isinstance(image, Image.Image):
            opened = image
        else:
            raise ValueError(f"{where}: expected a PIL image, bytes, a path or a pixel tensor, "
                             f"got {type(image).__name__}")
        width, height = opened.size
        if width * height > limits.max_pixels:
            raise ValueError(f"{where}: {width}x{height} = {width * height} pixels exceed "
                             f"max_image_pixels={limits.max_pixels}")
        if width < 1 or height < 1:
            raise ValueError(f"{where}: has no pixels ({width}x{height})")
        opened.load()
        return opened
    except ValueError:
        raise
    except FileNotFoundError as error:
        raise ValueError(f"{where}: no such file: {error.filename}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError, EOFError) as error:
        raise ValueError(f"{where}: cannot be decoded as an image ({error})") from None


def needs_decoding(image: Any) -> bool:
    """Whether ``prepare_images`` would decode ``image`` (encoded bytes, a path, a PIL image), rather than
    pass it through (``PreparedImage``) or only check its shape (ready pixel values: a tensor, or a mapping
    with ``pixel_values``)."""
    return not isinstance(image, (PreparedImage, torch.Tensor, Mapping))


def prepare_images(images: Sequence[Any], processor: ImageProcessor, limits: ImageLimits) -> list[PreparedImage]:
    """Each image as ``processor`` prepares it, after checking the count and each image against ``limits``;
    errors name ``images`` or ``images[k]``. Prepared images pass through; ready pixel values (a tensor, or
    a mapping with ``pixel_values``) are shape-checked by ``processor``."""
    check_image_count(len(images), limits)
    out = []
    for k, image in enumerate(images):
        if isinstance(image, PreparedImage):
            out.append(image)
            continue
        where = f"images[{k}]"
        loaded = image if isinstance(image, Mapping) else load_image(image, limits, where)
        try:
            out.append(processor.prepare(loaded))
        except ValueError as error:
            raise ValueError(f"{where}: {str(error).removeprefix('image: ')}") from None
    return out


# -- URLs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageURL:
    """An image a request gives by URL; ``field`` is where in the request it came from (errors name it)."""

    url: str
    field: str


@dataclass(frozen=True)
class ImageFetchPolicy:
    """Where images may come from. ``data:`` URLs are always read. An ``http(s)`` URL is fetched only when
    its host is one of ``allowed_hosts`` (exact, case-insensitive names; empty: none), within
    ``timeout`` seconds in all and at most ``max_bytes`` bytes; a redirect must stay on an allowed host."""

    allowed_hosts: tuple[str, ...] = ()
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024

    def __post_init__(self) -> None:
        hosts = tuple(self.allowed_hosts)
        for host in hosts:
            if not isinstance(host, str) or not host or host != host.strip() or "/" in host:
                raise ValueError(f"allowed_image_hosts: must be host names, got {host!r}")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in hosts))
        if not (self.timeout > 0 and self.timeout < float("inf")):
            raise ValueError(f"image_fetch_timeout: must be a positive number of seconds, got {self.timeout}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_image_bytes: must be an int >= 1, got {self.max_bytes!r}")

    def allows(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and (parts.hostname or "").lower() in self.allowed_hosts


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:image/...`` URL."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"{where}: not a valid data URL (expected data:image/<type>;base64,<data>)")
    mime = match.group("mime").strip().lower()
    if not mime.startswith("image/"):
        raise ValueError(f"{where}: the data URL's media type must be image/*, got {mime or 'none'!r}")
    if "base64" not in [p.strip().lower() for p in match.group("params").split(";")]:
        raise ValueError(f"{where}: the data URL must be base64-encoded (data:{mime};base64,...)")
    text = re.sub(r"\s+", "", match.group("data"))
    if len(text) * 3 // 4 > max_bytes:
        raise ValueError(f"{where}: the image takes over max_image_bytes={max_bytes} bytes")
    if not _BASE64.fullmatch(text) or len(text) % 4:
        raise ValueError(f"{where}: the data URL's payload is not valid base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the data URL's payload is not valid base64") from None
    if not data:
        raise ValueError(f"{where}: the data URL holds no bytes")
    return data


def read_image_url(ref: ImageURL, policy: ImageFetchPolicy) -> bytes:
    """The encoded image behind ``ref``: a ``data:`` URL decoded, or an allowed ``http(s)`` URL fetched
    (blocking). ``ValueError`` naming ``ref.field`` for anything else."""
    url, where = ref.url, ref.field
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, where, policy.max_bytes)
    if scheme not in ("http", "https"):
        raise ValueError(f"{where}: must be a data: URL or an http(s) URL, got scheme {scheme or 'none'!r}")
    if not policy.allows(url):
        host = urllib.parse.urlsplit(url).hostname or ""
        raise ValueError(f"{where}: fetching images from {host!r} is not allowed on this server; send the image "
                         f"inline as a base64 data: URL")
    return fetch_image(url, policy, where)


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: ImageFetchPolicy, where: str) -> None:
        self._policy, self._where = policy, where

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not self._policy.allows(newurl):
            raise ValueError(f"{self._where}: the image URL redirects to a host that is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, policy: ImageFetchPolicy, where: str) -> bytes:
    """GET ``url`` (its host must be allowed) within ``policy.timeout`` seconds and ``policy.max_bytes``."""
    if not policy.allows(url):
        raise ValueError(f"{where}: fetching from this host is not allowed")
    deadline = time.monotonic() + policy.timeout
    opener = urllib.request.build_opener(_AllowListRedirects(policy, where))
    request = urllib.request.Request(url, headers={"Accept": "image/*", "User-Agent": "asyncllm"})
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise ValueError(f"{where}: the image takes {length} bytes, over max_image_bytes={policy.max_bytes}")
            data = bytearray()
            while chunk := response.read(_CHUNK):
                data += chunk
                if len(data) > policy.max_bytes:
                    raise ValueError(f"{where}: the image takes over max_image_bytes={policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ValueError(f"{where}: fetching the image took over {policy.timeout:g} s")
    except urllib.error.HTTPError as error:
        raise ValueError(f"{where}: fetching the image failed with HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ValueError(f"{where}: fetching the image failed ({reason})") from None
    if not data:
        raise ValueError(f"{where}: the URL returned no bytes")
    return bytes(data)
