"""One request inside the engine: prompt encoding and checks, its state, how a sampled token is taken in,
and the KV-only step that ends a session turn.

Nothing here touches the event loop's scheduling: the engine's loop task calls these, and is the only
caller that mutates a request or a sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.detokenizer import IncrementalDetokenizer
from asyncllm.event_loop import Signal
from asyncllm.outputs import Usage
from asyncllm.sampling import RequestSampling, SamplingParams, check_bans, check_token_ids
from asyncllm.scheduler import ScheduledChunk, Scheduler
from asyncllm.sequence import FinishReason, ImageSpan, SequenceState
from asyncllm.streams import OutputChannel
from asyncllm.tokenizer import Tokenizer

Message = dict[str, Any]
Prompt = str | Sequence[int] | Sequence[Message]


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """Token ids for a text prompt, a token id list (checked against ``vocab_size``) or a list of chat
    messages (rendered with the chat template and a generation prompt)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return tokenizer.encode(prompt)
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or len(prompt) == 0:
        raise ValueError("prompt: must be a non-empty str, list of token ids or list of chat messages")
    if all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)  # type: ignore[arg-type]
    ids = list(prompt)
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"prompt[{i}]: token ids must be ints in [0, {vocab_size}), got {token!r}")
    return ids


def split_image_parts(messages: Sequence[Message], image_text: str) -> tuple[list[Message], list[Any]]:
    """Chat messages whose list contents hold ``{"type": "image", "image": ...}`` parts, as messages with
    string contents (each image part becomes ``image_text``, text parts are joined) and the images in order."""
    images: list[Any] = []
    out: list[Message] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    images.append(part["image"])
                    text.append(image_text)
                elif kind == "text":
                    text.append(str(part.get("text", "")))
                else:
                    raise ValueError(f"content: unsupported part {part!r} (text and image parts are)")
            message = {**message, "content": "".join(text)}
        out.append(message)
    return out, images


def usage_of(seq: SequenceState) -> Usage:
    return Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                 cached_tokens=seq.num_cached_tokens or 0)


@dataclass
class Request:
    """A submitted request: its sequence, output channel, detokenizer and per-request sampling state."""

    seq: SequenceState
    channel: OutputChannel
    detokenizer: IncrementalDetokenizer
    sampling: RequestSampling

    @classmethod
    def create(
        cls,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        *,
        tokenizer: Tokenizer,
        vocab_size: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        device: torch.device,
        session_id: Hashable | None = None,
        images: tuple[ImageSpan, ...] = (),
        channel: OutputChannel | None = None,
    ) -> Request:
        """Check that the prompt and ``max_tokens`` fit ``max_model_len``, that the params' token ids are in
        the vocabulary and that ``min_tokens`` bans leave something to sample (``ValueError`` otherwise), and
        build the request. Without ``max_tokens`` a request may run up to ``max_model_len``. ``channel``: the
        request's output channel when its stream was handed out before the request could be built (its
        images still being prepared); a new one otherwise."""
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens leave no room to generate within max_model_len={max_model_len}"
            )
        room = max_model_len - len(token_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens: {params.max_tokens} plus the prompt's {len(token_ids)} tokens exceeds "
                f"max_model_len={max_model_len}"
            )
        check_token_ids(params, vocab_size)
        check_bans(params, eos_token_ids, vocab_size)
        max_new = params.max_tokens if params.max_tokens is not None else room
        seq = SequenceState(request_id, list(token_ids), params, max_total_tokens=len(token_ids) + max_new,
                            session_id=session_id, images=images)
        if channel is None:
            channel = OutputChannel(request_id, keep_logprobs=params.logprobs is not None)
        elif channel.request_id != request_id:
            raise ValueError(f"channel: belongs to {channel.request_id!r}, not {request_id!r}")
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=token_ids,
                                             skip_special_tokens=params.skip_special_tokens, stop=params.stop)
        sampling = RequestSampling.create(params, eos_token_ids=eos_token_ids, device=device,
                                          vocab_size=vocab_size)
        return cls(seq, channel, detokenizer, sampling)

    def accept(self, token: int, eos_token_ids: frozenset[int], max_model_len: int) -> tuple[str, FinishReason | None]:
        """Append a sampled token; return the text it adds and, if the request ends with it, the reason
        (the text then includes whatever the detokenizer still held back).

        ``"stop"``: an EOS id (unless ``ignore_eos``), one of ``stop_token_ids`` (neither adds text) or a
        stop string; ``"length"``: ``max_tokens`` or ``max_model_len`` reached."""
        seq = self.seq
        params = seq.params
        assert params is not None
        seq.token_ids.append(token)
        reason: FinishReason | None = None
        text = ""
        if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        else:
            text = self.detokenizer.push(token)
            if self.detokenizer.stopped:
                reason = "stop"
        if reason is None and (len(seq.token_ids) >= seq.max_total_tokens or len(seq.token_ids) >= max_model_len):
            reason = "length"
        if reason is not None and not self.detokenizer.stopped:
            text += self.detokenizer.finish()
        return text, reason

    def finish(self, scheduler: Scheduler, flushes: SessionFlushes, reason: FinishReason, tokens: list[int],
               text: str, logprobs: Any = None) -> None:
        """Push the final output and release the sequence's KV. A session turn that was not aborted ends
        for its caller now, but its sequence stays for one more KV-only step that computes the last sampled
        token's KV (``SessionFlushes``), so the next turn reuses every token of this one."""
        seq = self.seq
        if seq.session_id is not None and reason != "abort":
            flushes.begin(seq, reason)
        else:
            scheduler.finish(seq, reason)
        self.channel.push(tokens, text, logprobs, finish_reason=reason, usage=usage_of(seq))


class SessionFlushes:
    """Session turns already final for their caller whose last token's KV is still to be computed.

    A finished turn's sequence stays scheduled (``flush_only``) for one KV-only step, so the session's
    next turn reuses every token of this one; that next turn waits (``settled``) until the flush ends.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._flushing: dict[str, SequenceState] = {}
        self._settled: dict[Hashable, Signal] = {}

    def begin(self, seq: SequenceState, reason: FinishReason) -> None:
        seq.flush_only = True
        seq.finish_reason = reason
        self._flushing[seq.request_id] = seq
        self._settled.setdefault(seq.session_id, Signal()).clear()

    def complete(self, chunks: Iterable[ScheduledChunk]) -> None:
        """End the flushes whose KV a step just computed (their blocks are pinned for the session)."""
        for chunk in chunks:
            seq = chunk.seq
            if seq.flush_only and seq.num_computed_tokens == len(seq.token_ids):
                self.end(seq, keep=True)

    def end(self, seq: SequenceState, *, keep: bool) -> None:
        """Finish the flushing ``seq``: with ``keep`` as the turn finished, else as aborted (no pin)."""
        self._flushing.pop(seq.request_id, None)
        self._scheduler.finish(seq, seq.finish_reason if keep and seq.finish_reason else "abort")
        event = self._settled.pop(seq.session_id, None)
        if event is not None:
            event.set()

    def end_all(self) -> None:
        for seq in list(self._flushing.values()):
            self.end(seq, keep=False)

    async def settled(self, session_id: Hashable) -> None:
        """Wait until no turn of ``session_id`` is flushing."""
        event = self._settled.get(session_id)
        if event is not None:
            await event.wait()
