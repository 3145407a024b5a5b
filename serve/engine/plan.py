"""What the engine is asked to do in one step, and what it answers. Pure Python (no torch).

The scheduler's output for a step is adapted to a list of `SequenceStep`s; `ModelRunner.execute` runs them
in one forward pass and returns a `StepOutput`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from core.request import TokenLogprobs


GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily (`SamplingParams.is_greedy`)."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A format the answer must follow (serve/engine/structured.py)."""

    kind: str
    """json (a JSON schema), json_object (any JSON object), regex, choice (one of a list of strings) or grammar
    (EBNF, xgrammar's dialect)."""
    spec: str = ""
    """The schema as JSON text, the regex, the choices as a JSON list, or the grammar; '' for json_object."""

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick a request's next token. The defaults are greedy decoding."""

    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 keeps all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    min_p: float = 0.0
    """Keep only the tokens at least min_p times as likely as the most likely one (0 keeps all)."""
    seed: int | None = None
    """With a seed, the token drawn at each position depends only on (seed, position, logits), so a request
    samples the same tokens whatever it is batched with and after preemption by recompute."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated (in [-2, 2])."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was already generated (in [-2, 2])."""
    repetition_penalty: float = 1.0
    """vLLM's and Hugging Face's: the logit of every token of the prompt or the answer so far is divided by it
    when positive and multiplied by it when negative (1: none), before the two penalties above."""
    allowed_token_ids: tuple[int, ...] = ()
    """vLLM's: the only tokens the answer may be made of (empty: any)."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """vLLM's ``bad_words`` as token sequences: each one's last token is banned wherever the answer so far ends with
    the others (a one-token word everywhere)."""
    ignore_eos: bool = False
    """vLLM's extension: an end-of-sequence token does not end the request, so it runs to max_new_tokens
    (load generators send it so that every request produces exactly its token budget)."""
    logprobs: int | None = None
    """Log-probabilities to return with every generated token: None for none; k for the token's own and the k
    most likely tokens'. They are the model's own distribution (its logits' log-softmax, before penalties,
    temperature, top-k and top-p), as vLLM's default."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (each scored by the logits before it): None for none, k
    for the token's own and the k most likely tokens'."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI's: (token id, bias) pairs added to the logits before any other step of sampling."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the request as end-of-sequence does (kept in the output; `ignore_eos` does not apply)."""
    min_tokens: int = 0
    """Output tokens before end-of-sequence or `stop_token_ids` may be drawn (they are masked until then)."""
    structured: StructuredOutput | None = None
    """A format the answer must follow (a JSON schema, a regex, ...); None for free text."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (None for none), got {getattr(self, name)}")

    @property
    def is_greedy(self) -> bool:
        """Temperature 0, or so close to it that the logits divided by it overflow fp32 (vLLM's ``_SAMPLING_EPS``):
        the arg-max, as the limit of sampling at a vanishing temperature."""
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_decoding(cls, decoding: Mapping[str, Any], seed: int | None = None) -> "SamplingParams":
        """The sampling a predictor's labels were generated with (its checkpoint's `decoding`), so that serving
        draws from the length distribution the predictor learned."""
        fields = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
        return cls(seed=seed, **{k: decoding[k] for k in fields if decoding.get(k) is not None})

    @property
    def has_penalties(self) -> bool:
        """Whether the next token depends on the tokens generated so far (SequenceStep.output_token_ids)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


GREEDY = SamplingParams()


@dataclasses.dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step: compute the K/V of `token_ids` and, if `sample`, its next token."""

    request_id: str
    token_ids: list[int]
    """Tokens computed this step: a prompt chunk, a whole prompt (plus generated tokens after a
    recompute), or the single token sampled last step."""
    num_computed_tokens: int
    """Tokens already in this sequence's KV cache; `token_ids[0]` sits at this position."""
    block_table: list[int]
    """Block ids of the sequence in order: token at position i lives in block_table[i // block_size]. Must
    cover num_computed_tokens + len(token_ids) tokens."""
    sample: bool = True
    """True when this step reaches the end of the sequence's known tokens, so a next token is due; False in
    the middle of a chunked prefill."""
    sampling: SamplingParams = GREEDY
    output_token_ids: tuple[int, ...] = ()
    """The tokens generated so far, for the penalties; filled only when `sample` and `sampling.has_penalties`."""
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt's distinct tokens, for the repetition penalty; filled only when `sample` and
    `sampling.repetition_penalty` is not 1."""
    banned_token_ids: tuple[int, ...] = ()
    """Tokens the sample may not be (end-of-sequence and stop tokens before `sampling.min_tokens`)."""
    allowed_tokens: Any = None
    """Structured outputs: the tokens the sample may be, as a bitmask ((1, ceil(V / 32)) int32 words: token t is
    bit t % 32 of word t // 32); None for any."""
    prompt_targets: tuple[int, ...] = ()
    """Prompt tokens to score (`sampling.prompt_logprobs`): the logits of this step's i-th token give the
    log-probability of ``prompt_targets[i]``, the prompt token after it (at most one per token of the step, none
    for the prompt's last token, whose logits sample)."""

    @property
    def num_tokens_after(self) -> int:
        """Tokens in the cache once this step has run."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one step produced."""

    sampled_token_ids: dict[str, int]
    """request_id -> next token, for every sequence of the step with `sample=True` (in plan order)."""
    num_batched_tokens: int
    """Tokens run through the model this step (sum of len(token_ids)), for throughput accounting."""
    logprobs: dict[str, TokenLogprobs] = dataclasses.field(default_factory=dict)
    """request_id -> the sampled token's log-probabilities, for the sequences whose sampling asks for them."""
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = dataclasses.field(default_factory=dict)
    """request_id -> (the position of the first prompt token scored, the scores of `SequenceStep.prompt_targets`)."""
