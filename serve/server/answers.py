"""One request's answer going out: its choices, whole or as server-sent events in OpenAI's chunk format, with
their log-probabilities and echoed prompt; several choices' streams merged as their pieces come."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import AsyncIterator, Callable, Sequence

from core.request import TokenLogprobs
from serve.server import bodies, formats
from serve.server import protocol as p
from serve.server.async_engine import EngineError, Output, RequestStream

LOWEST_LOGPROB = -9999.0  # what an impossible token's log-probability is written as (JSON has no -Infinity)


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


@dataclasses.dataclass
class Format:
    """Builds one request's response or stream chunks, completion or chat."""

    head: bodies.Head
    chat: bool
    num_prompt_tokens: int
    n: int = 1
    """Choices per prompt: streams ``0, n, 2n, ...`` are each prompt's first."""
    usage_in_chunks: bool = False
    """stream_options.include_usage: every chunk carries "usage" (null until the last, usage-only chunk)."""
    continuous_usage: bool = False
    """stream_options.continuous_usage_stats too: each chunk's "usage" is the usage so far, not null (vLLM's)."""
    cached_tokens: bool = False
    """Report the prompt tokens found in the prefix cache (``usage.prompt_tokens_details.cached_tokens``)."""

    def usage(self, streams: list[RequestStream]) -> dict:
        """Each prompt counted once (with what its first choice found cached), the completion tokens of every
        choice (as OpenAI counts ``n``)."""
        cached = sum(s.num_cached_tokens for s in streams[:: self.n]) if self.cached_tokens else None
        return bodies.usage(self.num_prompt_tokens, sum(s.num_output_tokens for s in streams), cached)

    def response(self, choices: list[dict], streams: list[RequestStream]) -> dict:
        body = bodies.response_body(self.head, chat=self.chat, choices=choices, usage_=self.usage(streams))
        if self.chat and choices and "prompt_logprobs" in choices[0]:  # vLLM's: once, beside the choices
            body["prompt_logprobs"] = choices[0]["prompt_logprobs"]
            for choice in choices:
                del choice["prompt_logprobs"]
        return body

    def chunk(self, choice: dict, streams: list[RequestStream]) -> dict:
        body = bodies.stream_chunk(self.head, chat=self.chat, choice=choice)
        if not self.usage_in_chunks:
            return body
        return {**body, "usage": self.usage(streams) if self.continuous_usage else None}

    def usage_chunk(self, streams: list[RequestStream]) -> dict:
        return bodies.usage_chunk(self.head, chat=self.chat, usage_=self.usage(streams))


@dataclasses.dataclass
class Choice:
    """One choice's answer as it goes out: whole, or piece by piece; with its log-probabilities and echo."""

    index: int
    chat: bool
    token_text: Callable[[int], str] | None = None
    """A token's text, when the request asked for log-probabilities (None: it did not)."""
    num_top: int = 0
    """Most likely tokens to report per position (``logprobs`` / ``top_logprobs``): an echoed prompt's are cut to
    it, when ``prompt_logprobs`` asked the engine for more."""
    echo_text: str | None = None
    """A completion's prompt, to answer in front of the completion (``echo``); None once sent, or without echo."""
    echo_ids: Sequence[int] = ()
    text_offset: int = 0
    """Characters of token text already streamed (completions' ``text_offset`` goes on from there)."""
    tools: formats.ToolCalls | None = None
    """A chat answer that calls tools: its text is their arguments, sent as ``tool_calls`` once complete."""
    held: list[Output] = dataclasses.field(default_factory=list)
    """A tool-calling answer's Outputs, held back until it ends (its calls go out in one piece)."""
    scored_prompt: Sequence[int] | None = None
    """The prompt, when the request asks for vLLM's ``prompt_logprobs`` (answered whole only)."""
    decode: Callable[[int], str] | None = None
    """A token's text, for ``prompt_logprobs``."""

    def whole(self, text: str, finish_reason: str, outputs: list[Output]) -> dict:
        """The choice of a whole response."""
        echoed, logprobs = self._take(outputs, scored=True)
        text = echoed + text
        if self.chat:
            calls = self.tools.calls(text) if self.tools is not None and finish_reason == "stop" else None
            if calls:
                finish_reason = self.tools.finish_reason
            choice = bodies.chat_choice(self.index, text=text, finish_reason=finish_reason, logprobs=logprobs,
                                        tool_calls=calls)
        else:
            choice = bodies.completion_choice(self.index, text=text, finish_reason=finish_reason, logprobs=logprobs)
        if self.scored_prompt is not None:
            scores = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), ())
            choice["prompt_logprobs"] = prompt_logprobs(self.scored_prompt, scores, self.decode)
        return choice

    def pieces(self, output: Output) -> list[dict]:
        """The stream-chunk choices of one Output."""
        if self.tools is not None:
            return self._tool_pieces(output)
        echoed, logprobs = self._take([output], scored=bool(output.token_ids))
        text, finish_reason = echoed + output.text, output.finish_reason
        if not self.chat:
            return [bodies.completion_choice(self.index, text=text, finish_reason=finish_reason, logprobs=logprobs)]
        out = [bodies.chat_delta(self.index, delta={"content": text}, logprobs=logprobs)] if text or logprobs else []
        if finish_reason is not None:
            out.append(bodies.chat_delta(self.index, delta={}, finish_reason=finish_reason))
        return out

    def _tool_pieces(self, output: Output) -> list[dict]:
        """A tool-calling answer's stream: nothing until it ends, then its calls in one delta (each with its
        index, id, name and whole arguments: what clients accumulate), or its text when it ended short of them."""
        self.held.append(output)
        if output.finish_reason is None:
            return []
        choice = self.whole("".join(o.text for o in self.held), output.finish_reason, self.held)
        message, reason = choice["message"], choice["finish_reason"]
        delta = ({"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
                 if message.get("tool_calls") else {"content": message["content"]})
        return [bodies.chat_delta(self.index, delta=delta, logprobs=choice["logprobs"]),
                bodies.chat_delta(self.index, delta={}, finish_reason=reason)]

    def role(self) -> dict:
        """A chat stream's first piece of this choice."""
        return bodies.chat_delta(self.index, delta={"role": "assistant", "content": ""})

    def _take(self, outputs: list[Output], *, scored: bool) -> tuple[str, dict | None]:
        """What goes out with ``outputs``: the prompt's text, once (the whole response, or the first piece), for
        ``echo`` ('' otherwise), and, when ``scored``, the log-probabilities (the echoed prompt's in front)."""
        logprobs = self._logprobs(outputs) if scored else None
        text, self.echo_text = self.echo_text or "", None
        return text, logprobs

    def _logprobs(self, outputs: list[Output]) -> dict | None:
        """The ``logprobs`` of this choice over ``outputs`` (None when the request asked for none); with the
        prompt's in front while it is still to be echoed."""
        if self.token_text is None:
            return None
        token_ids = [t for output in outputs for t in output.token_ids]
        logprobs: list[TokenLogprobs | None] = [lp for output in outputs for lp in output.logprobs]
        if self.echo_text is not None:
            prompt = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), ())
            prompt = [dataclasses.replace(lp, top=lp.top[: self.num_top]) for lp in prompt]
            token_ids, logprobs = [*self.echo_ids, *token_ids], [None, *prompt, *logprobs]
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.token_text)
        found = completion_logprobs(token_ids, logprobs, self.token_text, self.text_offset)
        self.text_offset += sum(len(t) for t in found["tokens"])
        return found


