"""Build and run a server: `serve_main(config)` is what `s3 serve` calls.

Under tensor parallelism every rank runs `serve_main` (launched by `deepspeed`); rank 0 loads the predictor,
serves HTTP and runs the engine loop, which sends each step's plan to the other ranks; they only execute it
(`LLMEngine.follow`) until rank 0 shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from core.distributed import world_size
from serve.engine.llm import LLMEngine
from serve.feedback import FeedbackLog, FeedbackWriter
from serve.outcomes import PredictionOutcomes
from serve.policy_config import PolicyConfig
from serve.server.admission import (
    Admission, AdmissionController, CheckpointLoader, Classifier, Predictor, check_target_model,
    ServeSetupError, default_frequency_penalty, resolve_admission,
)  # fmt: skip
from serve.server.app import create_app
from serve.server.async_engine import AsyncEngine
from serve.server.config import ServeConfig, is_loopback
from serve.server.engine_loop import EngineLoop
from serve.server.metrics import ServerMetrics
from serve.server.reload import ReloadError, reload_predictor
from serve.server.state import ServerState
from serve.server.stats_log import StatsLogger
from serve.server.bodies import fingerprint

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServingStack:
    """The long-lived parts of one server, started and stopped together."""

    engine: LLMEngine
    engine_loop: EngineLoop
    controller: AdmissionController | None
    admission: Admission
    state: ServerState
    app: FastAPI
    config: ServeConfig
    load_checkpoint: CheckpointLoader | None = None
    """What loaded the predictor, to load it again (`serve.server.reload`)."""
    classifier: Classifier | None = None
    """The predictor over prompts (in the engine thread or the controller's), whose predictor a reload swaps."""

    def start(self) -> None:
        self.engine_loop.start()
        if self.controller is not None:
            self.controller.start()

    def stop(self) -> None:
        """Stop taking requests, abort what is left, flush feedback, release tensor-parallel ranks."""
        if self.controller is not None:
            self.controller.stop()
        self.engine_loop.stop()


def build_stack(config: ServeConfig, *, model=None, tokenizer=None, predictor: Predictor | None = None,
                load_checkpoint: CheckpointLoader | None = None) -> ServingStack:
    """Load (or take) the model and the predictor and wire the server together; nothing runs until `start`."""
    admission = resolve_admission(config, predictor, load_checkpoint=load_checkpoint)
    span = admission.predictor.buckets.max_tokens if admission.predictor is not None else config.max_new_tokens
    if span != config.max_new_tokens:  # a short cap can be the operator's wish (a quick check, a cost limit)
        log.warning(
            "the length predictor %s predicts lengths up to %d tokens, but this server caps answers at "
            "max_new_tokens %d: %s; serve with --set max_new_tokens=%d to schedule and score as it learned",
            getattr(admission.predictor, "checkpoint_id", ""), span, config.max_new_tokens,
            "only the answers that end of themselves under the cap are scored and recorded (short ones)"
            if config.max_new_tokens < span else "answers past its longest bucket are all scored in its top one",
            span)
    engine_config = dataclasses.replace(config.engine, policy=admission.policy)
    engine = LLMEngine(engine_config, model=model, tokenizer=tokenizer, buckets=admission.buckets)
    if admission.predictor is not None and config.check_target_model:
        check_target_model(admission.predictor, engine.model_id)
    stack = assemble(config, engine, admission)
    stack.load_checkpoint = load_checkpoint
    return stack


def assemble(config: ServeConfig, engine: LLMEngine, admission: Admission) -> ServingStack:
    predictor = admission.predictor
    checkpoint_id = getattr(predictor, "checkpoint_id", None)
    feedback = None
    if config.feedback_dir and predictor is not None:
        try:
            writer = FeedbackWriter(config.feedback_dir, sync_every=config.feedback_sync_every)
        except OSError as exc:
            raise ServeSetupError(f"cannot write feedback records to feedback_dir {config.feedback_dir} "
                                  f"({exc.strerror}); set it to a writable folder, or to null to record none") from exc
        feedback = FeedbackLog(writer, predictor.buckets, checkpoint_id, sample_rate=config.feedback_sample_rate)
    outcomes = None
    if predictor is not None:
        outcomes = PredictionOutcomes(predictor.buckets, getattr(predictor, "expected_within_one", None), checkpoint_id)
    metrics = ServerMetrics(lambda: engine_loop.snapshot, policy=admission.policy.policy, checkpoint_id=checkpoint_id,
                            outcomes=outcomes)
    threaded = config.predictor_thread
    if threaded is None:
        threaded = torch.device(engine.config.device).type != "cpu"
    classify = None
    if predictor is not None and not threaded:
        classify = Classifier(predictor, metrics, max_batch_size=config.predictor_batch_size)
    engine_loop = EngineLoop(engine, feedback=feedback, outcomes=outcomes, classify=classify,
                             max_classified=config.predictor_batch_size)
    controller = None
    if predictor is not None and threaded:
        controller = AdmissionController(predictor, engine_loop, max_batch_size=config.predictor_batch_size,
                                         metrics=metrics)
    async_engine = AsyncEngine(engine_loop, ingress=controller or engine_loop, tokenizer=engine.tokenizer,
                               metrics=metrics, max_waiting_requests=config.max_waiting_requests,
                               max_num_seqs=engine.config.max_num_seqs, retry_after_s=config.retry_after_s,
                               eos_token_ids=frozenset(engine.eos_token_ids))
    state = ServerState(
        engine=async_engine, metrics=metrics, tokenizer=engine.tokenizer, model_name=served_model_name(config),
        max_model_len=engine.max_model_len, kv_capacity_tokens=engine.scheduler.pool.capacity_tokens,
        vocab_size=int(engine.runner.hf_model.config.vocab_size), max_new_tokens=config.max_new_tokens,
        api_key=config.resolved_api_key(), max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s, default_frequency_penalty=default_frequency_penalty(config, predictor),
        system_fingerprint=fingerprint(engine.model_id, admission.policy.policy, checkpoint_id),
        prefix_caching=engine.config.enable_prefix_caching, grammars=engine.grammars,
        priority_scheduling=config.priority_scheduling, allowed_origins=config.allowed_origins,
        label_decoding=getattr(predictor, "decoding", None),
    )  # fmt: skip
    return ServingStack(engine, engine_loop, controller, admission, state, create_app(state), config,
                        classifier=controller.classify if controller is not None else classify)


def served_model_name(config: ServeConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    model = config.engine.model
    return model if model == "smollm2" else Path(model).name.removesuffix(".gguf")


def serve_main(config: ServeConfig, load_checkpoint: CheckpointLoader | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (rank 0), or follow rank 0's steps (other tensor-parallel ranks).
    ``load_checkpoint`` loads ``config.predictor`` (see `CheckpointLoader`)."""
    configure_process(config)
    if hasattr(signal, "SIGHUP"):  # a reload asked before the server runs (or of a follower rank) kills nothing
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rank = int(os.environ.get("RANK", "0"))
    ranks = world_size()
    if ranks > 1 and ranks != config.engine.tensor_parallel:  # before any rank loads or binds anything
        raise ServeSetupError(f"launched as {ranks} processes (WORLD_SIZE) but tensor_parallel is "
                              f"{config.engine.tensor_parallel}: pass --tensor-parallel {ranks}, or launch "
                              f"{config.engine.tensor_parallel} processes")
    if config.engine.tensor_parallel > 1 and rank != 0:
        _follow(config)  # binds nothing; rank 0's refusal below ends the launch (the launcher stops every rank)
        return
    config.check_exposure()  # before minutes of loading a model
    config.check_tls()
    listener = bind_port(config.host, config.port)
    stack = build_stack(config, load_checkpoint=load_checkpoint)
    _log_startup(config, stack)
    server = DrainingServer(_uvicorn_config(stack.app, config.host, config.port, config.log_level, config.keep_alive_s,
                                            tls=config.tls), stack, exit_on_engine_failure=True)
    stack.start()
    stats = None
    if config.log_stats_interval_s > 0:
        stats = StatsLogger(lambda: stack.engine_loop.snapshot, interval_s=config.log_stats_interval_s,
                            outcomes=stack.engine_loop.outcomes).start()
    try:
        with _signals_end_the_run(), _sighup_reloads(stack):
            server.run(sockets=[listener])
    except _Stopped:
        pass
    finally:
        if stats is not None:
            stats.stop()
        stack.stop()
        listener.close()
    if stack.engine_loop.outcomes is not None:
        log.info("the predictor on this run's traffic: %s", stack.engine_loop.outcomes.summary())
    if server.engine_failed:
        raise EngineFailed(f"the engine failed: {stack.engine_loop.error!r}")
    log.info("stopped")


def bind_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound now, before the model loads: a port in use is an error at once, not after the
    loading (uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ServeSetupError(f"cannot listen on {host}:{port} ({exc.strerror}): another process holds the port, or "
                              "the address is not this machine's; pass another --port or --host") from exc
    return listener


def configure_process(config: ServeConfig) -> None:
    """Logging, and torch's threads: a core is left for the HTTP side unless ``torch_threads`` says otherwise."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(config.torch_threads or max(1, _num_cores() - 1))


class EngineFailed(RuntimeError):
    """The engine thread crashed; the server shut down (`s3 serve` exits non-zero)."""


class _Stopped(Exception):
    """SIGINT or SIGTERM after uvicorn's graceful shutdown."""


@contextlib.contextmanager
def _signals_end_the_run():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it found:
    with Python's default handlers that kills the process (SIGTERM) or prints a traceback (SIGINT) before the
    engine is stopped and the feedback flushed. These handlers raise _Stopped instead, so cleanup runs."""
    def stop(signum, frame):
        raise _Stopped()

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _sighup_reloads(stack: ServingStack):
    """SIGHUP loads the predictor checkpoint again and serves with it (`serve.server.reload`), in a thread of its
    own: loading takes seconds, and a signal handler must return at once."""
    busy = threading.Lock()

    def reload() -> None:
        try:
            reload_predictor(stack)
        except ReloadError as exc:
            log.error("predictor not reloaded: %s", exc)
        except Exception:
            log.exception("predictor not reloaded")
        finally:
            busy.release()

    def on_sighup(signum, frame) -> None:
        if not busy.acquire(blocking=False):
            log.warning("SIGHUP: a predictor reload is already under way; this one is ignored")
            return
        log.info("SIGHUP: loading the predictor checkpoint again")
        threading.Thread(target=reload, name="predictor-reload", daemon=True).start()

    if not hasattr(signal, "SIGHUP"):  # Windows
        yield
        return
    before = signal.signal(signal.SIGHUP, on_sighup)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


def _num_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _follow(config: ServeConfig) -> None:
    """A tensor-parallel rank other than 0: hold a shard of the model and run rank 0's plans until rank 0 shuts
    down. SIGINT/SIGTERM are ignored here: the deepspeed launcher sends them to every rank at once, and a rank
    that died first would leave rank 0's shutdown broadcast hanging (the launcher SIGKILLs stragglers after 30 s).
    SIGHUP (a predictor reload, `serve_main`) is ignored too: rank 0 alone predicts.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # The scheduler of this rank is never used; a policy without a predictor keeps its construction simple.
    engine = LLMEngine(dataclasses.replace(config.engine, policy=PolicyConfig(policy="max")))
    engine.follow()


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str, keep_alive_s: float, *,
                    tls: tuple[str, str] | None = None) -> uvicorn.Config:
    """``tls``: (certificate file, key file) to speak HTTPS."""
    certfile, keyfile = tls or (None, None)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=keep_alive_s,
                          access_log=log_level == "debug", ssl_certfile=certfile, ssl_keyfile=keyfile)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGINT/SIGTERM, or ``should_exit``) lets the requests running or queued
    finish for ``shutdown_timeout_s`` and then stops the serving stack, so that each one still left ends with its
    error (a 503, or a stream's error event and ``[DONE]``). uvicorn alone would cancel their handlers at the end of
    its graceful window, before the engine stops: a bare 500, or a stream closed without its last chunk."""

    ANSWER_S = 5.0
    """After the stack stops, how long the handlers have to send their errors before uvicorn cancels them."""
    LAUNCHER_DRAIN_S = 20.0
    """The longest drain under tensor parallelism: the deepspeed launcher, told to stop (Ctrl-C, SIGTERM to its
    process group), SIGKILLs every rank 30 s after passing the signal on, and the drain and the answers must be
    done by then. Signalling rank 0 alone is not cut short (its shutdown releases the other ranks)."""

    def __init__(self, config: uvicorn.Config, stack: ServingStack, *, exit_on_engine_failure: bool = False) -> None:
        self.exit_on_engine_failure = exit_on_engine_failure
        """Shut down when the engine thread crashes (`s3 serve`): a server answering 503 to everything forever is
        worse than one that exits non-zero for its supervisor (systemd, Kubernetes, the deepspeed launcher) to
        restart, which is what vLLM's server does when its engine dies. Off for servers embedded in tests."""
        self.engine_failed = False
        self.drain_s = stack.config.shutdown_timeout_s
        if stack.config.engine.tensor_parallel > 1 and self.drain_s > self.LAUNCHER_DRAIN_S:
            log.warning("shutdown_timeout_s %g cut to %g under tensor parallelism: the deepspeed launcher kills its "
                        "ranks 30 s after a Ctrl-C; to drain longer, send SIGTERM to rank 0 alone", self.drain_s,
                        self.LAUNCHER_DRAIN_S)
            self.drain_s = self.LAUNCHER_DRAIN_S
        config.timeout_graceful_shutdown = self.drain_s + self.ANSWER_S
        super().__init__(config)
        self.stack = stack

    async def on_tick(self, counter: int) -> bool:
        loop = self.stack.engine_loop
        if self.exit_on_engine_failure and not self.engine_failed and loop.error is not None:
            log.error("the engine failed (%r): shutting the server down", loop.error)
            self.engine_failed = self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.drain_s, self._end_what_is_left)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            deadline.cancel()

    def _end_what_is_left(self) -> None:
        snapshot = self.stack.engine_loop.snapshot
        log.warning("shutdown: %d requests running and %d waiting after %g s (shutdown_timeout_s) end with an error",
                    snapshot.num_running, snapshot.num_waiting, self.drain_s)
        # Stopping joins the engine thread (a step, at most): not in the event loop, which must send the errors.
        threading.Thread(target=self.stack.stop, name="shutdown", daemon=True).start()


