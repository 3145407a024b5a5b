"""Scheduler step cost: microseconds of CPU bookkeeping per step (schedule + update) at several batch sizes.

Not a test (pytest never collects this folder). Run: .venv/bin/python benchmarks/scheduler_step.py
Every policy is measured in the same run, so the ratios between them are meaningful on a noisy machine.

Three steady states of a busy server, each with a queue:
- ``seats full``: ``batch`` sequences running, as many as ``max_num_seqs`` allows, and twice as many waiting;
  nobody can be admitted, so a step is the running sequences' bookkeeping.
- ``memory full``: seats for four times ``batch``, a pool of ``batch`` worst-case sequences and 3 x ``batch``
  requests, each predicted to write 2,000 tokens: the pool binds, so every step some waiting request fits now
  and the policy's admission test runs against everyone running (the projected peak, for `s3`).
- ``mispredicted``: as ``memory full`` with a pool a quarter the size and every request predicted short (the
  first bucket) while it writes 2,000 tokens: running sequences run out of blocks every step, and each one short
  of a block asks the policy whether to wait or take a victim (for `s3`, whether another is likely to end soon).
  Measured after 100 steps, once the pool has filled.
- ``burst``: ``batch`` requests arrive at once at an empty server (seats and a pool as in ``memory full``, each
  request predicted to write 2,000 tokens): the first step, which admits them, timed on fresh schedulers.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from core.buckets import BucketSpec
from core.records import json_text
from core.request import LengthPrediction, Request
from serve.policy_config import POLICY_NAMES, PolicyConfig
from serve.sched_output import StepResult
from serve.scheduler import Scheduler, SchedulerConfig

SCENARIOS = ("seats full", "memory full", "mispredicted", "burst")


def measure(policy: str, batch: int, scenario: str = "seats full", steps: int = 300) -> float:
    """Mean seconds per decode step with about ``batch`` running sequences and a queue (see the module docstring)."""
    buckets = BucketSpec.uniform(2048, 10)
    seats = batch if scenario == "seats full" else 4 * batch
    pool_tokens = batch * (512 if scenario == "mispredicted" else 2048)
    config = SchedulerConfig(
        num_blocks=pool_tokens // 16, block_size=16, max_num_seqs=seats, max_num_batched_tokens=max(seats, 2048),
        policy=PolicyConfig(policy=policy),
    )
    prediction = {"seats full": LengthPrediction(bucket=0, num_tokens=10_000),
                  "mispredicted": LengthPrediction(bucket=0)}.get(scenario, LengthPrediction(bucket=9, num_tokens=2000))
    if scenario == "burst":
        return _first_step(config, buckets, prediction, batch, repeats=max(3, steps // 60))
    scheduler = Scheduler(config, buckets=buckets, clock=lambda: 0.0)
    for i in range(3 * batch):
        scheduler.add_request(Request(str(i), (1,) * 32, 2000, prediction=prediction))
    for _ in range(100 if scenario == "mispredicted" else 3):  # admit and prefill (and fill the pool)
        out = scheduler.schedule()
        scheduler.update_from_output(out, StepResult({s.request_id: 1 for s in out.seqs if s.samples}))
    start = time.perf_counter()
    for _ in range(steps):
        out = scheduler.schedule()
        scheduler.update_from_output(out, StepResult({s.request_id: 1 for s in out.seqs if s.samples}))
    return (time.perf_counter() - start) / steps


def _first_step(config: SchedulerConfig, buckets: BucketSpec, prediction: LengthPrediction, batch: int,
                repeats: int) -> float:
    """Mean seconds of the first `schedule()` after ``batch`` arrivals at an empty server."""
    total = 0.0
    for _ in range(repeats):
        scheduler = Scheduler(config, buckets=buckets, clock=lambda: 0.0)
        for i in range(batch):
            scheduler.add_request(Request(str(i), (1,) * 32, 2000, prediction=prediction))
        start = time.perf_counter()
        scheduler.schedule()
        total += time.perf_counter() - start
    return total / repeats


@click.command()
@click.option("--batches", default="8,32,128,512", show_default=True, help="Comma-separated batch sizes.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the figures as JSON: a `results` list of {policy, scenario, batch, step_us}.")
def main(batches: str, output: str | None) -> None:
    """Print each scenario's table: microseconds per step, one column per policy."""
    results = []
    for scenario in SCENARIOS:
        print(f"\n{scenario}: microseconds per step")
        print(f"{'batch':>6} " + " ".join(f"{p:>12}" for p in POLICY_NAMES))
        for batch in (int(b) for b in batches.split(",")):
            row = [{"policy": p, "scenario": scenario, "batch": batch, "step_us": measure(p, batch, scenario) * 1e6}
                   for p in POLICY_NAMES]
            print(f"{batch:>6} " + " ".join(f"{r['step_us']:>12.0f}" for r in row))
            results += row
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json_text({"results": results}, indent=1))


if __name__ == "__main__":
    main()
