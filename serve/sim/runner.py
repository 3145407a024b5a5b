"""The simulator: the real Scheduler driven by a cost model instead of a model.

The simulated executor ends each sequence at its true length, and the clock advances by the cost model's
step time, so every policy decision (admission, growth, preemption) is the production code's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from core.buckets import BucketSpec
from core.records import latency_figures
from core.request import Request
from serve.policy_config import PolicyName
from serve.sched_output import SchedulerOutput, StepResult
from serve.scheduler import Scheduler, SchedulerConfig
from serve.sim.costmodel import CostModel
from serve.sim.workload import SimRequest
from serve.step import EngineCore, Executor

TIMELINE_POINTS = 400


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TrueLengths:
    """Each sequence's generated-token count, kept across preemptions (a re-admitted sequence arrives with what it
    wrote), and whether a sampled token brings it to its true length."""

    def __init__(self, true_lengths: dict[str, int]) -> None:
        self.true_lengths = true_lengths
        self._generated: dict[str, int] = {}

    def schedule(self, out: SchedulerOutput) -> None:
        """Take in a step's plan: forget the finished, (re)start the admitted."""
        for request_id in out.finished_request_ids:
            self._generated.pop(request_id, None)
        for new in out.new_requests:
            self._generated[new.request_id] = len(new.output_token_ids)

    def sampled(self, request_id: str) -> bool:
        """Count one token for ``request_id``; True when that ends it."""
        self._generated[request_id] += 1
        return self._generated[request_id] >= self.true_lengths[request_id]


class CostModelExecutor:
    """The cost model as an `Executor` (serve/step.py): advances the clock by the step's modelled time and ends
    each sequence at its true length."""

    def __init__(self, cost: CostModel, true_lengths: dict[str, int], clock: SimClock) -> None:
        self.cost = cost
        self.lengths = TrueLengths(true_lengths)
        self.clock = clock
        self.last_step_s = 0.0

    def execute(self, out: SchedulerOutput) -> StepResult:
        self.lengths.schedule(out)
        self.last_step_s = self.cost.step_time(out)
        self.clock.now += self.last_step_s
        result = StepResult()
        for seq in out.seqs:
            if seq.samples:
                result.sampled_token_ids[seq.request_id] = 0
                if self.lengths.sampled(seq.request_id):
                    result.stopped_request_ids.add(seq.request_id)
        return result


@dataclasses.dataclass
class PolicyResult:
    """What one policy did on one workload."""

    policy: str
    num_requests: int
    makespan_s: float
    generated_tokens_per_s: float
    requests_per_s: float
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_token_latency_s: float
    """Mean over requests of latency / output tokens (the SLO metric)."""
    mean_ttft_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    mean_running_batch: float
    kv_utilization: float
    """Time-weighted fraction of the pool holding live tokens."""
    kv_reserved: float
    """Time-weighted fraction of the pool's blocks held (reserved or in use)."""
    num_preemptions: int
    num_mispredictions: int
    num_recomputed_tokens: int
    num_steps: int
    wall_s: float
    longest_stall_s: float = 0.0
    """The longest wait of any request between two of its tokens (preempted requests waiting to resume)."""
    timeline: list[tuple[float, int, float, float]] = dataclasses.field(default_factory=list, repr=False)
    """Sampled (time, running batch, kv utilization, kv reserved) points, for plots."""
    classes: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """With urgent requests (`WorkloadConfig.urgent_share`): `latency_summary` of the ``urgent`` and the
    ``normal`` ones."""


@dataclasses.dataclass
class _Accumulator:
    capacity_tokens: int
    num_blocks: int
    kv_used_time: float = 0.0
    kv_reserved_time: float = 0.0
    busy_time: float = 0.0
    points: list = dataclasses.field(default_factory=list)

    def add(self, out: SchedulerOutput, dt: float, now: float, used_blocks: int) -> None:
        reserved = used_blocks / self.num_blocks
        # Each sequence's tokens: a prefix several share (prefix caching) is counted once per holder, so capped.
        live = min(reserved, sum(s.start + s.num_new_tokens for s in out.seqs) / self.capacity_tokens)
        self.kv_used_time += live * dt
        self.kv_reserved_time += reserved * dt
        self.busy_time += dt
        self.points.append((now, len(out.seqs), live, reserved))


def max_new_tokens_of(num_prompt_tokens: int, max_seq_len: int, max_new_tokens: int | None) -> int:
    """The request's output cap: the rest of the context (the paper's worst case), or a fixed cap within it."""
    room = max_seq_len - num_prompt_tokens
    return room if max_new_tokens is None else min(room, max_new_tokens)


