"""The HTTP routes: OpenAI's /v1/completions and /v1/chat/completions (streamed or not), /v1/models, vLLM's
/tokenize, /detokenize and /version, /health and /metrics. Handlers validate, tokenize and submit; the engine
thread does the rest (see async_engine.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import logging
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from serve.engine.plan import SamplingParams, StructuredOutput
from serve.server import bodies, formats
from serve.server import protocol as p
from serve.server.answers import Choice, Format, close_all, sse_events
from serve.server.async_engine import EngineError, RequestStream, TextOptions
from serve.server.chat import chat_messages, predictor_text, template_kwargs
from serve.server.metrics import CONTENT_TYPE
from serve.server.state import ServerState

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("s3-serve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def require_api_key(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server "
                              "was started with (--api-key or S3_API_KEY)", code="invalid_api_key")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The JSON request body: 415 unless it is declared application/json (a browser sends other types
    cross-origin without asking first), 413 over ``limit`` bytes before reading all of it, 408 when it has
    not all arrived within ``timeout_s`` (a client that declares more than it sends would hold the handler)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise p.APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                              f"{media_type or 'no content type'}", param="Content-Type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise p.APIError(413, f"the request body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise p.APIError(413, f"the request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)  # not asyncio.timeout: Python 3.10 has none
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on, a class of its own before
        # Connection: close, so the connection goes too instead of waiting for the rest of the body.
        raise p.APIError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)",
                         headers={"Connection": "close"}) from None
    return b"".join(chunks)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app of one server: every route reads `state`; errors come out in OpenAI's format."""
    app = FastAPI(title="s3 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_exception_handler(p.APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    if state.allowed_origins:  # answers a browser's preflight before the routes (and their key check) see it
        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"])
    auth = [Depends(require_api_key)]

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        snap = state.engine.engine_loop.snapshot
        status = "ok" if snap.alive else "engine stopped"
        return JSONResponse({"status": status}, status_code=200 if snap.alive else 503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        return JSONResponse(bodies.models_body(state.model_name, state.created, state.max_model_len))

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str) -> Response:  # OpenAI's retrieve (`client.models.retrieve`)
        state.check_model(model)
        return JSONResponse(bodies.models_body(state.model_name, state.created, state.max_model_len)["data"][0])

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": VERSION})

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = p.parse_request(p.CompletionRequest, await _body(request, state))
        state.check_model(req.model)
        output_format = await state.structured(req)
        prompts = []
        for prompt in p.completion_prompts(req):
            if isinstance(prompt, str):
                prompts.append((list(state.tokenizer.encode(prompt)), prompt))
                continue
            state.check_token_ids(prompt, "prompt", "prompt token ids")
            prompts.append((prompt, state.tokenizer.decode(prompt)))
        return await _generate(request, state, req, prompts, output_format, chat=False, single_user_turn=None)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = p.parse_request(p.ChatCompletionRequest, await _body(request, state))
        state.check_model(req.model)
        output_format = await state.structured(req)  # tools too: checked before the template sees them
        messages = chat_messages(req)
        ids = _chat_prompt_ids(state.tokenizer, messages, req.add_generation_prompt,
                               tools=req.tools if req.tool_choice != "none" else None,
                               continue_final_message=req.continue_final_message,
                               template_kwargs=template_kwargs(req))
        single = (len(messages) == 1 and messages[0]["role"] == "user" and req.add_generation_prompt
                  and not req.continue_final_message and not req.tools and not template_kwargs(req))
        return await _generate(request, state, req, [(ids, predictor_text(messages))], output_format, chat=True,
                               single_user_turn=single)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        req = p.parse_body(p.TokenizeRequest, await _body(request, state))
        if req.model is not None:
            state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise p.bad_request("give either prompt or messages", "prompt")
        if req.prompt is not None:
            ids = list(state.tokenizer.encode(req.prompt))
        else:
            ids = _chat_prompt_ids(state.tokenizer, chat_messages(req), req.add_generation_prompt,
                                   template_kwargs=template_kwargs(req))
        return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids})

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        req = p.parse_body(p.DetokenizeRequest, await _body(request, state))
        if req.model is not None:
            state.check_model(req.model)
        state.check_token_ids(req.tokens, "tokens", "the tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})

    return app


async def _body(request: Request, state: ServerState) -> bytes:
    return await read_body(request, state.max_body_bytes, state.body_timeout_s)


def _chat_prompt_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                     tools: list | None = None, continue_final_message: bool = False,
                     template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The tokenizer's chat template with the generation prompt, as the labelled data was made; ``tools`` go to
    the template too (as vLLM hands them over; a template without tool support leaves them out);
    ``continue_final_message``: the last (assistant) message left open for the answer to continue;
    ``template_kwargs``: the client's own template variables (checked: `chat.template_kwargs`)."""
    extra = dict(template_kwargs or {})
    if tools:
        extra["tools"] = tools
    if continue_final_message:
        extra["continue_final_message"] = True
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            **extra)
    except Exception as exc:  # a template may refuse some conversations (e.g. no system role)
        raise p.bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def _generate(request: Request, state: ServerState, req: p.GenerationRequest,
                    prompts: list[tuple[list[int], str]], output_format: StructuredOutput | None, *,
                    chat: bool, single_user_turn: bool | None) -> Response:
    """Check the output budgets, submit one engine request per choice (``n`` per prompt; a completion may batch
    several prompts, each given as (token ids, text the predictor reads)), and answer as a stream of events or as
    one JSON body."""
    param = "messages" if chat else "prompt"
    if req.truncate_prompt_tokens is not None:
        prompts = [_truncated(state, ids, text, req.truncate_prompt_tokens, chat) for ids, text in prompts]
    budgets = []
    for ids, _ in prompts:
        if not ids:
            raise p.bad_request("the prompt is empty after tokenization", param)
        budgets.append(state.max_new_tokens_for(req, len(ids), param))
    if req.priority and not state.priority_scheduling:
        raise p.bad_request("priority must be 0: this server schedules without priorities (start it with "
                            "--priority-scheduling to let requests carry one)", "priority")
    if req.min_tokens > min(budgets):
        raise p.bad_request(f"min_tokens ({req.min_tokens}) exceeds the answer's {min(budgets)} tokens", "min_tokens")
    head = bodies.Head(bodies.new_id("chatcmpl" if chat else "cmpl"), bodies.now(), state.model_name, state.system_fingerprint)
    fmt = Format(head, chat, sum(len(ids) for ids, _ in prompts), req.n,
                 usage_in_chunks=req.stream and p.include_usage(req), continuous_usage=p.continuous_usage(req),
                 cached_tokens=state.prefix_caching)
    sampling = _sampling(state, req, output_format)
    token_text = None
    if sampling.logprobs is not None:
        token_text = _token_id_text if req.return_tokens_as_token_ids else state.token_text
    echo = getattr(req, "echo", False)
    tools = formats.tool_calls(req) if chat else None
    scored = req.prompt_logprobs is not None
    choices = [Choice(k * req.n + i, chat, token_text=token_text, num_top=sampling.logprobs or 0,
                      echo_text=text if echo else None, echo_ids=ids, tools=tools,
                      scored_prompt=ids if scored else None, decode=state.token_text)
               for k, (ids, text) in enumerate(prompts) for i in range(req.n)]
    if req.allowed_token_ids and output_format is not None:
        raise p.bad_request("allowed_token_ids cannot be combined with an output format", "allowed_token_ids")
    streams = _submit(state, head.rid, prompts, budgets, req.n, sampling=sampling, stop=p.stop_strings(req),
                      feedback=(_length_is_natural(req) and output_format is None
                                and state.decoded_as_labels(sampling, single_user_turn)), priority=req.priority,
                      text_options=TextOptions(req.include_stop_str_in_output, req.skip_special_tokens),
                      cache_salt=req.cache_salt)
    if req.stream:
        # close() also runs as a background task: it frees the requests even if the stream never started.
        return StreamingResponse(sse_events(streams, fmt, choices), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"} | _request_id(request, head.rid),
                                 background=BackgroundTask(close_all, streams))
    try:
        answers = await _unless_disconnected(request, asyncio.gather(*(stream.collect() for stream in streams)))
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except EngineError as exc:
        raise p.APIError(503, f"the engine could not finish the request: {exc}") from None
    finally:
        close_all(streams)
    whole = [choice.whole(text, reason, outputs) for choice, (text, reason, outputs) in zip(choices, answers)]
    return JSONResponse(fmt.response(whole, streams), headers=_request_id(request, head.rid))


