"""The engine thread: the only code that touches the LLMEngine and its scheduler, so their state needs no locks.

Recipe of one turn of the loop:
1. take every queued command (block on the queue when there is no work);
2. apply them in order: add requests (with their length prediction, made here where the loop classifies new
   requests itself, see `serve.server.admission`: at most ``max_classified`` a turn, the commands after them left
   for the next turns, so that a burst of arrivals does not stall the running answers for its whole
   classification), abort requests, run inspections;
3. if any request is waiting or running, run one `engine.step()`;
4. hand each request's new tokens to its asyncio queue, one `loop.call_soon_threadsafe` per event loop;
5. publish a snapshot of the engine's state (queue depth, KV blocks, counters) for /metrics and admission.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from typing import Any, Callable, Sequence

from serve.engine.llm import LLMEngine
from serve.engine.plan import SamplingParams
from core.request import LengthPrediction, Request, TokenLogprobs
from serve.sched_output import SchedulerSnapshot

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sink:
    """Where a request's events go: an asyncio queue and the event loop that owns it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New output tokens of one request; the last event of a request carries its finish reason or an error."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    """stop, length or abort; None while the request runs."""
    error: str | None = None
    """Set when the engine could not take or finish the request (the finish reason is then abort)."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per token when the request asked for log-probabilities (SamplingParams.logprobs)."""
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    """On a request's first event with tokens, when it asked for them: one per prompt token after the first."""
    num_cached_tokens: int = 0
    """On a request's first event with tokens: its prompt tokens found in the prefix cache."""

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Add:
    """Queue a request; ``prediction`` is filled in by the predictor thread on its way here, or by the engine
    loop itself (`EngineLoop.classify`)."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    prompt: str
    """Prompt text as the length predictor reads it; also kept in misprediction feedback."""
    sink: Sink
    prediction: LengthPrediction | None = None
    feedback: bool = True
    """Whether the feedback store may record the request: False when its client decided where it ends (its length
    is no label), and for a greedy request's choices after the first (the same answer, one record ``n`` times)."""
    priority: int = 0
    """Lower goes first (`core.request.Request.priority`)."""
    cache_salt: str | None = None
    """Only requests with the same salt share cached prompt blocks (`core.request.Request.cache_salt`)."""


@dataclasses.dataclass(frozen=True)
class Abort:
    """End a request and free its KV blocks (client gone, or a stop string found on the asyncio side)."""

    request_id: str
    stopped_at: int | None = None
    """Output tokens at the stop string, when a stop string ended it: feedback then records that length."""


@dataclasses.dataclass(frozen=True)
class Call:
    """Run ``fn(engine)`` in the engine thread between steps (tests, debugging); the result goes to ``future``."""

    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


_SHUTDOWN = object()


@dataclasses.dataclass(frozen=True)
class EngineSnapshot(SchedulerSnapshot):
    """The scheduler's state after a turn of the loop, read by other threads without touching the scheduler,
    and whether the engine thread still runs."""

    alive: bool = True
    num_feedback_records: int = 0
    """Records the feedback store wrote (0 without one)."""
    num_feedback_lost: int = 0
    """Records a failed feedback write lost (a full disk, the folder removed): serving goes on without them."""


class EngineDead(RuntimeError):
    """The engine thread stopped (shutdown or a crash); no request can be served."""


def classified(commands: list, classify: Callable[[list[str]], Sequence[LengthPrediction | None]]) -> list:
    """``commands`` in the same order, each request added without a prediction given one, all of them classified
    in one call (the predictor thread's batch, or what the engine loop took between two steps)."""
    unclassified = [i for i, c in enumerate(commands) if isinstance(c, Add) and c.prediction is None]
    if not unclassified:
        return commands
    commands = list(commands)
    for i, prediction in zip(unclassified, classify([commands[i].prompt for i in unclassified])):
        commands[i] = dataclasses.replace(commands[i], prediction=prediction)
    return commands


