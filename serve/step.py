"""One engine step as three calls, shared by the model engine, the simulator, `s3 bench` and the server.

    out = scheduler.schedule()                   # who runs, which tokens, which blocks (torch-free)
    result = executor.execute(out)               # the model, or the cost model -> one token per finishing seq
    finished = scheduler.update_from_output(out, result)

An executor sees only the plan: `SchedulerOutput.new_requests` carries what it needs to (re)start a request and
`finished_request_ids` tells it whom to forget, so it keeps its own per-request state (as vLLM v1's workers do)
and never reads the scheduler. A new backend (a GPU engine, DeepSpeed-FastGen) is a new `Executor`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from core.request import Request
from serve.sched_output import SchedulerOutput, StepResult
from serve.scheduler import Scheduler


class Executor(Protocol):
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Compute the plan's tokens; return one sampled token per sequence whose ScheduledSeq.samples is set,
        and the ids of those the executor ended (EOS, a scripted length)."""
        ...


@dataclasses.dataclass
class StepOutcome:
    """What one step did."""

    output: SchedulerOutput
    result: StepResult
    finished: list[Request]
    """Requests that ended in this step (EOS or max_new_tokens)."""


class EngineCore:
    """A scheduler and an executor, stepped together."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def step(self) -> StepOutcome:
        out = self.scheduler.schedule()
        result = self.executor.execute(out)
        finished = self.scheduler.update_from_output(out, result)
        return StepOutcome(out, result, finished)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()
