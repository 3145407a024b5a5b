"""The facts the scheduler works on: a request, its length prediction, and its misprediction events.

Pure Python (no torch): the simulator and the engine share these types.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence


class RequestStatus(enum.IntEnum):
    """A request's life. Ordered: every status above PREEMPTED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # the model ended it (EOS or a stop string)
    FINISHED_LENGTH = 4  # it reached max_new_tokens
    ABORTED = 5  # the client went away, or an operator cancelled it

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.ABORTED: "abort",
}


@dataclasses.dataclass(frozen=True)
class LengthPrediction:
    """What a predictor says about a request's output length, before admission."""

    bucket: int
    """Predicted length bucket (index into the predictor's BucketSpec)."""
    probs: tuple[float, ...] | None = None
    """Probability of each bucket, when the predictor gives them (enables quantile reservations)."""
    num_tokens: int | None = None
    """An exact length, when known (the oracle); the `oracle` policy reserves exactly this."""
    familiarity: float | None = None
    """How much the prompt resembles the predictor's training prompts (mean cosine similarity to the most similar
    few, predictor_train/familiarity.py); None when the predictor cannot tell."""
    unfamiliar: bool | None = None
    """Whether ``familiarity`` is below the predictor's threshold: a kind of prompt it was not trained on."""
    checkpoint_id: str | None = None
    """The predictor checkpoint that made it: what its feedback record names and whose live accuracy it counts in,
    even when a reload swapped the predictor while it waited or ran (serve/server/reload.py)."""


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model, and the most likely tokens' at that position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely tokens, most likely first (as many as asked)."""
    rank: int = 0
    """The token's rank in the distribution (1: the most likely); 0 where not computed."""


@dataclasses.dataclass
class MispredictionEvent:
    """A running sequence reached its reservation without finishing: training data for the next predictor."""

    request_id: str
    prompt: str | None
    predicted_bucket: int
    """The bucket the reservation came from when the misprediction happened."""
    reserved_output_tokens: int
    """Output tokens the reservation held when the sequence ran out of it."""
    num_output_tokens: int
    """Output tokens generated when the misprediction happened."""
    probs: tuple[float, ...] | None = None
    preempted: bool = False
    """True when the reservation could not grow in place and the sequence was preempted."""
    final_output_tokens: int | None = None
    """The true output length, filled in when the request finishes (None if it was aborted)."""
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request as the scheduler tracks it.

    ``num_computed_tokens`` is the single progress counter: the number of this request's tokens
    (prompt, then generated) whose KV entries are in the cache. Prefill, chunked prefill, decode and
    recompute after preemption are all "compute tokens up to ``num_tokens``".
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_new_tokens: int
    arrival_time: float = 0.0
    prompt: str | None = None
    """Prompt text, kept for misprediction events (training data)."""
    prediction: LengthPrediction | None = None
    sampling: Any = None
    """How the executor picks tokens (serve.engine.plan.SamplingParams for the model); opaque to the scheduler,
    which hands it to the executor when the request is (re)admitted."""
    cache_salt: str | None = None
    """With prefix caching: only requests with the same salt share cached blocks (vLLM's ``cache_salt``)."""
    priority: int = 0
    """Lower goes first (vLLM's convention): the scheduler tries waiting requests by priority, then in its policy's
    order, and takes victims from the least urgent running ones. All 0: the policy's order alone."""

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    """One per output token when the sampling asks for log-probabilities (``sampling.logprobs``); else empty."""
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    """One per prompt token after the first (which has none), once the prompt is computed, when the sampling asks
    for them (``sampling.prompt_logprobs``); else empty."""
    num_computed_tokens: int = 0
    reserved_output_tokens: int = 0
    """Output tokens the reservation holds while running, or will take when (re)admitted; 0 under the
    `paged` policy, which reserves nothing."""
    reserved_bucket: int | None = None
    """Bucket the current reservation came from (`s3`), grown on each misprediction."""
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    """Tokens computed again after preemptions: what each preemption threw away, less what the request found
    in the prefix cache when it was re-admitted (counted then)."""
    num_preempted_tokens: int = 0
    """Tokens it had computed when last preempted, until it is re-admitted and they count as recomputed."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at its first admission (their KV entries were not computed)."""
    num_waited_steps: int = 0
    """Steps in a row this running sequence has sat out waiting for a KV block (`PolicyConfig.wait_steps`)."""
    admission_index: int = -1
    """Its place among the scheduler's admissions, counted over all of them (a re-admission counts anew): `paged`'s
    victim is the highest, the most recently admitted, wherever the step's order (decodes first) puts it."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    longest_stall_s: float = 0.0
    """The longest wait between two of its output tokens (a preempted request's shows its wait to resume)."""
    finish_time: float | None = None
    mispredictions: list[MispredictionEvent] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompt_token_ids) == 0:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a (re)computation has to cover."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]
