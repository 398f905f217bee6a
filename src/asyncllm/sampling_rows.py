"""One request's part in each step's sampling: its row (``SamplingRow``) and the policy that builds it.

``RequestSampling`` holds what a request brings to every step: its params, its own generator (seeded once
from ``params.seed``) and the ids it bans while it has fewer than ``min_tokens`` outputs (EOS plus its stop
token ids). ``row`` turns that and the request's tokens into the step's ``SamplingRow``, passing the token
history only when a penalty reads it. ``check_token_ids`` validates a request's ids against the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from asyncllm.sampling_params import SamplingParams, _fail


@dataclass
class SamplingRow:
    """One request's view of the current step.

    ``generator``: the request's own generator (created once per request by the engine, on the logits'
    device); required when ``params.seed`` is set. A row with a generator draws only from it.
    ``min_tokens_blocked_ids``: ids banned while ``len(output_token_ids) < params.min_tokens``
    (normally EOS plus ``params.stop_token_ids``).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None
    min_tokens_blocked_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            _fail("generator", "required when params.seed is set (create it once per request)")

    @property
    def bans_active(self) -> bool:
        """True while this row's ``min_tokens_blocked_ids`` are banned."""
        return len(self.output_token_ids) < self.params.min_tokens and len(self.min_tokens_blocked_ids) > 0


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ``ValueError`` unless ``params.stop_token_ids`` and ``params.logit_bias`` name token ids in
    ``[0, vocab_size)``."""
    for token in params.stop_token_ids:
        if not 0 <= token < vocab_size:
            raise ValueError(f"stop_token_ids: {token} is outside the vocabulary [0, {vocab_size})")
    for token in params.logit_bias or {}:
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token {token} is outside the vocabulary [0, {vocab_size})")


def check_bans(params: SamplingParams, eos_token_ids: Iterable[int], vocab_size: int) -> None:
    """Raise ``ValueError`` naming ``min_tokens`` and ``stop_token_ids`` when the ids banned until
    ``min_tokens`` outputs exist (EOS plus ``stop_token_ids``) cover the whole vocabulary ``[0, vocab_size)``:
    such a row would have nothing left to sample. (``logit_bias`` cannot ban: its values are bounded.)"""
    if params.min_tokens and len(min_tokens_blocked_ids(params, eos_token_ids, vocab_size)) >= vocab_size:
        raise ValueError(
            f"min_tokens, stop_token_ids: with min_tokens={params.min_tokens}, EOS and stop_token_ids ban "
            f"every one of the {vocab_size} tokens; nothing could be sampled"
        )


def min_tokens_blocked_ids(params: SamplingParams, eos_token_ids: Iterable[int],
                           vocab_size: int | None = None) -> tuple[int, ...]:
    """The ids a request bans while it has fewer than ``params.min_tokens`` output tokens: the EOS ids plus
    ``params.stop_token_ids``, sorted; ``()`` when ``min_tokens`` is 0. With ``vocab_size``, ids outside
    ``[0, vocab_size)`` (an EOS id the model cannot produce) are left out."""
    if not params.min_tokens:
        return ()
    ids = set(eos_token_ids) | set(params.stop_token_ids)
    if vocab_size is not None:
        ids = {token for token in ids if 0 <= token < vocab_size}
    return tuple(sorted(ids))


@dataclass(eq=False)
class RequestSampling:
    """What one request brings to every step's sampling: its params, its own generator (seeded once from
    ``params.seed``, else ``None``) and its ``min_tokens`` bans."""

    params: SamplingParams
    generator: torch.Generator | None
    min_tokens_blocked_ids: tuple[int, ...]

    @classmethod
    def create(
        cls, params: SamplingParams, *, eos_token_ids: Iterable[int], device: torch.device,
        vocab_size: int | None = None,
    ) -> RequestSampling:
        """``vocab_size``: when given, bans outside the vocabulary are dropped (see
        ``min_tokens_blocked_ids``)."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return cls(params, generator, min_tokens_blocked_ids(params, eos_token_ids, vocab_size))

    def row(self, token_ids: Sequence[int], num_prompt_tokens: int) -> SamplingRow:
        """The row for sampling the token after ``token_ids`` (prompt, then output). The token history is
        passed only when a penalty reads it; the bans only while fewer than ``min_tokens`` are output."""
        params = self.params
        needs_history = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        num_output = len(token_ids) - num_prompt_tokens
        return SamplingRow(
            params=params,
            prompt_token_ids=token_ids[:num_prompt_tokens] if needs_history else (),
            output_token_ids=token_ids[num_prompt_tokens:] if needs_history else (),
            generator=self.generator,
            min_tokens_blocked_ids=self.min_tokens_blocked_ids if num_output < params.min_tokens else (),
        )
