"""A chat request as the chat template and the length predictor read it: its messages with string content, and
the template variables a client may set."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from serve.server import protocol as p


RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "return_dict", "return_tensors", "padding", "truncation", "max_length", "chat_template", "tokenizer_kwargs",
    "return_assistant_tokens_mask",
})  # fmt: skip
"""Arguments of the tokenizer's ``apply_chat_template`` that the server sets: not template variables a client may
pass in ``chat_template_kwargs``."""


def template_kwargs(request: BaseModel) -> dict[str, Any]:
    """The request's ``chat_template_kwargs``; a 400 for a name the server sets itself (`RESERVED_TEMPLATE_KWARGS`)."""
    kwargs = getattr(request, "chat_template_kwargs", None) or {}
    reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise p.bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets it (through the "
                          "request's own field where there is one)", "chat_template_kwargs")
    return kwargs


def chat_messages(request: p.ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as {role, content} with string content (text parts are joined); checks roles and types. An
    assistant turn that called tools reads as its calls in JSON ({"name", "arguments"} each), after its text if
    any, and a tool's result as a turn of role "tool": chat templates without tool support still show both."""
    if not request.messages:
        raise p.bad_request("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(request.messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise p.bad_request(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}",
                              f"messages.{i}.role")
        calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        text = "" if content is None and calls else _message_text(content, i)
        if calls:
            text = "\n".join(t for t in (text, _calls_text(calls, i)) if t)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _calls_text(calls: Any, index: int) -> str:
    try:
        return json.dumps([{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                           for c in calls], ensure_ascii=False)
    except (TypeError, KeyError, ValueError):
        raise p.bad_request(f"messages[{index}].tool_calls must be OpenAI tool calls (function name and JSON "
                          "arguments)", f"messages.{index}.tool_calls") from None


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                 for p in parts):
        return "".join(p["text"] for p in parts)
    raise p.bad_request(f"messages[{index}].content must be a string or a list of text parts",
                      f"messages.{index}.content")


def predictor_text(messages: list[dict[str, str]]) -> str:
    """What the length predictor reads for a chat: the last user message, as in the training data (one
    instruction per row, see pipeline/generate.py); the whole conversation when no user message exists."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return "\n".join(m["content"] for m in messages)
