"""Scheduler step cost: microseconds of CPU bookkeeping per step (schedule + update) at several batch sizes.

Not a test (pytest never collects this folder). Run: .venv/bin/python benchmarks/scheduler_step.py
Every policy is measured in the same run, so the ratios between them are meaningful on a noisy machine.
"""

from __future__ import annotations

import time

from core.buckets import BucketSpec
from core.request import LengthPrediction, Request
from serve.policy_config import POLICY_NAMES, PolicyConfig
from serve.sched_output import StepResult
from serve.scheduler import Scheduler, SchedulerConfig


def measure(policy: str, batch: int, steps: int = 300) -> float:
    """Mean seconds per decode step with ``batch`` running sequences and a queue twice as long."""
    buckets = BucketSpec.uniform(2048, 10)
    config = SchedulerConfig(
        num_blocks=batch * 2048 // 16, block_size=16, max_num_seqs=batch, max_num_batched_tokens=max(batch, 2048),
        policy=PolicyConfig(policy=policy),
    )
    scheduler = Scheduler(config, buckets=buckets, clock=lambda: 0.0)
    for i in range(3 * batch):
        scheduler.add_request(
            Request(str(i), (1,) * 32, 2000, prediction=LengthPrediction(bucket=0, num_tokens=10_000))
        )
    for _ in range(3):  # admit and prefill
        out = scheduler.schedule()
        scheduler.update_from_output(out, StepResult({s.request_id: 1 for s in out.seqs if s.samples}))
    start = time.perf_counter()
    for _ in range(steps):
        out = scheduler.schedule()
        scheduler.update_from_output(out, StepResult({s.request_id: 1 for s in out.seqs if s.samples}))
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    print(f"{'batch':>6} " + " ".join(f"{p:>10}" for p in POLICY_NAMES) + "   (microseconds per step)")
    for batch in (8, 32, 128, 512):
        print(f"{batch:>6} " + " ".join(f"{measure(p, batch) * 1e6:>10.0f}" for p in POLICY_NAMES))
