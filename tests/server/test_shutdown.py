"""Shutdown answers everyone: every request still queued when the server stops gets a response (an error is
fine), whether it sat in the predictor thread's queue, in the engine thread's, or was taken with the stop."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import pytest

from serve.server.engine_loop import EngineDead
from serve.server.admission import Classifier
from serve.server.config import ServeConfig
from tests.server.conftest import API_KEY, wait_for
from tests.server.fakes import CharTokenizer, FakePredictor, serve_config, start_server
from tests.server.test_engine_loop import PROMPTS, _add, _collect, make_loop
from tests.engine.engine_driver import tiny_llama
from serve.server.launch import DrainingServer, build_stack


class GatedPredictor(FakePredictor):
    """Blocks its first batch until `release` is set."""

    def __init__(self) -> None:
        super().__init__(bucket=0)
        self.entered, self.release = threading.Event(), threading.Event()

    def predict(self, prompts):
        if not self.calls:
            self.entered.set()
            assert self.release.wait(30)
        return super().predict(prompts)


async def _answered(q: asyncio.Queue):
    """The request's last event; the test fails (times out) if it never comes."""
    _, event = await _collect(q)
    return event


def test_requests_behind_the_predictor_at_shutdown_get_an_answer(tmp_path):
    predictor = GatedPredictor()
    stack = build_stack(serve_config(tmp_path, predictor_thread=True), model=tiny_llama(), tokenizer=CharTokenizer(),
                        predictor=predictor)
    stack.start()
    controller = stack.controller

    async def main():
        first = await _add(controller, "first", PROMPTS[0], bucket=None)
        await asyncio.to_thread(predictor.entered.wait, 30)  # the predictor thread holds "first"
        queued = [await _add(controller, f"queued-{i}", PROMPTS[1], bucket=None) for i in range(3)]
        stopping = asyncio.ensure_future(asyncio.to_thread(stack.stop))
        await asyncio.to_thread(wait_for, lambda: controller._commands.qsize() == 4, what="the stop queued")
        late = await _add(controller, "late", PROMPTS[2], bucket=None)  # queued behind the stop
        predictor.release.set()
        events = await asyncio.gather(*(_answered(q) for q in [first, *queued, late]))
        await stopping
        with pytest.raises(EngineDead, match="shutting down"):
            await _add(controller, "after", PROMPTS[0], bucket=None)
        return events

    *earlier, late = asyncio.run(main())
    assert late.finish_reason == "abort" and late.error == "the server is shutting down"
    for event in earlier:  # forwarded before the stop: finished, or aborted by the engine's shutdown
        assert event.finish_reason in ("stop", "length") or event.error == "the server is shutting down", event


@pytest.mark.parametrize("classified_here", [False, True])
def test_requests_taken_together_with_the_shutdown_command_get_an_answer(classified_here):
    # classified_here: a CPU server's loop classifies them, one a turn, so two of the three wait for later turns
    classify = Classifier(FakePredictor(bucket=0)) if classified_here else None
    loop = make_loop(tiny_llama(), policy="paged", classify=classify, max_classified=1)
    entered, gate = threading.Event(), threading.Event()
    held = loop.call(lambda engine: (entered.set(), gate.wait(30)))  # the engine thread waits between steps
    assert entered.wait(30)

    async def main():
        stopping = asyncio.ensure_future(asyncio.to_thread(loop.stop))
        await asyncio.to_thread(wait_for, lambda: loop._commands.qsize() == 1, what="the shutdown queued")
        behind = [await _add(loop, f"behind-{i}", PROMPTS[i], bucket=None if classified_here else 0)
                  for i in range(3)]
        gate.set()  # the next turn takes the shutdown and the three requests in one batch
        events = await asyncio.gather(*(_answered(q) for q in behind))
        await stopping
        return events

    events = asyncio.run(main())
    held.result(30)
    assert [e.error for e in events] == ["the server is shutting down"] * 3
    with pytest.raises(EngineDead):
        loop.submit(None)


