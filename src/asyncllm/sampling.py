"""Batched next-token sampling (``SamplingParams`` lives in :mod:`asyncllm.sampling_params`).

``SamplingParams`` is an immutable, validated value describing how one request chooses tokens.
``Sampler`` turns one step's logits ``[B, V]`` (one row per request) into one token id per row, on the
logits' device, applying in this order:

1. ``logit_bias`` is added;
2. while ``len(output) < min_tokens`` the row's ``min_tokens_blocked_ids`` are set to ``-inf``;
3. repetition penalty over prompt + output tokens (CTRL / Hugging Face style: positive logits are divided by
   the penalty, negative ones multiplied);
4. presence / frequency penalties over output tokens (OpenAI formula:
   ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``);
5. greedy rows (``SamplingParams.is_greedy``) take the argmax; the others are divided by their temperature,
   then filtered: top-k keeps the ``k`` largest logits; top-p keeps the smallest set of most likely tokens
   whose probability (renormalised after top-k) reaches ``top_p``, always at least one token; min-p drops
   tokens whose probability is below ``min_p`` times the most likely one's. One token is drawn from the
   renormalised remainder. Tokens tied with the last one a filter keeps may or may not be kept.

A row left without any finite processed logit (NaN counts as ``-inf``; ``+inf`` as the largest float32)
cannot come from validated params on finite logits (see ``SamplingParams``' bounds and
``sampling_rows.check_bans``); if one does (e.g. a model producing NaN), that row alone falls back to the
argmax of its raw logits (NaN as ``-inf``, so id 0 when the raw row holds nothing else), and the rest of the batch
is sampled as usual: no parameter or logit value makes the call raise.

Logprobs (``SamplerOutput.logprobs``) describe the model's raw distribution: ``log_softmax`` of the logits
as given, before any of the steps above.

Randomness: a row whose ``SamplingRow.generator`` is set draws only from that generator, exactly one
float64 uniform per sampled step, and is processed on its own, so its tokens do not depend on which other
rows share the batch or in which order. The other sampled rows share the ``generator`` argument of the
call (``None``: torch's default generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncllm.sampling_params import (
    GREEDY_TEMPERATURE_EPSILON,
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PRESENCE_FREQUENCY,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    _fail,
)
from asyncllm.sampling_rows import (
    RequestSampling,
    SamplingRow,
    check_bans,
    check_token_ids,
    min_tokens_blocked_ids,
)
from asyncllm.sampling_search import candidate_cutoff, inverse_cdf, pick, top_p_cutoff_by_buckets

__all__ = [
    "GREEDY_TEMPERATURE_EPSILON",
    "MAX_ABS_LOGIT_BIAS",
    "MAX_ABS_PRESENCE_FREQUENCY",
    "MAX_LOGPROBS",
    "MAX_REPETITION_PENALTY",
    "MAX_TEMPERATURE",
    "MIN_REPETITION_PENALTY",
    "RequestSampling",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "TokenLogprobs",
    "check_bans",
    "check_token_ids",
    "min_tokens_blocked_ids",
    "process_logits",
]

_TOP_P_CANDIDATES = 64  # how many of a row's largest logits are searched first for its top-p set
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class TokenLogprobs:
    """Log-probabilities under the model's raw distribution (log-softmax of the unprocessed logits)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-N (token_id, logprob), descending by logprob


