"""What the HTTP routes share: the server's state (`ServerState`), and the checks of a request's fields against the
model and the server's limits that need it (token ids, logit bias, bad words, output budgets, formats)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from serve.engine.plan import SamplingParams, StructuredOutput
from serve.engine.structured import StructuredOutputError
from serve.server import bodies, formats
from serve.server import protocol as p
from serve.server.async_engine import AsyncEngine
from serve.server.metrics import ServerMetrics


@dataclasses.dataclass
class ServerState:
    """What the routes need: the engine's asyncio side, the tokenizer, the model's limits and the HTTP limits."""

    engine: AsyncEngine
    metrics: ServerMetrics
    tokenizer: Any
    model_name: str
    max_model_len: int
    """The model's context (prompt + output tokens)."""
    kv_capacity_tokens: int
    """Tokens the whole KV pool holds: no request may need more."""
    vocab_size: int
    max_new_tokens: int
    api_key: str | None
    max_body_bytes: int
    default_frequency_penalty: float = 0.0
    """For requests that leave frequency_penalty out (ServeConfig.default_frequency_penalty)."""
    body_timeout_s: float = 30.0
    """A request body that has not fully arrived by then gets 408 (ServeConfig.body_timeout_s)."""
    system_fingerprint: str = "fp_s3"
    """OpenAI's system_fingerprint of every answer: names the model, policy and predictor."""
    prefix_caching: bool = False
    """The engine caches prompt prefixes: usage reports the cached prompt tokens."""
    grammars: Any = None
    """The engine's compiled output formats (serve.engine.structured.GrammarCache); None: no structured outputs."""
    priority_scheduling: bool = False
    """Requests may carry a ``priority`` (ServeConfig.priority_scheduling)."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins allowed to call the API from a browser (ServeConfig.allowed_origins); empty: no CORS."""
    label_decoding: dict | None = None
    """How the predictor's labels were decoded (its checkpoint's ``decoding``); None: not known."""
    created: int = dataclasses.field(default_factory=bodies.now)

    def __post_init__(self) -> None:
        # A token's text in log-probabilities (special tokens named, as they are scored); cached, since the
        # most likely tokens recur.
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: self.tokenizer.decode([token_id], skip_special_tokens=False))

    def decoded_as_labels(self, sampling: SamplingParams, single_user_turn: bool | None) -> bool:
        """Whether a request is asked as the predictor's labels were made, so that its length is one of them (the
        feedback store may train on it, the live accuracy may score it): the same sampling (greedy where the labels
        were, the same penalties) and, where the labels went through a chat template, one user message alone
        (``single_user_turn``; None for a completion, whose prompt skips the template). A system prompt or an
        earlier turn changes the answer's length while the predictor, which reads the last user message, sees the
        same prompt. Any request counts where the recipe is not known."""
        recipe = self.label_decoding
        if not recipe:
            return True
        if recipe.get("chat_template") and not single_user_turn:
            return False
        labels = SamplingParams.from_decoding(recipe)
        same = (sampling.is_greedy if labels.is_greedy else
                sampling.temperature == labels.temperature and sampling.top_p == labels.top_p)
        return (same and sampling.repetition_penalty == labels.repetition_penalty
                and sampling.presence_penalty == labels.presence_penalty
                and sampling.frequency_penalty == labels.frequency_penalty)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise p.APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r} "
                                  "(see GET /v1/models)", param="model", code="model_not_found")

    def logit_bias(self, request: p.GenerationRequest) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs, each checked."""
        pairs = []
        for key, bias in (request.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) < self.vocab_size):  # "²" is a digit to Python
                raise p.bad_request(f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {key!r}",
                                    "logit_bias")
            if not -100 <= bias <= 100:
                raise p.bad_request(f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                                    "logit_bias")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    def check_token_ids(self, ids: list[int], param: str, what: str) -> list[int]:
        """``ids``, when every one is in the vocabulary; else a 400 naming ``param``."""
        if not all(0 <= t < self.vocab_size for t in ids):
            raise p.bad_request(f"{what} must be in [0, {self.vocab_size})", param)
        return ids

    async def structured(self, request: p.GenerationRequest) -> StructuredOutput | None:
        """The answer's format, compiled here (once per distinct format) so that one that does not compile is a 400
        naming its field before the request is queued; in a worker thread, so that a large schema's compilation
        does not hold the other requests' I/O."""
        found = formats.structured_output(request)
        if found is None:
            return None
        param, fmt = found
        if self.grammars is None:
            raise p.bad_request("this server has no tokenizer to hold answers to a format", param)
        try:
            await asyncio.to_thread(self.grammars.compile, fmt)
        except StructuredOutputError as exc:
            raise p.bad_request(str(exc), param) from None
        return fmt

    def bad_words(self, request: p.GenerationRequest) -> tuple[tuple[int, ...], ...]:
        """vLLM's ``bad_words`` as token sequences: each word as the tokenizer splits it alone and after a space
        (where the model would write it after another word), without special tokens."""
        sequences: dict[tuple[int, ...], None] = {}
        for word in request.bad_words or []:
            if not word.strip():
                raise p.bad_request("bad_words may not hold an empty or blank word", "bad_words")
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    sequences[ids] = None
        return tuple(sequences)

    def stop_token_ids(self, request: p.GenerationRequest) -> tuple[int, ...]:
        return tuple(self.check_token_ids(request.stop_token_ids or [], "stop_token_ids", "the stop_token_ids"))

    def max_new_tokens_for(self, request: p.GenerationRequest, num_prompt_tokens: int, prompt_param: str) -> int:
        """The request's output budget: its max_tokens, checked against the cap, the context and the KV pool."""
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        room = limit - num_prompt_tokens
        if room < 1:
            raise p.bad_request(f"the prompt has {num_prompt_tokens} tokens, but this server takes at most {limit - 1} "
                                f"(context of {limit} tokens, at least one for the answer); shorten it", prompt_param)
        requested = p.requested_max_tokens(request)
        if requested is None:
            return min(self.max_new_tokens, room)
        param = p.max_tokens_field(request)
        if not 1 <= requested <= self.max_new_tokens:
            raise p.bad_request(f"{param} must be between 1 and {self.max_new_tokens}, got {requested}", param)
        if requested > room:
            raise p.bad_request(f"the prompt ({num_prompt_tokens} tokens) plus {param} ({requested}) exceed the "
                                f"context of {limit} tokens; set {param} to at most {room}", param)
        return requested
