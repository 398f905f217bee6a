"""A synchronous batch over ``asyncllm.pipeline``: no ``async``/``await``, for scripts and notebooks.
The whole list is submitted at once, so the engine batches it; results come back in input order, with a
progress bar on stderr for long lists.

Run:  python examples/batch_pipeline.py [MODEL]
MODEL: an HF directory, a hub id or a .gguf file; default $ASYNCLLM_MODEL, else the SmolLM2 GGUF
(``asyncllm fetch-default``).
"""

from __future__ import annotations

import os
import sys

import asyncllm
from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path

PROMPTS = [f"Write one sentence about the number {n}." for n in range(1, 9)]


def resolve_model(argv: list[str]) -> str:
    if len(argv) > 1:
        return argv[1]
    path = os.environ.get("ASYNCLLM_MODEL") or default_model_path()
    if path is None:
        raise SystemExit(MISSING_DEFAULT_MODEL)
    return str(path)


def run(model: str, prompts: list[str] = PROMPTS, max_tokens: int = 48) -> list[asyncllm.Completion]:
    with asyncllm.pipeline(model) as pipe:
        # chat-formatted prompts, one batch; plain text prompts work the same way with pipe(prompts)
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        completions = pipe.chat(conversations, max_tokens=max_tokens, temperature=0)
        for prompt, completion in zip(prompts, completions, strict=True):
            print(f"{prompt}\n  -> {completion.text.strip()!r} ({completion.usage.completion_tokens} tokens)")

        print("streamed:", end=" ")
        for text in pipe.stream("The sky is", max_tokens=16, temperature=0):
            print(text, end="", flush=True)
        print()
    return completions


def main(argv: list[str] | None = None) -> int:
    run(resolve_model(sys.argv if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
