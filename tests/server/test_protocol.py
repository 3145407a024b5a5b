"""Request validation: every refusal names the field to fix, in OpenAI's error format."""

from __future__ import annotations

import json

import pytest

from core.request import TokenLogprobs
from serve.engine.plan import StructuredOutput
from serve.server import bodies, formats
from serve.server import protocol as p
from serve.server.answers import LOWEST_LOGPROB, chat_logprobs, completion_logprobs
from serve.server.chat import chat_messages, predictor_text


def _parse(cls, body: dict | str):
    return p.parse_request(cls, body if isinstance(body, str) else json.dumps(body))


def _error(cls, body) -> p.APIError:
    with pytest.raises(p.APIError) as info:
        request = _parse(cls, body)
        formats.structured_output(request)  # the server checks the output format (and tools) next
        if cls is p.CompletionRequest:
            p.completion_prompts(request)
        else:
            chat_messages(request)
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
    ({"model": "m", "prompt": "hi", "n": 0}, "n", "between 1 and 128"),
    ({"model": "m", "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "m", "prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ({"model": "m", "prompt": "hi", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ({"model": "m", "prompt": "hi", "logprobs": -1}, "logprobs", "between 0 and 20"),
    ({"model": "m", "prompt": "hi", "logprobs": True}, "logprobs", "valid integer"),
    ({"model": "m", "prompt": ["a", ""]}, "prompt", "prompt[1] must be a non-empty string"),
    ({"model": "m", "prompt": []}, "prompt", "or a list of them"),
    ({"model": "m", "prompt": [[1, 2], [3, "x"]]}, "prompt", "prompt[1]"),
    ({"model": "m", "prompt": 7}, "prompt", "string or a non-empty list of token ids"),
    ({"model": "m", "prompt": "hi", "stop": ["a", ""]}, "stop", "non-empty"),
    ({"model": "m", "prompt": "hi", "stop": [str(i) for i in range(65)]}, "stop", "at most 64"),
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


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"logprobs": 3}, "logprobs", "valid boolean"),
])  # fmt: skip
def test_chat_logprobs_refusals(fields, param, words):
    error = _error(p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields)
    assert error.status == 400 and error.param == param and words in error.message


@pytest.mark.parametrize(("cls", "fields", "count"), [
    (p.CompletionRequest, {"prompt": "hi"}, None),
    (p.CompletionRequest, {"prompt": "hi", "logprobs": 0}, 0),
    (p.CompletionRequest, {"prompt": "hi", "logprobs": 5}, 5),
    (p.ChatCompletionRequest, {"messages": []}, None),
    (p.ChatCompletionRequest, {"messages": [], "logprobs": False}, None),
    (p.ChatCompletionRequest, {"messages": [], "logprobs": True}, 0),
    (p.ChatCompletionRequest, {"messages": [], "logprobs": True, "top_logprobs": 20}, 20),
])  # fmt: skip
def test_requested_logprobs(cls, fields, count):
    assert p.requested_logprobs(_parse(cls, {"model": "m"} | fields)) == count


def test_logprobs_bodies_follow_openai():
    lps = [TokenLogprobs(-0.5, ((7, -0.5), (8, -1.25))), TokenLogprobs(float("-inf"), ((7, -0.1), (9, -3.0)))]
    text = {7: "a", 8: "bc", 9: "\u00e9"}.__getitem__
    done = completion_logprobs([7, 9], lps, text, text_offset=4)
    assert done == {"tokens": ["a", "\u00e9"], "token_logprobs": [-0.5, LOWEST_LOGPROB],
                    "top_logprobs": [{"a": -0.5, "bc": -1.25}, {"a": -0.1, "\u00e9": LOWEST_LOGPROB}],
                    "text_offset": [4, 5]}
    chat = chat_logprobs([7, 9], lps, text)
    assert chat["refusal"] is None and [c["token"] for c in chat["content"]] == ["a", "\u00e9"]
    assert chat["content"][1]["bytes"] == [0xC3, 0xA9] and chat["content"][1]["logprob"] == LOWEST_LOGPROB
    assert chat["content"][0]["top_logprobs"] == [{"token": "a", "logprob": -0.5, "bytes": [97]},
                                                  {"token": "bc", "logprob": -1.25, "bytes": [98, 99]}]


