"""Streaming detokenization and stop strings, checked against full decodes and a brute-force reference."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asyncllm.detokenizer import IncrementalDetokenizer
from asyncllm.stop import StopStringMatcher
from asyncllm.tokenizer import Tokenizer

from ._tokenizers import CORPUS, build_chat_tokenizer, build_sentencepiece_backend

FFFD = "\ufffd"

PIECES = st.one_of(
    st.sampled_from(["the", " quick", " fox", "Hello", " world", ".", ",", " ", "  ", "\n", "\t", "'s"]),
    st.sampled_from(list("éèçñüößÅøœ€☕")),
    st.sampled_from(["e\u0301", "a\u0308", "👩\u200d💻", "🇫🇷"]),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.characters(blacklist_categories=("Cs",)),
)
TEXT = st.lists(PIECES, max_size=25).map("".join)


def build_sentencepiece_tokenizer(decoder_style: str) -> Tokenizer:
    """A Llama-2-style tokenizer: Metaspace pre-tokenizer, byte-fallback BPE trained on a tiny corpus."""
    backend = build_sentencepiece_backend(decoder_style)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["in-memory", pytest.param("smollm2", marks=pytest.mark.slow)])
def byte_level(request: pytest.FixtureRequest) -> Tokenizer:
    """A byte-level BPE tokenizer: the one trained in memory, and the SmolLM2 GGUF's (skips when absent)."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    return build_chat_tokenizer()


@pytest.fixture(scope="module", params=["strip", "metaspace"])
def sentencepiece(request: pytest.FixtureRequest) -> Tokenizer:
    return build_sentencepiece_tokenizer(request.param)


@pytest.fixture(scope="module", params=["byte-level", pytest.param("smollm2-byte-level", marks=pytest.mark.slow),
                                        "sentencepiece-strip", "sentencepiece-metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "byte-level":
        return build_chat_tokenizer()
    if request.param == "smollm2-byte-level":
        return request.getfixturevalue("smollm2_tokenizer")
    return build_sentencepiece_tokenizer(request.param.removeprefix("sentencepiece-"))


def stream(detokenizer: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    """Every delta, the one ``finish`` returns last."""
    return [detokenizer.push(i) for i in ids] + [detokenizer.finish()]


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(max_examples=25, deadline=None)
@given(text=TEXT, specials=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2)), max_size=3))
def test_deltas_concatenate_to_full_decode(tokenizer: Tokenizer, skip_special_tokens: bool, text: str,
                                           specials: list[tuple[int, int]]) -> None:
    ids = tokenizer.encode(text)
    # Specials go between characters: one inside a byte-fallback run would make the run malformed UTF-8.
    boundaries = [j for j in range(len(ids) + 1) if not tokenizer.decode(ids[:j]).endswith(FFFD)]
    for position, which in specials:
        special = tokenizer.all_special_ids[which % len(tokenizer.all_special_ids)]
        slot = boundaries[position % len(boundaries)]
        ids.insert(slot, special)
        boundaries = [b if b < slot else b + 1 for b in boundaries]
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = stream(detokenizer, ids)
    assert "".join(deltas) == expected
    assert detokenizer.text == expected
    assert detokenizer.token_ids == tuple(ids)
    assert not detokenizer.stopped
    # Nothing is held back at the end unless the text really ends in an undecodable byte sequence.
    assert (deltas[-1] == "") == (not expected.endswith(FFFD))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_byte_level_ids_stream_exactly(byte_level: Tokenizer, skip_special_tokens: bool,
                                              data: st.DataObject) -> None:
    """Arbitrary ids, specials included: split and invalid UTF-8 sequences of every kind."""
    token = st.one_of(st.integers(0, byte_level.vocab_size - 1), st.sampled_from(byte_level.all_special_ids))
    ids = data.draw(st.lists(token, max_size=30))
    expected = byte_level.decode(ids, skip_special_tokens=skip_special_tokens)
    deltas = stream(IncrementalDetokenizer(byte_level, skip_special_tokens=skip_special_tokens), ids)
    assert "".join(deltas) == expected
    assert (deltas[-1] == "") == (not expected.endswith(FFFD))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_byte_fallback_runs_stream_exactly(sentencepiece: Tokenizer, data: st.DataObject) -> None:
    """Characters spelled as byte tokens, interleaved with arbitrary ordinary tokens."""
    byte_ids = [sentencepiece.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    ordinary = [i for i in range(sentencepiece.vocab_size)
                if i not in byte_ids and i not in sentencepiece.all_special_ids]
    characters = st.characters(blacklist_categories=("Cs",), blacklist_characters=FFFD)
    items = data.draw(st.lists(st.one_of(characters, st.sampled_from(ordinary)),
                               max_size=20))
    ids: list[int] = []
    for item in items:
        ids.extend([byte_ids[b] for b in item.encode("utf-8")] if isinstance(item, str) else [item])
    expected = sentencepiece.decode(ids)
    deltas = stream(IncrementalDetokenizer(sentencepiece), ids)
    assert "".join(deltas) == expected
    assert FFFD not in "".join(deltas)
    assert deltas[-1] == ""


def test_split_characters_are_held_not_replaced(tokenizer: Tokenizer) -> None:
    text = "猫🐈‍⬛ é\u0301 𝄞"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) / 2  # multi-byte characters really are split over several tokens
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert all(FFFD not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


# ---------------------------------------------------------------------- prompt context


@settings(max_examples=25, deadline=None)
@given(prompt=TEXT, completion=TEXT)
def test_prompt_context_gives_continuation_text(tokenizer: Tokenizer, prompt: str, completion: str) -> None:
    prompt_ids = tokenizer.encode(prompt)
    generated = tokenizer.encode(" " + completion, add_special_tokens=False)
    prompt_text = tokenizer.decode(prompt_ids)
    full_text = tokenizer.decode(prompt_ids + generated)
    assume(full_text.startswith(prompt_text))
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt_ids), generated)
    assert "".join(deltas) == full_text[len(prompt_text):]
    assert "".join(stream(IncrementalDetokenizer(tokenizer), generated)) == tokenizer.decode(generated)


