"""Shutdown answers everyone: every request still queued when the server stops gets a response (an error is
fine), whether it sat in the predictor thread's queue, in the engine thread's, or was taken with the stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.server.engine_loop import EngineDead
from tests.server.conftest import wait_for
from tests.server.fakes import CharTokenizer, FakePredictor, serve_config
from tests.server.test_engine_loop import PROMPTS, _add, _collect, make_loop
from tests.engine.engine_driver import tiny_llama
from serve.server.launch import build_stack


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


def test_requests_taken_together_with_the_shutdown_command_get_an_answer():
    loop = make_loop(tiny_llama(), policy="paged")
    entered, gate = threading.Event(), threading.Event()
    held = loop.call(lambda engine: (entered.set(), gate.wait(30)))  # the engine thread waits between steps
    assert entered.wait(30)

    async def main():
        stopping = asyncio.ensure_future(asyncio.to_thread(loop.stop))
        await asyncio.to_thread(wait_for, lambda: loop._commands.qsize() == 1, what="the shutdown queued")
        behind = [await _add(loop, f"behind-{i}", PROMPTS[i]) for i in range(3)]
        gate.set()  # the next turn takes the shutdown and the three requests in one batch
        events = await asyncio.gather(*(_answered(q) for q in behind))
        await stopping
        return events

    events = asyncio.run(main())
    held.result(30)
    assert [e.error for e in events] == ["the server is shutting down"] * 3
    with pytest.raises(EngineDead):
        loop.submit(None)