def test_accepted_shapes():
    request = _parse(p.CompletionRequest, {"model": "m", "prompt": [[5, 6, 7]], "stop": "x", "temperature": 1,
                                           "best_of": 1, "n": 1, "logprobs": None,
                                           "frequency_penalty": 0.5, "presence_penalty": -0.5})
    assert p.completion_prompts(request) == [[5, 6, 7]] and p.stop_strings(request) == ["x"]
    assert (request.frequency_penalty, request.presence_penalty) == (0.5, -0.5)
    chat = _parse(p.ChatCompletionRequest, {"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]})  # fmt: skip
    messages = chat_messages(chat)
    assert messages[0]["role"] == "system" and messages[1]["content"] == "Hi there"
    assert predictor_text(messages) == "Hi there" and p.requested_max_tokens(chat) == 9


def test_error_types_follow_openai():
    assert p.APIError(401, "x").body()["error"]["type"] == "authentication_error"
    assert p.APIError(429, "x").type == "rate_limit_error" and p.APIError(503, "x").type == "server_error"


# Every optional field OpenAI marks nullable, per endpoint (the SDK sends null for a parameter passed as None).
NULLABLE = ("max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
            "frequency_penalty", "logit_bias", "logprobs", "user", "stream_options")
COMPLETION_NULLABLE = NULLABLE + ("echo", "best_of", "suffix")
CHAT_NULLABLE = NULLABLE + ("max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                            "functions", "function_call", "parallel_tool_calls")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_explicit_null_means_the_default_for_every_nullable_field():
    default = _parse(p.CompletionRequest, {"model": "m", "prompt": "hi"})
    nulls = _parse(p.CompletionRequest, {"model": "m", "prompt": "hi"} | dict.fromkeys(COMPLETION_NULLABLE))
    assert nulls == default and nulls.model_fields_set == {"model", "prompt"}  # frequency_penalty: "left out"
    chat = _parse(p.ChatCompletionRequest, CHAT | dict.fromkeys(CHAT_NULLABLE))
    assert chat == _parse(p.ChatCompletionRequest, CHAT) and (chat.temperature, chat.n) == (1.0, 1)
    # Required fields stay required.
    assert _error(p.CompletionRequest, {"model": None, "prompt": "hi"}).param == "model"
    assert _error(p.ChatCompletionRequest, {"model": "m", "messages": None}).param == "messages"


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", '"auto"'),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "needs tools"),  # [] is no tools, as vLLM reads it
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools.0", "function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}], "tool_choice": "required"},
     "tools.0.function.parameters", "JSON schema"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"functions": [{"name": "f"}]}, "functions", "deprecated"), ({"function_call": "auto"}, "function_call", "deprecated"),
])  # fmt: skip
def test_tool_requests_the_server_cannot_answer_are_refused_by_name(fields, param, says):
    error = _error(p.ChatCompletionRequest, CHAT | fields)
    assert error.status == 400 and error.param == param and says in error.message


def test_tool_calls_become_a_json_schema_and_answers_become_calls():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}}
    named = formats.tool_calls(_parse(p.ChatCompletionRequest, CHAT | {"tools": [tool], "tool_choice": {
        "type": "function", "function": {"name": "f"}}}))
    assert named.schema == tool["function"]["parameters"] and named.finish_reason == "stop"
    assert [c["function"] for c in named.calls('{"x": 1}')] == [{"name": "f", "arguments": '{"x": 1}'}]
    assert named.calls('{"x": ') is None  # cut short: no call
    required = formats.tool_calls(_parse(p.ChatCompletionRequest, CHAT | {"tools": [tool], "tool_choice": "required",
                                                                      "parallel_tool_calls": False}))
    assert required.schema["maxItems"] == 1 and required.finish_reason == "tool_calls"
    calls = required.calls('[{"name": "f", "parameters": {"x": 2}}]')
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": '{"x": 2}'}]
    assert formats.tool_calls(_parse(p.ChatCompletionRequest, CHAT | {"tools": [tool], "tool_choice": "none"})) is None
    # A conversation's calls and results reach the template as text.
    history = CHAT | {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "3"}]}
    assert chat_messages(_parse(p.ChatCompletionRequest, history)) == [
        {"role": "assistant", "content": '[{"name": "f", "arguments": {"x": 1}}]'}, {"role": "tool", "content": "3"}]


def test_stream_options_need_stream_as_in_openai():
    error = _error(p.CompletionRequest, {"model": "m", "prompt": "hi", "stream_options": {"include_usage": True}})
    assert error.param == "stream_options" and "only allowed when 'stream' is enabled" in error.message
    error = _error(p.ChatCompletionRequest, CHAT | {"stream": False, "stream_options": {"include_usage": True}})
    assert error.param == "stream_options"
    request = _parse(p.ChatCompletionRequest, CHAT | {"stream": True, "stream_options": {"include_usage": True}})
    assert p.include_usage(request)
    bad = CHAT | {"stream": True, "stream_options": {"include_usage": "yes"}}
    assert _error(p.ChatCompletionRequest, bad).param == "stream_options.include_usage"


def test_openai_defaults_and_extensions_are_accepted():
    chat = _parse(p.ChatCompletionRequest, CHAT | {"response_format": {"type": "text"}, "seed": -(2**63),
                                                   "ignore_eos": True})
    assert chat.seed == -(2**63) and chat.ignore_eos
    assert _parse(p.CompletionRequest, {"model": "m", "prompt": "hi", "seed": -1}).seed == -1
    assert _error(p.CompletionRequest, {"model": "m", "prompt": "hi", "seed": 2**63}).param == "seed"
    error = _error(p.ChatCompletionRequest, CHAT | {"response_format": {"type": "xml"}})
    assert error.param == "response_format" and "json_schema" in error.message
    json_mode = _parse(p.ChatCompletionRequest, CHAT | {"response_format": {"type": "json_object"}})
    assert formats.structured_output(json_mode) == ("response_format", StructuredOutput("json_object"))
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    found = formats.structured_output(_parse(p.CompletionRequest, {"model": "m", "prompt": "hi"} | fields))
    assert found == ("response_format", StructuredOutput("json", json.dumps(schema)))
    # vLLM's guided_json as text or as an object is one format (one compiled grammar); the properties keep their
    # order, which is the order the answer writes them in.
    as_text = _parse(p.ChatCompletionRequest, CHAT | {"guided_json": json.dumps(schema)})
    assert formats.structured_output(as_text) == ("guided_json", found[1])
    assert _error(p.ChatCompletionRequest, CHAT | {"response_format": "text"}).param == "response_format"
    assert _error(p.CompletionRequest, {"model": "m", "prompt": "hi", "ignore_eos": 1}).param == "ignore_eos"


def test_fingerprint_names_the_configuration():
    assert bodies.fingerprint("m", "s3", "ckpt") == bodies.fingerprint("m", "s3", "ckpt")
    assert bodies.fingerprint("m", "s3", "ckpt") != bodies.fingerprint("m", "s3", "other")
    assert bodies.fingerprint("m").startswith("fp_")
