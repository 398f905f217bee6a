"""Images through the OpenAI-compatible app over a tiny random LLaVA: the official ``openai`` client sends
a base64 data URL and gets the engine's own greedy answer for that image (plain and streamed, and in a
session, whose next turn reuses the image's KV); bad images are 400s naming the content part or its URL; a
remote URL is fetched only from an allowed host (a local HTTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")

from asyncllm.adapters.asgi import create_app

from .._images import data_url, png_bytes
from ._support import asgi_client, running_server

GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
TEXT = "What is in the picture?"
URL_FIELD = "messages[0].content[1].image_url.url"
PART_FIELD = "messages[0].content[1]"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": TEXT}, *parts]}]


async def reference(make_llava_engine: Any, images: list[bytes]) -> Any:
    """The engine's own greedy answer for ``TEXT`` then ``images`` as engine image parts."""
    content = [{"type": "text", "text": TEXT}, *({"type": "image", "image": i} for i in images)]
    async with make_llava_engine(enable_prefix_caching=False) as engine:
        return await engine.generate([{"role": "user", "content": content}], **GREEDY)


def test_openai_client_sends_a_data_url_image(make_llava_engine: Any, chat_tokenizer: Any) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    image = png_bytes(seed=7)
    want = asyncio.run(reference(make_llava_engine, [image]))
    other = asyncio.run(reference(make_llava_engine, [png_bytes(seed=8)]))
    assert other.text != want.text  # the answer depends on the image
    with running_server(create_app(make_llava_engine(), model_name="llava")) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        messages: Any = user(image_part(data_url(image)))
        reply = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0,
                                               logprobs=True, extra_body={"ignore_eos": True})
        stream = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="llava", messages=user(image_part("data:image/png;base64,@@")),
                                           max_tokens=8)
    assert reply.choices[0].message.content == want.text == streamed
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.usage.prompt_tokens, 8)
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    # the logprobs name each sampled token: they are the engine's tokens, one by one
    assert [lp.token for lp in reply.choices[0].logprobs.content] == [
        chat_tokenizer.decode([t], skip_special_tokens=False) for t in want.token_ids]
    assert bad.value.status_code == 400 and bad.value.body["param"] == URL_FIELD  # type: ignore[index]


async def post(client: Any, messages: Any, **extra: Any) -> Any:
    return await client.post("/v1/chat/completions", json={"messages": messages, **GREEDY, **extra})


@pytest.mark.parametrize(("part", "param", "words"), [
    (image_part("data:image/png;base64,iVBORw0KGgo*"), URL_FIELD, "not valid base64"),
    (image_part("data:image/png;base64,iVBORw0KGg"), URL_FIELD, "not valid base64"),
    (image_part("data:text/plain;base64,aGVsbG8="), URL_FIELD, "image/*"),
    (image_part("data:image/png,rawbytes"), URL_FIELD, "base64"),
    (image_part(data_url(b"hello, not an image")), PART_FIELD, "cannot be decoded as an image"),
    (image_part(data_url(png_bytes(width=49))), PART_FIELD, "exceed max_image_pixels=1920"),
    (image_part("ftp://example.com/cat.png"), URL_FIELD, "data: URL or an http(s) URL"),
    (image_part("https://example.com/cat.png"), URL_FIELD, "not allowed"),
    ({"type": "image_url", "image_url": {"url": data_url(png_bytes()), "detail": "max"}},
     "messages[0].content[1].image_url.detail", "detail"),
])
async def test_bad_images_are_400_naming_the_field(make_llava_engine: Any, part: dict[str, Any], param: str,
                                                   words: str) -> None:
    app = create_app(make_llava_engine(max_image_pixels=48 * 40, max_images_per_request=2))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        r = await post(client, user(part))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
        ok = await post(client, user(image_part(data_url(png_bytes()))))  # the app keeps serving
        assert ok.status_code == 200, ok.text


async def test_too_many_images_and_text_only_models_are_400(make_llava_engine: Any, make_tiny_engine: Any) -> None:
    part = image_part(data_url(png_bytes()))
    app = create_app(make_llava_engine(max_images_per_request=2))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        r = await post(client, user(part, part, part))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "max_images_per_request=2" in r.json()["error"]["message"]
        assert (await post(client, user(part, part))).status_code == 200
        # of several bad images, the first in prompt order is reported
        bad = [image_part("https://example.com/a.png"), image_part("data:image/png;base64,@")]
        for order, words in ((bad, "not allowed"), (bad[::-1], "base64")):
            r = await post(client, user(*order))
            assert r.status_code == 400 and r.json()["error"]["param"] == URL_FIELD, r.text
            assert words in r.json()["error"]["message"]
    app = create_app(make_tiny_engine())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        r = await post(client, user(part))
        assert r.status_code == 400 and r.json()["error"]["param"] == PART_FIELD, r.text
        assert "takes no images" in r.json()["error"]["message"]
        r = await client.post("/tokenize", json={"messages": user(part)})
        assert r.status_code == 400 and r.json()["error"]["param"] == PART_FIELD, r.text


