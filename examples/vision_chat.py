"""Chat about an image with a LLaVA model: the first turn sends the image and a question as content parts,
the follow-up turns send text only; the session keeps the image's KV pinned, so every later turn reuses it
(``usage.cached_tokens``) instead of encoding the image again.

Run:  python examples/vision_chat.py LLAVA_DIR [IMAGE] [--max-tokens N]
LLAVA_DIR: a local LLaVA-1.5 Hugging Face directory (e.g. a download of llava-hf/llava-1.5-7b-hf);
IMAGE: a PNG/JPEG file (default: a generated picture of coloured stripes); N: the reply limit (default 64).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from pathlib import Path
from typing import Any

from asyncllm import AsyncEngine

QUESTIONS = ["What is in this picture?", "Which colours do you see?", "Describe it in one sentence."]


def stripes(width: int = 336, height: int = 224) -> bytes:
    """A PNG of vertical red, green and blue stripes, for running without an image file."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    third = width // 3
    for i, colour in enumerate([(220, 30, 30), (30, 200, 60), (40, 60, 220)]):
        image.paste(colour, (i * third, 0, width if i == 2 else (i + 1) * third, height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def chat(model: str, image: Any, questions: list[str] = QUESTIONS, max_tokens: int = 64,
               **engine_options: Any) -> list[Any]:
    """Ask ``questions`` about ``image`` (a path, encoded bytes or a PIL image) in one session, printing each
    reply as it streams; returns the completions."""
    completions = []
    engine = AsyncEngine.from_pretrained(model, **engine_options)
    async with engine, engine.session() as session:
        for turn, question in enumerate(questions):
            content: Any = question
            if turn == 0:
                content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
            print(f"> {question}")
            stream = session.stream(content, max_tokens=max_tokens, temperature=0)
            async for text in stream:
                print(text, end="", flush=True)
            completion = stream.completion
            if completion is None:
                raise RuntimeError("the turn ended without a reply")
            print(f"\n  [{completion.usage.prompt_tokens} prompt tokens, "
                  f"{completion.usage.cached_tokens} reused]")
            completions.append(completion)
    return completions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat about an image with a local LLaVA model.")
    parser.add_argument("model", help="a local LLaVA Hugging Face directory")
    parser.add_argument("image", nargs="?", type=Path, default=None, help="an image file (default: stripes)")
    parser.add_argument("--max-tokens", type=int, default=64, help="reply limit per turn (default 64)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(chat(args.model, args.image or stripes(), max_tokens=args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