@dataclass
class SamplerOutput:
    """One entry per row, in row order; ``logprobs[i]`` is ``None`` when row i did not ask for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _check_batch(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        _fail("logits", f"must be a floating-point [batch, vocab] tensor, got {tuple(logits.shape)} "
                        f"{logits.dtype}")
    if logits.shape[0] != len(rows):
        _fail("rows", f"expected one row per logits row ({logits.shape[0]}), got {len(rows)}")
    if logits.shape[1] == 0:
        _fail("logits", "vocabulary dimension is empty")


def _check_range(name: str, ids: Sequence[int], vocab_size: int) -> None:
    """Token ids in ``[0, vocab_size)``, checked with two C-level scans."""
    if len(ids) and (min(ids) < 0 or max(ids) >= vocab_size):
        _check_ids(name, ids, vocab_size)


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    for token in ids:
        if not 0 <= token < vocab_size:
            _fail(name, f"token id {token} is outside the vocabulary [0, {vocab_size})")


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Return a float32 copy of ``logits`` ``[B, V]`` after bias, min-token bans and penalties.

    Steps 1-4 of the module docstring, row by row in that order; rows that need none of them are copied
    unchanged. Temperature and filtering are not applied here. ``logits`` is never modified.
    """
    _check_batch(logits, rows)
    processed = logits.to(torch.float32, copy=True)
    _apply_processors(processed, rows)
    return processed