def test_a_stopping_server_finishes_what_it_can_and_ends_the_rest_with_their_error(tmp_path):
    """uvicorn alone cancels the handlers still running at the end of its graceful window (a bare 500, a stream
    cut short); the server stops its engine first, so each gets its error: a 503, or an error event and [DONE]."""
    server = start_server(serve_config(tmp_path, policy="paged", shutdown_timeout_s=1.0), eos=False)
    engine = server.stack.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.1), step())[1]  # 32 tokens take about 3 s
    answers: dict[str, httpx.Response] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def ask(name: str, max_tokens: int, stream: bool = False) -> None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "stream": stream}
        answers[name] = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)

    askers = [threading.Thread(target=ask, args=args) for args in (("short", 3), ("long", 32), ("streamed", 32, True))]
    for asker in askers:
        asker.start()
    wait_for(lambda: server.stack.engine_loop.snapshot.num_running == 3, what="three requests running")
    started = time.monotonic()
    server.stop()
    stopped_after = time.monotonic() - started
    for asker in askers:
        asker.join(30)

    assert answers["short"].status_code == 200  # finished within the drain
    assert answers["short"].json()["usage"]["completion_tokens"] == 3
    assert answers["long"].status_code == 503
    assert "shutting down" in answers["long"].json()["error"]["message"]
    events = [line.removeprefix("data: ") for line in answers["streamed"].text.splitlines() if line]
    assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert len(events) > 3  # it had streamed tokens before
    assert stopped_after < 1.0 + DrainingServer.ANSWER_S


def test_shutdown_timeout_must_be_seconds():
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match="shutdown_timeout_s"):
            ServeConfig(shutdown_timeout_s=bad)


@pytest.mark.parametrize(("tensor_parallel", "drain_s"), [(1, 60.0), (2, DrainingServer.LAUNCHER_DRAIN_S)])
def test_under_tensor_parallelism_the_drain_ends_before_the_launcher_kills_the_ranks(tensor_parallel, drain_s):
    # The deepspeed launcher SIGKILLs its ranks 30 s after a Ctrl-C: a longer drain would end in a bare reset.
    import types

    import uvicorn
    from fastapi import FastAPI

    from serve.engine.llm import EngineConfig

    config = ServeConfig(engine=EngineConfig(tensor_parallel=tensor_parallel), shutdown_timeout_s=60.0)
    server = DrainingServer(uvicorn.Config(FastAPI()), types.SimpleNamespace(config=config))
    assert server.drain_s == drain_s and server.config.timeout_graceful_shutdown == drain_s + DrainingServer.ANSWER_S
    assert drain_s + DrainingServer.ANSWER_S < 30 or tensor_parallel == 1


def test_a_launch_of_more_processes_than_tensor_parallel_ranks_is_refused(monkeypatch, tmp_path):
    # Each rank would otherwise load the model and serve alone, and the second fail on the port taken.
    from serve.server import launch
    from serve.server.admission import ServeSetupError
    from serve.server.launch import serve_main

    monkeypatch.setattr(launch, "configure_process", lambda config: None)  # no torch thread or logging changes here
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ServeSetupError, match="launched as 2 processes .* pass --tensor-parallel 2"):
        serve_main(serve_config(tmp_path))


def test_a_server_whose_engine_crashed_shuts_down_for_its_supervisor_to_restart(tmp_path):
    # Answering 503 to everything forever helps nobody; `s3 serve` exits non-zero instead (EngineFailed), as vLLM's
    # server does when its engine dies. Servers embedded in tests keep running unless asked.
    server = start_server(serve_config(tmp_path, policy="paged"), eos=False)
    server.server.exit_on_engine_failure = True

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access")

    server.stack.engine.step = broken_step
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 503 and "illegal memory access" in answer.json()["error"]["message"]
    server._thread.join(30)
    assert not server._thread.is_alive() and server.server.engine_failed
    server.stack.stop()
