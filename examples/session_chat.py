"""A multi-turn chat over one ``Session``: its KV stays pinned between turns, so each turn prefills only
its new tokens (``usage.cached_tokens`` shows how many prompt tokens were reused).

Run:  python examples/session_chat.py [MODEL]
MODEL: an HF directory, a hub id or a .gguf file; default $ASYNCLLM_MODEL, else the SmolLM2 GGUF
(``asyncllm fetch-default``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from asyncllm import AsyncEngine
from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path

QUESTIONS = ["Name a river in Europe.", "How long is it?", "Which countries does it flow through?"]


def resolve_model(argv: list[str]) -> str:
    if len(argv) > 1:
        return argv[1]
    path = os.environ.get("ASYNCLLM_MODEL") or default_model_path()
    if path is None:
        raise SystemExit(MISSING_DEFAULT_MODEL)
    return str(path)


async def chat(model: str, questions: list[str] = QUESTIONS, max_tokens: int = 64) -> list[str]:
    """Ask ``questions`` in one session, printing each reply as it streams; returns the replies."""
    replies = []
    engine = AsyncEngine.from_pretrained(model)
    async with engine, engine.session(system="You are a helpful assistant. Be brief.") as session:
        for question in questions:
            print(f"> {question}")
            stream = session.stream(question, max_tokens=max_tokens, temperature=0)
            async for text in stream:
                print(text, end="", flush=True)
            completion = stream.completion
            assert completion is not None
            print(f"\n  [{completion.usage.prompt_tokens} prompt tokens, "
                  f"{completion.usage.cached_tokens} reused from the previous turn]")
            replies.append(completion.text)
        print(f"transcript: {len(session.messages)} messages")
    return replies


def main(argv: list[str] | None = None) -> int:
    asyncio.run(chat(resolve_model(sys.argv if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
