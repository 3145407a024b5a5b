"""Structured outputs over HTTP: OpenAI's response_format and vLLM's guided_* fields hold the answer to its format
(tiny_llama's random answers, masked), whole and streamed; bad formats are 400s naming their field."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.server.conftest import client, wait_idle

CHAT = [{"role": "user", "content": "Answer in the format."}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"enum": ["x", "yy"]}},
          "required": ["b", "a"], "additionalProperties": False}  # not in alphabetical order


def _chat(server, **kwargs):
    args = {"model": "tiny", "messages": CHAT, "max_tokens": 30, "temperature": 1.0, "seed": 3} | kwargs
    return client(server).chat.completions.create(**args)


def test_a_json_schema_holds_the_answer(server):
    for fmt in ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}},
                {"extra_body": {"guided_json": SCHEMA}}, {"extra_body": {"guided_json": json.dumps(SCHEMA)}}):
        answer = _chat(server, **fmt).choices[0]
        value = json.loads(answer.message.content)
        assert value["a"] in ("x", "yy") and isinstance(value["b"], bool)
        assert list(value) == ["b", "a"]  # in the schema's order, as OpenAI and vLLM write them
        assert answer.finish_reason == "stop"
    wait_idle(server)


def test_regex_choice_and_grammar(server):
    c = client(server)
    for seed in range(3):
        text = c.completions.create(model="tiny", prompt="Code:", max_tokens=10, temperature=1.0, seed=seed,
                                    extra_body={"guided_regex": "[0-9]{3}-[a-c]"}).choices[0].text
        assert re.fullmatch("[0-9]{3}-[a-c]", text), text
        choice = _chat(server, seed=seed, extra_body={"guided_choice": ["red", "green", "blue"]})
        assert choice.choices[0].message.content in ("red", "green", "blue")
    grammar = 'root ::= "(" digits ")"\ndigits ::= [0-9] | [0-9] digits'
    text = c.completions.create(model="tiny", prompt="Digits:", max_tokens=12, temperature=0,
                                extra_body={"guided_grammar": grammar}).choices[0].text
    assert re.fullmatch(r"\([0-9]+\)?", text), text  # the closing bracket unless max_tokens ran out first
    wait_idle(server)


def test_streamed_structured_answers_equal_the_whole_ones(server):
    args = dict(model="tiny", messages=CHAT, max_tokens=30, temperature=1.0, seed=9, n=2,
                extra_body={"guided_json": SCHEMA})
    whole = client(server).chat.completions.create(**args)
    texts = {}
    for chunk in client(server).chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[i] for i in range(2)] == [ch.message.content for ch in whole.choices]
    assert all(json.loads(t)["a"] in ("x", "yy") for t in texts.values())
    wait_idle(server)


@pytest.mark.parametrize(("fields", "param"), [
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_bad_formats_are_400s_naming_their_field(server, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, extra_body=fields)
    assert info.value.body["param"] == param, info.value.body


def test_min_tokens_with_a_format_is_refused(server):
    """A format may allow nothing but its end before min_tokens: refused, so no step is left without a token."""
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                               extra_body={"guided_choice": ["a"], "min_tokens": 4})
    assert info.value.body["param"] == "min_tokens"


def test_json_mode_answers_an_object(server):
    """OpenAI's JSON mode promises an object; xgrammar's built-in JSON grammar let an array through (seed 1 wrote
    `[-0,607,...`)."""
    for seed in range(6):
        text = _chat(server, seed=seed, response_format={"type": "json_object"}).choices[0].message.content
        assert text.startswith("{"), text
    wait_idle(server)