def test_sentencepiece_continuation_keeps_leading_space(sentencepiece: Tokenizer) -> None:
    prompt = sentencepiece.encode("The quick brown")
    generated = sentencepiece.encode(" fox jumps", add_special_tokens=False)
    assert sentencepiece.id_to_token(generated[0]).startswith("▁")
    with_prompt = "".join(stream(IncrementalDetokenizer(sentencepiece, prompt_token_ids=prompt), generated))
    alone = "".join(stream(IncrementalDetokenizer(sentencepiece), generated))
    assert with_prompt == sentencepiece.decode(prompt + generated)[len(sentencepiece.decode(prompt)):]
    assert with_prompt == " fox jumps"
    assert alone == sentencepiece.decode(generated) == "fox jumps"


def test_each_push_decodes_a_small_window(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tokenizer.encode(" ".join(CORPUS * 8), add_special_tokens=False)
    assert len(ids) > 150
    window_sizes: list[int] = []
    real_decode = tokenizer.decode

    def spy(token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        window_sizes.append(len(token_ids))
        return real_decode(token_ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tokenizer, "decode", spy)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=ids[:50])
    deltas = stream(detokenizer, ids[50:])
    monkeypatch.undo()
    assert "".join(deltas) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:50])):]
    assert max(window_sizes) <= 12  # anchor + previous chunk + a held-back multi-byte character
    assert sum(window_sizes) <= 8 * len(ids)


# ---------------------------------------------------------------------- stop strings

STOPS = ["\n\nUser:", "###END###", "</answer>", "停止吧", "🛑end", "END"]


def first_stop_cut(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Brute force, reading ``text`` one character at a time: where the first stop string to complete starts
    (the longest of those completing together), and which one it is."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return end - len(stop), stop
    return None


def token_span(tokenizer: Tokenizer, ids: Sequence[int], start: int, end: int) -> int:
    """How many tokens the characters ``[start, end)`` of ``decode(ids)`` come from (ASCII text)."""
    lengths = [len(tokenizer.decode(ids[:j])) for j in range(len(ids) + 1)]
    first = next(j for j in range(1, len(lengths)) if lengths[j] > start)
    last = next(j for j in range(1, len(lengths)) if lengths[j] >= end)
    return last - first + 1


def test_nested_stop_that_completes_first_wins() -> None:
    stops = ["<b>END</b>", "END"]
    for pieces in (["x<b>EN", "D</b> y"], ["x<b>END</b> y"], list("x<b>END</b> y")):
        matcher = StopStringMatcher(stops)
        released = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
        # Generation stops when "END" completes; "<b>END</b>" cannot complete before it.
        assert (released, matcher.matched) == ("x<b>", "END")


@pytest.mark.parametrize("stop", ["###END###", "\n\nUser:", "</answer>"])
def test_stop_string_split_over_tokens_never_leaks(tokenizer: Tokenizer, stop: str) -> None:
    text = f"The answer is 42, final{stop} and then more text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    start = full.index(stop)
    assert token_span(tokenizer, ids, start, start + len(stop)) >= 2
    detokenizer = IncrementalDetokenizer(tokenizer, stop=[stop, "unrelated"])
    deltas = [detokenizer.push(i) for i in ids]
    assert detokenizer.stopped and detokenizer.matched_stop == stop
    assert "".join(deltas) == detokenizer.text == full[:start]
    assert detokenizer.push(ids[0]) == "" and detokenizer.finish() == ""
    assert detokenizer.text == full[:start]


@pytest.mark.parametrize("stop", ["###END###", "\n\nUser:", "</answer>"])
def test_stop_string_near_miss_is_released_in_full(tokenizer: Tokenizer, stop: str) -> None:
    text = f"The answer is 42, final{stop[:-1]}~ and then more text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, stop=[stop])
    deltas = stream(detokenizer, ids)
    assert not detokenizer.stopped
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1] == ""  # the held prefix was released as soon as it diverged