def requests_of(items: Sequence[SimRequest], max_seq_len: int, max_new_tokens: int | None) -> list[Request]:
    """One scheduler `Request` per workload item, named by its index, its prompt as that many placeholder tokens:
    its shared prefix 0s, the rest its index + 1 (so that prefix caching shares only the shared prefix)."""
    return [
        Request(
            request_id=str(i),
            prompt_token_ids=(0,) * item.num_shared_prefix_tokens + (i + 1,) * (item.num_prompt_tokens
                                                                                 - item.num_shared_prefix_tokens),
            max_new_tokens=max_new_tokens_of(item.num_prompt_tokens, max_seq_len, max_new_tokens),
            arrival_time=item.arrival_time,
            prompt=item.prompt,
            prediction=item.prediction,
            priority=item.priority,
        )
        for i, item in enumerate(items)
    ]


def replay(policy: str, scheduler: Scheduler, executor: Executor, requests: Sequence[Request], *,
           clock: Callable[[], float], wait_until: Callable[[float], None]) -> PolicyResult:
    """Serve ``requests``, each added to ``scheduler`` once ``clock`` reaches its ``arrival_time``, stepping
    ``executor`` until all have ended; ``wait_until(t)`` passes idle time up to the next arrival. The simulator's
    clock is advanced by its executor, a real engine's is the wall clock; the metrics are the same."""
    wall0 = time.perf_counter()
    core = EngineCore(scheduler, executor)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    acc = _Accumulator(scheduler.pool.capacity_tokens, scheduler.pool.num_blocks)
    next_arrival = 0
    while next_arrival < len(pending) or core.has_unfinished():
        now = clock()
        while next_arrival < len(pending) and pending[next_arrival].arrival_time <= now:
            scheduler.add_request(pending[next_arrival])
            next_arrival += 1
        if not core.has_unfinished():
            wait_until(pending[next_arrival].arrival_time)
            continue
        step = core.step()
        assert step.output.seqs, "the scheduler made no progress with requests waiting"
        done = clock()
        acc.add(step.output, done - now, done, scheduler.pool.num_used_blocks)
    return _summarise(policy, list(requests), scheduler, acc, time.perf_counter() - wall0)


def simulate_policy(
    policy: PolicyName,
    items: Sequence[SimRequest],
    *,
    cost: CostModel,
    buckets: BucketSpec,
    sched: SchedulerConfig,
    max_new_tokens: int | None = None,
    requests: list[Request] | None = None,
) -> PolicyResult:
    """Run ``items`` through a scheduler with ``policy`` in simulated time and return its metrics. ``requests``:
    the items' scheduler requests (`requests_of`) as the caller set them up (priorities, say), read back after."""
    clock = SimClock()
    config = dataclasses.replace(sched, policy=dataclasses.replace(sched.policy, policy=policy))
    scheduler = Scheduler(config, buckets=buckets, clock=clock)
    if requests is None:
        requests = requests_of(items, cost.model.max_seq_len, max_new_tokens)
    true_len = {r.request_id: item.num_output_tokens for r, item in zip(requests, items)}
    executor = CostModelExecutor(cost, true_len, clock)

    def idle_until(t: float) -> None:
        clock.now = t

    return replay(policy, scheduler, executor, requests, clock=clock, wait_until=idle_until)


def latency_summary(requests: Sequence[Request]) -> dict[str, float]:
    """``num_requests`` and time to first token and end-to-end latency, mean / p50 / p99, of ended ``requests``
    (the issue's key names)."""
    ttfts = [r.first_token_time - r.arrival_time for r in requests]
    latencies = [r.finish_time - r.arrival_time for r in requests]
    return {"num_requests": len(requests), **latency_figures(ttfts, latencies)}


def _summarise(policy: str, requests: list[Request], scheduler: Scheduler, acc: _Accumulator, wall: float):
    start = min(r.arrival_time for r in requests)
    makespan = max(r.finish_time for r in requests) - start
    latencies = [r.finish_time - r.arrival_time for r in requests]
    stats = scheduler.stats
    step = max(1, len(acc.points) // TIMELINE_POINTS)
    classes = {}
    if any(r.priority for r in requests):
        classes = {"urgent": latency_summary([r for r in requests if r.priority < 0]),
                   "normal": latency_summary([r for r in requests if r.priority >= 0])}
    return PolicyResult(
        policy=policy,
        makespan_s=makespan,
        generated_tokens_per_s=sum(r.num_output_tokens for r in requests) / makespan,
        requests_per_s=len(requests) / makespan,
        mean_token_latency_s=sum(lat / r.num_output_tokens for lat, r in zip(latencies, requests)) / len(requests),
        **latency_summary(requests),
        mean_running_batch=stats.mean_running_batch,
        kv_utilization=acc.kv_used_time / max(acc.busy_time, 1e-12),
        kv_reserved=acc.kv_reserved_time / max(acc.busy_time, 1e-12),
        num_preemptions=stats.num_preemptions,
        num_mispredictions=stats.num_mispredictions,
        num_recomputed_tokens=stats.num_recomputed_tokens,
        num_steps=stats.num_steps,
        wall_s=wall,
        longest_stall_s=max(r.longest_stall_s for r in requests),
        timeline=acc.points[::step],
        classes=classes,
    )
