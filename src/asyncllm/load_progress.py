"""The progress bar shown while a model's tensors load: a ``tqdm`` bar on stderr, only where someone can see
it (stderr is a terminal) and only when loading takes more than a moment (``DELAY_S``), so that fast loads,
logs and pipes stay clean. ``EngineConfig.load_progress=False`` (``--quiet`` on the command line) turns it
off."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

DELAY_S = 1.0
"""Seconds of loading before the bar appears (``tqdm``'s ``delay``)."""


def loading_progress(
    items: Iterable[T],
    *,
    total: int,
    description: str = "loading tensors",
    stream: IO[str] | None = None,
    delay_s: float | None = None,
) -> Iterator[T]:
    """``items``, unchanged, with a ``tqdm`` bar over ``total`` of them on ``stream`` (default
    ``sys.stderr``) after ``delay_s`` (default ``DELAY_S``) seconds, where ``stream`` is a terminal."""
    out = sys.stderr if stream is None else stream
    if not _is_terminal(out):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=description, unit="tensor", file=out, leave=False,
              delay=DELAY_S if delay_s is None else delay_s, dynamic_ncols=True) as bar:
        yield from bar


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
