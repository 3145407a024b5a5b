"""The OpenAI wire format: request validation and error bodies (the responses' are `serve.server.bodies`).

Requests are parsed with pydantic in strict mode (``"10"`` is not an int), and every failure becomes an
`APIError` whose message and ``param`` name the offending field, in OpenAI's error format. Fields with
several accepted shapes (``prompt``, ``stop``, message ``content``) are checked by hand for clearer messages.
Parameters this server does not implement are refused rather than silently ignored (vLLM's, unless at their
default); fields nobody defined are logged as ignored, as vLLM does. An explicit ``null`` means
"the default" for every optional field, as in OpenAI's API (its SDK sends ``"temperature": null`` for
``temperature=None``).
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, model_validator

log = logging.getLogger(__name__)


MAX_STOP_STRINGS = 64  # OpenAI takes 4, vLLM any number: lm-eval's humaneval sends 8 (a bound against abuse only)
MAX_CHOICES = 128  # n, as OpenAI
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs (and vLLM's default max_logprobs)
REQUIRED = ("model", "prompt", "messages")


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
    """Fields shared by completion and chat requests. Fields it does not name are kept aside (``model_extra``):
    vLLM's that this server does not implement are refused unless at their default (`VLLM_UNSUPPORTED`), any
    other is logged as ignored (as vLLM does)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in REQUIRED}
        return data

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
    ignore_eos: bool = False
    """vLLM's extension: an end-of-sequence token does not end the request (it runs to max_tokens)."""
    # vLLM's sampling extensions (sent in the OpenAI SDK's extra_body).
    top_k: int | None = None
    """Keep the k most likely tokens when sampling (-1 or 0: all)."""
    min_p: float = 0.0
    """Keep the tokens at least min_p times as likely as the most likely one when sampling."""
    stop_token_ids: list[int] | None = None
    """Tokens that end the answer as end-of-sequence does (counted in the usage; their text is not shown)."""
    min_tokens: int = 0
    """Output tokens before end-of-sequence or stop_token_ids may come, and stop strings are looked for."""
    logit_bias: dict[str, float] | None = None
    """OpenAI's: {token id as a string: bias in [-100, 100]} added to the logits."""
    response_format: Any = None
    """OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}
    (vLLM takes it on completions too)."""
    # vLLM's structured outputs (one at most, and not with a JSON response_format).
    guided_json: Any = None
    """A JSON schema (an object, or its JSON text) the answer follows."""
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect of GBNF)."""
    priority: int = 0
    """vLLM's extension: lower goes first (a server started with priority scheduling; else only 0)."""
    repetition_penalty: float = 1.0
    """vLLM's (and Hugging Face's): the logit of every token in the prompt or the answer so far is divided by it
    when positive, multiplied when negative (1: none; above 1 discourages repeating)."""
    include_stop_str_in_output: bool = False
    """vLLM's: keep the stop string that ended the answer in its text."""
    skip_special_tokens: bool = True
    """vLLM's: leave special tokens out of the answer's text."""
    truncate_prompt_tokens: int | None = None
    """vLLM's: keep only the prompt's last k tokens (-1: as many as the context takes with one answer token)."""
    allowed_token_ids: list[int] | None = None
    """vLLM's: the only tokens the answer may be made of."""
    prompt_logprobs: int | None = None
    """vLLM's: each prompt token's log-probability (after the first) with the k most likely tokens' at its place."""
    cache_salt: str | None = None
    """vLLM's: with prefix caching, only requests with the same salt share cached prompt blocks (one per tenant)."""
    bad_words: list[str] | None = None
    """vLLM's: words the answer may not contain (each as the tokenizer splits it, with and without a leading space:
    its last token is banned wherever the answer so far ends with the ones before)."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: log-probabilities name each token as ``token_id:<id>`` instead of its text (for clients that must
    map them back to ids, where a token's text is not unique or not valid UTF-8 on its own)."""


class CompletionRequest(GenerationRequest):
    prompt: Any
    logprobs: int | None = None
    """Return each token's log-probability and the ``logprobs`` most likely tokens' (0 to MAX_LOGPROBS)."""
    echo: bool = False
    """Answer with the prompt in front of the completion (with ``logprobs``, the prompt tokens' too)."""
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    """vLLM's: end the templated prompt with the assistant's turn opening (false: the template's text as is)."""
    continue_final_message: bool = False
    """vLLM's: the last message is the assistant's, and the answer continues it (not with add_generation_prompt)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's: more variables for the chat template (e.g. a model's ``enable_thinking``); a template ignores the
    ones it does not use. Names the server sets itself (`serve.server.chat.RESERVED_TEMPLATE_KWARGS`) are refused."""
    max_completion_tokens: int | None = None
    logprobs: bool = False
    """Return each token's log-probability (and, with ``top_logprobs``, the most likely tokens')."""
    top_logprobs: int | None = None
    tools: Any = None
    """OpenAI's function tools: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    tool_choice: Any = None
    """A named function ({"type": "function", "function": {"name"}}), "required" or "none"; "auto" (the default with
    tools) needs a model-specific parser of free-text calls, which SmolLM2 has no format for (see `tool_calls`)."""
    parallel_tool_calls: bool = True
    """With tool_choice "required": whether the answer may call several tools."""
    # The deprecated function calling: refused whatever its value (see TOOL_FIELDS).
    functions: Any = None
    function_call: Any = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion prompt, or chat messages through the chat template."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    """Optional, as in vLLM; when given, it must be the served model."""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    """Messages only: end where the assistant's answer starts, as a chat request's prompt does."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Messages only: more variables for the chat template, as a chat request's."""


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    """Optional, as in vLLM; when given, it must be the served model."""
    tokens: list[int]


