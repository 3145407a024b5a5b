"""Test doubles: request builders and a fake executor that ends sequences at scripted lengths."""

from __future__ import annotations

from core.buckets import BucketSpec
from serve.policy_config import PolicyConfig
from core.request import LengthPrediction, Request
from serve.sched_output import SchedulerOutput, StepResult
from serve.scheduler import Scheduler, SchedulerConfig

BUCKETS = BucketSpec.uniform(64, 4)  # buckets of 16 tokens: (0,16], (16,32], (32,48], (48,64]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(policy: str = "s3", *, num_blocks: int = 16, block_size: int = 4, **kwargs) -> Scheduler:
    policy_kwargs = {k: kwargs.pop(k) for k in ("aging_s", "aging_queue_factor", "lookahead", "watermark", "reserve_quantile", "quantile", "prior_weight",
                                             "short_queue", "wait_steps") if k in kwargs}
    config = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=kwargs.pop("max_num_seqs", 8),
        max_num_batched_tokens=kwargs.pop("max_num_batched_tokens", 64),
        long_prefill_token_threshold=kwargs.pop("long_prefill_token_threshold", 0),
        policy=PolicyConfig(policy=policy, **policy_kwargs),
        enable_prefix_caching=kwargs.pop("enable_prefix_caching", False),
    )
    return Scheduler(config, buckets=kwargs.pop("buckets", BUCKETS), clock=kwargs.pop("clock", FakeClock()), **kwargs)


def make_request(
    request_id: str,
    *,
    prompt_tokens: int = 4,
    max_new_tokens: int = 32,
    bucket: int | None = None,
    true_tokens: int | None = None,
    arrival_time: float = 0.0,
) -> Request:
    prediction = None
    if bucket is not None or true_tokens is not None:
        bucket = BUCKETS.bucket_of(true_tokens) if bucket is None else bucket
        prediction = LengthPrediction(bucket=bucket, num_tokens=true_tokens)
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(1, prompt_tokens + 1)),
        max_new_tokens=max_new_tokens,
        arrival_time=arrival_time,
        prompt=f"prompt {request_id}",
        prediction=prediction,
    )


class ScriptedExecutor:
    """Samples token ``len(output) + 1`` for each sequence and stops it at its scripted length."""

    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths
        self.computed: dict[str, int] = {}  # tokens in each sequence's (imaginary) cache

    def execute(self, scheduler: Scheduler, out: SchedulerOutput) -> StepResult:
        for rid in out.preempted_request_ids + out.finished_request_ids:
            self.computed.pop(rid, None)
        result = StepResult()
        starts = {seq.request_id: seq.start for seq in out.seqs}
        for new in out.new_requests:
            # A (re)admitted request starts on an empty cache, or on cached prefix blocks with prefix caching.
            start = starts[new.request_id]
            assert start == 0 or (scheduler.pool.prefix_caching and start % scheduler.pool.block_size == 0), start
            self.computed[new.request_id] = start
        for seq in out.seqs:
            # The plan must continue exactly where the cache ends (recompute starts from 0).
            assert seq.start == self.computed.get(seq.request_id, 0), (seq, self.computed.get(seq.request_id))
            self.computed[seq.request_id] = seq.start + seq.num_new_tokens
            assert len(seq.block_ids) * scheduler.pool.block_size >= seq.start + seq.num_new_tokens
            if seq.samples:
                request = scheduler.requests[seq.request_id]
                result.sampled_token_ids[seq.request_id] = request.num_output_tokens + 1
                if request.num_output_tokens + 1 >= self.lengths[seq.request_id]:
                    result.stopped_request_ids.add(seq.request_id)
        return result


def run_until_done(scheduler: Scheduler, lengths: dict[str, int], *, max_steps: int = 10_000, clock=None, on_step=None):
    """Drive the scheduler to completion; check invariants after every step; return finished requests in order."""
    executor = ScriptedExecutor(lengths)
    finished = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        out = scheduler.schedule()
        result = executor.execute(scheduler, out)
        finished += scheduler.update_from_output(out, result)
        scheduler.check_invariants()
        if clock is not None:
            clock.now += 1.0
        if on_step is not None:
            on_step(out)
    assert not scheduler.has_unfinished(), "did not finish within max_steps"
    return finished
