"""``SamplingParams``: how one request chooses its tokens, validated once at construction.

Every invalid value raises ``ValueError`` whose message starts with the field name (e.g.
``"temperature: must be >= 0, got -1"``), so adapters can report the offending field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

MAX_LOGPROBS = 20
"""The largest number of top alternatives ``SamplingParams.logprobs`` may ask for."""

MAX_ABS_LOGIT_BIAS = 100.0
"""``logit_bias`` values lie in ``[-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS]``."""

GREEDY_TEMPERATURE_EPSILON = 1e-5
"""Temperatures below this (subnormals included) sample greedily: dividing float32 logits by them would
overflow. A temperature of at least this is applied as given."""

MAX_TEMPERATURE = 1e4
"""The largest temperature accepted (far flatter than any use needs; its float32 is finite)."""

MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
"""``repetition_penalty`` lies in this range: dividing or multiplying a float32 logit by it stays finite."""

MAX_ABS_PRESENCE_FREQUENCY = 2.0
"""``presence_penalty`` and ``frequency_penalty`` lie in ``[-2, 2]`` (OpenAI's range)."""
_SEED_MIN, _SEED_END = -(2**63), 2**64  # the range torch.Generator.manual_seed accepts


def _fail(name: str, message: str) -> NoReturn:
    raise ValueError(f"{name}: {message}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, f"must be an int, got {value!r}")
    return int(value)


def _as_optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, f"must be an int or None, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, f"must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        _fail(name, f"must be finite, got {value!r}")
    return result


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, f"must be a bool, got {value!r}")
    return value


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if not ((low < value) if low_open else (low <= value)) or value > high:
        bracket = "(" if low_open else "["
        _fail(name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")


def _as_stop(value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        _fail("stop", f"must be a str or a list of str, got {value!r}")
    for item in items:
        if not isinstance(item, str):
            _fail("stop", f"must contain only str, got {item!r}")
        if not item:
            _fail("stop", "empty stop strings are not allowed")
    return tuple(items)


def _as_token_ids(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        _fail(name, f"must be a list of token ids, got {value!r}")
    ids = tuple(_as_int(name, item) for item in value)
    if any(i < 0 for i in ids):
        _fail(name, f"token ids must be >= 0, got {value!r}")
    return ids


def _as_logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        _fail("logit_bias", f"must be a dict of token id -> bias or None, got {value!r}")
    bias: dict[int, float] = {}
    for key, item in value.items():
        token = _as_int("logit_bias", key)
        if token < 0:
            _fail("logit_bias", f"token ids must be >= 0, got {key!r}")
        amount = _as_float("logit_bias", item)
        _in_range("logit_bias", amount, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
        bias[token] = amount
    return bias or None


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens; validated once, never mutated.

    ``max_tokens``: tokens to generate at most (``None``: until the model's context is full); ``>= 1``.
    ``min_tokens``: EOS and ``stop_token_ids`` are banned until this many tokens exist; ``<= max_tokens``.
    ``temperature``: in ``[0, 1e4]``; below ``GREEDY_TEMPERATURE_EPSILON`` (``1e-5``) it means greedy, so
    ``0`` and tiny or subnormal values all take the argmax. ``top_p`` in ``(0, 1]``; ``top_k``: ``0``
    disables it and ``-1`` is accepted as a synonym (normalised to ``0``), otherwise ``>= 1``. ``min_p`` in
    ``[0, 1]``. ``repetition_penalty`` in ``[0.01, 100]``; ``presence_penalty`` and ``frequency_penalty``
    in ``[-2, 2]``. For finite model logits below ``1e36`` in magnitude these bounds keep every processed
    float32 logit finite, so no valid request leaves its row without a token to choose (bans covering the
    whole vocabulary are refused at submission, where the vocabulary is known: see
    ``asyncllm.sampling_rows.check_bans``; the sampler's fallback covers anything else).
    ``seed``: makes the request's sampling reproducible (any value ``torch.Generator.manual_seed`` takes).
    ``stop``: strings that end generation; a single str or a list is normalised to a tuple, empty strings
    are rejected. ``stop_token_ids``: token ids that end generation (a tuple after construction).
    ``ignore_eos``: keep generating after EOS. ``logprobs``: return the chosen token's log-probability plus
    this many top alternatives (``0..20``); ``None`` returns none. ``logit_bias``: token id -> value in
    ``[-100, 100]`` added to that logit (stored as a private copy, to be treated as read-only; an empty dict
    becomes ``None``).
    ``skip_special_tokens``: leave special tokens out of the detokenized text.

    Every invalid value raises ``ValueError`` whose message starts with the field name, type errors
    included (``bool`` is not accepted where an int or a number is expected).
    """

    max_tokens: int | None = 256
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        max_tokens = _as_optional_int("max_tokens", self.max_tokens)
        if max_tokens is not None and max_tokens < 1:
            _fail("max_tokens", f"must be >= 1 or None, got {max_tokens}")
        put("max_tokens", max_tokens)
        min_tokens = _as_int("min_tokens", self.min_tokens)
        if min_tokens < 0:
            _fail("min_tokens", f"must be >= 0, got {min_tokens}")
        if max_tokens is not None and min_tokens > max_tokens:
            _fail("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
        put("min_tokens", min_tokens)

        temperature = _as_float("temperature", self.temperature) + 0.0  # -0.0 becomes 0.0
        if temperature < 0:
            _fail("temperature", f"must be >= 0, got {self.temperature!r}")
        if temperature > MAX_TEMPERATURE:
            _fail("temperature", f"must be <= {MAX_TEMPERATURE:g}, got {self.temperature!r}")
        put("temperature", temperature)
        top_p = _as_float("top_p", self.top_p)
        _in_range("top_p", top_p, 0.0, 1.0, low_open=True)
        put("top_p", top_p)
        top_k = _as_int("top_k", self.top_k)
        if top_k < -1:
            _fail("top_k", f"must be >= 1, or 0 / -1 to disable, got {top_k}")
        put("top_k", max(top_k, 0))
        min_p = _as_float("min_p", self.min_p)
        _in_range("min_p", min_p, 0.0, 1.0)
        put("min_p", min_p)
        repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        _in_range("repetition_penalty", repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        put("repetition_penalty", repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _as_float(name, getattr(self, name))
            _in_range(name, penalty, -MAX_ABS_PRESENCE_FREQUENCY, MAX_ABS_PRESENCE_FREQUENCY)
            put(name, penalty)

        seed = _as_optional_int("seed", self.seed)
        if seed is not None and not _SEED_MIN <= seed < _SEED_END:
            _fail("seed", f"must be in [-2**63, 2**64), got {seed}")
        put("seed", seed)
        put("stop", _as_stop(self.stop))
        put("stop_token_ids", _as_token_ids("stop_token_ids", self.stop_token_ids))
        put("ignore_eos", _as_bool("ignore_eos", self.ignore_eos))
        logprobs = _as_optional_int("logprobs", self.logprobs)
        if logprobs is not None:
            _in_range("logprobs", logprobs, 0, MAX_LOGPROBS)
        put("logprobs", logprobs)
        put("logit_bias", _as_logit_bias(self.logit_bias))
        put("skip_special_tokens", _as_bool("skip_special_tokens", self.skip_special_tokens))

    @classmethod
    def from_kwargs(cls, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """``params`` (default: ``SamplingParams()``) with ``overrides`` applied, validated again.

        An unknown keyword raises ``TypeError`` whose message starts with its name. ``None`` is passed through
        as a value (it means "until the context is full" for ``max_tokens`` and "no seed" for ``seed``).
        """
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params: must be a SamplingParams or None, got {type(params).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for name in overrides:
            if name not in known:
                raise TypeError(f"{name}: unknown sampling parameter; known: {sorted(known)}")
        return dataclasses.replace(params if params is not None else cls(), **overrides)

    @property
    def is_greedy(self) -> bool:
        """True when the token is always the argmax of the processed logits (temperature below
        ``GREEDY_TEMPERATURE_EPSILON`` or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPSILON or self.top_k == 1

    @property
    def has_logit_processors(self) -> bool:
        """True when bias or penalties change this request's logits (min-token bans are per step)."""
        return (
            self.logit_bias is not None
            or self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