# Not implemented; accepted only when unset, zero, false or empty (best_of also at 1).
UNSUPPORTED = ("best_of", "suffix")
TOOL_FIELDS = ("functions", "function_call")
# vLLM's request extensions this server does not implement, with the values that change nothing: any other value
# is a 400 naming the field rather than an answer that silently ignored it.
VLLM_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0),
    "logits_processors": ([],), "spaces_between_special_tokens": (True,),
    "guided_whitespace_pattern": (), "guided_decoding_backend": ("auto", "xgrammar"), "structural_tag": (),
    "chat_template": (), "documents": ([],), "mm_processor_kwargs": ({},),
    "add_special_tokens": (), "echo_messages": (), "kv_transfer_params": (), "vllm_xargs": ({},),
    "logits_processor_pattern": (),
}  # fmt: skip
# Fields whose value that changes nothing differs by endpoint: (completions, chat), vLLM's defaults and this server's
# behaviour (a completion's prompt is tokenized with the special tokens, a chat's template writes its own).
NO_CHANGE_BY_ENDPOINT: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {"add_special_tokens": ((True,), (False,))}


def parse_body(model_cls: type[BaseModel], body: bytes) -> Any:
    """A JSON body as ``model_cls``; a 400 APIError naming the first bad field."""
    try:
        return model_cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise _validation_error(exc) from None


def parse_request(model_cls: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """Validate a generation request's JSON body; raise a 400 APIError naming the first bad field."""
    request = parse_body(model_cls, body)
    _check_extra_fields(request)
    for name in UNSUPPORTED:
        value = getattr(request, name, None)
        if value and not (name == "best_of" and value == 1):
            raise bad_request(f"{name} is not supported by this server; leave it out", name)
    for name in TOOL_FIELDS:
        if getattr(request, name, None) is not None:
            raise bad_request(f"{name}: the deprecated function calling is not supported; use tools and tool_choice",
                              name)
    _check_stream_options(request)
    _check_ranges(request)
    return request


def _check_extra_fields(request: GenerationRequest) -> None:
    """A 400 for a vLLM extension this server does not implement, set to anything but its default; a warning
    naming the other fields it does not know (as vLLM logs them), which it ignores."""
    extra = request.model_extra or {}
    for name, value in extra.items():
        allowed = VLLM_UNSUPPORTED.get(name, ())
        if name in NO_CHANGE_BY_ENDPOINT:
            allowed = NO_CHANGE_BY_ENDPOINT[name][isinstance(request, ChatCompletionRequest)]
        if name in VLLM_UNSUPPORTED and value not in allowed:
            raise bad_request(f"{name} is not supported by this server; leave it out", name)
    if isinstance(request, ChatCompletionRequest) and extra.get("echo") not in (None, False):
        raise bad_request("echo is not supported on chat completions by this server; leave it out", "echo")
    ignored = tuple(sorted(set(extra) - set(VLLM_UNSUPPORTED) - {"echo"}))
    if ignored:  # a warning the first time, so that a client sending them with every request does not flood the log
        level = logging.DEBUG if ignored in _IGNORED_SEEN else logging.WARNING
        if len(_IGNORED_SEEN) < _MAX_IGNORED_SEEN:  # bounded: a client may send a new field name every time
            _IGNORED_SEEN.add(ignored)
        log.log(level, "ignoring request fields this server does not know: %s", ", ".join(ignored))


_IGNORED_SEEN: set[tuple[str, ...]] = set()
_MAX_IGNORED_SEEN = 256


def _check_stream_options(request: GenerationRequest) -> None:
    options = request.stream_options
    if options is None:
        return
    if not request.stream:  # OpenAI's rule and message
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          "stream_options")
    for name in ("include_usage", "continuous_usage_stats"):
        if options.get(name) not in (None, True, False):
            raise bad_request(f"stream_options.{name} must be true or false", f"stream_options.{name}")


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
    if not 1 <= request.n <= MAX_CHOICES:
        raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {request.n}", "n")
    if not 0.0 <= request.temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {request.temperature}", "temperature")
    if not 0.0 < request.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(request, name) <= 2.0:
            raise bad_request(f"{name} must be in [-2, 2], got {getattr(request, name)}", name)
    if request.seed is not None and not -(2**63) <= request.seed < 2**63:
        raise bad_request(f"seed must be a 64-bit integer, in [-2**63, 2**63), got {request.seed}", "seed")
    if not -(2**63) <= request.priority < 2**63:
        raise bad_request(f"priority must be a 64-bit integer, got {request.priority}", "priority")
    if request.top_k is not None and request.top_k < -1:
        raise bad_request(f"top_k must be -1 or 0 (all tokens) or positive, got {request.top_k}", "top_k")
    if not 0.0 <= request.min_p <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {request.min_p}", "min_p")
    if request.min_tokens < 0:
        raise bad_request(f"min_tokens must be >= 0, got {request.min_tokens}", "min_tokens")
    if not 0.0 < request.repetition_penalty < float("inf"):
        raise bad_request(f"repetition_penalty must be > 0, got {request.repetition_penalty}", "repetition_penalty")
    truncate = request.truncate_prompt_tokens
    if truncate is not None and truncate < 1 and truncate != -1:
        raise bad_request(f"truncate_prompt_tokens must be >= 1, or -1 for the model's context, got {truncate}",
                          "truncate_prompt_tokens")
    if request.prompt_logprobs is not None:
        if not 0 <= request.prompt_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {request.prompt_logprobs}",
                              "prompt_logprobs")
        if request.stream:
            raise bad_request("prompt_logprobs is not supported with stream: true", "prompt_logprobs")
    if request.cache_salt is not None and not request.cache_salt:
        raise bad_request("cache_salt must not be empty", "cache_salt")
    if request.allowed_token_ids is not None and not request.allowed_token_ids:
        raise bad_request("allowed_token_ids must name at least one token", "allowed_token_ids")
    if isinstance(request, ChatCompletionRequest) and request.continue_final_message:
        if request.add_generation_prompt:
            raise bad_request("continue_final_message needs add_generation_prompt: false", "continue_final_message")
        if not request.messages or request.messages[-1].get("role") != "assistant":
            raise bad_request("continue_final_message needs the last message to be the assistant's",
                              "continue_final_message")
    requested_logprobs(request)


