"""The simulator's load protocol on the real engine: a length trace replayed through the model runner.

    python benchmarks/engine_trace_load.py --trace runs/trace_validation_9k.jsonl --device cuda --dtype bfloat16 \
        --num-requests 1000 --rate-fractions 1.0,1.2 --seeds 0 --kv-cache-tokens 12492 --max-num-seqs 64 \
        --output runs/engine_trace

`benchmarks/sim_load.py` with the cost model replaced by the model: each request is a trace row (its prompt
length, its predictor probabilities, its real output length), the production scheduler decides every step, the
engine's `ModelRunner` computes it (paged attention over the KV pool) on ``--device``, and the executor ends each
sequence at its traced length, as the simulator's does. The model is randomly initialised with the target's shape
(SmolLM2-135M-Instruct's unless ``--shape tiny``): a step's time depends on the shape, not the weights, and the
tokens are not read. Arrivals are Poisson in wall time. Per seed, `paged`'s capacity is measured first with every
request at once; then each policy runs at each fraction of it on the same arrivals. Writes
``<output>/engine_trace.json`` (a ``results`` list with the shared benchmark keys and ``rate_fraction``, ``seed``,
``capacity_rps``, ``device``) after every run, and stops starting runs after ``--deadline-s``. Not collected by
pytest.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.records import json_text, result_record  # noqa: E402
from serve.policy_config import PolicyConfig  # noqa: E402
from serve.policy_options import policy_options  # noqa: E402
from serve.sched_output import SchedulerOutput, StepResult  # noqa: E402
from serve.scheduler import Scheduler  # noqa: E402
from serve.sim.runner import TrueLengths, replay, requests_of  # noqa: E402
from serve.sim.simulate import SimulateConfig, setup, workload_items  # noqa: E402
from serve.sim.workload import PredictorConfig, WorkloadConfig  # noqa: E402

# SmolLM2-135M-Instruct's architecture (its config.json); the weights are random.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
}


class TracedLengths:
    """The model executor, with each sequence ended at its traced length (its own tokens are not read)."""

    def __init__(self, inner, true_lengths: dict[str, int]) -> None:
        self.inner = inner
        self.lengths = TrueLengths(true_lengths)

    def execute(self, out: SchedulerOutput) -> StepResult:
        self.lengths.schedule(out)
        result = self.inner.execute(out)
        return StepResult(result.sampled_token_ids, {r for r in result.sampled_token_ids if self.lengths.sampled(r)})


def build_model(shape: str, device: str, dtype: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], eos_token_id=None, bos_token_id=None, pad_token_id=0))
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def serve_items(model, policy: str, items, sched, buckets, max_seq_len: int, max_new_tokens: int, offline: bool):
    """One policy over ``items`` on the model, arrivals in wall time from now; the simulator's metrics."""
    from serve.engine.executor import ModelExecutor
    from serve.engine.runner import ModelRunner

    config = dataclasses.replace(sched, policy=dataclasses.replace(sched.policy, policy=policy))
    scheduler = Scheduler(config, buckets=buckets, clock=time.perf_counter)
    runner = ModelRunner(model, num_blocks=config.num_blocks, block_size=config.block_size)
    requests = requests_of(items, max_seq_len, max_new_tokens)
    executor = TracedLengths(ModelExecutor(runner, eos_token_ids=set()),
                             {r.request_id: item.num_output_tokens for r, item in zip(requests, items)})
    start = time.perf_counter()
    for request in requests:
        request.arrival_time = start + (0.0 if offline else request.arrival_time)
    return replay(policy, scheduler, executor, requests, clock=time.perf_counter,
                  wait_until=lambda t: time.sleep(max(0.0, t - time.perf_counter())))


@click.command()
@click.option("--trace", required=True, help="A length trace with predictor probabilities (predictor_trace.py).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="smollm2-135m", show_default=True)
@click.option("--policies", default="paged,s3", show_default=True)
@click.option("--rate-fractions", default="1.0,1.2", show_default=True)
@click.option("--seeds", default="0", show_default=True)
@click.option("--num-requests", type=int, default=1000, show_default=True)
@click.option("--max-new-tokens", type=int, default=512, show_default=True)
@click.option("--kv-cache-tokens", type=int, default=12492, show_default=True)
@click.option("--max-num-seqs", type=int, default=64, show_default=True)
@policy_options()
@click.option("--warmup-requests", type=int, default=32, show_default=True)
@click.option("--capacity", type=float, default=None,
              help="paged's requests/s to take the fractions of  [default: measured first, per seed]")
@click.option("--deadline-s", type=float, default=float("inf"), help="Start no run after this many seconds.")
@click.option("--output", default="runs/engine_trace", show_default=True)
def main(trace, device, dtype, shape, policies, rate_fractions, seeds, num_requests, max_new_tokens,
         kv_cache_tokens, max_num_seqs, warmup_requests, capacity, deadline_s, output, **knobs):
    began = time.perf_counter()
    names = tuple(p for p in policies.split(",") if p)
    model = build_model(shape, device, dtype)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"trace": trace, "device": device, "dtype": dtype, "shape": shape, "num_requests": num_requests,
            "kv_cache_tokens": kv_cache_tokens, "max_num_seqs": max_num_seqs, **knobs}
    records: list[dict] = []

    def save(result, **tags) -> None:
        records.append({**result_record(result, "num_requests", "makespan_s", "longest_stall_s", "mean_running_batch",
                                        "num_steps", "wall_s"), **tags})
        (out / "engine_trace.json").write_text(json_text({**meta, "results": records}, indent=2))
        click.echo(f"{tags} {result.policy}: {result.generated_tokens_per_s:.0f} tok/s, mean latency "
                   f"{result.mean_latency_s:.2f} s, p99 TTFT {result.p99_ttft_s:.2f} s, preemptions "
                   f"{result.num_preemptions}, longest stall {result.longest_stall_s:.1f} s, {result.num_steps} steps "
                   f"in {result.wall_s:.0f} s", err=True)

    for seed in [int(s) for s in seeds.split(",")]:
        config = SimulateConfig(preset="smollm2-cpu", max_new_tokens=max_new_tokens, kv_cache_tokens=kv_cache_tokens,
                                max_num_seqs=max_num_seqs, predictor=PredictorConfig(kind="file"),
                                workload=WorkloadConfig(num_requests=num_requests, trace=trace, seed=seed),
                                policy=PolicyConfig(**knobs))
        cost, buckets, sched = setup(config)
        items = workload_items(config, config.workload, cost, buckets)
        args = (sched, buckets, cost.model.max_seq_len, max_new_tokens)
        if warmup_requests:
            serve_items(model, "paged", items[:warmup_requests], *args, offline=True)
        if capacity is None:
            measured = serve_items(model, "paged", items, *args, offline=True)
            save(measured, rate_fraction=None, seed=seed, device=device)
        rps = capacity or measured.requests_per_s
        for fraction in [float(f) for f in rate_fractions.split(",")]:
            online = dataclasses.replace(config.workload, mode="online", rate=fraction * rps)
            online_items = workload_items(config, online, cost, buckets)
            for name in names:
                if time.perf_counter() - began > deadline_s:
                    click.echo(f"deadline: {name} at {fraction} not run", err=True)
                    return
                result = serve_items(model, name, online_items, *args, offline=False)
                save(result, rate_fraction=fraction, seed=seed, device=device,
                     capacity_rps=rps)


if __name__ == "__main__":
    main()
