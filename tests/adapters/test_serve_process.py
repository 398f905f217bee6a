"""``asyncllm serve`` as a real process on 127.0.0.1: keep-alive latency, the max_tokens flags, SIGTERM
draining, and ``python -m asyncllm``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")

import httpx

from ._support import parse_prometheus
from .test_asgi_server import _write_tiny_model

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SRC if not path else f"{SRC}{os.pathsep}{path}"}


def _start(model_dir: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "asyncllm", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu", "--kv-cache-tokens", "4096", "--log-level", "warning", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        process.kill()
        raise AssertionError((line, process.communicate()[1]))
    return process, f"http://127.0.0.1:{match.group(1)}"


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 30) -> str:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_parts: Any) -> Path:
    directory = tmp_path_factory.mktemp("serve") / "tiny-llama"
    _write_tiny_model(directory, tiny_model_parts)
    return directory


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    process, url = _start(model_dir, "--max-tokens-limit", "64", "--default-max-tokens", "5")
    try:
        yield url
    finally:
        stderr = _stop(process)
        assert "Traceback" not in stderr, stderr


def test_python_dash_m_asyncllm_help() -> None:
    result = subprocess.run([sys.executable, "-m", "asyncllm", "--help"], capture_output=True, text=True,
                            env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: asyncllm") and "serve" in result.stdout


def _e2e_seconds(client: httpx.Client) -> float:
    samples, _ = parse_prometheus(client.get("/metrics").text)
    return samples[("asyncllm_e2e_request_latency_seconds_sum", ())]


def test_keep_alive_requests_are_not_delayed_by_nagle(server: str) -> None:
    """With Nagle's algorithm on, a response written in two parts waits for the client's delayed ACK:
    about 40 ms per request on a kept-alive connection, 0.8 s for 20."""
    body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server, timeout=30) as client:
        for _ in range(3):  # warm up: first-use costs are not what is measured here
            assert client.post("/v1/completions", json=body).status_code == 200
        peers = set()
        start = time.perf_counter()
        for _ in range(20):
            r = client.post("/tokenize", json={"prompt": "Hi"})
            assert r.status_code == 200
            peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
        tokenize = time.perf_counter() - start

        # generation: the time outside the server's own request latency (the model step of a loaded
        # machine varies) is the transport's
        server_before = _e2e_seconds(client)
        start = time.perf_counter()
        for _ in range(20):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
            peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
        completions = time.perf_counter() - start
        outside = completions - (_e2e_seconds(client) - server_before)
    assert len(peers) == 1  # one kept-alive connection throughout
    assert tokenize < 0.4, f"20 /tokenize requests on one connection took {tokenize * 1000:.0f} ms"
    assert outside < 0.4, (f"20 completions on one connection spent {outside * 1000:.0f} ms outside the "
                           f"server's request latency (total {completions * 1000:.0f} ms)")


def test_serve_max_tokens_default_and_limit(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    r = httpx.post(f"{server}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "64" in r.json()["error"]["message"]


def _stream(client: httpx.Client, url: str, max_tokens: int) -> Any:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True}
    return client.stream("POST", f"{url}/v1/completions", json=body)


def _events(lines: list[str]) -> list[Any]:
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_parts: Any) -> Path:
    """The tiny model with room for a stream far longer than any grace period (60k positions)."""
    tokenizer, hf_config, state = tiny_model_parts
    directory = tmp_path_factory.mktemp("serve-long") / "tiny-llama"
    _write_tiny_model(directory, (tokenizer, {**hf_config, "max_position_embeddings": 1 << 16}, state))
    return directory


def test_sigterm_drains_then_ends_open_streams_with_an_error_event(long_context_model_dir: Path) -> None:
    process, url = _start(long_context_model_dir, "--shutdown-grace", "3", "--kv-cache-tokens", "66000")
    try:
        with httpx.Client(timeout=60) as long_client, httpx.Client(timeout=60) as short_client, \
                _stream(long_client, url, 60000) as long_response:
            assert long_response.status_code == 200
            long_lines = long_response.iter_lines()
            first = [next(long_lines) for _ in range(6)]  # a few tokens are out: the stream is running
            with _stream(short_client, url, 16) as short_response:
                assert short_response.status_code == 200
                short_lines = short_response.iter_lines()
                short_first = next(short_lines)
                sent = time.monotonic()
                process.send_signal(signal.SIGTERM)
                short_events = _events([short_first, *short_lines])
            long_events = _events([*first, *long_lines])
            ended = time.monotonic() - sent
        # the short stream finished within the grace period: complete, no error
        assert short_events[-1] == "[DONE]" and "error" not in short_events[-2], short_events[-2:]
        assert [e["choices"][0]["finish_reason"] for e in short_events[:-1]].count("length") == 1
        assert not any("error" in e for e in short_events[:-1])
        # the long one was still running when the grace period ended: an error event, then [DONE]
        assert long_events[-1] == "[DONE]" and "error" in long_events[-2], long_events[-3:]
        assert long_events[-2]["error"]["type"] == "server_error"
        assert not any(e["choices"][0]["finish_reason"] for e in long_events[:-2])
        assert 3 <= ended < 12, ended
        stderr = _stop(process, signal.SIGTERM, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr, stderr