def requested_prompt_logprobs(request: GenerationRequest) -> int | None:
    """The prompt tokens' log-probabilities a request asks for: vLLM's ``prompt_logprobs``, an echoed completion
    with ``logprobs``, or both (the larger count)."""
    echoed = requested_logprobs(request) if getattr(request, "echo", False) else None
    counts = [c for c in (echoed, request.prompt_logprobs) if c is not None]
    return max(counts) if counts else None


def requested_logprobs(request: GenerationRequest) -> int | None:
    """How many of the most likely tokens to report with each generated token's log-probability; None when the
    request asks for no log-probabilities. Completions: ``logprobs``; chat: ``logprobs: true`` with
    ``top_logprobs`` (0 when left out), which needs ``logprobs: true`` as in OpenAI's API."""
    if isinstance(request, ChatCompletionRequest):
        name, count = "top_logprobs", request.top_logprobs
        if count is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", name)
        if not request.logprobs:
            return None
        count = count or 0
    else:
        name, count = "logprobs", getattr(request, "logprobs", None)
        if count is None:
            return None
    if not 0 <= count <= MAX_LOGPROBS:
        raise bad_request(f"{name} must be between 0 and {MAX_LOGPROBS}, got {count}", name)
    return count


def max_tokens_field(request: GenerationRequest) -> str:
    """The field that limits the answer: chat's ``max_completion_tokens`` where given (a completion's is an ignored
    extra), else ``max_tokens``."""
    chat = isinstance(request, ChatCompletionRequest)
    return "max_completion_tokens" if chat and request.max_completion_tokens is not None else "max_tokens"


def requested_max_tokens(request: GenerationRequest) -> int | None:
    return getattr(request, max_tokens_field(request))


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


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """A completion request's prompts: a string, a list of token ids, or a batch of either (answered as one
    request per prompt, their choices in order)."""
    def is_one(prompt: Any) -> bool:  # a non-empty string, or a non-empty list of token ids
        return (isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int for t in prompt)) \
            and len(prompt) > 0

    prompts = [request.prompt] if is_one(request.prompt) else request.prompt
    if not isinstance(prompts, list) or not prompts:
        raise bad_request("prompt must be a non-empty string or a non-empty list of token ids, or a list of them",
                          "prompt")
    for i, prompt in enumerate(prompts):
        if not is_one(prompt):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise bad_request(f"{where} must be a non-empty string or a non-empty list of token ids", "prompt")
    return prompts


def include_usage(request: GenerationRequest) -> bool:
    return bool(request.stream_options and request.stream_options.get("include_usage"))


def continuous_usage(request: GenerationRequest) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk carries the usage so
    far, not null."""
    return include_usage(request) and bool(request.stream_options.get("continuous_usage_stats"))
