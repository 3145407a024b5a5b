"""The engine thread and the predictor thread without HTTP: tokens, aborts, feedback, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from serve.engine.llm import EngineConfig, LLMEngine
from serve.engine.plan import GREEDY
from serve.feedback import FeedbackWriter, read_feedback
from serve.policy_config import PolicyConfig
from core.request import LengthPrediction
from serve.feedback import FeedbackLog
from serve.server.admission import AdmissionController, Classifier
from serve.server.engine_loop import Abort, Add, EngineDead, EngineLoop, EngineSnapshot, Sink
from serve.server.metrics import ServerMetrics
from serve.server.launch import build_stack
from tests.engine.engine_driver import tiny_llama
from tests.server.fakes import BUCKETS, CharTokenizer, FakePredictor, serve_config

PROMPTS = [[5, 9, 17, 33], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100, 3, 77]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_loop(model, tmp_path=None, *, policy="s3", kv_cache_tokens=512, classify=None,
              max_classified: int = 32) -> EngineLoop:
    config = EngineConfig(kv_cache_tokens=kv_cache_tokens, block_size=4, max_num_seqs=8,
                          policy=PolicyConfig(policy=policy, watermark=0.0))
    engine = LLMEngine(config, model=model, tokenizer=None, buckets=BUCKETS)
    feedback = None
    if tmp_path is not None:
        feedback = FeedbackLog(FeedbackWriter(tmp_path, sync_every=1), BUCKETS, "ckpt")
    loop = EngineLoop(engine, feedback=feedback, classify=classify, max_classified=max_classified)
    loop.start()
    return loop


async def _add(ingress, request_id, ids, max_new_tokens=24, bucket=0) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    prediction = LengthPrediction(bucket=bucket) if bucket is not None else None
    ingress.submit(Add(request_id, ids, max_new_tokens, GREEDY, f"prompt {request_id}",
                       Sink(asyncio.get_running_loop(), q), prediction))
    return q


async def _collect(q: asyncio.Queue, *, limit: int | None = None):
    tokens, event = [], None
    while event is None or not event.is_last:
        event = await asyncio.wait_for(q.get(), 30)
        tokens += event.token_ids
        if limit is not None and len(tokens) >= limit:
            return tokens, None
    return tokens, event


def _pool_is_whole(loop: EngineLoop) -> None:
    def check(engine):
        engine.scheduler.check_invariants()
        return engine.scheduler.pool.num_free_blocks, engine.scheduler.pool.num_blocks, len(engine.scheduler.requests)

    free, total, remembered = loop.call(check).result(10)
    assert free == total and remembered == 0


def test_tokens_stream_in_order_and_the_pool_is_whole_after(model, tmp_path):
    # The engine alone (checked against generate() in tests/test_llm_engine.py) is the reference.
    plain = LLMEngine(EngineConfig(kv_cache_tokens=4096, block_size=4), model=model, tokenizer=None)
    done = {c.request_id: c.output_token_ids for c in plain.generate_ids({str(i): p for i, p in enumerate(PROMPTS)},
                                                                                 max_new_tokens=24)}
    reference = [done[str(i)] for i in range(len(PROMPTS))]
    loop = make_loop(model, tmp_path, kv_cache_tokens=96)  # small pool: mispredictions and preemptions

    async def main():
        queues = [await _add(loop, str(i), ids) for i, ids in enumerate(PROMPTS)]
        return await asyncio.gather(*[_collect(q) for q in queues])

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == reference
    assert {event.finish_reason for _, event in results} == {"length"}
    _pool_is_whole(loop)
    assert loop.snapshot.stats.num_mispredictions > 0
    loop.stop()
    records = list(read_feedback(tmp_path))
    assert sorted(r["request_id"] for r in records) == ["0", "1", "2"]
    for r in records:
        assert (r["predicted_bucket"], r["true_bucket"], r["checkpoint_id"]) == (0, BUCKETS.bucket_of(24), "ckpt")


def test_abort_frees_the_request_and_a_stop_string_abort_records_its_length(model, tmp_path):
    loop = make_loop(model, tmp_path)

    async def main():
        q_gone, q_stopped = await _add(loop, "gone", PROMPTS[0]), await _add(loop, "stopped", PROMPTS[1])
        await _collect(q_gone, limit=1)
        tokens, _ = await _collect(q_stopped, limit=12)  # past bucket 0 (8 tokens): mispredicted
        loop.submit(Abort("gone"))
        loop.submit(Abort("stopped", stopped_at=10))

    asyncio.run(main())
    _pool_is_whole(loop)
    stats = loop.snapshot.stats
    assert stats.num_aborted == 1 and stats.num_finished == 1  # a stop string completes the answer
    loop.stop()
    (record,) = read_feedback(tmp_path)  # "gone" ended without a length: no training row
    assert record["request_id"] == "stopped" and record["num_output_tokens"] == 10
    assert record["true_bucket"] == BUCKETS.bucket_of(10)
    assert not record["finished"]  # a stop string cut it: its length is no label, retraining leaves it out


def test_a_request_that_cannot_fit_gets_an_error_event(model):
    loop = make_loop(model, policy="max")

    async def main():
        return await _collect(await _add(loop, "big", [3] * 500, max_new_tokens=100, bucket=None))

    tokens, event = asyncio.run(main())
    assert tokens == [] and event.finish_reason == "abort" and "context" in event.error
    loop.stop()


def test_a_request_the_engine_fails_to_take_fails_alone(model, monkeypatch):
    """A bug in taking one request (not a refusal: any exception) answers that request with an error; the engine
    goes on serving the others."""
    loop = make_loop(model, policy="max")
    add = loop.engine.add_request
    monkeypatch.setattr(loop.engine, "add_request",
                        lambda request_id, *args, **kwargs: 1 / 0 if request_id == "bad" else add(request_id, *args,
                                                                                                   **kwargs))

    async def main():
        bad = await _collect(await _add(loop, "bad", PROMPTS[0], bucket=None))
        good = await _collect(await _add(loop, "good", PROMPTS[1], bucket=None))
        return bad, good

    (_, bad), (tokens, good) = asyncio.run(main())
    assert "ZeroDivisionError" in bad.error and bad.finish_reason == "abort"
    assert tokens and good.error is None and loop.snapshot.alive
    loop.stop()


def test_a_crashed_step_fails_every_request_and_refuses_new_ones(model, monkeypatch):
    loop = make_loop(model, policy="max")
    monkeypatch.setattr(loop.engine, "step", lambda: 1 / 0)

    async def main():
        return await _collect(await _add(loop, "a", PROMPTS[0], bucket=None))

    _, event = asyncio.run(main())
    assert "ZeroDivisionError" in event.error
    loop._thread.join(10)
    assert not loop.snapshot.alive and isinstance(loop.error, ZeroDivisionError)
    assert (loop.snapshot.num_running, loop.snapshot.num_waiting, loop.snapshot.num_kv_blocks_held) == (0, 0, 0)
    with pytest.raises(EngineDead):
        loop.submit(Abort("a"))


def test_a_crash_applying_one_command_answers_those_taken_with_it(model, monkeypatch):
    """The loop takes every queued command, then applies them in turn: a crash in one left the later ones (taken,
    not applied) without an answer, their clients waiting forever."""
    loop = make_loop(model, policy="max")
    gate = threading.Event()

    def broken_abort(request_id, **kwargs):
        raise RuntimeError("a bug in abort")

    monkeypatch.setattr(loop.engine, "abort", broken_abort)

    entered = threading.Event()

    def hold(engine):
        entered.set()
        return gate.wait(10)

    async def main():
        q = await _add(loop, "a", PROMPTS[0], bucket=None)
        loop.call(hold)  # hold the engine so that the next two are taken together
        await asyncio.to_thread(entered.wait, 10)  # (else the turn could take the hold and the abort, not "b")
        loop.submit(Abort("a"))
        later = await _add(loop, "b", PROMPTS[1], bucket=None)
        gate.set()
        return await asyncio.wait_for(_collect(later), 30)  # it waited forever

    _, event = asyncio.run(main())
    assert event.finish_reason == "abort" and "a bug in abort" in event.error


def test_shutdown_ends_running_requests_with_an_error(model):
    loop = make_loop(model, policy="max")
    gate = threading.Event()

    async def main():
        q = await _add(loop, "a", PROMPTS[0], bucket=None)
        loop.call(lambda engine: gate.wait(10))  # hold the engine between two steps
        threading.Thread(target=loop.stop).start()
        gate.set()
        return await _collect(q)

    _, event = asyncio.run(main())
    assert event.finish_reason == "abort" and "shutting down" in event.error


def test_predictor_thread_batches_and_keeps_command_order(model):
    loop = make_loop(model, policy="s3")
    predictor = FakePredictor(bucket=3)
    metrics = ServerMetrics(lambda: loop.snapshot, policy="s3")
    controller = AdmissionController(predictor, loop, max_batch_size=8, metrics=metrics)
    entered, gate = threading.Event(), threading.Event()
    predictor_calls = []
    predict = predictor.predict

    def slow_predict(prompts):
        predictor_calls.append(len(prompts))
        entered.set()
        gate.wait(10)
        return predict(prompts)

    predictor.predict = slow_predict
    controller.start()

    async def main():
        first = await _add(controller, "first", PROMPTS[0], bucket=None)
        await asyncio.to_thread(entered.wait, 10)  # the thread is busy with "first": the rest queue up
        rest = [await _add(controller, f"r{i}", PROMPTS[i % 3], bucket=None) for i in range(5)]
        controller.submit(Abort("r0"))  # must not overtake r0's Add
        gate.set()
        return await asyncio.gather(*[_collect(q) for q in [first, *rest[1:]]])

    results = asyncio.run(main())
    assert predictor_calls == [1, 5]
    assert all(event.finish_reason == "length" and len(tokens) == 24 for tokens, event in results)
    _pool_is_whole(loop)
    assert loop.snapshot.stats.num_mispredictions == 0  # bucket 3 covers 24 tokens
    controller.stop()
    loop.stop()


def test_a_failing_predictor_admits_at_the_worst_case(model):
    loop = make_loop(model, policy="s3")
    metrics = ServerMetrics(lambda: loop.snapshot, policy="s3")
    broken = FakePredictor()
    broken.predict = lambda prompts: 1 / 0
    controller = AdmissionController(broken, loop, metrics=metrics)
    controller.start()

    async def main():
        return await _collect(await _add(controller, "a", PROMPTS[0], bucket=None))

    tokens, event = asyncio.run(main())
    assert len(tokens) == 24 and event.finish_reason == "length"
    assert loop.snapshot.stats.num_mispredictions == 0 and b"s3_predictor_errors_total 1.0" in metrics.render()
    controller.stop()
    loop.stop()


def test_the_engine_thread_classifies_new_requests_between_steps_in_batches(model):
    """A CPU server: no predictor thread; the engine loop classifies what arrived since its last step, at most
    max_batch_size prompts between two steps (a burst does not stall the running answers for all of its
    classification), never while a step runs, and keeps the commands' order."""
    predictor = FakePredictor(bucket=3)
    predict, calls, stepping = predictor.predict, [], threading.Event()

    def predict_between_steps(prompts):
        assert not stepping.is_set()
        calls.append(len(prompts))
        return predict(prompts)

    predictor.predict = predict_between_steps
    metrics = ServerMetrics(lambda: loop.snapshot, policy="s3")
    loop = make_loop(model, policy="s3", classify=Classifier(predictor, metrics, max_batch_size=4), max_classified=4)
    step = loop.engine.step

    def watched_step():
        stepping.set()
        calls.append("step")
        try:
            return step()
        finally:
            stepping.clear()

    loop.engine.step = watched_step
    entered, gate = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        return gate.wait(10)

    async def main():
        loop.call(hold)  # hold the loop: the next six arrive together
        # Once it holds (else the loop could take the first arrivals in the same turn as the call, and classify
        # them apart from the rest)
        await asyncio.to_thread(entered.wait, 10)
        queues = [await _add(loop, f"r{i}", PROMPTS[i % 3], bucket=None) for i in range(6)]
        loop.submit(Abort("r0"))  # must not overtake r0's Add
        classified = await _add(loop, "given", PROMPTS[0], bucket=3)  # arrives classified: not classified again
        gate.set()
        return await asyncio.gather(*[_collect(q) for q in [*queues[1:], classified]])

    results = asyncio.run(main())
    assert [c for c in calls if c != "step"] == [4, 2] and calls[:3] == [4, "step", 2]
    assert all(event.finish_reason == "length" and len(tokens) == 24 for tokens, event in results)
    assert loop.snapshot.stats.num_mispredictions == 0  # bucket 3 covers 24 tokens: every request had it
    assert b"s3_predictor_batch_size_count 2.0" in metrics.render()
    _pool_is_whole(loop)
    loop.stop()


