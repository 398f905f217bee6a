"""Soak test of ``asyncllm serve`` on loopback: concurrent clients for a while, with client cancellations,
disconnects and bad inputs mixed in, then a check that the server let go of what it held.

    python benchmarks/soak.py                                 # 8 clients, 10 minutes, the default GGUF
    python benchmarks/soak.py --clients 4 --seconds 30        # a short check
    python benchmarks/soak.py --model path/to/model --serve-arg=--max-num-seqs=16

Starts the server itself as a subprocess (``python -m asyncllm serve``) on 127.0.0.1 and a free port.
Each client runs a bounded loop (``--max-requests-per-client``, and no request starts after the deadline)
of randomly chosen actions: plain and streamed chat and completions, session turns (then ``DELETE``),
streams the client abandons part way, requests it gives up on before the reply, connections dropped in
the middle of sending a request, and invalid requests that must get a 4xx. It prints requests completed,
cancelled by the client, answered 4xx, answered 5xx and other failures (transport errors, malformed
streams); p50/p99 latency of completed requests; the server's KV blocks in use, running requests and
open sessions once the clients are done (from ``GET /metrics``; all three should return to 0); and the
server's RSS growth between warm-up and the end. Not part of the test suite; exit status 1 when a 5xx, a
failure, a leak or an unexpected status was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

USER_PROMPTS = ["Name three rivers.", "Write a haiku about rain.", "What is 12 times 7?",
                "Explain TCP in one sentence.", "List four colours.", "Say hello in French."]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def done(self, started: float) -> None:
        self.outcomes["completed"] += 1
        self.latencies.append(time.perf_counter() - started)

    def status(self, r: httpx.Response, expect_4xx: bool = False) -> bool:
        """Record a non-2xx answer; True when the response was 2xx."""
        self.statuses[r.status_code] += 1
        if r.status_code < 300:
            if expect_4xx:
                self.problem(f"expected a 4xx, got {r.status_code}")
            return True
        if r.status_code >= 500:
            self.outcomes["5xx"] += 1
            self.problem(f"{r.status_code}: {r.text[:200]}")
        else:
            self.outcomes["failed_4xx"] += 1
            if not expect_4xx and r.status_code != 409:
                self.problem(f"unexpected {r.status_code}: {r.text[:200]}")
        return False

    def problem(self, text: str) -> None:
        self.outcomes["problems"] += 1
        if len(self.problems) < 20:
            self.problems.append(text)


def _sse_events(lines: list[str]) -> list[Any]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in lines if line.startswith("data: ")]


class Client:
    def __init__(self, index: int, url: str, args: argparse.Namespace, tally: Tally) -> None:
        self.index = index
        self.url = url
        self.args = args
        self.tally = tally
        self.rng = random.Random(args.seed * 1000 + index)
        self.http = httpx.AsyncClient(base_url=url, timeout=args.request_timeout,
                                      headers={"Authorization": f"Bearer {args.api_key}"})
        self.turns = 0

    def _chat_body(self, **extra: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.rng.choice(USER_PROMPTS)}],
                "max_tokens": self.rng.randint(1, self.args.max_tokens),
                "temperature": self.rng.choice([0.0, 0.7]), **extra}

    async def run(self, deadline: float) -> None:
        actions = [(self.plain, 4), (self.streamed, 4), (self.completion, 2), (self.session, 2),
                   (self.abandon_stream, 2), (self.give_up_waiting, 1), (self.drop_mid_request, 1),
                   (self.bad_input, 2)]
        funcs, weights = zip(*actions, strict=True)
        try:
            for _ in range(self.args.max_requests_per_client):
                if time.monotonic() >= deadline:
                    break
                action = self.rng.choices(funcs, weights)[0]
                try:
                    await action()
                except (httpx.TransportError, ValueError, KeyError) as error:
                    self.tally.outcomes["transport_error"] += 1
                    self.tally.problem(f"{action.__name__}: {type(error).__name__}: {error}")
        finally:
            await self.http.aclose()

    async def plain(self) -> None:
        started = time.perf_counter()
        r = await self.http.post("/v1/chat/completions", json=self._chat_body())
        if self.tally.status(r):
            reason = r.json()["choices"][0]["finish_reason"]
            if reason not in ("stop", "length"):
                self.tally.problem(f"finish_reason {reason!r}")
                return
            self.tally.done(started)

    async def completion(self) -> None:
        started = time.perf_counter()
        r = await self.http.post("/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": self.rng.randint(1, self.args.max_tokens),
            "n": self.rng.choice([1, 1, 2]), "seed": self.rng.randint(0, 1000)})
        if self.tally.status(r):
            self.tally.done(started)

    async def streamed(self, body: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        body = body or self._chat_body(stream=True, stream_options={"include_usage": True})
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if not self.tally.status(r):
                await r.aread()
                return
            lines = [line async for line in r.aiter_lines()]
        events = _sse_events(lines)
        if not events or events[-1] != "[DONE]" or any("error" in e for e in events[:-1]):
            self.tally.problem(f"bad stream ending: {lines[-3:]}")
            return
        self.tally.done(started)

    async def session(self) -> None:
        self.turns += 1
        session_id = f"soak-{self.index}-{self.turns}"
        for turn in range(self.rng.randint(1, 3)):
            started = time.perf_counter()
            body = self._chat_body(session_id=session_id)
            if turn == 0:
                body["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
            r = await self.http.post("/v1/chat/completions", json=body)
            if not self.tally.status(r):
                break
            self.tally.done(started)
        r = await self.http.delete(f"/v1/sessions/{session_id}")
        if r.status_code not in (200, 404):
            self.tally.status(r)

    async def abandon_stream(self) -> None:
        body = self._chat_body(stream=True, max_tokens=self.args.max_tokens * 4, ignore_eos=True)
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if not self.tally.status(r):
                await r.aread()
                return
            seen = 0
            async for _ in r.aiter_lines():
                seen += 1
                if seen >= self.rng.randint(2, 12):
                    break  # leaving the block closes the connection mid-stream
        self.tally.outcomes["cancelled"] += 1

    async def give_up_waiting(self) -> None:
        body = self._chat_body(max_tokens=self.args.max_tokens * 4, ignore_eos=True)
        try:
            await asyncio.wait_for(self.http.post("/v1/chat/completions", json=body),
                                   timeout=self.rng.uniform(0.01, 0.3))
        except asyncio.TimeoutError:
            self.tally.outcomes["cancelled"] += 1
            return
        self.tally.outcomes["completed"] += 1  # it was faster than the client's patience

    async def drop_mid_request(self) -> None:
        """Send headers and part of a body, then close the connection."""
        host, port = self.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(self._chat_body()).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + self.args.api_key.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:len(body) // 2])
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0, 0.05))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        self.tally.outcomes["cancelled"] += 1

    async def bad_input(self) -> None:
        rng = self.rng
        kind = rng.randrange(6)
        headers = None
        if kind == 0:
            content: Any = b'{"messages": [ {"role": "user", "content": '  # truncated JSON
        elif kind == 1:
            content = json.dumps(self._chat_body(temperature=-3))
        elif kind == 2:
            content = json.dumps({**self._chat_body(), "model": "no-such-model"})
        elif kind == 3:
            content = json.dumps({**self._chat_body(), "max_tokens": 10**9})
        elif kind == 4:
            content = json.dumps({"messages": [{"role": "tool", "content": 5}]})
        else:
            content = json.dumps(self._chat_body())
            headers = {"Authorization": "Bearer wrong-key"}
        r = await self.http.post("/v1/chat/completions", content=content, headers=headers)
        self.tally.status(r, expect_4xx=True)


def _sample_rss(pid: int, every: float, samples: list[int], stop: threading.Event) -> None:
    """Append the server's RSS to ``samples`` every ``every`` seconds until ``stop`` is set: whether growth
    levels off shows in the series, not in its two ends."""
    while not stop.wait(every):
        with contextlib.suppress(OSError, RuntimeError):
            samples.append(_rss_kib(pid))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(asyncllm_[a-z_]+) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "ASYNCLLM_API_KEYS": args.api_key}
    with socket.socket() as probe:  # a free port (the server also prints the one it bound)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "asyncllm", "serve", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *args.serve_arg]
    print("starting:", " ".join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, f"http://127.0.0.1:{match.group(1)}"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def soak(args: argparse.Namespace, url: str) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    clients = [Client(i, url, args, tally) for i in range(args.clients)]
    await asyncio.gather(*(c.run(deadline) for c in clients))
    return tally


def main(argv: list[str] | None = None) -> int:
    from asyncllm.assets import DEFAULT_MODEL_FILE, cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(cache_dir() / DEFAULT_MODEL_FILE))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long clients start requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of normal requests")
    parser.add_argument("--max-requests-per-client", type=int, default=100_000)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-every", type=float, default=60.0, help="seconds between server RSS samples")
    parser.add_argument("--api-key", default="sk-soak")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra argument for asyncllm serve (repeatable; use --serve-arg=--flag=value)")
    args = parser.parse_args(argv)

    process, url = _start_server(args)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {args.api_key}"},
                          timeout=120) as warm:
            for _ in range(3):
                warm.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 8}).raise_for_status()
        rss_start = _rss_kib(process.pid)
        started = time.monotonic()
        samples, stop_sampling = [rss_start], threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(process.pid, args.rss_every, samples, stop_sampling),
                                   daemon=True)
        sampler.start()
        tally = asyncio.run(soak(args, url))
        elapsed = time.monotonic() - started
        stop_sampling.set()
        sampler.join()
        settle = time.monotonic() + 30
        while True:  # aborted requests are dropped at the engine's next step
            metrics = _metrics(url)
            if (metrics.get("asyncllm_kv_blocks_used", 1) == 0 and metrics.get("asyncllm_requests_running", 1) == 0
                    and metrics.get("asyncllm_sessions_open", 1) == 0) or time.monotonic() > settle:
                break
            time.sleep(0.2)
        rss_end = _rss_kib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    o = tally.outcomes
    total = sum(o[k] for k in ("completed", "cancelled", "failed_4xx", "5xx", "transport_error"))
    lat = tally.latencies
    leaks = {k: metrics.get(f"asyncllm_{k}", float("nan"))
             for k in ("kv_blocks_used", "requests_running", "requests_waiting", "sessions_open")}
    print(f"soak: {args.clients} clients, {elapsed:.1f} s, model {Path(args.model).name}")
    print(f"requests: {total} (completed {o['completed']}, cancelled {o['cancelled']}, "
          f"failed 4xx {o['failed_4xx']}, 5xx {o['5xx']}, transport errors {o['transport_error']})")
    print(f"statuses: {dict(sorted(tally.statuses.items()))}")
    print(f"latency of completed: p50 {_percentile(lat, 0.5) * 1000:.0f} ms, "
          f"p99 {_percentile(lat, 0.99) * 1000:.0f} ms, mean {statistics.fmean(lat) * 1000 if lat else 0:.0f} ms")
    print(f"server after the clients: kv blocks used {leaks['kv_blocks_used']:.0f} "
          f"(cached {metrics.get('asyncllm_kv_blocks_cached', float('nan')):.0f} of "
          f"{metrics.get('asyncllm_kv_blocks_total', float('nan')):.0f}), running {leaks['requests_running']:.0f}, "
          f"waiting {leaks['requests_waiting']:.0f}, sessions open {leaks['sessions_open']:.0f}")
    print(f"server RSS: {rss_start / 1024:.1f} MiB after warm-up -> {rss_end / 1024:.1f} MiB "
          f"({(rss_end - rss_start) / 1024:+.1f} MiB)")
    series = ", ".join(f"{kib / 1024:.0f}" for kib in samples)
    print(f"server RSS every {args.rss_every:g} s (MiB): {series}")
    print(f"server exit status after SIGTERM: {process.returncode}")
    for text in tally.problems:
        print(f"  problem: {text}")
    bad = o["5xx"] or o["transport_error"] or o["problems"] or any(v != 0 for v in leaks.values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
