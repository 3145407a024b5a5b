"""Several choices per request (``n``), through the official openai client: one engine request each, choice 0 the
``n=1`` answer, streamed choices interleaved by index, usage summed, all or none admitted; a batch of prompts
answers as its prompts one by one; a greedy request's identical choices are one feedback record."""

from __future__ import annotations

import asyncio
import collections

import openai
import pytest

from serve.feedback import read_feedback
from tests.server.conftest import async_client, client, engine_paused, wait_for, wait_idle
from tests.server.fakes import MAX_NEW_TOKENS

CHAT = [{"role": "user", "content": "Name three colours."}]


def test_completion_choices_are_separate_samples_with_choice_0_the_single_answer(server):
    c = client(server)
    args = dict(model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, seed=5,
                extra_body={"ignore_eos": True})
    single = c.completions.create(**args)
    several = c.completions.create(**args, n=4)
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == single.choices[0].text
    assert len({choice.text for choice in several.choices}) > 1  # sampled apart, not one answer four times
    assert (several.usage.prompt_tokens, several.usage.completion_tokens) == (single.usage.prompt_tokens, 32)
    assert c.completions.create(**args, n=4).choices[3].text == several.choices[3].text  # seeded: reproducible
    wait_idle(server)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_choices_equal_the_whole_ones(server, chat):
    c = client(server)
    args = dict(model="tiny", max_tokens=10, temperature=0.9, seed=3, n=3, extra_body={"ignore_eos": True})
    create = c.chat.completions.create if chat else c.completions.create
    args |= dict(messages=CHAT, logprobs=True) if chat else dict(prompt="The answer is", logprobs=0)
    whole = create(**args)
    texts, roles, reasons, tokens = collections.defaultdict(str), [], {}, collections.Counter()
    usage = None
    for chunk in create(**args, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if chat else choice.text
            texts[choice.index] += piece or ""
            if chat and choice.delta.role:
                roles.append(choice.index)
            if choice.logprobs is not None:
                tokens[choice.index] += len(choice.logprobs.content if chat else choice.logprobs.tokens)
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    expected = [(ch.message.content if chat else ch.text) for ch in whole.choices]
    assert [texts[i] for i in range(3)] == expected and reasons == {i: "length" for i in range(3)}
    assert roles == ([0, 1, 2] if chat else []) and dict(tokens) == {i: 10 for i in range(3)}
    assert usage.completion_tokens == whole.usage.completion_tokens == 30
    wait_idle(server)


def test_n_the_server_could_never_queue_is_400(slow_server):
    with pytest.raises(openai.BadRequestError) as info:
        client(slow_server).completions.create(model="tiny", prompt="hi", max_tokens=3, n=7)
    assert info.value.body["param"] == "n" and "6 requests" in info.value.body["message"]


def test_choices_are_admitted_all_or_none(slow_server):
    """4 free running slots + 2 waiting: with 5 requests in, a request for 2 choices is refused whole, and the
    queue is as it was."""
    engine = slow_server.stack.state.engine

    async def main():
        c = async_client(slow_server)
        ask = lambda n: c.completions.create(model="tiny", prompt="queued", max_tokens=3, n=n)  # noqa: E731
        with engine_paused(slow_server):
            waiting = [asyncio.ensure_future(ask(1)) for _ in range(5)]
            await asyncio.to_thread(wait_for, lambda: engine.num_in_flight == 5)
            with pytest.raises(openai.RateLimitError) as info:
                await ask(2)
            assert engine.num_in_flight == 5
            last = asyncio.ensure_future(ask(1))  # the one place left
            await asyncio.to_thread(wait_for, lambda: engine.num_in_flight == 6)
        return info.value, await asyncio.gather(*waiting, last)

    error, done = asyncio.run(main())
    assert "cannot take 2 more" in error.body["message"]
    assert [d.usage.completion_tokens for d in done] == [3] * 6
    wait_idle(slow_server)


def test_a_batch_of_prompts_answers_as_its_prompts_one_by_one(server):
    c = client(server)
    args = dict(model="tiny", max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    prompts = ["Once upon", "The answer is"]
    alone = [c.completions.create(**args, prompt=prompt, n=2) for prompt in prompts]
    batch = c.completions.create(**args, prompt=prompts, n=2)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in batch.choices] == [ch.text for done in alone for ch in done.choices]
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (len("Once upon") + len("The answer is"), 24)
    streamed = collections.defaultdict(str)
    for chunk in c.completions.create(**args, prompt=prompts, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(4)] == [ch.text for ch in batch.choices]
    wait_idle(server)


def test_lm_eval_batches_token_id_prompts_with_echo(server):
    """lm-eval-harness's local-completions with batch_size > 1: token-id prompts, echo, logprobs 1, max_tokens 1."""
    c = client(server)
    batch = [[ord(ch) for ch in text] for text in ("abc def", "xyz", "The answer is 42")]
    done = c.completions.create(model="tiny", prompt=batch, echo=True, logprobs=1, max_tokens=1, temperature=0)
    for ids, choice in zip(batch, done.choices):
        assert choice.text.startswith("".join(map(chr, ids)))
        assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) >= len(ids)
        single = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
        # the same figures as alone, to float rounding (batched with other prompts, the matrix shapes differ)
        assert single.choices[0].logprobs.token_logprobs[1:] == pytest.approx(choice.logprobs.token_logprobs[1:],
                                                                               abs=1e-4)
    wait_idle(server)


