"""Tool calling through structured outputs: a named function's arguments, or "required" calls among the tools,
held to their JSON schemas (tiny_llama's random answers, masked), whole and streamed, and a conversation that
carries calls and their results; "auto" and malformed tools are 400s naming the field."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import client, wait_idle
from tests.server.fakes import serve_config, start_server

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                           "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
CLOSE_THE_LIST = {"93": 8.0}  # "]" (the char tokenizer's id 93): the random model's lists of calls otherwise run on


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """paged, answers up to 96 tokens: a list of calls in JSON runs longer than the shared server's 32."""
    srv = start_server(serve_config(tmp_path_factory.mktemp("s3-tools"), policy="paged", max_new_tokens=96))
    yield srv
    srv.stop()


def _ask(server, **kwargs):
    args = {"model": "tiny", "messages": CHAT, "max_tokens": 96, "temperature": 1.0, "seed": 2,
            "tools": [WEATHER, CLOCK]} | kwargs
    return client(server).chat.completions.create(**args)


def test_a_named_function_is_called_with_arguments_of_its_schema(server):
    choice = _ask(server, tool_choice={"type": "function", "function": {"name": "weather"}}).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # OpenAI's, for a named function
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    wait_idle(server)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_name_the_tools_with_their_arguments(server, parallel):
    for seed in range(3):
        choice = _ask(server, tool_choice="required", seed=seed, parallel_tool_calls=parallel,
                      logit_bias=CLOSE_THE_LIST).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            arguments = json.loads(call.function.arguments)
            assert (call.function.name, set(arguments)) in (("weather", {"city"}), ("clock", {"utc"}))
    wait_idle(server)


def test_streamed_calls_equal_the_whole_ones(server):
    args = dict(tool_choice="required", n=2, seed=5, logit_bias=CLOSE_THE_LIST)
    whole = _ask(server, **args)
    calls, reasons = {}, {}
    for chunk in _ask(server, **args, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                calls.setdefault(choice.index, []).append((call.function.name, call.function.arguments))
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "tool_calls", 1: "tool_calls"}
    for choice in whole.choices:
        assert calls[choice.index] == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    wait_idle(server)


def test_a_conversation_carries_calls_and_their_results(server):
    history = CHAT + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    answer = _ask(server, messages=history, tool_choice="none", max_tokens=4).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    wait_idle(server)


@pytest.mark.parametrize(("fields", "param"), [
    ({}, "tool_choice"),  # "auto", the default with tools
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": "weather"}}, "tool_choice"),  # once a 500
    ({"tool_choice": {"type": "function", "function": {"name": ["weather"]}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools.0"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_tool_requests_the_server_cannot_answer_are_400s(server, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        _ask(server, **fields)
    assert info.value.body["param"] == param, info.value.body


def test_required_calls_take_schemas_with_shared_definitions(server):
    """pydantic writes enums and nested models as `$defs` referenced by `#/$defs/...`: nested under the list of
    calls, the references pointed at a root that had none (a 400 'Cannot find field $defs')."""
    unit = {"type": "function", "function": {"name": "temperature", "parameters": {
        "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"],
        "additionalProperties": False, "$defs": {"Unit": {"enum": ["C", "F"]}}}}}
    choice = _ask(server, tools=[unit, CLOCK], tool_choice="required", parallel_tool_calls=False,
                  logit_bias=CLOSE_THE_LIST).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name in ("temperature", "clock")
    if call.function.name == "temperature":
        assert json.loads(call.function.arguments)["unit"] in ("C", "F")
    clash = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, "$defs": {"Unit": {"enum": ["K"]}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        _ask(server, tools=[unit, clash], tool_choice="required")
    assert info.value.body["param"] == "tools" and "Unit" in info.value.body["message"]
    wait_idle(server)


def test_an_empty_tool_list_is_no_tools(server):
    """vLLM reads `"tools": []` as no tools; it was a 400 here, breaking clients written for vLLM."""
    answer = _ask(server, tools=[])
    assert answer.choices[0].message.tool_calls is None
