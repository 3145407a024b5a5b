"""A client that goes away has its request aborted and its KV blocks freed, streamed or not.

The engine is paused while the client disconnects, so the request cannot finish first: the abort is the only
way it can end.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.server.conftest import API_KEY, engine_paused, wait_for, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": "tiny", "prompt": "tell me everything", "max_tokens": 400, "temperature": 0}


def _engine(srv):
    return srv.stack.state.engine


def test_streaming_client_that_disconnects_is_aborted(slow_server):
    before = wait_idle(slow_server)
    with httpx.Client(base_url=slow_server.url, headers=AUTH) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first
            with engine_paused(slow_server):
                assert slow_server.stack.engine_loop.snapshot.num_running == 1
                response.close()  # the client goes away mid-stream
                wait_for(lambda: _engine(slow_server).num_in_flight == 0, what="the server to notice")
    after = wait_idle(slow_server)  # the pool is whole again and the request is forgotten
    assert after["num_aborted"] == before["num_aborted"] + 1
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 400


def test_non_streaming_client_that_disconnects_is_aborted(slow_server):
    before = wait_idle(slow_server)

    async def main():
        async with httpx.AsyncClient(base_url=slow_server.url, headers=AUTH) as http:
            call = asyncio.ensure_future(http.post("/v1/completions", json=LONG))
            await asyncio.to_thread(wait_for, lambda: slow_server.stack.engine_loop.snapshot.num_running == 1)
            with engine_paused(slow_server):
                call.cancel()  # closes the connection
                await asyncio.to_thread(wait_for, lambda: _engine(slow_server).num_in_flight == 0)

    asyncio.run(main())
    after = wait_idle(slow_server)
    assert after["num_aborted"] == before["num_aborted"] + 1
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 400


def test_every_choice_of_a_client_that_disconnects_is_aborted(slow_server):
    before = wait_idle(slow_server)
    with httpx.Client(base_url=slow_server.url, headers=AUTH) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True, "n": 3}) as response:
            lines = response.iter_lines()
            assert '"text"' in next(line for line in lines if line.startswith("data: "))
            with engine_paused(slow_server):
                response.close()
                wait_for(lambda: _engine(slow_server).num_in_flight == 0, what="the server to notice")
    after = wait_idle(slow_server)
    assert after["num_aborted"] == before["num_aborted"] + 3
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 3 * 400

    async def main():  # not streamed: the same
        async with httpx.AsyncClient(base_url=slow_server.url, headers=AUTH) as http:
            call = asyncio.ensure_future(http.post("/v1/completions", json={**LONG, "n": 2}))
            await asyncio.to_thread(wait_for, lambda: slow_server.stack.engine_loop.snapshot.num_running == 2)
            with engine_paused(slow_server):
                call.cancel()
                await asyncio.to_thread(wait_for, lambda: _engine(slow_server).num_in_flight == 0)

    asyncio.run(main())
    assert wait_idle(slow_server)["num_aborted"] == after["num_aborted"] + 2