def _log_startup(config: ServeConfig, stack: ServingStack) -> None:
    admission, pool = stack.admission, stack.engine.scheduler.pool
    if admission.note:
        log.warning(admission.note)
    predictor = admission.predictor
    log.info("model %s (served as %r), policy %s, predictor %s, KV pool %d blocks x %d tokens (prefix caching %s), "
             "tensor parallel %d, default frequency penalty %g, priorities %s", stack.engine.model_id,
             stack.state.model_name, admission.policy.policy,
             getattr(predictor, "checkpoint_id", None) if predictor else "none", pool.num_blocks, pool.block_size,
             "on" if pool.prefix_caching else "off", config.engine.tensor_parallel,
             stack.state.default_frequency_penalty, "honoured" if config.priority_scheduling else "refused")
    familiarity = getattr(predictor, "familiarity", None)
    if familiarity is not None:
        log.info("familiarity: prompts scoring under %.3f against the predictor's %d kept training prompts count as "
                 "unfamiliar (s3_unfamiliar_prompts_total; %.0f%% of its validation prompts did)",
                 familiarity.threshold, len(familiarity.bank), 100 * predictor.info.familiarity["quantile"])
    elif hasattr(predictor, "familiarity"):  # a trained checkpoint without a bank
        log.info("familiarity: the predictor keeps no training-prompt embeddings (trained before 2026-12-06 or with "
                 "familiarity_bank_size 0): no unfamiliar-prompt counts")
    log.info("listening on %s://%s:%d (API key %s)", "https" if config.tls else "http", config.host, config.port,
             "required" if stack.state.api_key else "not required")
    if config.allowed_origins:
        log.info("browsers may call the API from %s (CORS)", ", ".join(config.allowed_origins))
    if not stack.state.api_key and not is_loopback(config.host):
        log.warning("serving %s without an API key (allow_insecure_no_auth): anyone who can reach the port can "
                    "use this server and write to its feedback store", config.host)


class BackgroundServer:
    """A server in a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, stack: ServingStack, *, host: str = "127.0.0.1", log_level: str = "warning",
                 keep_alive_s: float = ServeConfig.keep_alive_s, tls: tuple[str, str] | None = None) -> None:
        self.stack = stack
        self.server = DrainingServer(_uvicorn_config(stack.app, host, 0, log_level, keep_alive_s, tls=tls), stack)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port: int | None = None
        self.scheme = "https" if tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.stack.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self.stack.stop()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