@settings(max_examples=30, deadline=None)
@given(prefix=TEXT, stop=st.sampled_from(STOPS), suffix=TEXT, chop=st.booleans())
def test_stop_strings_cut_at_the_earliest_match(tokenizer: Tokenizer, prefix: str, stop: str, suffix: str,
                                                chop: bool) -> None:
    body = prefix + (stop[:-1] if chop else stop) + suffix
    ids = tokenizer.encode(body, add_special_tokens=False)
    full = tokenizer.decode(ids)
    cut = first_stop_cut(full, STOPS)
    detokenizer = IncrementalDetokenizer(tokenizer, stop=STOPS)
    deltas = stream(detokenizer, ids)
    assert detokenizer.stopped == (cut is not None)
    assert "".join(deltas) == (full if cut is None else full[:cut[0]])
    assert detokenizer.matched_stop == (None if cut is None else cut[1])
    assert not any(s in delta for s in STOPS for delta in deltas)


def test_stop_on_special_token_text_when_specials_are_kept(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("Hi there<|im_end|>\n<|im_start|>user\nmore", add_special_tokens=False)
    kept = IncrementalDetokenizer(byte_level, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(stream(kept, ids)) == "Hi there" and kept.stopped
    skipped = IncrementalDetokenizer(byte_level, skip_special_tokens=True, stop=["<|im_end|>"])
    assert "".join(stream(skipped, ids)) == byte_level.decode(ids) and not skipped.stopped


def test_stop_at_start_releases_nothing(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("###END### trailing", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["###END###"])
    assert stream(detokenizer, ids) == [""] * (len(ids) + 1)
    assert detokenizer.stopped and detokenizer.text == ""


# ---------------------------------------------------------------------- StopStringMatcher against brute force


def longest_held_suffix(consumed: str, stops: Sequence[str]) -> int:
    return max((n for n in range(1, len(consumed) + 1) for s in stops
                if n < len(s) and s.startswith(consumed[len(consumed) - n:])), default=0)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab#é🙂", max_size=30),
       stops=st.lists(st.text(alphabet="ab#é🙂", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_matcher_releases_everything_before_the_earliest_stop(text: str, stops: list[str],
                                                              cuts: list[int]) -> None:
    bounds = [0, *sorted({min(c, len(text)) for c in cuts}), len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopStringMatcher(stops)
    released = ""
    for index, chunk in enumerate(chunks):
        released += matcher.feed(chunk)
        consumed = "".join(chunks[: index + 1])
        if not matcher.stopped:
            assert released + matcher.held == consumed
            assert len(matcher.held) == longest_held_suffix(consumed, stops)
    released += matcher.flush()
    cut = first_stop_cut(text, stops)
    assert released == (text if cut is None else text[:cut[0]])
    assert matcher.matched == (None if cut is None else cut[1])


# ---------------------------------------------------------------------- errors


def test_invalid_arguments(sentencepiece: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        IncrementalDetokenizer(sentencepiece, stop=["ok", ""])
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(sentencepiece, stop="###")
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]"):
        IncrementalDetokenizer(sentencepiece, prompt_token_ids=[1, -4])
    detokenizer = IncrementalDetokenizer(sentencepiece)
    for bad in (-1, sentencepiece.vocab_size, 3.0, True):
        with pytest.raises(ValueError, match="token_id"):
            detokenizer.push(bad)  # type: ignore[arg-type]
    detokenizer.push(sentencepiece.encode("hi", add_special_tokens=False)[0])
    assert detokenizer.finish() == ""
    assert detokenizer.finish() == ""
    with pytest.raises(RuntimeError, match="finish"):
        detokenizer.push(0)
