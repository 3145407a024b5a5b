"""The OpenAI wire format: request validation, response and stream-chunk bodies, and error bodies.

Requests are parsed with pydantic in strict mode (``"10"`` is not an int), and every failure becomes an
`APIError` whose message and ``param`` name the offending field, in OpenAI's error format. Fields with
several accepted shapes (``prompt``, ``stop``, message ``content``) are checked by hand for clearer messages.
Parameters this server does not implement are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error a client caused (or must wait out), rendered in OpenAI's error format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class GenerationRequest(BaseModel):
    """Fields shared by completion and chat requests."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Any = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Accepted only at their no-op values (see UNSUPPORTED).
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None


class CompletionRequest(GenerationRequest):
    prompt: Any
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# Not implemented; accepted only when unset, zero, false or empty (best_of also at 1).
UNSUPPORTED = ("logit_bias", "logprobs", "echo", "best_of", "suffix",
               "top_logprobs", "tools", "response_format")


def parse_request(model_cls: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """Validate a JSON body; raise a 400 APIError naming the first bad field."""
    try:
        request = model_cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise _validation_error(exc) from None
    for name in UNSUPPORTED:
        value = getattr(request, name, None)
        if value and not (name == "best_of" and value == 1):
            raise bad_request(f"{name} is not supported by this server; leave it out", name)
    _check_ranges(request)
    return request


def _validation_error(exc: pydantic.ValidationError) -> APIError:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error['msg']}")
    if error["type"] == "model_type":
        return bad_request("the request body must be a JSON object")
    param = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return bad_request(f"missing required field '{param}'", param)
    return bad_request(f"invalid field '{param}': {error['msg']}", param)


def _check_ranges(request: GenerationRequest) -> None:
    if request.n != 1:
        raise bad_request(f"n={request.n} is not supported: this server returns one choice per request (n=1)", "n")
    if not 0.0 <= request.temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {request.temperature}", "temperature")
    if not 0.0 < request.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(request, name) <= 2.0:
            raise bad_request(f"{name} must be in [-2, 2], got {getattr(request, name)}", name)
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise bad_request(f"seed must be in [0, 2**63), got {request.seed}", "seed")


def requested_max_tokens(request: GenerationRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


def stop_strings(request: GenerationRequest) -> list[str]:
    """``stop`` as a list: a string, a list of up to four non-empty strings, or absent."""
    stop = request.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def completion_prompt(request: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: a string or a list of token ids (a batch of one is unwrapped)."""
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"got a batch of {len(prompt)} prompts; this server takes one prompt per request", "prompt")
    raise bad_request("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as {role, content} with string content (text parts are joined); checks roles and types."""
    if not request.messages:
        raise bad_request("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(request.messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant, got {role!r}",
                              f"messages.{i}.role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _message_text(message.get("content"), i)})
    return out


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                 for p in parts):
        return "".join(p["text"] for p in parts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts",
                      f"messages.{index}.content")


def predictor_text(messages: list[dict[str, str]]) -> str:
    """What the length predictor reads for a chat: the last user message, as in the training data (one
    instruction per row, see pipeline/generate.py); the whole conversation when no user message exists."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return "\n".join(m["content"] for m in messages)


def include_usage(request: GenerationRequest) -> bool:
    return bool(request.stream_options and request.stream_options.get("include_usage"))


# -- responses -------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_body(rid: str, created: int, model: str, *, text: str, finish_reason: str | None,
                    usage_: dict | None, chunk: bool) -> dict:
    """A /v1/completions response (``chunk=False``) or one of its stream chunks."""
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(rid: str, created: int, model: str, *, text: str, finish_reason: str | None,
              usage_: dict | None) -> dict:
    """A whole /v1/chat/completions response."""
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(rid: str, created: int, model: str, *, delta: dict, finish_reason: str | None) -> dict:
    """One chat stream chunk; the first carries the role, the last an empty delta and the finish reason."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, *, chat: bool, usage_: dict) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [], "usage": usage_}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "s3"}]}
