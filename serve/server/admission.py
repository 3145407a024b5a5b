"""The length predictor in the admission path, and the feedback it learns from.

Where the predictor runs. On a GPU, in its own thread between the HTTP handlers and the engine thread
(`AdmissionController`): new requests queue up while a batch is being classified and form the next batch (up to
``max_batch_size``), so batches grow with load without a fixed wait, and a classifier pass overlaps the decode
step (torch releases the GIL) instead of lengthening it. Aborts travel the same path, so an abort can never
overtake the request it cancels. On a CPU, in the engine thread, between two steps (`EngineLoop`'s
``classify``): torch computations issued from two threads slow each other on shared cores even when they take
turns (at 2 torch threads, one 9 ms prediction every 0.5 s made SmolLM2's 100-130 ms decode steps 17-38% longer
from a thread of its own, at the same time or taking turns, and 1-7% from the engine thread;
`benchmarks/predictor_contention.py`). Either way the engine only ever schedules requests that carry their
prediction.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Sequence

from core.buckets import BucketSpec
from core.predictors import OraclePredictor, Predictor
from core.request import LengthPrediction
from serve.policies import policy_needs
from serve.policy_config import POLICY_NAMES, PolicyConfig, with_length_profile
from serve.server.config import ServeConfig
from serve.server.engine_loop import Abort, Add, EngineDead, EngineLoop, classified, send_error

log = logging.getLogger(__name__)


class ServeSetupError(ValueError):
    """The server cannot start as configured; the message says what to change."""


TablePredictor = OraclePredictor  # its former name here (tests/server import it)


@dataclasses.dataclass(frozen=True)
class Admission:
    """How the server admits requests: the policy that will run and the predictor it uses (if any)."""

    policy: PolicyConfig
    predictor: Predictor | None
    note: str | None = None
    """Why the configured policy was replaced by the fallback, for the startup log."""

    @property
    def buckets(self) -> BucketSpec | None:
        return self.predictor.buckets if self.predictor is not None else None


CheckpointLoader = Callable[[str], Predictor]
"""Loads a trained predictor checkpoint folder (`predictor_train`'s `LengthPredictor.load`). `serve` never imports
the training package: the entry point (`s3 serve`, the load benchmark) hands the loader in."""


def resolve_admission(config: ServeConfig, predictor: Predictor | None = None, *,
                      load_checkpoint: CheckpointLoader | None = None) -> Admission:
    """The policy to serve with, and its predictor: what the registry says the policy needs (`policy_needs`).
    A policy that needs buckets gets the checkpoint (or the oracle_lengths table); without one, the fallback
    policy or an error. A policy that needs exact lengths gets only the oracle_lengths table."""
    policy = config.engine.policy
    need = policy_needs(policy.policy)
    if need == "none":
        return Admission(policy, None)
    if predictor is None:
        try:
            predictor = load_predictor(config, load_checkpoint)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return _fallback(config, str(exc))
    if need == "exact" and not isinstance(predictor, OraclePredictor):
        raise ServeSetupError(f"the {policy.policy} policy needs exact lengths: give oracle_lengths, or use a policy "
                              f"that needs a bucket predictor ({', '.join(_needing('buckets'))})")
    return Admission(with_length_profile(policy, predictor), predictor)


def _needing(need: str) -> list[str]:
    return [name for name in POLICY_NAMES if policy_needs(name) == need]


def load_predictor(config: ServeConfig, load_checkpoint: CheckpointLoader | None = None) -> Predictor:
    if config.oracle_lengths:
        return OraclePredictor.from_file(config.oracle_lengths, BucketSpec.uniform(config.max_new_tokens,
                                                                                   config.num_buckets))
    if not config.predictor:
        raise FileNotFoundError("no predictor checkpoint was given")
    if load_checkpoint is None:
        raise ValueError(f"cannot load the predictor checkpoint {config.predictor}: this entry point gave no "
                         "checkpoint loader (`s3 serve` does)")
    return load_checkpoint(config.predictor)


def _fallback(config: ServeConfig, reason: str) -> Admission:
    if config.fallback_policy is None:
        raise ServeSetupError(
            f"the {config.policy} policy needs a length predictor and none could be loaded ({reason}). Train one "
            "with `s3 train` and pass --predictor FOLDER, or add --fallback-policy max|paged to serve without one, "
            f"or choose a policy that needs none ({', '.join(_needing('none'))})."
        )
    policy = dataclasses.replace(config.engine.policy, policy=config.fallback_policy)
    return Admission(policy, None, note=f"no usable predictor ({reason}); serving with --fallback-policy "
                                       f"{config.fallback_policy}")


def check_target_model(predictor: Predictor, model_id: str) -> None:
    """A checkpoint that learned another model's lengths would mispredict everything: refuse it."""
    trained_on = getattr(predictor, "target_model", None)
    if trained_on is not None and trained_on != model_id:
        raise ServeSetupError(
            f"predictor checkpoint {predictor.checkpoint_id} learned the output lengths of {trained_on!r}, but "
            f"this server runs {model_id!r}; train a predictor on data generated with this model, or pass "
            "--set check_target_model=false to use it anyway"
        )


def default_frequency_penalty(config: ServeConfig, predictor: Predictor | None) -> float:
    """As configured, else as the predictor's labels were generated (its checkpoint's decoding), else 0."""
    if config.default_frequency_penalty is not None:
        return config.default_frequency_penalty
    decoding = getattr(predictor, "decoding", None) or {}
    return float(decoding.get("frequency_penalty", 0.0))


_STOP = object()


class Classifier:
    """The predictor over prompts, each distinct prompt once, in batches of at most ``max_batch_size``:
    predictions, or None for each prompt of a batch the predictor fails on (the request is then admitted with the
    worst-case reservation, as S3Policy does for a missing prediction, instead of failing); timed in the server's
    metrics."""

    def __init__(self, predictor: Predictor, metrics=None, *, max_batch_size: int = 32) -> None:
        self.predictor = predictor
        self.metrics = metrics  # serve.server.metrics.ServerMetrics or None
        self.max_batch_size = max_batch_size

    def __call__(self, prompts: list[str]) -> list[LengthPrediction | None]:
        # A prompt that comes more than once (the n choices of one request, a repeated prompt) is predicted once.
        unique, found = list(dict.fromkeys(prompts)), {}
        for i in range(0, len(unique), self.max_batch_size):
            batch = unique[i:i + self.max_batch_size]
            found.update(zip(batch, self._batch(batch)))
        predictions = [found[prompt] for prompt in prompts]
        if self.metrics is not None:
            self.metrics.observe_predictions(predictions)  # per request, repeats included
        return predictions

    def _batch(self, prompts: list[str]) -> Sequence[LengthPrediction | None]:
        start = time.perf_counter()
        try:
            predictions = list(self.predictor.predict(prompts))
            assert len(predictions) == len(prompts), (len(predictions), len(prompts))
        except Exception:
            log.exception("the length predictor failed on a batch of %d prompts", len(prompts))
            if self.metrics is not None:
                self.metrics.predictor_errors.inc()
            return [None] * len(prompts)
        if self.metrics is not None:
            self.metrics.predictor_batch_seconds.observe(time.perf_counter() - start)
            self.metrics.predictor_batch_size.observe(len(prompts))
        return predictions


class AdmissionController:
    """The predictor thread: classifies new requests in batches and forwards every command, in order, to the
    engine loop. Once stopped, every request still queued here, or submitted later, is answered with an error
    instead of being left waiting."""

    def __init__(self, predictor: Predictor, engine_loop: EngineLoop, *, max_batch_size: int = 32,
                 metrics=None) -> None:
        self.classify = Classifier(predictor, metrics, max_batch_size=max_batch_size)
        self.engine_loop = engine_loop
        self.max_batch_size = max_batch_size
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit's check and put happen before, or after, the stop's drain
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="length-predictor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, command: Add | Abort) -> None:
        """Thread-safe; raises EngineDead once this thread or the engine loop has stopped."""
        with self._lock:
            if self._stopped:
                raise EngineDead("the server is shutting down")
            if not self.engine_loop.snapshot.alive:
                raise EngineDead(f"the engine has stopped: {self.engine_loop.error or 'shut down'}")
            self._commands.put(command)

    def stop(self, timeout: float = 30.0) -> None:
        """Forward what came before the stop, answer the rest with an error, and end the thread."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)
        else:
            self._close([])

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if _STOP in batch:
                cut = batch.index(_STOP)
                self._forward(batch[:cut])
                self._close(batch[cut + 1:])
                return
            self._forward(batch)

    def _forward(self, batch: list) -> None:
        for command in classified(batch, self.classify):
            try:
                self.engine_loop.submit(command)
            except EngineDead as exc:  # tell the client instead of leaving it waiting
                if isinstance(command, Add):
                    send_error(command.sink, str(exc))

    def _close(self, rest: list) -> None:
        """Stop taking commands, then answer every request left behind (``rest`` and the queue)."""
        with self._lock:
            self._stopped = True
        while True:
            try:
                rest.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in rest:
            if isinstance(command, Add):
                send_error(command.sink, "the server is shutting down")

    def _take_batch(self) -> list:
        batch = [self._commands.get()]
        num_adds = isinstance(batch[0], Add)
        while num_adds < self.max_batch_size:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            batch.append(command)
            num_adds += isinstance(command, Add)
        return batch
