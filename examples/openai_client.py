"""The official ``openai`` client against a running ``asyncllm serve``: a chat completion, then the same
question streamed token by token.

Run:  asyncllm serve --port 8000          # in another terminal (default model: the SmolLM2 GGUF)
      python examples/openai_client.py [BASE_URL]
BASE_URL defaults to $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1; the API key to $OPENAI_API_KEY
(any value when the server was started without --api-key). Needs ``pip install openai``.
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def run(base_url: str, api_key: str | None = None, max_tokens: int = 48) -> tuple[str, str]:
    """Returns the non-streamed reply and the streamed one (greedy, so the same text)."""
    client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused")
    model = client.models.list().data[0].id  # the server serves one model
    messages = [{"role": "user", "content": "Name three colours."}]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    text = reply.choices[0].message.content or ""
    print(f"[{model}] {text}\n  usage: {reply.usage}")

    streamed = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            streamed.append(delta)
            print(delta, end="", flush=True)
    print()
    return text, "".join(streamed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    base_url = argv[1] if len(argv) > 1 else os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)
    run(base_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
