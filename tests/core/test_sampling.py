"""SamplingParams validation and the batched Sampler, against float64 references written from the spec."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm import sampling, sampling_search
from asyncllm.sampling import (
    MAX_LOGPROBS,
    Sampler,
    SamplingParams,
    SamplingRow,
    process_logits,
)

NAN, INF = float("nan"), float("inf")

# Every field with values it must reject: range errors and type errors (bool is not an int or a number).
BAD_VALUES: list[tuple[str, object]] = [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", "16"), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 2.0), ("min_tokens", None), ("min_tokens", False),
    ("min_tokens", 300),  # above the default max_tokens=256
    ("temperature", -1), ("temperature", -1e-9), ("temperature", "hot"), ("temperature", None),
    ("temperature", True), ("temperature", NAN), ("temperature", INF),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", "0.9"), ("top_p", NAN), ("top_p", None),
    ("top_k", -2), ("top_k", 2.5), ("top_k", True), ("top_k", "5"), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", "0.1"), ("min_p", NAN), ("min_p", False),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", "1.1"),
    ("repetition_penalty", INF),
    ("presence_penalty", -2.01), ("presence_penalty", 2.5), ("presence_penalty", "0"),
    ("presence_penalty", None),
    ("frequency_penalty", -3), ("frequency_penalty", 2.0001), ("frequency_penalty", [1]),
    ("seed", 1.5), ("seed", "42"), ("seed", True), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5), ("stop", None),
    ("stop", b"x"),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", [True]), ("stop_token_ids", 5),
    ("stop_token_ids", [1.0]), ("stop_token_ids", None),
    ("ignore_eos", "yes"), ("ignore_eos", 1), ("ignore_eos", None),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 2.0), ("logprobs", True),
    ("logprobs", "5"),
    ("logit_bias", {1: 100.5}), ("logit_bias", {1: -101}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"7": 1.0}), ("logit_bias", {True: 1.0}), ("logit_bias", {1: "x"}),
    ("logit_bias", {1: NAN}), ("logit_bias", [(1, 2.0)]),
    ("skip_special_tokens", "no"), ("skip_special_tokens", 0), ("skip_special_tokens", None),
]


# --------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_invalid_value_raises_value_error_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: "):
        SamplingParams(**{name: value})  # type: ignore[arg-type]


def test_every_field_has_bad_value_cases() -> None:
    assert {f.name for f in dataclasses.fields(SamplingParams)} == {name for name, _ in BAD_VALUES}


def test_min_tokens_is_bounded_by_max_tokens_only_when_set() -> None:
    with pytest.raises(ValueError, match=r"^min_tokens: .*max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    assert SamplingParams(max_tokens=None, min_tokens=10_000).max_tokens is None


def test_valid_values_are_normalised() -> None:
    bias = {3: 1, 4: -2.5}
    params = SamplingParams(stop="###", stop_token_ids=[5, 6], top_k=-1, temperature=1, logit_bias=bias,
                            seed=-(2**63), logprobs=0, min_p=1, top_p=1)
    assert params.stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert params.stop_token_ids == (5, 6)
    assert params.top_k == 0
    assert type(params.temperature) is float and params.temperature == 1.0
    assert params.logit_bias == {3: 1.0, 4: -2.5}
    bias[3] = 50.0  # the params hold their own copy
    assert params.logit_bias == {3: 1.0, 4: -2.5}
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_from_kwargs_merges_and_validates() -> None:
    base = SamplingParams(temperature=0.5, max_tokens=10)
    merged = SamplingParams.from_kwargs(base, top_p=0.9, stop="x", max_tokens=None)
    assert (merged.temperature, merged.top_p, merged.stop, merged.max_tokens) == (0.5, 0.9, ("x",), None)
    assert base.top_p == 1.0 and base.max_tokens == 10
    assert SamplingParams.from_kwargs(temperature=0.0) == SamplingParams(temperature=0.0)
    assert SamplingParams.from_kwargs() == SamplingParams()
    with pytest.raises(TypeError, match=r"^tempreature: unknown"):
        SamplingParams.from_kwargs(base, tempreature=1.0)
    with pytest.raises(ValueError, match=r"^top_p: "):
        SamplingParams.from_kwargs(base, top_p=2.0)
    with pytest.raises(TypeError, match=r"^params: "):
        SamplingParams.from_kwargs({"temperature": 1.0})  # type: ignore[arg-type]


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    assert not SamplingParams().is_greedy


def test_row_with_seed_requires_a_generator() -> None:
    with pytest.raises(ValueError, match=r"^generator: "):
        SamplingRow(SamplingParams(seed=1), [], [], None)


# --------------------------------------------------------------------------------------------- helpers


def row(params: SamplingParams, prompt: Sequence[int] = (), output: Sequence[int] = (),
        blocked: Sequence[int] = (), generator: torch.Generator | None = None) -> SamplingRow:
    if params.seed is not None and generator is None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, list(blocked))


def reference_processed(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """Bias, min-token bans, CTRL repetition penalty and OpenAI penalties, in float64, one token at a time."""
    x = logits.to(torch.float64).clone()
    p = r.params
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(r.output_token_ids) < p.min_tokens:
        for token in r.min_tokens_blocked_ids:
            x[token] = -math.inf
    if p.repetition_penalty != 1.0:
        for token in set(r.prompt_token_ids) | set(r.output_token_ids):
            value = float(x[token])
            x[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token, count in Counter(r.output_token_ids).items():
        x[token] -= count * p.frequency_penalty + (1.0 if count > 0 else 0.0) * p.presence_penalty
    return x


def reference_keep(logits: torch.Tensor, p: SamplingParams, slack: float = 0.0) -> torch.Tensor:
    """Tokens kept by top-k, then top-p (over the top-k renormalised distribution), then min-p, in float64.

    ``slack`` > 0 widens every cutoff a little (a superset that tolerates float32 rounding at a boundary).
    """
    s = logits.to(torch.float64) / p.temperature
    vocab = s.numel()
    keep = torch.ones(vocab, dtype=torch.bool)
    if 0 < p.top_k < vocab:
        kth = torch.sort(s, descending=True).values[p.top_k - 1]
        keep &= s >= kth - slack
    if p.top_p < 1.0:
        q = torch.where(keep, torch.softmax(s, 0), 0.0)
        q = q / q.sum()
        cumulative, cut = 0.0, math.inf
        for i in sorted(range(vocab), key=lambda i: -float(s[i])):
            if not keep[i]:
                continue
            if cumulative >= min(1.0, p.top_p + slack):
                break
            cut, cumulative = float(s[i]), cumulative + float(q[i])
        keep &= s >= cut - slack
    if p.min_p > 0.0:
        probs = torch.softmax(s, 0)
        keep &= probs >= p.min_p * probs.max() * (1.0 - slack)
    return keep


def reference_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    probs = torch.softmax(logits.to(torch.float64) / p.temperature, 0) * reference_keep(logits, p)
    return probs / probs.sum()


# --------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = logits.float().argmax(dim=-1).tolist()
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == expected
    assert all(type(t) is int for t in out.token_ids)
    # The same rows next to sampled rows (the general path) and with top_k=1 are still the argmax.
    mixed = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.5)),
             row(SamplingParams(temperature=0.9, top_k=1)), row(SamplingParams(temperature=1.0, top_p=0.5)),
             row(SamplingParams(temperature=0.0, min_p=0.3)), row(SamplingParams(temperature=0.0, seed=5))]
    got = Sampler()(logits, mixed, torch.Generator().manual_seed(1)).token_ids
    assert [got[i] for i in (0, 2, 4, 5)] == [expected[i] for i in (0, 2, 4, 5)]


# --------------------------------------------------------------------------------------------- penalties

penalty_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 1.0]),
    min_tokens=st.integers(0, 4),
    repetition_penalty=st.sampled_from([1.0, 0.5, 1.3, 2.0]),
    presence_penalty=st.sampled_from([0.0, -1.5, 0.7, 2.0]),
    frequency_penalty=st.sampled_from([0.0, 0.4, -2.0, 1.1]),
    logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 39), st.floats(-100, 100), max_size=4)),
)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(penalty_params, st.lists(st.integers(0, 39), max_size=12), st.lists(st.integers(0, 39),
                  max_size=8), st.lists(st.integers(0, 39), max_size=2)),
        min_size=1, max_size=5),
    seed=st.integers(0, 2**31),
)
def test_penalties_match_float64_reference(rows: list, seed: int) -> None:
    logits = torch.randn(len(rows), 40, generator=torch.Generator().manual_seed(seed)) * 4
    batch = [row(p, prompt, output, blocked) for p, prompt, output, blocked in rows]
    original = logits.clone()
    processed = process_logits(logits, batch)
    assert torch.equal(logits, original)
    reference = torch.stack([reference_processed(logits[i], r) for i, r in enumerate(batch)])
    assert torch.equal(torch.isinf(processed), torch.isinf(reference))
    finite = torch.isfinite(reference)
    torch.testing.assert_close(processed.double()[finite], reference[finite], rtol=1e-5, atol=1e-4)
    # Greedy rows take the argmax of the processed logits (where it is not a near tie).
    tokens = Sampler()(logits, batch, torch.Generator().manual_seed(seed)).token_ids
    for i, r in enumerate(batch):
        top2 = torch.topk(reference[i], 2).values
        if r.params.is_greedy and float(top2[0] - top2[1]) > 1e-3:
            assert tokens[i] == int(reference[i].argmax())


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.5, -0.5]])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.1)
    assert Sampler()(logits, [row(params, output=[1])]).token_ids == [2]
    # Negative logits are multiplied by the repetition penalty; positive ones divided.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    processed = process_logits(logits, [row(params, prompt=[1, 1, 5], output=[3])])
    torch.testing.assert_close(processed, torch.tensor([[0.0, 1.5, 2.9, -2.0, 2.5, -1.0]]))
    assert Sampler()(logits, [row(params, prompt=[1, 1, 5], output=[3])]).token_ids == [2]


def test_min_tokens_bans_blocked_ids_until_reached() -> None:
    eos, stop_id = 2, 7
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5, 0.2, 0.1, 0.3, 8.0, 0.4, 1.5]])
    params = SamplingParams(temperature=0.0, min_tokens=3)
    for produced in range(5):
        token = Sampler()(logits, [row(params, output=[1] * produced, blocked=[eos, stop_id])]).token_ids[0]
        assert token == (9 if produced < 3 else eos)
    # Without min_tokens the same row is free to end at once.
    assert Sampler()(logits, [row(SamplingParams(temperature=0.0), blocked=[eos])]).token_ids == [eos]
    # Sampled rows never draw a banned id before min_tokens.
    sampled = SamplingParams(temperature=2.0, min_tokens=2)
    batch = [row(sampled, output=[1], blocked=[eos, stop_id]) for _ in range(2000)]
    generator = torch.Generator().manual_seed(0)
    tokens = Sampler()(logits.expand(2000, -1).contiguous(), batch, generator).token_ids
    assert eos not in tokens and stop_id not in tokens


# --------------------------------------------------------------------------------------------- filters

filter_params = st.builds(
    SamplingParams,
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.just(0), st.integers(1, 320)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
)


@settings(max_examples=50, deadline=None)
@given(
    configs=st.lists(filter_params, min_size=1, max_size=3),
    vocab=st.sampled_from([2, 7, 50, 63, 64, 65, 300, 4099]),
    scale=st.sampled_from([0.1, 1.0, 4.0, 15.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_sampled_tokens_stay_inside_the_allowed_set(configs: list[SamplingParams], vocab: int, scale: float,
                                                      ties: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(len(configs), vocab, generator=generator) * scale
    if ties:
        base = torch.round(base * 2) / 2
    repeats = 24
    logits = base.repeat_interleave(repeats, dim=0)
    batch = [row(p) for p in configs for _ in range(repeats)]
    tokens = Sampler()(logits, batch, generator).token_ids
    for c, params in enumerate(configs):
        allowed = reference_keep(base[c], params, slack=1e-4)
        drawn = tokens[c * repeats:(c + 1) * repeats]
        assert all(bool(allowed[t]) for t in drawn), (params, drawn, allowed.nonzero().flatten().tolist())


# (vocab, logit scale, live tokens (the rest sit at -30), params, whether top-p needs the bucket fallback)
DISTRIBUTION_CASES = [
    (12, 2.0, 12, SamplingParams(temperature=0.7), False),
    (12, 2.0, 12, SamplingParams(temperature=1.3, top_k=5), False),
    (12, 2.0, 12, SamplingParams(temperature=1.0, top_p=0.6), False),
    (12, 2.0, 12, SamplingParams(temperature=0.9, top_k=8, top_p=0.7, min_p=0.1), False),
    (12, 2.0, 12, SamplingParams(temperature=1.0, min_p=0.2), False),
    (200, 0.5, 200, SamplingParams(temperature=1.0, top_p=0.85), True),
    (200, 1.0, 200, SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05), False),  # min-p bounds it
    (200, 3.0, 200, SamplingParams(temperature=1.0, top_k=100, top_p=0.95), False),
    (3000, 0.4, 150, SamplingParams(temperature=1.0, top_p=0.9), True),  # finer buckets
    (700, 1.0, 700, SamplingParams(temperature=1.0), False),  # two-level inverse CDF, partial last block
]


@pytest.mark.parametrize(("vocab", "scale", "live", "params", "fallback"), DISTRIBUTION_CASES)
def test_empirical_distribution_matches_reference(vocab: int, scale: float, live: int, params: SamplingParams,
                                                  fallback: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.full((vocab,), -30.0)
    logits[:live] = torch.randn(live, generator=generator) * scale
    expected = reference_distribution(logits, params)
    fallbacks: list[int] = []
    original = sampling.top_p_cutoff_by_buckets
    monkeypatch.setattr(sampling, "top_p_cutoff_by_buckets",
                        lambda probs, target: fallbacks.append(len(probs)) or original(probs, target))
    per_call, calls = 3000, 10
    batch = [row(params) for _ in range(per_call)]
    counts = torch.zeros(vocab, dtype=torch.float64)
    for _ in range(calls):
        tokens = Sampler()(logits.expand(per_call, -1).contiguous(), batch, generator).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    assert bool(fallbacks) == fallback
    n = per_call * calls
    assert counts[expected == 0].sum() == 0
    # Chi-square over bins with enough expected draws (the rest pooled into one bin); 6-sigma bound.
    big = expected * n >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big] * n, (expected[~big] * n).sum().view(1)])
    keep = wanted > 0
    chi2 = float((((observed - wanted) ** 2)[keep] / wanted[keep]).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_inverse_cdf_never_returns_a_zero_probability_index() -> None:
    probs = torch.zeros(4, 1100)
    probs[0, :3] = 1.0  # mass only in the first block, zero tail blocks
    probs[1, 1099] = 1.0  # only the last entry of the partial last block
    probs[2, 256:512:7] = torch.rand(37)
    probs[3, 5] = 1e-30  # a tiny mass next to a large one
    probs[3, 900] = 1.0
    for u in (0.0, 0.5, 1.0 - 2**-53):
        picked = sampling_search.inverse_cdf(probs, torch.full((4, 1), u, dtype=torch.float64))
        assert all(float(probs[i, t]) > 0 for i, t in enumerate(picked.tolist())), (u, picked)
    narrow = probs[:, :400].clone()
    narrow[1, 399] = 1.0
    picked = sampling_search.inverse_cdf(narrow, torch.full((4, 1), 1.0 - 2**-53, dtype=torch.float64))
    assert all(float(narrow[i, t]) > 0 for i, t in enumerate(picked.tolist()))


# --------------------------------------------------------------------------------------------- seeds


def step_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    scale = [0.6, 2.0, 1.0, 1.0, 3.0, 1.0][request]
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step)) * scale


REQUESTS = [
    SamplingParams(seed=7, temperature=0.9, top_p=0.9),  # flat: top-p set larger than the candidates
    SamplingParams(seed=11, temperature=1.2, top_k=40, repetition_penalty=1.2),
    SamplingParams(seed=3, temperature=1.0, min_p=0.05, frequency_penalty=0.5),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0),
    SamplingParams(seed=7, temperature=1.0, top_p=0.5, presence_penalty=1.0),  # same seed as request 0
]


def run_requests(order: list[int], steps: int, vocab: int) -> dict[int, list[int]]:
    generators = {r: torch.Generator().manual_seed(REQUESTS[r].seed) for r in order
                  if REQUESTS[r].seed is not None}
    outputs: dict[int, list[int]] = {r: [] for r in order}
    shared = torch.Generator().manual_seed(123)
    for step in range(steps):
        logits = torch.stack([step_logits(r, step, vocab) for r in order])
        batch = [SamplingRow(REQUESTS[r], [1, 2, 3], outputs[r], generators.get(r)) for r in order]
        tokens = Sampler()(logits, batch, shared).token_ids
        for r, token in zip(order, tokens, strict=True):
            outputs[r].append(token)
    return outputs


def test_seeded_rows_reproduce_across_batch_compositions_and_orders() -> None:
    steps, vocab = 10, 3000
    seeded = [r for r, p in enumerate(REQUESTS) if p.seed is not None]
    alone = {r: run_requests([r], steps, vocab)[r] for r in seeded}
    assert len({tuple(v) for v in alone.values()}) == len(seeded)  # different requests, different tokens
    for order in ([0, 1, 2, 3, 4, 5], [4, 3, 5, 2, 1, 0], [3, 0, 4], [2, 5, 3, 3, 1]):
        together = run_requests(order, steps, vocab)
        for r in order:
            if r in alone:
                assert together[r] == alone[r], (order, r)


def test_unseeded_rows_use_the_call_generator() -> None:
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    batch = [row(SamplingParams(temperature=1.0, top_p=0.95)) for _ in range(8)]
    first = Sampler()(logits, batch, torch.Generator().manual_seed(42)).token_ids
    again = Sampler()(logits, batch, torch.Generator().manual_seed(42)).token_ids
    other = Sampler()(logits, batch, torch.Generator().manual_seed(43)).token_ids
    assert first == again and first != other


# --------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_the_raw_log_softmax(dtype: torch.dtype) -> None:
    vocab = 50
    logits = (torch.randn(5, vocab, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    batch = [
        row(SamplingParams(logprobs=None)),
        row(SamplingParams(temperature=0.0, logprobs=0)),
        row(SamplingParams(temperature=0.5, top_k=4, logprobs=3, presence_penalty=2.0), output=[5, 6]),
        row(SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS, logit_bias={7: 100.0})),
        row(SamplingParams(temperature=1.0, logprobs=5, seed=9)),
    ]
    out = Sampler()(logits, batch, torch.Generator().manual_seed(0))
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[0] is None
    assert out.token_ids[3] == 7  # the bias decided the token; its logprob is still the raw one
    for i in range(1, 5):
        entry = out.logprobs[i]
        assert entry is not None
        n = batch[i].params.logprobs
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(reference[i, entry.token_id]), abs=1e-5)
        assert len(entry.top) == n
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        expected_top = torch.topk(reference[i], n).values.tolist() if n else []
        assert values == pytest.approx(expected_top, abs=1e-5)
        for token, value in entry.top:
            assert value == pytest.approx(float(reference[i, token]), abs=1e-5)


def test_logprobs_top_is_capped_by_the_vocabulary() -> None:
    logits = torch.randn(1, 6)
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=20))])
    entry = out.logprobs[0]
    assert entry is not None and sorted(t for t, _ in entry.top) == list(range(6))


# --------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_raise_value_errors_naming_them() -> None:
    sampler = Sampler()
    greedy = row(SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match=r"^logits: "):
        sampler(torch.randn(10), [greedy])
    with pytest.raises(ValueError, match=r"^logits: "):
        sampler(torch.zeros(1, 10, dtype=torch.long), [greedy])
    with pytest.raises(ValueError, match=r"^rows: "):
        sampler(torch.randn(2, 10), [greedy])
    with pytest.raises(ValueError, match=r"^logit_bias: .*12"):
        sampler(torch.randn(1, 10), [row(SamplingParams(logit_bias={12: 1.0}))])
    with pytest.raises(ValueError, match=r"^min_tokens_blocked_ids: "):
        sampler(torch.randn(1, 10), [row(SamplingParams(min_tokens=1), blocked=[10])])
    with pytest.raises(ValueError, match=r"prompt_token_ids"):
        sampler(torch.randn(1, 10), [row(SamplingParams(repetition_penalty=1.1), prompt=[3, 10])])
    with pytest.raises(ValueError, match=r"output_token_ids"):
        sampler(torch.randn(1, 10), [row(SamplingParams(presence_penalty=1.0), output=[-1])])


# ---------------------------------------------------------------------- per-request rows
def test_request_rows_carry_history_only_for_penalties_and_bans_only_below_min_tokens() -> None:
    eos = (2, 7)
    plain = sampling.RequestSampling.create(SamplingParams(), eos_token_ids=eos, device=torch.device("cpu"))
    assert plain.generator is None and plain.min_tokens_blocked_ids == ()
    row = plain.row([5, 6, 9], num_prompt_tokens=2)
    assert (tuple(row.prompt_token_ids), tuple(row.output_token_ids), tuple(row.min_tokens_blocked_ids)) == (
        (), (), ())

    params = SamplingParams(min_tokens=2, stop_token_ids=[11, 2], presence_penalty=0.5, seed=3)
    state = sampling.RequestSampling.create(params, eos_token_ids=eos, device=torch.device("cpu"))
    assert state.min_tokens_blocked_ids == sampling.min_tokens_blocked_ids(params, eos) == (2, 7, 11)
    assert state.generator is not None and state.generator.initial_seed() == 3
    first = state.row([5, 6, 9], num_prompt_tokens=2)
    assert (list(first.prompt_token_ids), list(first.output_token_ids)) == ([5, 6], [9])
    assert tuple(first.min_tokens_blocked_ids) == (2, 7, 11) and first.generator is state.generator
    assert tuple(state.row([5, 6, 9, 4], num_prompt_tokens=2).min_tokens_blocked_ids) == ()


def test_params_token_ids_are_checked_against_the_vocabulary() -> None:
    sampling.check_token_ids(SamplingParams(stop_token_ids=[9], logit_bias={0: 1.0}), 10)
    with pytest.raises(ValueError, match=r"^stop_token_ids"):
        sampling.check_token_ids(SamplingParams(stop_token_ids=[10]), 10)
    with pytest.raises(ValueError, match=r"^logit_bias"):
        sampling.check_token_ids(SamplingParams(logit_bias={10: 1.0}), 10)


# ------------------------------------------------------------------ extreme values and finite choices
@pytest.mark.parametrize("value", [1e-46, 5e-324, 1e-300, 9.99e-6, 0.0, -0.0])
def test_temperatures_below_the_epsilon_are_greedy(value: float) -> None:
    params = SamplingParams(temperature=value)
    assert params.is_greedy and params.temperature >= 0.0
    assert not SamplingParams(temperature=sampling.GREEDY_TEMPERATURE_EPSILON).is_greedy
    logits = torch.randn(3, 40)
    out = Sampler()(logits, [row(params), row(SamplingParams(temperature=value, presence_penalty=1.0),
                                              output=[int(logits[1].argmax())]),
                             row(SamplingParams(temperature=0.7, seed=1))])
    assert out.token_ids[0] == int(logits[0].argmax())
    expected = logits[1].clone()
    expected[int(logits[1].argmax())] -= 1.0
    assert out.token_ids[1] == int(expected.argmax())


@pytest.mark.parametrize(("name", "low", "high"), [
    ("temperature", 0.0, sampling.MAX_TEMPERATURE),
    ("repetition_penalty", sampling.MIN_REPETITION_PENALTY, sampling.MAX_REPETITION_PENALTY),
    ("presence_penalty", -2.0, 2.0),
    ("frequency_penalty", -2.0, 2.0),
])
def test_penalty_and_temperature_bounds_are_inclusive_and_enforced(name: str, low: float, high: float) -> None:
    SamplingParams(**{name: low})
    SamplingParams(**{name: high})
    for bad in (math.nextafter(high, INF), 1e300, -1e300 if low >= 0 else math.nextafter(low, -INF)):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            SamplingParams(**{name: bad})
    if name == "repetition_penalty":
        for bad in (1e-46, 5e-324, math.nextafter(low, 0.0)):
            with pytest.raises(ValueError, match=r"^repetition_penalty: "):
                SamplingParams(repetition_penalty=bad)


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.sampled_from([0.0, 5e-324, 1e-46, 1e-5, 0.3, 1.0, 1e4]),
    repetition_penalty=st.sampled_from([0.01, 1.0, 100.0]),
    presence=st.sampled_from([-2.0, 0.0, 2.0, 5e-324]),
    frequency=st.sampled_from([-2.0, 0.0, 2.0]),
    bias=st.sampled_from([None, -100.0, 100.0, 5e-324]),
    top_p=st.sampled_from([5e-324, 1e-300, 0.5, 1.0]),
    min_p=st.sampled_from([0.0, 5e-324, 1.0]),
    top_k=st.sampled_from([0, 1, 3]),
    scale=st.sampled_from([1.0, 1e30, 1e-30]),
    seed=st.integers(0, 2**16),
)
def test_every_valid_params_row_gets_a_token_it_allows(temperature: float, repetition_penalty: float,
                                                        presence: float, frequency: float, bias: float | None,
                                                        top_p: float, min_p: float, top_k: int, scale: float,
                                                        seed: int) -> None:
    vocab = 30
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, vocab, generator=gen) * scale
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty, top_p=top_p,
                            presence_penalty=presence, frequency_penalty=frequency, min_p=min_p, top_k=top_k,
                            min_tokens=4, logit_bias=None if bias is None else dict.fromkeys(range(vocab), bias))
    blocked = list(range(vocab - 1))  # only the last id may be chosen while min_tokens is unmet
    rows = [row(params, prompt=list(range(vocab)), output=[1, 1, 2], blocked=blocked),
            row(SamplingParams(temperature=0.0))]
    out = Sampler()(logits, rows, torch.Generator().manual_seed(seed))
    assert out.token_ids == [vocab - 1, int(logits[1].argmax())]


def test_a_row_without_any_finite_logit_falls_back_to_its_raw_argmax_alone() -> None:
    logits = torch.randn(4, 20)
    logits[1] = NAN
    logits[2, 5] = INF
    rows = [row(SamplingParams(temperature=0.0)),
            row(SamplingParams(temperature=0.8)),
            row(SamplingParams(temperature=0.8, min_tokens=1), blocked=range(20)),  # bans every id
            row(SamplingParams(temperature=0.0, presence_penalty=1.0), output=[3])]
    out = Sampler()(logits, rows, torch.Generator().manual_seed(0))
    reference = logits[3].clone()
    reference[3] -= 1.0
    assert out.token_ids == [int(logits[0].argmax()), 0, 5, int(reference.argmax())]


def test_bans_covering_the_vocabulary_are_refused_naming_the_fields() -> None:
    params = SamplingParams(min_tokens=1, stop_token_ids=list(range(1, 10)))
    with pytest.raises(ValueError, match=r"^min_tokens, stop_token_ids: "):
        sampling.check_bans(params, [0], 10)
    sampling.check_bans(params, [0], 11)  # id 10 is still allowed
    sampling.check_bans(dataclasses.replace(params, min_tokens=0), [0], 10)  # no bans without min_tokens
    # an EOS id outside the vocabulary neither counts as a ban nor reaches the sampler
    assert sampling.min_tokens_blocked_ids(params, [0, 99], 10) == tuple(range(10))
