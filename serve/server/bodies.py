"""OpenAI's response and stream-chunk bodies (the requests are `serve.server.protocol`'s)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def fingerprint(*parts: object) -> str:
    """OpenAI's ``system_fingerprint``: names the serving configuration (model, policy, predictor) that
    produced an answer; it changes when one of them does."""
    return "fp_" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Head:
    """What every response and chunk of one request repeats."""

    rid: str
    created: int
    model: str
    system_fingerprint: str

    def fields(self, kind: str) -> dict:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int | None = None) -> dict:
    """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens`` when the server caches prefixes."""
    body = {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}
    if num_cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    return body


def completion_choice(index: int, *, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    """One choice of a /v1/completions response or stream chunk (OpenAI streams the same shape)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, *, text: str, finish_reason: str | None, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    """One choice of a whole /v1/chat/completions response: text, or tool calls (and no content)."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, *, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    """One choice of a chat stream chunk; each choice's first carries the role, its last an empty delta and the
    finish reason."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response_body(head: Head, *, chat: bool, choices: list[dict], usage_: dict | None) -> dict:
    """A whole /v1/chat/completions or /v1/completions response."""
    return {**head.fields("chat.completion" if chat else "text_completion"), "choices": choices, "usage": usage_}


def _chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"  # completions stream the response's own shape


def stream_chunk(head: Head, *, chat: bool, choice: dict) -> dict:
    """One stream chunk carrying one choice's piece."""
    return {**head.fields(_chunk_kind(chat)), "choices": [choice]}


def usage_chunk(head: Head, *, chat: bool, usage_: dict) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, only usage (the chunks before it
    carry ``"usage": null``)."""
    return {**head.fields(_chunk_kind(chat)), "choices": [], "usage": usage_}


def models_body(model: str, created: int, max_model_len: int) -> dict:
    """OpenAI's model list, with vLLM's ``max_model_len`` (clients size their prompts by it)."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "s3",
                                        "root": model, "parent": None, "max_model_len": max_model_len}]}
