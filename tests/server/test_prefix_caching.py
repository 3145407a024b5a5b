"""A server with prefix caching: answers unchanged, the cached prompt tokens in OpenAI's usage, hits in /metrics."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, client, wait_idle
from tests.server.fakes import serve_config, start_server

PROMPT = "You are a careful assistant. Answer briefly. Question: "  # 55 characters: tokens of the char tokenizer


@pytest.fixture(scope="module")
def caching_server(tmp_path_factory):
    config = serve_config(tmp_path_factory.mktemp("s3-prefix"), policy="paged")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, enable_prefix_caching=True))
    srv = start_server(config)
    yield srv
    srv.stop()


def _ask(srv, prompt: str, **kwargs):
    return client(srv).completions.create(**({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
                                             | kwargs))


def test_cached_prompt_tokens_are_reported_and_the_answer_is_unchanged(caching_server, server):
    first = _ask(caching_server, PROMPT + "why?")
    wait_idle(caching_server)
    again = _ask(caching_server, PROMPT + "why?")
    other = _ask(caching_server, PROMPT + "how?")
    num_prompt = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole blocks of 4 tokens, the prompt's last token always computed again.
    assert again.usage.prompt_tokens_details.cached_tokens == (num_prompt - 1) // 4 * 4
    assert other.usage.prompt_tokens_details.cached_tokens == len(PROMPT) // 4 * 4  # the shared part (BOS-less)
    assert again.choices[0].text == first.choices[0].text == _ask(server, PROMPT + "why?").choices[0].text
    assert _ask(server, PROMPT + "why?").usage.prompt_tokens_details is None  # a server without the cache
    wait_idle(caching_server)


def test_a_cache_salt_shares_blocks_only_with_the_same_salt(caching_server):
    prompt = PROMPT + "salted?"
    _ask(caching_server, prompt)
    wait_idle(caching_server)
    cached = lambda **extra: _ask(caching_server, prompt, extra_body=extra).usage.prompt_tokens_details.cached_tokens
    assert cached(cache_salt="tenant-a") == 0  # another tenant's blocks are not found
    wait_idle(caching_server)
    assert cached(cache_salt="tenant-a") > 0 and cached(cache_salt="tenant-b") == 0
    wait_idle(caching_server)
    assert cached() > 0  # unsalted requests still share among themselves
    with pytest.raises(openai.BadRequestError) as info:
        _ask(caching_server, prompt, extra_body={"cache_salt": ""})
    assert info.value.body["param"] == "cache_salt"


def test_choices_count_their_prompt_once(caching_server):
    several = _ask(caching_server, PROMPT + "n?", n=3, temperature=1.0, seed=1)
    assert several.usage.prompt_tokens == len(PROMPT) + 2
    assert several.usage.prompt_tokens_details.cached_tokens == len(PROMPT) // 4 * 4
    usage = None
    for chunk in client(caching_server).completions.create(model="tiny", prompt=PROMPT + "n?", max_tokens=3,
                                                           stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage.prompt_tokens_details.cached_tokens == (len(PROMPT) + 1) // 4 * 4
    wait_idle(caching_server)


def test_metrics_count_prefix_cache_lookups_and_hits(caching_server):
    _ask(caching_server, PROMPT + "metrics?")
    wait_idle(caching_server)
    text = httpx.get(f"{caching_server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("s3_prefix_cache_")}
    assert 0 < values["s3_prefix_cache_hits_total"] < values["s3_prefix_cache_queries_total"]