def _sampling(state: ServerState, req: p.GenerationRequest, output_format: StructuredOutput | None) -> SamplingParams:
    """The request's sampling parameters, each checked (token ids against the vocabulary), with its output format
    (`ServerState.structured`)."""
    # An explicit null means "the default", as leaving it out does (protocol drops nulls before parsing).
    frequency_penalty = (req.frequency_penalty if "frequency_penalty" in req.model_fields_set
                         else state.default_frequency_penalty)
    return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k or 0),
                          min_p=req.min_p, seed=req.seed, presence_penalty=req.presence_penalty,
                          frequency_penalty=frequency_penalty, repetition_penalty=req.repetition_penalty,
                          ignore_eos=req.ignore_eos,
                          allowed_token_ids=tuple(state.check_token_ids(
                              req.allowed_token_ids or [], "allowed_token_ids", "the allowed_token_ids")),
                          logprobs=p.requested_logprobs(req), prompt_logprobs=p.requested_prompt_logprobs(req),
                          stop_token_ids=state.stop_token_ids(req), min_tokens=req.min_tokens,
                          logit_bias=state.logit_bias(req), bad_words=state.bad_words(req), structured=output_format)


def _token_id_text(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids``: a token named by its id in log-probabilities."""
    return f"token_id:{token_id}"


def _length_is_natural(req: p.GenerationRequest) -> bool:
    """Whether the answers end where the model ends them, so that the feedback store may take their lengths for
    labels: not when the client forces a length (``ignore_eos``, ``min_tokens``) or changes what ends it
    (``stop_token_ids``, a ``logit_bias``, ``allowed_token_ids`` or ``bad_words``, which may touch end-of-sequence;
    an output format, which the caller checks). Stop strings are the store's own case (it keeps what happened before
    the cut)."""
    return not (req.ignore_eos or req.min_tokens or req.stop_token_ids or req.logit_bias or req.allowed_token_ids
                or req.bad_words)


def _truncated(state: ServerState, ids: list[int], text: str, keep: int, chat: bool) -> tuple[list[int], str]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many as the context takes with
    one answer token). A completion's predictor reads the text kept; a chat's, its last user message as ever."""
    if keep == -1:
        keep = min(state.max_model_len, state.kv_capacity_tokens) - 1
    if len(ids) <= keep:
        return ids, text
    ids = ids[-keep:]
    return ids, text if chat else state.tokenizer.decode(ids)


