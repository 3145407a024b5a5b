"""Log-probabilities over HTTP, through the official openai client: completions' ``logprobs`` and chat's
``logprobs`` / ``top_logprobs``, whole and streamed, one entry per generated token; ``echo``, with the prompt's."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from tests.engine.engine_driver import tiny_llama
from tests.server.conftest import client, wait_idle

CHAT = [{"role": "user", "content": "Name three colours."}]


def test_completion_logprobs_cover_every_token(server):
    c = client(server)
    done = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                frequency_penalty=0, logprobs=2, extra_body={"ignore_eos": True})
    lp, text = done.choices[0].logprobs, done.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens == 12
    assert "".join(lp.tokens) == text  # one character per token here
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[token] == value and len(top) <= 3
        assert value == max(top.values())  # greedy without a penalty takes the most likely token
    wait_idle(server)


def test_chat_logprobs_with_top_logprobs(server):
    c = client(server)
    chat = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                     frequency_penalty=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == values[0] and entry.bytes == list(entry.token.encode("utf-8"))
    plain = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None
    just = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in just.choices[0].logprobs.content)
    wait_idle(server)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_logprobs_equal_the_whole_answers(server, chat):
    c = client(server)
    args = dict(model="tiny", max_tokens=16, temperature=0.8, seed=11, extra_body={"ignore_eos": True})
    if chat:
        args |= dict(messages=CHAT, logprobs=True, top_logprobs=2)
        whole = c.chat.completions.create(**args).choices[0].logprobs.content
        chunks = [ch.choices[0].logprobs for ch in c.chat.completions.create(**args, stream=True) if ch.choices]
        streamed = [entry for lp in chunks if lp is not None for entry in lp.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    else:
        args |= dict(prompt="The answer is", logprobs=1)
        whole = c.completions.create(**args).choices[0].logprobs
        chunks = [ch.choices[0].logprobs for ch in c.completions.create(**args, stream=True)]
        streamed = [lp for lp in chunks if lp is not None]
        assert [t for lp in streamed for t in lp.tokens] == whole.tokens
        assert [v for lp in streamed for v in lp.token_logprobs] == whole.token_logprobs
        assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    assert len(streamed) >= 2 and all(math.isfinite(v) for v in whole_values(whole, chat))
    wait_idle(server)


def whole_values(whole, chat: bool) -> list[float]:
    return [e.logprob for e in whole] if chat else whole.token_logprobs


def test_logprobs_end_at_a_stop_string_with_the_usage(server):
    c = client(server)
    first = c.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0,
                                 extra_body={"ignore_eos": True})
    stop = first.choices[0].text[5:7]
    assert len(stop) == 2, "the answer is too short for this test"
    done = c.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=stop, logprobs=0,
                                extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "stop" and stop not in done.choices[0].text
    assert len(done.choices[0].logprobs.tokens) == done.usage.completion_tokens
    wait_idle(server)


def test_top_logprobs_without_logprobs_is_refused(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="tiny", messages=CHAT, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_echo_answers_the_prompt_first(server):
    c = client(server)
    args = dict(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = c.completions.create(**args).choices[0].text
    assert c.completions.create(**args, echo=True).choices[0].text == "Once upon" + plain
    assert "".join(ch.choices[0].text for ch in c.completions.create(**args, echo=True, stream=True)) == \
        "Once upon" + plain
    wait_idle(server)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server):
    """lm-eval-harness's loglikelihood request (local-completions): a token-id prompt, echo, logprobs 1,
    max_tokens 1, temperature 0; it sums token_logprobs over the continuation and checks each against the top."""
    ids = [ord(ch) for ch in "The answer is 42"]
    args = dict(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    done = client(server).completions.create(**args)
    lp = done.choices[0].logprobs
    assert done.choices[0].text.startswith("The answer is 42")
    assert len(lp.tokens) == len(ids) + done.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token has none
    with torch.no_grad():
        expected = tiny_llama()(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(
        expected.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist(), abs=1e-4)
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == value and len(top) <= 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = [ch.choices[0].logprobs for ch in client(server).completions.create(**args, stream=True)]
    assert [t for chunk in chunks if chunk is not None for t in chunk.tokens] == lp.tokens
    wait_idle(server)