class EngineLoop:
    """Owns an LLMEngine in a thread; other threads send it commands through `submit`."""

    def __init__(self, engine: LLMEngine, *, feedback=None, outcomes=None, keepalive_s: float = 60.0,
                 classify: Callable[[list[str]], Sequence[LengthPrediction | None]] | None = None,
                 max_classified: int = 32) -> None:
        self.engine = engine
        self.feedback = feedback  # serve.feedback.FeedbackLog or None
        self.outcomes = outcomes  # serve.outcomes.PredictionOutcomes or None: the predictor's live accuracy
        self.keepalive_s = keepalive_s
        self.classify = classify
        """Predicts the length of the requests added without a prediction, between steps (a CPU server's
        `admission.Classifier`); None where they arrive classified or need no prediction."""
        self.max_classified = max_classified
        """Most requests ``classify`` reads in one turn, between two steps (the predictor's batch size)."""
        self.snapshot = EngineSnapshot(num_kv_blocks=engine.scheduler.pool.num_blocks)
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit's check and put happen before, or after, the final drain
        self._sinks: dict[str, Sink] = {}
        self._num_sent: dict[str, int] = {}
        self._unrecorded: set[str] = set()  # requests the feedback store must not record (Add.feedback)
        self._taken: list = []  # the commands of the current turn; those from _next on are not applied yet (a crash
        self._next = 0  # answers them; those past the turn's max_classified are the next turn's first)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- other threads ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, command: Add | Abort | Call) -> None:
        """Thread-safe; raises EngineDead once the loop has stopped."""
        with self._lock:
            if not self.snapshot.alive:
                raise EngineDead(f"the engine has stopped: {self.error or 'shut down'}")
            self._commands.put(command)

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` in the engine thread between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.submit(Call(fn, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the thread and (tensor parallel) release the other ranks."""
        if self._thread.is_alive():
            self._commands.put(_SHUTDOWN)
            self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # a bug or an out-of-memory: fail every request rather than hang them
            log.exception("the engine loop crashed")
            self.error = exc
            self._end_all(f"the engine failed: {exc!r}")
            _refuse(self._taken[self._next:], f"the engine failed: {exc!r}")  # taken, never applied
        finally:
            with self._lock:  # nothing runs or waits any more: the gauges say so, the totals stay
                self.snapshot = dataclasses.replace(self.snapshot, alive=False, num_running=0, num_waiting=0,
                                                    num_kv_blocks_held=0, num_kv_blocks_used=0)
            self._drain_after_stop()
            if self.feedback is not None:
                self.feedback.close()
            if self.error is None:
                self.engine.shutdown()  # tensor parallel: the other ranks leave engine.follow()

    def _turn(self) -> bool:
        """One turn of the loop (see the module docstring); False when told to shut down."""
        busy = self.engine.has_unfinished() or self._next < len(self._taken)  # or commands were left for this turn
        commands = self._taken = self._take_commands(block=not busy)
        self._next = 0
        end = len(commands)
        if self.classify is not None:
            end = _classified_end(commands, self.max_classified)
            commands = self._taken = classified(commands[:end], self.classify) + commands[end:]
        for i, command in enumerate(commands[:end]):
            self._next = i + 1
            if command is _SHUTDOWN:
                self._end_all(None)
                _refuse(commands[i + 1:])  # taken with the shutdown, this turn's or left for later: as if still queued
                return False
            self._apply(command)
        if self.engine.has_unfinished():
            self._step()
        self._publish()
        return True

    def _take_commands(self, *, block: bool) -> list:
        commands = self._taken[self._next:]  # left by the last turn, past its max_classified
        if block:
            if self.feedback is not None:
                self.feedback.sync()  # idle: make what was written durable
            try:
                commands.append(self._commands.get(timeout=self.keepalive_s))
            except queue.Empty:
                self._keepalive()
                return []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _keepalive(self) -> None:
        """Tensor parallel: an empty step, so the other ranks' collective does not time out while idle."""
        if self.engine.config.tensor_parallel > 1:
            self.engine.step()

    def _apply(self, command: Add | Abort | Call) -> None:
        if isinstance(command, Add):
            self._add(command)
        elif isinstance(command, Abort):
            self._abort(command)
        elif command.future.set_running_or_notify_cancel():  # not cancelled by its caller while it waited
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as exc:
                command.future.set_exception(exc)

    def _add(self, cmd: Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, max_new_tokens=cmd.max_new_tokens,
                                    sampling=cmd.sampling, prediction=cmd.prediction, prompt=cmd.prompt,
                                    priority=cmd.priority, cache_salt=cmd.cache_salt)
        except ValueError as exc:  # the HTTP side checks limits first; this is the last line of defence
            send_error(cmd.sink, str(exc))
            return
        except Exception as exc:  # a bug in taking one request fails that request, not the engine and all others
            log.exception("could not add request %s", cmd.request_id)
            send_error(cmd.sink, f"the engine could not take the request: {exc!r}")
            return
        self._sinks[cmd.request_id] = cmd.sink
        self._num_sent[cmd.request_id] = 0
        if not cmd.feedback:
            self._unrecorded.add(cmd.request_id)

    def _abort(self, cmd: Abort) -> None:
        request = self.engine.abort(cmd.request_id, stopped=cmd.stopped_at is not None)
        if request is not None and cmd.stopped_at is not None:
            self._record(request, stopped_at=cmd.stopped_at)
        self._forget(cmd.request_id)

    def _step(self) -> None:
        finished = self.engine.step()
        events: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for completion in finished:
            request = completion.request
            self._emit(events, request, completion.finish_reason)
            self._record(request)
            self._forget(request.request_id)
        for request in self.engine.scheduler.running:
            self._emit(events, request, None)
        _deliver(events)

    def _emit(self, events: dict, request: Request, finish_reason: str | None) -> None:
        sink = self._sinks.get(request.request_id)
        if sink is None:
            return
        sent = self._num_sent[request.request_id]
        new = tuple(request.output_token_ids[sent:])
        if new or finish_reason is not None:
            self._num_sent[request.request_id] = sent + len(new)
            logprobs = tuple(request.output_logprobs[sent:])
            first = sent == 0 and bool(new)
            prompt = tuple(request.prompt_logprobs) if first else ()
            events[sink.loop].append((sink.queue, TokenEvent(
                new, finish_reason, logprobs=logprobs, prompt_logprobs=prompt,
                num_cached_tokens=request.num_cached_tokens if first else 0)))

    def _record(self, request: Request, *, stopped_at: int | None = None) -> None:
        if request.request_id in self._unrecorded:
            return
        if self.feedback is not None:
            self.feedback.record(request, stopped_at=stopped_at)
        if self.outcomes is not None and stopped_at is None:  # cut by a client's stop string: its length is no label
            self.outcomes.observe(request)

    def _forget(self, request_id: str) -> None:
        self._unrecorded.discard(request_id)
        self._sinks.pop(request_id, None)
        self._num_sent.pop(request_id, None)
        self.engine.scheduler.forget(request_id)

    def _end_all(self, error: str | None) -> None:
        """Abort every live request (shutdown or crash) and tell its client."""
        events: dict = collections.defaultdict(list)
        for request_id, sink in list(self._sinks.items()):
            events[sink.loop].append((sink.queue, TokenEvent((), "abort", error or "the server is shutting down")))
            if self.error is None:
                self.engine.abort(request_id)
            self._forget(request_id)
        _deliver(events)

    def _drain_after_stop(self) -> None:
        """Commands that arrived while stopping: their clients learn the engine is gone."""
        while True:
            try:
                _refuse([self._commands.get_nowait()])
            except queue.Empty:
                return

    def _publish(self) -> None:
        feedback = {} if self.feedback is None else {"num_feedback_records": self.feedback.num_written,
                                                     "num_feedback_lost": self.feedback.num_lost}
        self.snapshot = EngineSnapshot(**vars(self.engine.snapshot()), **feedback)


def _classified_end(commands: list, max_classified: int) -> int:
    """Where this turn's ``commands`` end: before the first request to classify past ``max_classified``."""
    unclassified = [i for i, c in enumerate(commands) if isinstance(c, Add) and c.prediction is None]
    return unclassified[max_classified] if len(unclassified) > max_classified else len(commands)


def _refuse(commands: list, message: str = "the server is shutting down") -> None:
    """Answer commands the stopped engine will never run: requests get an error, calls an exception."""
    for command in commands:
        if isinstance(command, Add):
            send_error(command.sink, message)
        elif isinstance(command, Call) and command.future.set_running_or_notify_cancel():
            command.future.set_exception(EngineDead("the engine has stopped"))


def send_error(sink: Sink, message: str) -> None:
    """End a request that the engine never took, with an error its client will see."""
    _deliver({sink.loop: [(sink.queue, TokenEvent((), "abort", message))]})


def _deliver(events: dict[asyncio.AbstractEventLoop, list]) -> None:
    """One wake-up per event loop for all of this step's events, instead of one per request."""
    for loop, items in events.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop has closed: its clients are gone
            pass


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for q, event in items:
        q.put_nowait(event)