def _sse_data(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def sse_events(streams: list[RequestStream], fmt: Format, choices: list[Choice]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, each choice's pieces as they come, ending with
    ``data: [DONE]``. A client that goes away cancels this generator; `finally` then aborts the requests, which
    frees their KV blocks."""
    try:
        if fmt.chat:
            for choice in choices:
                yield _sse_data(fmt.chunk(choice.role(), streams))
        async for i, output in merged(streams):
            for piece in choices[i].pieces(output):
                yield _sse_data(fmt.chunk(piece, streams))
        if fmt.usage_in_chunks:
            yield _sse_data(fmt.usage_chunk(streams))
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        yield _sse_data(p.APIError(503, f"the engine could not finish the request: {exc}").body())
        yield "data: [DONE]\n\n"
    finally:
        close_all(streams)


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Output]]:
    """Every stream's Outputs as they come, each with its stream's index; an EngineError of any stream ends it."""
    if len(streams) == 1:
        async for output in streams[0].outputs():
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream.outputs():
                queue.put_nowait((i, output, None))
        except EngineError as exc:
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                left -= 1
                continue
            yield i, output
    finally:
        for task in tasks:
            task.cancel()


def _logprob(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None],
                        token_text: Callable[[int], str], text_offset: int = 0) -> dict:
    """/v1/completions' ``logprobs``: each token's text, log-probability and offset in the answer's text (from
    ``text_offset``), and a {text: log-probability} of the most likely tokens with the token itself, as vLLM. An
    echoed prompt's first token has none (``None``, as OpenAI)."""
    texts = [token_text(t) for t in token_ids]
    offsets = [text_offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    tops = [None if lp is None else {**{token_text(i): _logprob(v) for i, v in lp.top}, text: _logprob(lp.logprob)}
            for text, lp in zip(texts, logprobs)]
    return {"tokens": texts, "token_logprobs": [None if lp is None else _logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprobs],
                    token_text: Callable[[int], str]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (the first has none: ``None``), {token id: {"logprob", "rank",
    "decoded_token"}} for the token itself, then the most likely tokens at its place."""
    out: list[dict | None] = [None]
    for token, lp in zip(prompt_ids[1:], logprobs):
        entry = {str(token): {"logprob": _logprob(lp.logprob), "rank": lp.rank, "decoded_token": token_text(token)}}
        for rank, (other, value) in enumerate(lp.top, start=1):
            entry.setdefault(str(other), {"logprob": _logprob(value), "rank": rank, "decoded_token": token_text(other)})
        out.append(entry)
    return out


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs],
                  token_text: Callable[[int], str]) -> dict:
    """/v1/chat/completions' ``logprobs``: per token its text, UTF-8 bytes, log-probability and the most likely
    tokens' (``top_logprobs``)."""
    def entry(token_id: int, value: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _logprob(value), "bytes": list(text.encode("utf-8"))}

    content = [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
               for t, lp in zip(token_ids, logprobs)]
    return {"content": content, "refusal": None}