def _submit(state: ServerState, rid: str, prompts: list[tuple[list[int], str]], budgets: list[int], n: int, *,
            sampling: SamplingParams, stop: list[str], feedback: bool, priority: int = 0,
            text_options: TextOptions = TextOptions(), cache_salt: str | None = None) -> list[RequestStream]:
    """One engine request per choice, ``n`` per prompt in order, all or none (a 429 when the queue cannot take
    them all). Choice i of every prompt has the request's seed for i = 0 and one derived from it for the others, so
    a batch answers as its prompts one by one and ``n=1`` as choice 0 of any ``n``; the first choice is the
    request ``rid``, the others ``rid-<index>``."""
    engine, total = state.engine, len(prompts) * n
    limit = engine.max_waiting_requests + engine.max_num_seqs
    if total > limit:
        what, param = (f"n={n}", "n") if len(prompts) == 1 else (f"{len(prompts)} prompts x n={n}", "prompt")
        raise p.bad_request(f"{what} exceeds the {limit} requests this server queues and runs at once", param)
    engine.check_capacity(total)
    streams: list[RequestStream] = []
    try:
        for k, ((ids, text), budget) in enumerate(zip(prompts, budgets)):
            for i in range(n):
                seed = sampling.seed if i == 0 or sampling.seed is None else (sampling.seed * 1_000_003 + i) % 2**63
                index = k * n + i
                # A greedy request's choices are one answer n times: the feedback store records it once.
                streams.append(engine.submit(rid if index == 0 else f"{rid}-{index}", ids, max_new_tokens=budget,
                                             sampling=dataclasses.replace(sampling, seed=seed), prompt=text,
                                             stop=stop, feedback=feedback and (i == 0 or not sampling.is_greedy),
                                             priority=priority, text=text_options, cache_salt=cache_salt))
    except BaseException:
        close_all(streams)
        raise
    return streams


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``, unless the client disconnects first (then cancel it and raise ClientGone)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler cancelled (a shutdown; Ctrl-C in `s3 batch`): the answer's task goes too
        task.cancel()
        task.add_done_callback(_retrieved)  # else asyncio logs "exception was never retrieved", a traceback each
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # retrieved: asyncio would log its CancelledError as an error
    raise ClientGone()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors in OpenAI's format -------------------------------------------------------------------------------


def _error_response(request: Request, error: p.APIError) -> JSONResponse:
    _state(request).metrics.errors.labels(status=str(error.status)).inc()
    headers = _request_id(request, f"err-{uuid.uuid4().hex[:24]}") | (error.headers or {})  # a log line to match
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _request_id(request: Request, default: str | None = None) -> dict[str, str]:
    """The ``X-Request-Id`` header of the answer: the client's own (a proxy's trace id), else ``default`` (the
    answer's id), so a log line on either side can be matched with the other."""
    value = request.headers.get("x-request-id") or default
    return {"X-Request-Id": value} if value else {}


async def _api_error(request: Request, exc: p.APIError) -> JSONResponse:
    return _error_response(request, exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        message += ("; routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, "
                    "/metrics, /version")
    return _error_response(request, p.APIError(exc.status_code, message))


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up while sending its body: nobody reads an answer, and it is not a server error."""
    log.debug("client hung up while sending %s %s", request.method, request.url.path)
    _state(request).metrics.errors.labels(status="499").inc()
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error_response(request, p.APIError(500, f"internal error: {exc!r}"))