def _apply_processors(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Apply bias, bans and penalties to the float32 ``x`` in place; tensors are built only for rows that
    need each step."""
    vocab = x.shape[1]
    device = x.device
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    rep_rows: list[int] = []
    rep_ids: list[int] = []
    rep_penalty = [1.0] * len(rows)
    count_rows: list[int] = []
    count_ids: list[int] = []
    presence = [0.0] * len(rows)
    frequency = [0.0] * len(rows)
    for i, row in enumerate(rows):
        params = row.params
        if params.logit_bias is not None:
            _check_ids("logit_bias", list(params.logit_bias), vocab)
            bias_rows += [i] * len(params.logit_bias)
            bias_ids += params.logit_bias.keys()
            bias_values += params.logit_bias.values()
        if row.bans_active:
            _check_ids("min_tokens_blocked_ids", row.min_tokens_blocked_ids, vocab)
            ban_rows += [i] * len(row.min_tokens_blocked_ids)
            ban_ids += row.min_tokens_blocked_ids
        repeats = params.repetition_penalty != 1.0
        counted = (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0) and len(
            row.output_token_ids) > 0
        if repeats:
            _check_range("prompt_token_ids", row.prompt_token_ids, vocab)
        if repeats or counted:
            _check_range("output_token_ids", row.output_token_ids, vocab)
        if repeats:
            seen = len(row.prompt_token_ids) + len(row.output_token_ids)
            rep_rows += [i] * seen
            rep_ids += row.prompt_token_ids
            rep_ids += row.output_token_ids
            rep_penalty[i] = params.repetition_penalty
        if counted:
            count_rows += [i] * len(row.output_token_ids)
            count_ids += row.output_token_ids
            presence[i] = params.presence_penalty
            frequency[i] = params.frequency_penalty

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    if bias_rows:
        x.index_put_((index(bias_rows), index(bias_ids)),
                     torch.tensor(bias_values, dtype=torch.float32, device=device), accumulate=True)
    if ban_rows:
        x.index_put_((index(ban_rows), index(ban_ids)), torch.tensor(float("-inf"), device=device))
    if rep_rows:
        r, c = index(rep_rows), index(rep_ids)
        penalty = torch.tensor(rep_penalty, dtype=torch.float32, device=device)[r]
        seen_logits = x[r, c]
        # Duplicate (row, id) pairs write the same value, so the scatter is well defined.
        x[r, c] = torch.where(seen_logits > 0, seen_logits / penalty, seen_logits * penalty)
    if count_rows:
        keys = index(count_rows) * vocab + index(count_ids)
        unique_keys, counts = torch.unique(keys, return_counts=True)
        r, c = unique_keys // vocab, unique_keys % vocab
        freq = torch.tensor(frequency, dtype=torch.float32, device=device)[r]
        pres = torch.tensor(presence, dtype=torch.float32, device=device)[r]
        x[r, c] = x[r, c] - (counts.to(torch.float32) * freq + pres)


def _sample_filtered(s: torch.Tensor, params: Sequence[SamplingParams], floor: torch.Tensor,
                     uniform: torch.Tensor) -> torch.Tensor:
    """Sample rows with top-k or top-p from ``s`` ``[m, V]`` (temperature-scaled, row max exactly 0).

    Filters as in the module docstring; ``floor`` ``[m]`` is the min-p cutoff on ``s`` (``-inf``: off). Every
    filter amounts to a per-row cutoff, so the kept set is looked for among the row's
    ``max(top_k, _TOP_P_CANDIDATES)`` largest logits (``topk``, no sort) and sampled from there; only top-p
    rows whose kept set is larger fall back to ``_top_p_cutoff_by_buckets`` over the whole row.
    """
    m, vocab = s.shape
    device = s.device
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]
    top_k = torch.tensor(ks, dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    p_only = [j for j, p in enumerate(params) if ks[j] == 0 and p.top_p < 1.0]
    total = torch.zeros(m, dtype=torch.float32, device=device)
    p_only_probs = torch.empty(0, vocab, device=device)
    if p_only:
        p_only_probs = pick(s, p_only, m).exp()
        total[torch.tensor(p_only, dtype=torch.long, device=device)] = p_only_probs.sum(dim=1)
    size = min(vocab, max(max(ks), _TOP_P_CANDIDATES if p_only else 0))
    if size >= vocab:
        values, indices = s.sort(dim=1, descending=True)
    else:
        values, indices = s.topk(size, dim=1)
    cutoff, covered = candidate_cutoff(values, top_k, top_p, total, floor, vocab)
    tokens = torch.empty(m, dtype=torch.long, device=device)
    done = covered.nonzero().squeeze(1)
    if done.numel():
        kept = pick(values, done.tolist(), m)
        probs = kept.exp().masked_fill_(kept < cutoff[done].unsqueeze(1), 0.0)
        choice = inverse_cdf(probs, uniform[done])
        tokens[done] = pick(indices, done.tolist(), m).gather(1, choice.unsqueeze(1)).squeeze(1)
    pending = (~covered).nonzero().squeeze(1)
    if pending.numel():
        # Only top-p rows without top-k get here (top-k rows always fit their candidates).
        slot = {j: n for n, j in enumerate(p_only)}
        rows = pending.tolist()
        probs = pick(p_only_probs, [slot[j] for j in rows], len(p_only))
        min_p = torch.tensor([params[j].min_p for j in rows], dtype=torch.float32, device=device)
        p_cutoff = torch.maximum(top_p_cutoff_by_buckets(probs, top_p[pending] * total[pending]), min_p)
        probs.mul_(probs >= p_cutoff.unsqueeze(1))
        tokens[pending] = inverse_cdf(probs, uniform[pending])
    return tokens


def _sample(s: torch.Tensor, params: Sequence[SamplingParams], generator: torch.Generator | None
            ) -> torch.Tensor:
    """Sample one token per row of the processed float32 logits ``s`` ``[n, V]`` (modified in place).

    Logits are divided by the temperature; top-k, top-p and min-p (drop tokens whose probability is below
    ``min_p`` times the most likely one's) filter them (see ``_sample_filtered``); one token is drawn from the
    renormalised remainder by inverse-CDF sampling with exactly one float64 uniform per row, drawn in row
    order from ``generator``. Each row's result depends only on that row's logits and its uniform.
    """
    n, vocab = s.shape
    device = s.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    s.sub_(s.amax(dim=1, keepdim=True)).div_(temperature.unsqueeze(1))  # the row max becomes exactly 0
    uniform = torch.rand((n, 1), dtype=torch.float64, device=device, generator=generator)
    # p_i >= min_p * p_max  <=>  s_i >= log(min_p), since the row max of s is 0.
    floor = torch.tensor([math.log(p.min_p) if p.min_p > 0.0 else float("-inf") for p in params],
                         dtype=torch.float32, device=device)
    filtered = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    plain = [i for i, p in enumerate(params) if not (0 < p.top_k < vocab or p.top_p < 1.0)]
    tokens = torch.empty(n, dtype=torch.long, device=device)
    if filtered:
        index = torch.tensor(filtered, dtype=torch.long, device=device)
        tokens[index] = _sample_filtered(pick(s, filtered, n), [params[i] for i in filtered], floor[index],
                                         uniform[index])
    if plain:
        index = torch.tensor(plain, dtype=torch.long, device=device)
        rows = pick(s, plain, n)
        if any(params[i].min_p > 0.0 for i in plain):
            rows.masked_fill_(rows < floor[index].unsqueeze(1), float("-inf"))
        tokens[index] = inverse_cdf(rows.exp_(), uniform[index])
    return tokens


def _raw_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor
                  ) -> list[TokenLogprobs | None]:
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits[index].to(torch.float32), dim=-1)
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
    n_top = min(max(rows[i].params.logprobs or 0 for i in wanted), logits.shape[1])
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if n_top > 0:
        values, ids = logprobs.topk(n_top, dim=1)
        top_values, top_ids = values.tolist(), ids.tolist()
    token_list = tokens[index].tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        result[i] = TokenLogprobs(token_id=token_list[j], logprob=chosen[j],
                                  top=list(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
    return result


class Sampler:
    """Chooses one token per row of a step's logits; stateless, runs on the logits' device.

    Semantics are those of the module docstring. Returned logprobs are the model's raw distribution:
    ``log_softmax`` of the unprocessed logits, before bias, bans, penalties, temperature or filtering.

    Cost: when every row is greedy with no bias, penalties or active bans, a call is one argmax over the
    batch. Otherwise logits are copied to float32 once; penalty tensors are built only from rows that use
    them; top-k/top-p search a partial selection (``topk``) of each row, and a row whose top-p set is larger
    than that falls back to bucketing by probability instead of sorting; rows with neither skip selection.

    A row without any finite logit after bans and penalties takes the argmax of its raw logits instead
    (see the module docstring); no row's values make the call raise for the batch.
    """

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 generator: torch.Generator | None = None) -> SamplerOutput:
        _check_batch(logits, rows)
        if all(row.params.is_greedy and not row.params.has_logit_processors and not row.bans_active
               for row in rows):
            # CPU argmax is several times faster on float32 than on half types; the cast keeps the order.
            exact = logits if logits.dtype == torch.float32 or logits.device.type != "cpu" else logits.float()
            tokens = exact.argmax(dim=-1)
        else:
            tokens = self._choose(logits, rows, generator)
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=_raw_logprobs(logits, rows, tokens))

    @staticmethod
    def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None
                ) -> torch.Tensor:
        x = logits.to(torch.float32, copy=True)
        _apply_processors(x, rows)
        x.nan_to_num_(nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
        # Rows left without a finite logit are sampled from zeros (never raising) and replaced below by
        # their raw argmax; no host sync is needed to find them.
        stuck = (x == float("-inf")).all(dim=1)
        x.masked_fill_(stuck.unsqueeze(1), 0.0)
        tokens = Sampler._pick(x, rows, generator)
        fallback = logits.to(torch.float32).nan_to_num(nan=float("-inf")).argmax(dim=-1)
        return torch.where(stuck, fallback, tokens)

    @staticmethod
    def _pick(x: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None
              ) -> torch.Tensor:
        device = x.device
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        greedy = [i for i, row in enumerate(rows) if row.params.is_greedy]
        shared = [i for i, row in enumerate(rows) if not row.params.is_greedy and row.generator is None]
        private = [i for i, row in enumerate(rows) if not row.params.is_greedy and row.generator is not None]
        if greedy:
            index = torch.tensor(greedy, dtype=torch.long, device=device)
            tokens[index] = x[index].argmax(dim=-1)
        if shared:
            params = [rows[i].params for i in shared]
            if len(shared) == len(rows):
                tokens = _sample(x, params, generator)
            else:
                index = torch.tensor(shared, dtype=torch.long, device=device)
                tokens[index] = _sample(x[index], params, generator)
        for i in private:
            # Processed alone so that its result cannot depend on the batch's shape or order.
            tokens[i : i + 1] = _sample(x[i : i + 1], [rows[i].params], rows[i].generator)
        return tokens
