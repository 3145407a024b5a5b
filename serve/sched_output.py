"""The facts of one step passed between the scheduler and its executor: the plan (`SchedulerOutput`) one way and
what was computed (`StepResult`) the other (as vLLM v1's ``sched/output.py``); and what the scheduler reports to
metrics and benchmarks (`SchedulerStats`, `SchedulerSnapshot`). Torch-free."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from core.request import TokenLogprobs


@dataclasses.dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute tokens [start, start + num_new_tokens)."""

    request_id: str
    start: int
    """Tokens already in the cache (the position of the first token computed now)."""
    num_new_tokens: int
    block_ids: list[int]
    """The request's block table; a live view, valid until the next schedule()."""
    samples: bool
    """True when this step reaches the last known token, so the executor samples the next one."""


@dataclasses.dataclass(frozen=True)
class NewRequestData:
    """What an executor needs to (re)start a request: admitted for the first time, or again after a preemption."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: tuple[int, ...]
    """Tokens generated before a preemption (recomputed with the prompt); empty at first admission."""
    sampling: Any
    """The request's sampling parameters (Request.sampling)."""


@dataclasses.dataclass
class SchedulerOutput:
    """The plan of one step, handed to the executor."""

    seqs: list[ScheduledSeq] = dataclasses.field(default_factory=list)
    """What to compute: running sequences first (decoding ones, then those still prefilling, each in
    admission order), then newly admitted ones."""
    new_requests: list[NewRequestData] = dataclasses.field(default_factory=list)
    """Admitted this step, for the first time or again after a preemption. Their cache starts empty, or on the
    cached blocks of a shared prefix (prefix caching): their ScheduledSeq's ``start`` says where."""
    preempted_request_ids: list[str] = dataclasses.field(default_factory=list)
    """Preempted this step: their blocks are freed and they wait to be recomputed."""
    waited_request_ids: list[str] = dataclasses.field(default_factory=list)
    """Running sequences that sat this step out, waiting for a block rather than preempting another."""
    finished_request_ids: list[str] = dataclasses.field(default_factory=list)
    """Finished or aborted since the previous step: the executor drops their state."""
    time: float = 0.0
    """Clock reading when the plan was made."""

    @property
    def new_request_ids(self) -> list[str]:
        return [r.request_id for r in self.new_requests]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


@dataclasses.dataclass
class StepResult:
    """What the executor reports back for one step."""

    sampled_token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    """One new token per sequence whose ScheduledSeq.samples was True."""
    stopped_request_ids: set[str] = dataclasses.field(default_factory=set)
    """Sequences the executor ended (EOS, stop string, a scripted length); the token above counts."""
    logprobs: dict[str, TokenLogprobs] = dataclasses.field(default_factory=dict)
    """The new token's log-probabilities, for the sequences whose sampling asks for them."""
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = dataclasses.field(default_factory=dict)
    """(the position of the first prompt token scored, their log-probabilities), for the sequences whose sampling
    asks for prompt log-probabilities and whose step computed prompt positions (again, after a preemption)."""


@dataclasses.dataclass
class SchedulerStats:
    """Running counters, for metrics and benchmarks."""

    num_steps: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_preemptions: int = 0
    num_mispredictions: int = 0
    num_recomputed_tokens: int = 0
    num_prefix_query_tokens: int = 0
    """Tokens looked up in the prefix cache at admission (with prefix caching)."""
    num_prefix_hit_tokens: int = 0
    """Of those, tokens found there: their KV entries were not computed again."""
    num_batched_seqs: int = 0
    """Sequences stepped, summed over steps (see `mean_running_batch`)."""
    num_batched_tokens: int = 0
    """Tokens computed (prompt and output), summed over steps."""
    step_time_s: float = 0.0
    """The clock's time from each step's plan to its update, summed: the engine's time in steps, the
    simulator's modelled one."""

    @property
    def mean_running_batch(self) -> float:
        """Sequences stepped per step, on average (0 before the first step)."""
        return self.num_batched_seqs / max(1, self.num_steps)


@dataclasses.dataclass(frozen=True)
class SchedulerSnapshot:
    """The scheduler's state at one moment, for metrics, benchmarks and the server (read, never written)."""

    num_waiting: int = 0
    num_running: int = 0
    num_kv_blocks: int = 0
    num_kv_blocks_held: int = 0
    """Blocks held by sequences: written, or reserved for output still to come."""
    num_kv_blocks_used: int = 0
    """Blocks that hold computed tokens; held - used is memory set aside for tokens not yet written."""
    stats: SchedulerStats = dataclasses.field(default_factory=SchedulerStats)
