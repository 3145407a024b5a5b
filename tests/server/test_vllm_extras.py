"""vLLM's request extensions (the OpenAI SDK's ``extra_body``): the ones the server implements change the answer as
vLLM's do; the ones it does not are a 400 naming the field unless left at their default; unknown fields are logged."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, client
from tests.server.fakes import EOS_ID, CharTokenizer

PROMPT = "Once upon a time"


def _complete(server, **kwargs):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0} | kwargs
    return client(server).completions.create(**body)


def _stream_text(server, **extra) -> str:
    chunks = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                               stream=True, **extra)
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def test_include_stop_str_in_output_keeps_the_stop_string(server):
    answer = _complete(server, extra_body={"ignore_eos": True}).choices[0].text
    stop = answer[4:6]
    cut = answer.find(stop)
    kept = _complete(server, stop=[stop], extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == answer[: cut + len(stop)] and kept.choices[0].finish_reason == "stop"
    assert _complete(server, stop=[stop], extra_body={"ignore_eos": True}).choices[0].text == answer[:cut]
    streamed = _stream_text(server, stop=[stop], extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert streamed == answer[: cut + len(stop)]


def test_skip_special_tokens_false_shows_special_tokens_but_not_the_ending_one(server):
    eos = CharTokenizer().decode([EOS_ID])
    args = {"ignore_eos": True, "allowed_token_ids": [EOS_ID, 66]}
    shown = _complete(server, max_tokens=24, extra_body=args | {"skip_special_tokens": False}).choices[0].text
    hidden = _complete(server, max_tokens=24, extra_body=args).choices[0].text
    assert set(hidden) <= {"B"} and eos in shown and shown.replace(eos, "") == hidden
    # An answer that end-of-sequence ends does not show it, unless the stop is to be included (as vLLM).
    ended = _complete(server, extra_body={"allowed_token_ids": [EOS_ID], "skip_special_tokens": False})
    assert ended.choices[0].text == "" and ended.choices[0].finish_reason == "stop"
    included = _complete(server, extra_body={"allowed_token_ids": [EOS_ID], "skip_special_tokens": False,
                                             "include_stop_str_in_output": True})
    assert included.choices[0].text == eos


def test_allowed_token_ids_hold_the_answer_to_them(server):
    answer = _complete(server, temperature=1.0, seed=3, extra_body={"allowed_token_ids": [66, 67], "ignore_eos": True})
    assert set(answer.choices[0].text) <= {"B", "C"} and answer.usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, extra_body={"allowed_token_ids": [10**6]})
    assert info.value.body["param"] == "allowed_token_ids"
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, extra_body={"allowed_token_ids": [66], "guided_choice": ["B"]})
    assert info.value.body["param"] == "allowed_token_ids"


def test_repetition_penalty_changes_a_repetitive_answer(server):
    plain = _complete(server, extra_body={"ignore_eos": True}).choices[0].text
    penalised = _complete(server, extra_body={"ignore_eos": True, "repetition_penalty": 2.0}).choices[0].text
    assert len(set(penalised)) >= len(set(plain)) and penalised != plain
    for bad in (0, -1.0):
        with pytest.raises(openai.BadRequestError) as info:
            _complete(server, extra_body={"repetition_penalty": bad})
        assert info.value.body["param"] == "repetition_penalty"


def test_bad_words_never_appear_and_the_answer_is_the_same_before_them(server):
    plain = _complete(server, extra_body={"ignore_eos": True}).choices[0].text
    word = plain[3:5]
    banned = _complete(server, extra_body={"ignore_eos": True, "bad_words": [word]}).choices[0].text
    assert word not in banned
    end = plain.find(word) + len(word) - 1  # where the word would be completed
    assert banned[:end] == plain[:end] and banned[end] != plain[end]
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, extra_body={"bad_words": ["ok", " "]})
    assert info.value.body["param"] == "bad_words"


def test_return_tokens_as_token_ids_names_each_token_by_its_id(server):
    answer = _complete(server, logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    logprobs = answer.choices[0].logprobs
    ids = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    assert CharTokenizer().decode(ids, skip_special_tokens=True) == answer.choices[0].text
    assert all(key.startswith("token_id:") for top in logprobs.top_logprobs for key in top)
    chat = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert content and all(e.token.startswith("token_id:") for e in content)
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)


def test_chat_template_kwargs_reach_the_template_and_the_servers_own_are_refused(server):
    api = client(server)
    messages = [{"role": "user", "content": "Hi"}]
    plain = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    more = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"preamble": "ABC"}})
    assert more.usage.prompt_tokens == plain.usage.prompt_tokens + 3
    counted = httpx.post(f"{server.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"model": "tiny", "messages": messages, "chat_template_kwargs": {"preamble": "ABC"}})
    assert counted.json()["count"] == more.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                    extra_body={"chat_template_kwargs": {"tokenize": False}})
    assert info.value.body["param"] == "chat_template_kwargs" and "tokenize" in info.value.body["message"]


def test_truncate_prompt_tokens_keeps_the_prompts_end(server):
    kept = _complete(server, max_tokens=4, extra_body={"truncate_prompt_tokens": 4})
    assert kept.usage.prompt_tokens == 4
    assert kept.choices[0].text == _complete(server, prompt=PROMPT[-4:], max_tokens=4).choices[0].text
    whole = _complete(server, max_tokens=4, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(PROMPT)
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, extra_body={"truncate_prompt_tokens": 0})
    assert info.value.body["param"] == "truncate_prompt_tokens"


def test_chat_template_options(server):
    api = client(server)
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    without = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                          extra_body={"add_generation_prompt": False})
    assert with_prompt.usage.prompt_tokens == without.usage.prompt_tokens + len("<assistant>")
    started = messages + [{"role": "assistant", "content": "Hello"}]
    answer = api.chat.completions.create(model="tiny", messages=started, max_tokens=2, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    assert answer.choices[0].finish_reason in ("stop", "length")
    for extra, param in (({"continue_final_message": True}, "continue_final_message"),
                         ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
                         ({"echo": True}, "echo")):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body=extra)
        assert info.value.body["param"] == param


@pytest.mark.parametrize("field, value", [("use_beam_search", True), ("length_penalty", 0.5),
                                          ("logits_processors", ["a.b"]), ("chat_template", "{{ x }}"),
                                          ("guided_decoding_backend", "outlines"), ("documents", [{"x": 1}])])
def test_vllm_fields_it_does_not_implement_are_refused_unless_at_their_default(server, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, max_tokens=2, extra_body={field: value})
    assert info.value.body["param"] == field and "not supported" in info.value.body["message"]
    defaults = {"use_beam_search": False, "length_penalty": 1.0, "logits_processors": [],
                "guided_decoding_backend": "auto"}
    if field in defaults:
        _complete(server, max_tokens=2, extra_body={field: defaults[field]})


def test_unknown_fields_are_ignored_and_logged(server, caplog):
    with caplog.at_level(logging.WARNING, logger="serve.server.protocol"):
        answer = _complete(server, max_tokens=2, extra_body={"store": True, "no_such_option": 1})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert "no_such_option, store" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve.server.protocol"):
        _complete(server, max_tokens=2, extra_body={"store": True, "no_such_option": 2})
    assert "no_such_option" not in caplog.text  # warned once per set of fields


def test_prompt_logprobs_are_the_echoed_prompts(server):
    prompt = "abcab"
    answer = _complete(server, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 2})
    echoed = _complete(server, prompt=prompt, max_tokens=2, echo=True, logprobs=2)
    scores = answer.choices[0].model_extra["prompt_logprobs"]
    ids = CharTokenizer().encode(prompt)
    assert len(scores) == len(prompt) and scores[0] is None
    for token, entry, expected in zip(ids[1:], scores[1:], echoed.choices[0].logprobs.token_logprobs[1:len(prompt)]):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(expected) and mine["decoded_token"] == CharTokenizer().decode([token])
        assert 1 <= mine["rank"] and len(entry) <= 3
        ranked = sorted(entry.values(), key=lambda e: -e["logprob"])
        assert ranked[0]["rank"] == 1 and (mine["rank"] <= 2) == (mine in ranked[:2])
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=2, n=2, extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) == \
        chat.usage.prompt_tokens
    assert all("prompt_logprobs" not in (choice.model_extra or {}) for choice in chat.choices)
    for extra in ({"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        with pytest.raises(openai.BadRequestError) as info:
            _complete(server, extra_body=extra)
        assert info.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        _stream_text(server, extra_body={"prompt_logprobs": 1})
    assert info.value.body["param"] == "prompt_logprobs"


def test_an_echoed_prompt_keeps_its_own_count_of_top_tokens_beside_prompt_logprobs(server):
    answer = _complete(server, prompt="abcab", max_tokens=2, echo=True, logprobs=1, extra_body={"prompt_logprobs": 4})
    tops = answer.choices[0].logprobs.top_logprobs
    assert tops[0] is None and all(len(top) <= 2 for top in tops[1:])  # the token itself and one more at most
    assert max(len(entry) for entry in answer.choices[0].model_extra["prompt_logprobs"][1:]) >= 4


def test_fields_of_the_other_endpoint_are_ignored_and_no_op_values_accepted(server):
    """A completion's `tools`, `tool_choice` or `max_completion_tokens` are chat fields, ignored like any unknown
    one (the first gave a 500, the last named itself in the error about max_tokens); `add_special_tokens` at the
    value that changes nothing (True for completions, False for chat, vLLM's defaults) is accepted."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    answer = _complete(server, max_tokens=2, extra_body={"tools": tools, "tool_choice": "required",
                                                          "add_special_tokens": True})
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        _complete(server, max_tokens=1000, extra_body={"max_completion_tokens": 5})
    assert info.value.body["param"] == "max_tokens"
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, extra_body={"add_special_tokens": False})
    assert chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        _complete(server, max_tokens=2, extra_body={"add_special_tokens": False})


def test_an_error_carries_a_request_id(server):
    answer = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": "tiny", "prompt": "hi", "max_tokens": 0})
    assert answer.status_code == 400 and answer.headers["x-request-id"].startswith("err-")
