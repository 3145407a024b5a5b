"""Request validation: every refusal names the field to fix, in OpenAI's error format."""

from __future__ import annotations

import json

import pytest

from serve.server import protocol as p


def _parse(cls, body: dict | str):
    return p.parse_request(cls, body if isinstance(body, str) else json.dumps(body))


def _error(cls, body) -> p.APIError:
    with pytest.raises(p.APIError) as info:
        request = _parse(cls, body)
        if cls is p.CompletionRequest:
            p.completion_prompt(request)
        else:
            p.chat_messages(request)
        p.stop_strings(request)
    return info.value


@pytest.mark.parametrize(("body", "param", "words"), [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ({"prompt": "hi"}, "model", "missing required field 'model'"),
    ({"model": "m"}, "prompt", "missing required field 'prompt'"),
    ({"model": "m", "prompt": "hi", "max_tokens": "10"}, "max_tokens", "valid integer"),
    ({"model": "m", "prompt": "hi", "temperature": 2.5}, "temperature", "[0, 2]"),
    ({"model": "m", "prompt": "hi", "top_p": 0}, "top_p", "(0, 1]"),
    ({"model": "m", "prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    ({"model": "m", "prompt": "hi", "presence_penalty": -3}, "presence_penalty", "[-2, 2]"),
    ({"model": "m", "prompt": "hi", "n": 2}, "n", "n=1"),
    ({"model": "m", "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "m", "prompt": "hi", "logprobs": 3}, "logprobs", "not supported"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"model": "m", "prompt": 7}, "prompt", "string or a non-empty list of token ids"),
    ({"model": "m", "prompt": "hi", "stop": ["a", ""]}, "stop", "non-empty"),
    ({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
])  # fmt: skip
def test_completion_refusals_name_the_field(body, param, words):
    error = _error(p.CompletionRequest, body)
    assert error.status == 400 and error.param == param and words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("messages", "param"), [
    ([], "messages"),
    ([{"role": "robot", "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages.0.content"),
])  # fmt: skip
def test_chat_refusals_name_the_message(messages, param):
    assert _error(p.ChatCompletionRequest, {"model": "m", "messages": messages}).param == param


def test_accepted_shapes():
    request = _parse(p.CompletionRequest, {"model": "m", "prompt": [[5, 6, 7]], "stop": "x", "temperature": 1,
                                           "best_of": 1, "n": 1, "logprobs": None,
                                           "frequency_penalty": 0.5, "presence_penalty": -0.5})
    assert p.completion_prompt(request) == [5, 6, 7] and p.stop_strings(request) == ["x"]
    assert (request.frequency_penalty, request.presence_penalty) == (0.5, -0.5)
    chat = _parse(p.ChatCompletionRequest, {"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]})  # fmt: skip
    messages = p.chat_messages(chat)
    assert messages[0]["role"] == "system" and messages[1]["content"] == "Hi there"
    assert p.predictor_text(messages) == "Hi there" and p.requested_max_tokens(chat) == 9


def test_error_types_follow_openai():
    assert p.APIError(401, "x").body()["error"]["type"] == "authentication_error"
    assert p.APIError(429, "x").type == "rate_limit_error" and p.APIError(503, "x").type == "server_error"
