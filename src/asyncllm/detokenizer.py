"""Incremental (streaming) detokenization with stop strings.

Each ``push`` decodes only a short window of recent tokens: ``ids[prefix:]``, where the text of
``ids[prefix:read]`` was already released. The new text is what the window adds beyond that. When the window
ends in U+FFFD (an incomplete UTF-8 sequence, e.g. half of a byte-fallback or byte-level character), that tail
is held back until later tokens complete it, or ``finish`` flushes it.

Decoders treat the first token of a sequence specially (SentencePiece drops its leading space). A window that
does not start the sequence is therefore decoded behind a fixed "anchor" token, so every token after the first
decodes exactly as it does inside the full sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from asyncllm.stop import StopStringMatcher

if TYPE_CHECKING:
    from asyncllm.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context of the first generated tokens.
_PROMPT_CONTEXT_TOKENS = 4
# One character spans at most 4 tokens (its UTF-8 bytes).
_MAX_CHARACTER_TOKENS = 4
_ANCHOR_CANDIDATES = ("a", "e", "x", "!", ".", "0")


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into text deltas.

    Invariants:
    - without a stop match, ``"".join(deltas) + finish() == tokenizer.decode(generated_ids)`` when
      ``prompt_token_ids`` is empty, and ``== decode(prompt + generated)[len(decode(prompt)):]`` otherwise
      (the generated text as a continuation of the prompt: a SentencePiece leading space is kept). This holds
      for byte-level BPE in general and for byte-fallback tokenizers whenever every run of consecutive byte
      tokens is valid UTF-8 (the decoder turns *every* byte of an invalid run into U+FFFD, after the valid
      start of the run has been released);
    - a U+FFFD that ends the decoded window is never released before ``finish`` or before a later
      character follows it, so a split multi-byte character is never released as U+FFFD;
    - no delta contains a stop string or any text after it; when one matches (the first occurrence to
      complete, see ``StopStringMatcher``), ``text`` is exactly the text before it, ``stopped`` is true and
      later pushes return ``""``;
    - each push decodes a short window, not the sequence: the tokens released by the previous step (as
      context), those still held back, and the new one.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.vocab_size
        for index, token_id in enumerate(prompt_token_ids):
            self._check_id(token_id, f"prompt_token_ids[{index}]")
        self._skip_special = bool(skip_special_tokens)
        self._skipped = frozenset(tokenizer.all_special_ids) if self._skip_special else frozenset()
        self._stop = StopStringMatcher(stop)

        split = max(len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS, 0)
        # Start the context on a character boundary: a byte run cut mid-character decodes to U+FFFD.
        lowest = max(split - _MAX_CHARACTER_TOKENS, 0)
        while split > lowest and self._starts_mid_character(prompt_token_ids[split:]):
            split -= 1
        self._ids: list[int] = [int(i) for i in prompt_token_ids[split:]]
        self._num_context = len(self._ids)
        self._anchor_ids = _find_anchor(tokenizer)
        self._anchored = any(i not in self._skipped for i in prompt_token_ids[:split])
        self._prefix = 0
        self._read = self._num_context
        # Characters of the current window's decoded text already released (or owned by the prompt).
        self._released = len(self._decode_window(self._prefix, self._read))
        self._parts: list[str] = []
        self._finished = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched."""
        return self._stop.stopped

    @property
    def matched_stop(self) -> str | None:
        """The stop string that matched, or ``None``."""
        return self._stop.matched

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of every returned delta)."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The generated ids pushed so far, including any pushed after a stop match."""
        return tuple(self._ids[self._num_context:])

    def push(self, token_id: int) -> str:
        """Append one generated token; return the newly released text (possibly ``""``)."""
        self._check_id(token_id, "token_id")
        if self._finished:
            raise RuntimeError("push after finish(): the detokenizer is closed")
        self._ids.append(int(token_id))
        if self._stop.stopped:
            return ""
        window = self._decode_window(self._prefix, len(self._ids))
        complete_end = len(window.rstrip(_REPLACEMENT))
        if complete_end == len(window):
            delta = window[self._released:]
            self._advance()
        else:
            end = max(complete_end, self._released)
            delta = window[self._released:end]
            self._released = end
        return self._emit(self._stop.feed(delta))

    def finish(self) -> str:
        """End of generation: release everything still held back (incomplete characters, stop-string
        prefixes). Idempotent; ``push`` after ``finish`` raises ``RuntimeError``."""
        if self._finished:
            return ""
        self._finished = True
        if self._stop.stopped:
            return ""
        window = self._decode_window(self._prefix, len(self._ids))
        released = self._stop.feed(window[self._released:])
        self._released = len(window)
        return self._emit(released + self._stop.flush())

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta

    def _advance(self) -> None:
        """Everything decoded so far is final: start the next window at the old read offset."""
        if not self._anchored:
            self._anchored = any(i not in self._skipped for i in self._ids[self._prefix:self._read])
        self._prefix, self._read = self._read, len(self._ids)
        self._released = len(self._decode_window(self._prefix, self._read))

    def _starts_mid_character(self, ids: Sequence[int]) -> bool:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)
        return text.startswith(_REPLACEMENT)

    def _decode_window(self, start: int, end: int) -> str:
        ids = self._ids[start:end]
        if self._anchored and self._anchor_ids:
            ids = self._anchor_ids + ids
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _check_id(self, token_id: int, field: str) -> None:
        is_int = isinstance(token_id, int) and not isinstance(token_id, bool)
        if not is_int or not 0 <= token_id < self._vocab_size:
            raise ValueError(f"{field}: {token_id!r} is not a token id in [0, {self._vocab_size})")


def _find_anchor(tokenizer: Tokenizer) -> list[int]:
    """A plain one-character token whose text is the same wherever it stands (``[]`` if none is found)."""
    for candidate in _ANCHOR_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is None or token_id in tokenizer.all_special_ids:
            continue
        single = tokenizer.decode([token_id], skip_special_tokens=False)
        if single and tokenizer.decode([token_id, token_id], skip_special_tokens=False) == single * 2:
            return [token_id]
    return []
