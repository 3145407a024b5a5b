"""A bounded load test: a few hundred concurrent requests (chat and completion, streamed and not, stop strings,
clients that leave early) against a small KV pool under the s3 policy with a predictor that always says
"bucket 0", so requests mispredict, grow and get preempted. Every answer must be exactly the greedy answer
(nothing lost or duplicated), and the pool must be whole afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import random

from tests.server.conftest import async_client, client, wait_idle
from tests.server.fakes import MAX_NEW_TOKENS

NUM_REQUESTS = 300
TOPICS = ["the sea", "a robot", "tea", "winter", "maths", "a city", "music", "rain", "bees", "chess"]


@dataclasses.dataclass(frozen=True)
class Job:
    chat: bool
    topic: str
    max_tokens: int
    stream: bool
    stop: str | None
    leaves_early: bool

    def kwargs(self) -> dict:
        args = {"model": "tiny", "temperature": 0, "max_tokens": self.max_tokens, "stream": self.stream}
        if self.stop:
            args["stop"] = self.stop
        if self.chat:
            return args | {"messages": [{"role": "user", "content": f"Tell me about {self.topic}."}]}
        return args | {"prompt": f"A story about {self.topic}:"}


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    num_tokens: int


def expected(job: Job, reference: Answer) -> Answer:
    """The greedy answer cut at max_tokens and at the stop string (one character per token but the EOS)."""
    num_tokens = min(job.max_tokens, reference.num_tokens)
    text = reference.text[:job.max_tokens]
    finish = "stop" if reference.finish_reason == "stop" and job.max_tokens >= reference.num_tokens else "length"
    if job.stop and job.stop in text:
        cut = text.index(job.stop)
        return Answer(text[:cut], "stop", cut + len(job.stop))
    return Answer(text, finish, num_tokens)


async def run_job(c, job: Job) -> Answer | None:
    create = c.chat.completions.create if job.chat else c.completions.create
    response = await create(**job.kwargs())
    if not job.stream:
        choice = response.choices[0]
        return Answer(choice.message.content if job.chat else choice.text, choice.finish_reason,
                      response.usage.completion_tokens)
    pieces, finish = [], None
    async for chunk in response:
        choice = chunk.choices[0]
        pieces.append((choice.delta.content if job.chat else choice.text) or "")
        finish = choice.finish_reason or finish
        if job.leaves_early and len(pieces) >= 2:
            await response.close()
            return None
    return Answer("".join(pieces), finish, -1)  # a stream has no usage unless asked


def make_jobs(rng: random.Random, references: dict) -> list[Job]:
    jobs = []
    for _ in range(NUM_REQUESTS):
        chat, topic = rng.random() < 0.5, rng.choice(TOPICS)
        stream = rng.random() < 0.5
        reference = references[chat, topic].text
        stop = None
        if rng.random() < 0.3 and len(reference) > 6:
            start = rng.randrange(2, len(reference) - 2)
            stop = reference[start:start + 2]
        jobs.append(Job(chat, topic, rng.randint(1, MAX_NEW_TOKENS), stream, stop,
                        leaves_early=stream and rng.random() < 0.1))
    return jobs


def test_hundreds_of_concurrent_requests_all_get_their_full_answer(server):
    c = client(server)
    references = {}
    for chat in (False, True):
        for topic in TOPICS:
            job = Job(chat, topic, MAX_NEW_TOKENS, False, None, False)
            references[chat, topic] = asyncio.run(run_job(async_client(server), job))
    before = wait_idle(server)
    jobs = make_jobs(random.Random(0), references)

    async def main():
        ac = async_client(server, timeout=120)
        return await asyncio.gather(*[run_job(ac, job) for job in jobs], return_exceptions=True)

    answers = asyncio.run(main())
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, errors[:3]
    for job, answer in zip(jobs, answers):
        if job.leaves_early:
            continue
        want = expected(job, references[job.chat, job.topic])
        assert (answer.text, answer.finish_reason) == (want.text, want.finish_reason), job
        assert answer.num_tokens in (-1, want.num_tokens), job
    after = wait_idle(server)  # no request in flight, the KV pool whole, nothing remembered
    assert after["num_mispredictions"] > before["num_mispredictions"]
    assert after["num_preemptions"] > before["num_preemptions"]
    assert after["num_finished"] + after["num_aborted"] - before["num_finished"] - before["num_aborted"] == len(jobs)
    assert c.models.list().data  # still serving
