"""Embedding the OpenAI-compatible app in your own FastAPI app: ``engine.lifespan`` starts and closes the
engine with the app, the OpenAI routes are mounted under ``/llm`` and a route of your own uses the same
engine directly.

Run:  ASYNCLLM_MODEL=path/to/model.gguf uvicorn --factory examples.fastapi_app:build_app --port 8000
  or  python examples/fastapi_app.py [MODEL]
then: curl localhost:8000/llm/v1/chat/completions -H 'content-type: application/json' \
        -d '{"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
      curl 'localhost:8000/haiku?topic=rivers'
MODEL defaults to the SmolLM2 GGUF (``asyncllm fetch-default``). Needs ``pip install fastapi uvicorn``.
"""

from __future__ import annotations

import os
import sys

from fastapi import FastAPI

from asyncllm import AsyncEngine
from asyncllm.adapters.asgi import create_app
from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path


def resolve_model(model: str | None = None) -> str:
    if model:
        return model
    path = os.environ.get("ASYNCLLM_MODEL") or default_model_path()
    if path is None:
        raise SystemExit(MISSING_DEFAULT_MODEL)
    return str(path)


def build_app(model: str | None = None) -> FastAPI:
    engine = AsyncEngine.from_pretrained(resolve_model(model))
    app = FastAPI(lifespan=engine.lifespan)
    app.mount("/llm", create_app(engine, model_name="local"))  # add api_keys=[...] to require a key

    @app.get("/haiku")
    async def haiku(topic: str = "the sea", max_tokens: int = 48) -> dict[str, object]:
        completion = await engine.generate(
            [{"role": "user", "content": f"Write a haiku about {topic}."}], max_tokens=max_tokens, temperature=0)
        return {"topic": topic, "haiku": completion.text, "tokens": completion.usage.completion_tokens}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    argv = sys.argv if argv is None else argv
    uvicorn.run(build_app(argv[1] if len(argv) > 1 else None), host="127.0.0.1", port=8000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
