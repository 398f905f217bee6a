"""Request parsing against the OpenAI API reference: field names, defaults, null handling and error params."""

from __future__ import annotations

from typing import Any

import pytest

from asyncllm.adapters.errors import APIError, from_value_error
from asyncllm.adapters.openai_schema import (
    RequestLimits,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_messages,
    parse_prompt,
    parse_tokenize_request,
)

LIMITS = RequestLimits(vocab_size=100, max_n=4)
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> Any:
    return parse_chat_request({"messages": USER, **fields}, LIMITS)


def rejected(call: Any, *args: Any) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    assert info.value.status == 400
    return info.value


def test_defaults_follow_openai() -> None:
    req = chat()
    assert req.chat and req.n == 1 and not req.stream and not req.include_usage and req.model is None
    assert req.params.temperature == 1.0 and req.params.top_p == 1.0
    assert req.params.max_tokens is None and req.params.logprobs is None and req.session_id is None


def test_null_means_not_given_and_unknown_fields_are_ignored() -> None:
    req = chat(temperature=None, stop=None, seed=None, n=None, stream=None, logit_bias=None,
               response_format={"type": "text"}, tools=None, parallel_tool_calls=True)
    assert req == chat()


def test_sampling_fields_and_extras_reach_sampling_params() -> None:
    req = chat(max_tokens=7, temperature=0.5, top_p=0.9, stop="END", seed=3, presence_penalty=0.5,
               frequency_penalty=-0.5, logit_bias={"5": 10, "7": -100}, top_k=20, min_p=0.1,
               repetition_penalty=1.2, min_tokens=2, ignore_eos=True, stop_token_ids=[1, 2], user="u1",
               stream=True, stream_options={"include_usage": True}, model="m")
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (7, 0.5, 0.9, 3)
    assert (p.top_k, p.min_p, p.min_tokens) == (20, 0.1, 2)
    assert p.stop == ("END",) and p.stop_token_ids == (1, 2) and p.ignore_eos
    assert p.logit_bias == {5: 10.0, 7: -100.0}
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert req.stream and req.include_usage and req.model == "m"


def test_max_completion_tokens_wins_and_errors_name_the_field_sent() -> None:
    assert chat(max_tokens=9, max_completion_tokens=4).params.max_tokens == 4
    err = rejected(lambda: chat(max_completion_tokens=0))
    assert err.param == "max_completion_tokens" and err.message.startswith("max_completion_tokens:")
    assert rejected(lambda: chat(max_tokens=0)).param == "max_tokens"


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),
    ({"n": True}, "n"),
    ({"stop": [""]}, "stop[0]"),
    ({"stop": ["ok", 5]}, "stop[1]"),
    ({"stop": 5}, "stop"),
    ({"stop": "\ud800"}, "stop"),
    ({"stop": ["ok", "a\udfff"]}, "stop[1]"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # "²".isdigit() but int("²") fails
    ({"logit_bias": {"\u0661": 1}}, "logit_bias"),  # ARABIC-INDIC DIGIT ONE
    ({"logit_bias": {" 5": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"logit_bias": {"3": True}}, "logit_bias"),
    ({"logit_bias": {"3": float("nan")}}, "logit_bias"),
    ({"logit_bias": {"3": "1"}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 1e300}, "temperature"),  # above SamplingParams' bound
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"top_p": float("-inf")}, "top_p"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"n": 10**30}, "n"),
    ({"top_k": 1e300}, "top_k"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"skip_special_tokens": 0}, "skip_special_tokens"),
    ({"logprobs": 1}, "logprobs"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"model": "m\ud800"}, "model"),
    ({"user": "\udc00"}, "user"),
    ({"session_id": "s\ud800"}, "session_id"),
    ({"session_id": 7}, "session_id"),
    ({"seed": 1.5}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"100": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 101}}, "logit_bias"),
    ({"stop_token_ids": [100]}, "stop_token_ids[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": []}, "stream_options"),
    ({"model": 3}, "model"),
    ({"user": 3}, "user"),
    ({"session_id": ""}, "session_id"),
    ({"session_id": "s", "n": 2}, "n"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_invalid_chat_fields_are_400_naming_the_param(fields: dict[str, Any], param: str) -> None:
    assert rejected(lambda: chat(**fields)).param == param


def test_chat_logprobs_map_to_top_alternatives() -> None:
    assert chat(logprobs=True).params.logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).params.logprobs == 5
    assert chat(logprobs=False).params.logprobs is None


def test_surrogates_in_message_text_and_prompts_are_400_naming_the_field() -> None:
    content = [{"type": "text", "text": "fine"}, {"type": "text", "text": "x\ud83d"}]
    err = rejected(parse_messages, [{"role": "user", "content": content}])
    assert err.param == "messages[0].content[1].text" and err.code == "invalid_string"
    assert "U+D83D" in err.message
    err.message.encode("utf-8")
    assert rejected(parse_messages, [{"role": "user", "content": "\udfff"}]).param == "messages[0].content"
    assert rejected(parse_prompt, "\ud800", 100).param == "prompt"
    assert rejected(parse_prompt, ["ok\ud800"], 100).param == "prompt"
    assert rejected(lambda: parse_tokenize_request({"prompt": "\ud800"})).param == "prompt"
    assert rejected(lambda: parse_tokenize_request({"messages": [{"role": "user", "content": "\ud800"}]})
                    ).param == "messages[0].content"
    assert rejected(lambda: parse_detokenize_request({"tokens": [1], "model": "\ud800"}, 100)).param == "model"
    # a correctly paired surrogate escape is an ordinary character
    assert parse_messages([{"role": "user", "content": "\U0001F600"}])[0]["content"] == "\U0001F600"