async def test_a_bad_image_request_beside_a_good_one(make_llava_engine: Any) -> None:
    image = png_bytes(seed=9)
    want = await reference(make_llava_engine, [image])
    app = create_app(make_llava_engine())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        good, bad, good_stream = await asyncio.gather(
            post(client, user(image_part(data_url(image)))),
            post(client, user(image_part(data_url(image[: len(image) // 2])))),
            post(client, user(image_part(data_url(image))), stream=True))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == PART_FIELD, bad.text
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == want.text
    assert good_stream.status_code == 200 and '"finish_reason":"length"' in good_stream.text.replace(" ", "")


async def test_a_session_turn_reuses_the_image_of_the_previous_turn(make_llava_engine: Any) -> None:
    image = png_bytes(seed=10)
    app = create_app(make_llava_engine(block_size=4))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        first = await post(client, user(image_part(data_url(image))), session_id="s1")
        second = await post(client, [{"role": "user", "content": "And the colours?"}], session_id="s1")
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    used, reused = first.json()["usage"], second.json()["usage"]
    cached = reused["prompt_tokens_details"]["cached_tokens"]
    # every full block of turn 1's prompt, image tokens included, is reused (the reply, rendered back as
    # text, may tokenize differently from the sampled tokens)
    assert cached >= used["prompt_tokens"] // 4 * 4 and used["prompt_tokens"] > 16


# -- remote URLs ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def image_server(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving ``files`` (``/redirect`` answers 302 to localhost); yields its
    base URL and the paths requested."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cat.png")
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_remote_images_come_only_from_allowed_hosts(make_llava_engine: Any) -> None:
    image = png_bytes(seed=11)
    want = await reference(make_llava_engine, [image])
    with image_server({"/cat.png": image, "/big.png": png_bytes(width=400, height=400)}) as (base, requested):
        refused = create_app(make_llava_engine(), allowed_image_hosts=("localhost",))
        async with refused.router.lifespan_context(refused), asgi_client(refused) as client:
            r = await post(client, user(image_part(f"{base}/cat.png")))
        assert r.status_code == 400 and r.json()["error"]["param"] == URL_FIELD, r.text
        assert "'127.0.0.1' is not allowed" in r.json()["error"]["message"]
        assert requested == []  # refused before any connection

        allowed = create_app(make_llava_engine(), allowed_image_hosts=("127.0.0.1",), max_image_bytes=50_000)
        async with allowed.router.lifespan_context(allowed), asgi_client(allowed) as client:
            ok = await post(client, user(image_part(f"{base}/cat.png")))
            missing = await post(client, user(image_part(f"{base}/missing.png")))
            big = await post(client, user(image_part(f"{base}/big.png")))
            redirected = await post(client, user(image_part(f"{base}/redirect")))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == want.text, ok.text
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
        assert big.status_code == 400 and "max_image_bytes=50000" in big.json()["error"]["message"]
        assert redirected.status_code == 400 and "redirects" in redirected.json()["error"]["message"]
        assert all(r.json()["error"]["param"] == URL_FIELD for r in (missing, big, redirected))
        assert requested == ["/cat.png", "/missing.png", "/big.png", "/redirect"]


def test_settings_and_the_serve_command_take_image_options(capsys: pytest.CaptureFixture[str]) -> None:
    from asyncllm.adapters.serve_cli import add_serve_command, run_serve
    from asyncllm.adapters.settings import ServerSettings

    for bad, field in (({"allowed_image_hosts": ("a/b",)}, "allowed_image_hosts"),
                       ({"image_fetch_timeout": 0.0}, "image_fetch_timeout"),
                       ({"max_image_bytes": 0}, "max_image_bytes")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            ServerSettings(**bad)
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "m", "--allowed-image-hosts", "a.example,b.example",
                              "--allowed-image-hosts", "c.example", "--max-images-per-request", "3"])
    assert args.allowed_image_hosts == ["a.example", "b.example", "c.example"]
    assert args.max_images_per_request == 3 and args.max_image_pixels is None
    # bad image options are refused, naming the field, before any model loads (this one does not exist)
    for flags, field in ((["--max-image-pixels", "0"], "max_image_pixels"),
                         (["--max-images-per-request", "-1"], "max_images_per_request"),
                         (["--image-fetch-timeout", "0"], "image_fetch_timeout"),
                         (["--allowed-image-hosts", "http://a.example/"], "allowed_image_hosts")):
        assert run_serve(parser.parse_args(["serve", "/nonexistent/model", *flags])) == 2
        assert f"asyncllm serve: {field}: " in capsys.readouterr().err
