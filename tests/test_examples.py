"""Every file in ``examples/`` runs against a tiny random-weight Llama written as a Hugging Face directory."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("starlette")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SRC = str(ROOT / "src")


def _env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SRC if not path else f"{SRC}{os.pathsep}{path}", **extra}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"asyncllm_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tiny_hf_dir: Path) -> Path:
    return tiny_hf_dir


def test_every_example_has_a_header_saying_how_to_run_it() -> None:
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert names == ["batch_pipeline", "fastapi_app", "openai_client", "session_chat", "sse_starlette",
                     "vision_chat"]
    for name in names:
        header = _load(name).__doc__
        assert header and "Run:" in header, name


@pytest.mark.parametrize("name", ["session_chat", "batch_pipeline"])
def test_script_examples_run_as_scripts(name: str, model_dir: Path) -> None:
    """Model from the command line for one, from ``$ASYNCLLM_MODEL`` for the other."""
    argv = [str(model_dir)] if name == "session_chat" else []
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *argv], capture_output=True, text=True,
                            env=_env(ASYNCLLM_MODEL=str(model_dir)), timeout=120)
    assert result.returncode == 0, result.stderr
    if name == "session_chat":
        assert result.stdout.count("> ") == 3 and "transcript: 7 messages" in result.stdout
    else:
        assert result.stdout.count("  -> ") == 8 and "streamed:" in result.stdout


def test_session_chat_reuses_the_previous_turn(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replies = asyncio.run(_load("session_chat").chat(str(model_dir), ["Hi", "And then?"], max_tokens=6))
    assert len(replies) == 2
    reused = [int(n) for n in re.findall(r"(\d+) reused", capsys.readouterr().out)]
    assert reused[0] == 0 and reused[1] > 0


def test_vision_chat_runs_as_a_script(tiny_llava_dir: Path, tmp_path: Path) -> None:
    """The tiny LLaVA from the command line, with an image file and with the generated stripes."""
    from ._images import png_bytes

    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(seed=3))
    for extra in ([str(image)], []):
        result = subprocess.run([sys.executable, str(EXAMPLES / "vision_chat.py"), str(tiny_llava_dir), *extra,
                                 "--max-tokens", "6"], capture_output=True, text=True, env=_env(), timeout=120)
        assert result.returncode == 0, result.stderr
        reused = [int(n) for n in re.findall(r"(\d+) reused", result.stdout)]
        assert result.stdout.count("> ") == 3 and len(reused) == 3 and reused[0] == 0 and min(reused[1:]) > 0


def test_vision_chat_answers_about_the_image_and_reuses_it(tiny_llava_dir: Path) -> None:
    """The first reply is the engine's own answer for that image and question; the next turn reuses every
    full block of the first turn's prompt, image tokens included."""
    from asyncllm import AsyncEngine

    from ._images import png_bytes

    example = _load("vision_chat")
    image = png_bytes(seed=4)
    options = {"device": "cpu", "kv_cache_tokens": 1024, "block_size": 4}
    first, second = asyncio.run(example.chat(str(tiny_llava_dir), image, ["What is this?", "Really?"],
                                             max_tokens=6, **options))

    async def reference() -> list[int]:
        async with AsyncEngine.from_pretrained(tiny_llava_dir, enable_prefix_caching=False, **options) as engine:
            content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
            reply = await engine.generate([{"role": "user", "content": content}], max_tokens=6, temperature=0)
            return reply.token_ids

    assert first.token_ids == asyncio.run(reference())
    assert second.usage.cached_tokens >= first.usage.prompt_tokens // 4 * 4 > 16


def test_batch_pipeline_returns_completions_in_order(model_dir: Path) -> None:
    completions = _load("batch_pipeline").run(str(model_dir), ["one", "two", "three"], max_tokens=5)
    assert len(completions) == 3 and all(1 <= c.usage.completion_tokens <= 5 for c in completions)


def test_fastapi_app_serves_openai_routes_and_its_own(model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app = _load("fastapi_app").build_app(str(model_dir))
    with TestClient(app) as client:  # runs the lifespan: the engine starts and closes with the app
        r = client.post("/llm/v1/chat/completions", json={
            "model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        r = client.get("/haiku", params={"topic": "rivers", "max_tokens": 5})
        assert r.status_code == 200 and 1 <= r.json()["tokens"] <= 5


def test_sse_starlette_streams_deltas_then_done(model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app = _load("sse_starlette").build_app(str(model_dir), max_tokens=8)
    with TestClient(app) as client:
        assert "EventSource" in client.get("/").text
        with client.stream("GET", "/stream", params={"prompt": "Hi"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            body = "".join(response.iter_text())
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "event: done\ndata: {}"
    deltas = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert deltas and all(isinstance(d, str) and d for d in deltas)


def test_openai_client_against_asyncllm_serve(model_dir: Path) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    command = [sys.executable, "-m", "asyncllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
               "--device", "cpu", "--kv-cache-tokens", "4096", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert match, (line, process.stderr.read() if process.stderr else "")
        text, streamed = _load("openai_client").run(match.group(1), max_tokens=8)
        assert text and streamed == text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    assert "Traceback" not in stderr, stderr
