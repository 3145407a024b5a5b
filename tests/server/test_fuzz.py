"""Random request bodies against a live server: any body is answered (200, or a 4xx in OpenAI's error shape), never
a 500 or a dropped connection; a stream ends with [DONE]; and once everything has ended, dropped streams included,
the KV pool is whole and nothing is remembered."""

from __future__ import annotations

import concurrent.futures
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY, wait_idle

words = st.text(alphabet="abcdefgh .", min_size=1, max_size=4)
# Integers past 64 bits and objects of the wrong shape inside (a field holding a string where an object belongs)
# once reached the engine and the format code as they came: a 500, and for a huge top_k a stopped engine.
shapes = st.dictionaries(st.sampled_from(["type", "function", "json_schema", "name", "schema", "1", "\u00b2"]),
                         st.one_of(st.text(max_size=3), st.integers(-2, 5), st.lists(st.integers(0, 3), max_size=2)),
                         max_size=3)
anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1]),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                     st.lists(st.integers(-2, 200), max_size=4), st.just({}), shapes)
JSON_SCHEMA = {"type": "json_schema", "json_schema": {
    "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]

# Fields within their ranges, drawn in any combination: what is left to refuse is how they combine.
SAMPLING = {
    "max_tokens": st.integers(1, 40), "temperature": st.floats(0, 2), "top_p": st.floats(0.1, 1),
    "stop": st.lists(words, max_size=3), "seed": st.integers(0, 5), "n": st.integers(1, 3),
    "stream": st.booleans(), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "ignore_eos": st.booleans(), "top_k": st.integers(1, 20), "min_p": st.floats(0, 0.5),
    "stop_token_ids": st.lists(st.integers(2, 127), max_size=3), "min_tokens": st.integers(0, 10),
    "logit_bias": st.dictionaries(st.sampled_from(["3", "5", "40", "100"]), st.floats(-100, 100), max_size=3),
    "repetition_penalty": st.floats(0.5, 2), "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(), "truncate_prompt_tokens": st.sampled_from([-1, 1, 5, 10]),
    "allowed_token_ids": st.lists(st.integers(1, 127), min_size=1, max_size=6),
    "prompt_logprobs": st.integers(0, 5), "cache_salt": st.sampled_from(["a", "b"]),
    "bad_words": st.lists(words, max_size=2), "return_tokens_as_token_ids": st.booleans(),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, JSON_SCHEMA]),
    "guided_choice": st.lists(st.text(alphabet="xyz", min_size=1, max_size=3), min_size=1, max_size=3),
}
COMPLETION = {
    "prompt": st.one_of(st.text(alphabet="abcdefgh .", min_size=1, max_size=30),
                        st.lists(st.integers(2, 127), min_size=1, max_size=12), st.lists(words, min_size=1, max_size=3)),
    "logprobs": st.integers(0, 5), "echo": st.booleans(),
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": st.text(alphabet="abcdef ", max_size=20)})
CHAT = {
    "messages": st.lists(message, min_size=1, max_size=3), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 30), "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(), "tools": st.just(TOOLS),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}}]),
}


def plausible(fields: dict, required: str):
    optional = {**SAMPLING, **fields}
    return st.fixed_dictionaries({"model": st.just("tiny"), required: optional.pop(required)}, optional=optional)


def garbled(fields: dict):
    """Any field may hold anything, the model and the prompt included."""
    names = [*SAMPLING, *fields, "stream_options", "best_of", "suffix", "priority", "user"]
    return st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other"])},
                                 optional={name: anything for name in names})


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), plausible(COMPLETION, "prompt")),
    st.tuples(st.just("/v1/chat/completions"), plausible(CHAT, "messages")),
    st.tuples(st.just("/v1/completions"), garbled(COMPLETION)),
    st.tuples(st.just("/v1/chat/completions"), garbled(CHAT)),
)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def post(http: httpx.Client, path: str, body: dict, *, drop_after: int | None = None) -> None:
    """Send ``body`` as written (NaN and infinities included) and check the answer; ``drop_after``: close a stream
    after that many lines."""
    content = json.dumps(body)  # allow_nan: a client may send the literals
    with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if drop_after is not None and len(lines) > drop_after:
                return
        text = "\n".join(lines)
    assert r.status_code in (200, 400, 404), (r.status_code, text[:500])
    if r.status_code != 200:
        assert json.loads(text)["error"]["message"]
    elif body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]"), text[-500:]
        assert '"error"' not in text, text[-500:]
    else:
        assert json.loads(text)["choices"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=requests)
def test_any_body_is_answered(server, http, case):
    path, body = case
    post(http, path, body)


def test_concurrent_bodies_and_dropped_streams_leave_the_pool_whole(server, http):
    cases = []

    @settings(max_examples=80, deadline=None, database=None)
    @given(case=requests)
    def draw(case):
        cases.append(case)

    draw()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, http, path, body, drop_after=2 if i % 3 == 0 else None)
                   for i, (path, body) in enumerate(cases)]
        for future in futures:
            future.result()
    wait_idle(server)


def test_nan_and_infinity_are_400(server, http):
    for value in (math.nan, math.inf):
        r = http.post("/v1/completions", content=json.dumps({"model": "tiny", "prompt": "a", "temperature": value}),
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