def test_extreme_but_valid_numbers_are_accepted() -> None:
    p = chat(temperature=1e4, repetition_penalty=100, top_p=5e-324, min_p=5e-324,
             presence_penalty=-0.0, max_tokens=10**30, seed=2**64 - 1).params
    assert p.temperature == 1e4 and p.max_tokens == 10**30 and p.seed == 2**64 - 1
    assert chat(temperature=0).params.is_greedy
    # below SamplingParams' greedy epsilon a temperature samples greedily instead of underflowing
    assert chat(temperature=5e-324).params.is_greedy and chat(temperature=1e-46).params.is_greedy
    for field, value in (("temperature", 1e300), ("repetition_penalty", 5e-324)):
        err = rejected(lambda field=field, value=value: chat(**{field: value}))
        assert err.status == 400 and err.param == field


def test_unhashable_roles_are_400_not_500() -> None:
    for role in ([], {}, 1, None, True):
        assert rejected(parse_messages, [{"role": role, "content": "x"}]).param == "messages[0].role"


def test_error_messages_echoing_unencodable_input_stay_encodable() -> None:
    err = APIError(400, "model: got 'x\ud800'", param="a\udfffb")
    assert err.message == "model: got 'x\\ud800'" and err.param == "a\\udfffb"
    body = err.body()
    body["error"]["message"].encode("utf-8")
    assert len(APIError(400, "x" * 10**6).message) <= 2000


def test_messages_accept_text_parts_and_map_developer_to_system() -> None:
    messages = parse_messages([
        {"role": "developer", "content": "be brief", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ])
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize(("messages", "param"), [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA=="}]}],
     "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==",
                                                                       "detail": "ultra"}}]}],
     "messages[0].content[0].image_url.detail"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([USER[0], "oops"], "messages[1]"),
])
def test_bad_messages(messages: Any, param: str) -> None:
    assert rejected(lambda: parse_chat_request({"messages": messages}, LIMITS)).param == param


def test_completion_prompt_forms() -> None:
    assert parse_prompt("abc", 100) == "abc"
    assert parse_prompt(["abc"], 100) == "abc"
    assert parse_prompt([1, 2, 3], 100) == [1, 2, 3]
    assert parse_prompt([[4, 5]], 100) == [4, 5]
    for bad, param in [("", "prompt"), ([], "prompt"), (["a", "b"], "prompt"), ([[1], [2]], "prompt"),
                       ([1, 100], "prompt[1]"), ([1, True], "prompt[1]"), (3, "prompt"), ([[]], "prompt")]:
        assert rejected(parse_prompt, bad, 100).param == param


def test_completion_request_logprobs_is_a_count() -> None:
    req = parse_completion_request({"prompt": "x", "logprobs": 2, "n": 3, "seed": 10}, LIMITS)
    assert not req.chat and req.params.logprobs == 2 and req.n == 3
    assert [p.seed for p in req.choice_params()] == [10, 11, 12]
    assert rejected(parse_completion_request, {"logprobs": 1}, LIMITS).param == "prompt"
    assert rejected(parse_completion_request, {"prompt": "x", "logprobs": 21}, LIMITS).param == "logprobs"


def test_unseeded_choices_share_params() -> None:
    req = parse_completion_request({"prompt": "x", "n": 2}, LIMITS)
    assert [p.seed for p in req.choice_params()] == [None, None]


def test_tokenize_and_detokenize_bodies() -> None:
    req = parse_tokenize_request({"prompt": "hello", "add_special_tokens": False})
    assert req.prompt == "hello" and req.messages is None and not req.add_special_tokens
    req = parse_tokenize_request({"messages": USER})
    assert req.messages == USER and req.add_generation_prompt
    assert rejected(parse_tokenize_request, {}).param == "prompt"
    assert rejected(parse_tokenize_request, {"prompt": "a", "messages": USER}).param == "prompt"
    assert parse_detokenize_request({"tokens": [1, 2]}, 100) == ([1, 2], None, False)
    assert rejected(parse_detokenize_request, {"tokens": [-1]}, 100).param == "tokens[0]"
    assert rejected(parse_detokenize_request, {}, 100).param == "tokens"


def test_engine_value_errors_map_to_params() -> None:
    err = from_value_error(ValueError("prompt[3]: token ids must be ints"), {"prompt": "messages"})
    assert err.param == "messages[3]" and err.message.startswith("messages[3]:")
    err = from_value_error(ValueError("prompt: 5000 tokens leave no room within max_model_len=4096"))
    assert err.param == "prompt" and err.code == "context_length_exceeded"
    assert from_value_error(ValueError("no field here")).param is None
