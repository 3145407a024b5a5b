"""Every refusal a client can get, as the openai client and a raw HTTP client see it: status, OpenAI error body,
and the field to fix."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, async_client, client, engine_paused, wait_for, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(srv, path: str, content: bytes | str, headers=None) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", content=content, headers={**AUTH, "Content-Type": "application/json",
                                                                      **(headers or {})})


def _error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(("body", "param", "words"), [
    ('{"model": "tiny", "prompt": ', None, "not valid JSON"),
    ('{"prompt": "hi"}', "model", "missing required field 'model'"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": "5"}', "max_tokens", "valid integer"),
    ('{"model": "tiny", "prompt": "hi", "n": 129}', "n", "between 1 and 128"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 0}', "max_tokens", "between 1 and 32"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 33}', "max_tokens", "between 1 and 32"),
    ('{"model": "tiny", "prompt": "%s"}' % ("x" * 600), "prompt", "shorten it"),
    ('{"model": "tiny", "prompt": "%s", "max_tokens": 30}' % ("x" * 490), "max_tokens", "at most 22"),
    ('{"model": "tiny", "prompt": [5, 900]}', "prompt", "token ids must be in [0, 128)"),
    # shapes that once reached code expecting another one (500s)
    ('{"model": "tiny", "prompt": "hi", "logit_bias": {"\u00b2": 1}}', "logit_bias", "must be token ids"),
    ('{"model": "tiny", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": "x"}}',
     "response_format.json_schema.schema", "needs"),
    ('{"model": "tiny", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": [1]}}',
     "response_format.json_schema.schema", "needs"),
])  # fmt: skip
def test_bad_completion_requests_are_400_naming_the_field(server, body, param, words):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_requests_through_the_openai_client(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "refuse"}])
    assert info.value.body["param"] == "messages" and "chat template" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 600}])
    assert info.value.body["param"] == "messages"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as info:
        client(server).completions.create(model="gpt-9", prompt="hi")
    assert info.value.body["code"] == "model_not_found" and "'tiny'" in info.value.body["message"]


def test_unknown_route_is_404_in_openai_format(server):
    response = httpx.get(f"{server.url}/v1/engines", headers=AUTH)
    assert response.status_code == 404 and "/v1/chat/completions" in _error(response)["message"]


def test_body_over_the_limit_is_413(server):
    big = '{"model": "tiny", "prompt": "%s"}' % ("x" * (2 << 20))
    assert _post(server, "/v1/completions", big).status_code == 413
    # Without a Content-Length (chunked), the limit holds while reading.
    chunks = (big[i:i + 65536].encode() for i in range(0, len(big), 65536))
    response = httpx.post(f"{server.url}/v1/completions", content=chunks,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in _error(response)["message"]


def test_missing_or_wrong_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(f"{server.url}{path}", headers=headers)
            assert response.status_code == 401 and _error(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_full_queue_is_429_with_retry_after_counting_free_running_slots(slow_server):
    """A cold burst (nothing running yet): 4 free running slots + 2 waiting are accepted, the 7th is refused."""
    engine = slow_server.stack.state.engine
    room = engine.max_waiting_requests + engine.max_num_seqs

    async def main():
        c = async_client(slow_server)
        ask = lambda: c.completions.create(model="tiny", prompt="queued", max_tokens=3)  # noqa: E731
        with engine_paused(slow_server):
            assert slow_server.stack.engine_loop.snapshot.num_running == 0
            waiting = [asyncio.ensure_future(ask()) for _ in range(room)]
            await asyncio.to_thread(wait_for, lambda: engine.num_in_flight == room)
            with pytest.raises(openai.RateLimitError) as info:
                await ask()
        done = await asyncio.gather(*waiting)
        return info.value, done

    error, done = asyncio.run(main())
    assert room == 6
    assert error.response.headers["retry-after"] == "1" and error.body["code"] == "queue_full"
    assert "4 free running slots" in error.body["message"]
    assert [d.usage.completion_tokens for d in done] == [3] * room
    wait_idle(slow_server)
