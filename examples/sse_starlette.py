"""Streaming tokens to a browser over Server-Sent Events from a plain Starlette route (no OpenAI format):
``GET /`` serves a page whose ``EventSource`` appends each token as it arrives; ``GET /stream?prompt=...``
sends one ``data:`` event per text delta (JSON-encoded) and a final ``event: done``. A browser that goes
away cancels the response, which closes the engine stream and so aborts the request.

Run:  python examples/sse_starlette.py [MODEL]      then open http://127.0.0.1:8000/
MODEL: an HF directory, a hub id or a .gguf file; default $ASYNCLLM_MODEL, else the SmolLM2 GGUF
(``asyncllm fetch-default``). Needs ``pip install starlette uvicorn``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, StreamingResponse
from starlette.routing import Route

from asyncllm import AsyncEngine
from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path

PAGE = """<!doctype html>
<meta charset="utf-8"><title>asyncllm SSE</title>
<form id="f"><input id="p" size="60" value="Tell me a short story."><button>Send</button></form>
<pre id="out" style="white-space: pre-wrap"></pre>
<script>
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  const out = document.getElementById("out");
  out.textContent = "";
  const source = new EventSource("/stream?prompt=" + encodeURIComponent(document.getElementById("p").value));
  source.onmessage = (m) => { out.textContent += JSON.parse(m.data); };
  source.addEventListener("done", () => source.close());
  source.onerror = () => source.close();
};
</script>
"""


def resolve_model(model: str | None = None) -> str:
    if model:
        return model
    path = os.environ.get("ASYNCLLM_MODEL") or default_model_path()
    if path is None:
        raise SystemExit(MISSING_DEFAULT_MODEL)
    return str(path)


def build_app(model: str | None = None, max_tokens: int = 128) -> Starlette:
    engine = AsyncEngine.from_pretrained(resolve_model(model))

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def stream(request: Request) -> StreamingResponse:
        prompt = request.query_params.get("prompt") or "Hello"
        limit = min(int(request.query_params.get("max_tokens", max_tokens)), max_tokens)

        async def events() -> AsyncIterator[str]:
            tokens = engine.stream([{"role": "user", "content": prompt}], max_tokens=limit)
            try:
                async for text in tokens:
                    yield f"data: {json.dumps(text)}\n\n"
            finally:
                await tokens.aclose()  # the client left early: abort the request
            yield "event: done\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[Route("/", page), Route("/stream", stream)], lifespan=engine.lifespan)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    argv = sys.argv if argv is None else argv
    uvicorn.run(build_app(argv[1] if len(argv) > 1 else None), host="127.0.0.1", port=8000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