@pytest.mark.parametrize("predictor_thread", [None, True, False])
def test_a_cpu_server_classifies_in_the_engine_thread_unless_told_otherwise(tmp_path, model, predictor_thread):
    config = serve_config(tmp_path, predictor_thread=predictor_thread)
    stack = build_stack(config, model=model, tokenizer=CharTokenizer(), predictor=FakePredictor(bucket=3))
    threaded = predictor_thread is True
    assert (stack.controller is not None) is threaded
    assert (stack.engine_loop.classify is not None) is not threaded


def test_the_classifier_counts_unfamiliar_prompts_in_the_metrics():
    """A predictor that scores familiarity (predictor_train/familiarity.py) feeds /metrics: every scored prompt in
    s3_prompt_familiarity, those below its threshold in s3_unfamiliar_prompts."""

    class Familiar(FakePredictor):
        def predict(self, prompts):
            return [dataclasses.replace(p, familiarity=score, unfamiliar=score < 0.5)
                    for p, score in zip(super().predict(prompts), (0.9, 0.3, 0.8))]

    metrics = ServerMetrics(EngineSnapshot, policy="s3")  # an idle engine's snapshot
    predictions = Classifier(Familiar(), metrics)(["a", "b", "c"])
    assert [p.unfamiliar for p in predictions] == [False, True, False]
    value = metrics.registry.get_sample_value
    assert (value("s3_prompt_familiarity_count"), value("s3_unfamiliar_prompts_total")) == (3.0, 1.0)
    Classifier(FakePredictor(), metrics)(["d"])  # a predictor that cannot tell counts in neither
    assert (value("s3_prompt_familiarity_count"), value("s3_unfamiliar_prompts_total")) == (3.0, 1.0)
