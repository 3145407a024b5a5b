"""Live servers on tiny_llama for the HTTP tests, and helpers to pause the engine and to wait until it is idle."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import pytest
import torch
from openai import AsyncOpenAI, OpenAI

from tests.server.fakes import FakePredictor, serve_config, start_server

API_KEY = "test-key"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine, the HTTP server and the client share this process: one torch thread keeps the engine's
    thread pool from fighting them for 2 cores (see ServeConfig.torch_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """s3 policy with a predictor that always says bucket 0 (most answers mispredict), EOS on, a KV pool of
    128 blocks x 4 tokens and no waiting for a block (`wait_steps` 0): the load test preempts. With waiting on, a
    full pool usually waits for a sequence about to end, and whether any preemption is left depends on timing
    (the full suite once saw none)."""
    tmp = tmp_path_factory.mktemp("s3-server")
    config = serve_config(tmp, kv_cache_tokens=512, max_waiting_requests=1000)
    engine = dataclasses.replace(config.engine, policy=dataclasses.replace(config.engine.policy, wait_steps=0))
    config = dataclasses.replace(config, engine=engine)
    srv = start_server(config, predictor=FakePredictor(bucket=0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """paged policy, no EOS, answers up to 400 tokens, 4 running slots and at most 2 requests waiting beyond
    the free ones: for disconnects and 429s."""
    tmp = tmp_path_factory.mktemp("s3-slow")
    config = serve_config(tmp, policy="paged", kv_cache_tokens=4096, max_new_tokens=400, max_waiting_requests=2,
                          max_num_seqs=4)
    srv = start_server(config, eos=False)
    yield srv
    srv.stop()


def client(srv, **kwargs) -> OpenAI:
    return OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)


def async_client(srv, **kwargs) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_idle(srv) -> dict:
    """Wait until no request is in flight, then check the scheduler (in the engine thread): the KV pool is
    whole, and no finished request is remembered. Returns the scheduler's counters."""
    stack = srv.stack
    wait_for(lambda: stack.state.engine.num_in_flight == 0, what="no request in flight")

    def check(engine):
        scheduler = engine.scheduler
        scheduler.check_invariants()
        assert not scheduler.has_unfinished(), (scheduler.num_waiting, scheduler.num_running)
        assert scheduler.pool.num_free_blocks == scheduler.pool.num_blocks
        assert not scheduler.requests, f"{len(scheduler.requests)} ended requests still held"
        assert not scheduler._order, f"{len(scheduler._order)} ended requests still ordered"
        return vars(scheduler.stats).copy()

    # Aborts may still be on their way through the command queue: retry until they have landed.
    deadline = time.monotonic() + 30
    while True:
        try:
            return stack.engine_loop.call(check).result(30)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def engine_paused(srv):
    """Hold the engine thread between two steps (commands queue up; nothing is generated) until the block ends."""
    entered, gate = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        gate.wait(60)

    future = srv.stack.engine_loop.call(hold)
    assert entered.wait(30), "the engine did not pause"
    try:
        yield
    finally:
        gate.set()
        future.result(30)