def test_a_greedy_requests_choices_are_one_feedback_record(server):
    """Greedy choices are one answer n times: one feedback record; sampled choices are separate answers: one each
    that runs past its predicted bucket (bucket 0, up to 8 tokens)."""
    c = client(server)
    args = dict(model="tiny", prompt="feedback one", max_tokens=MAX_NEW_TOKENS, n=3)
    c.completions.create(**args, temperature=0)
    sampled = c.completions.create(**args | {"prompt": "feedback two"}, temperature=1.0, seed=2)
    wait_idle(server)
    server.stack.engine_loop.call(lambda engine: None).result(10)  # records are written before this runs
    prompts = collections.Counter(r["prompt"] for r in read_feedback(server.stack.engine_loop.feedback.writer.directory))
    long = sum(len(choice.text) > 8 for choice in sampled.choices)  # one character per token here
    assert prompts["feedback one"] == 1 and long <= prompts["feedback two"] <= 3 and long >= 2


def test_answers_whose_length_the_client_forces_are_not_feedback(server):
    """ignore_eos, min_tokens, stop_token_ids and logit_bias decide where an answer ends: not labels. The same
    prompt unforced is written (bucket 0 predicted; it answers past it, as in test_server's feedback test)."""
    c = client(server)
    base = dict(model="tiny", prompt="feedback one", max_tokens=MAX_NEW_TOKENS, temperature=0)
    forced = [{"ignore_eos": True}, {"min_tokens": 20}, {"stop_token_ids": [2]}, {"logit_bias": {"1": -100}}]
    store = server.stack.engine_loop.feedback.writer.directory

    def records() -> int:
        wait_idle(server)
        server.stack.engine_loop.call(lambda engine: None).result(10)  # records are written before this runs
        return sum(r["prompt"] == "feedback one" for r in read_feedback(store)) if store.exists() else 0

    before = records()
    for extra in forced:
        c.completions.create(**base, extra_body=extra)
    assert records() == before
    c.completions.create(**base)
    assert records() == before + 1


def test_the_choices_of_one_prompt_are_predicted_once(server):
    """Arriving together (the engine held while they queue), six choices of two prompts are two predictions."""
    predictor, engine = server.stack.admission.predictor, server.stack.state.engine
    before = len(predictor.calls)

    async def main():
        c = async_client(server)
        with engine_paused(server):
            call = asyncio.ensure_future(c.completions.create(model="tiny", prompt=["predict me once", "and me"], n=3,
                                                              max_tokens=2))
            await asyncio.to_thread(wait_for, lambda: engine.num_in_flight == 6)
        return await call

    assert len(asyncio.run(main()).choices) == 6
    asked = [prompt for batch in predictor.calls[before:] for prompt in batch]
    assert sorted(asked) == ["and me", "predict me once"]
    wait_idle(server)
