"""Length-predictor latency against the target model's decode step, measured side by side in one run.

Prints seconds per prompt for the predictor at batch 1 and 32 (``LengthPredictor.benchmark_latency``), then the
time of one SmolLM2 decode step on the project's engine at batch 1 and 32, and their ratios. The predictor
runs once per request, before admission; a decode step runs once per generated token.

    .venv/bin/python benchmarks/predictor_latency.py runs/predictor
    .venv/bin/python benchmarks/predictor_latency.py runs/predictor --model smollm2 --steps 32 --output lat.json

Not a test (pytest never collects this folder). Quiet machine only: other processes slow torch on CPU a lot.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from core.files import output_file  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.generate import format_prompt  # noqa: E402
from predictor_train.inference import BENCHMARK_PROMPTS, LengthPredictor  # noqa: E402
from serve.engine.llm import EngineConfig, LLMEngine  # noqa: E402


def decode_step_seconds(engine: LLMEngine, batch_size: int, num_steps: int) -> float:
    """Median wall time of one step once ``batch_size`` sequences are all decoding (prefill excluded)."""
    for i in range(batch_size):
        ids = format_prompt(engine.tokenizer, BENCHMARK_PROMPTS[i % len(BENCHMARK_PROMPTS)])
        engine.add_request(f"b{batch_size}-{i}", ids, max_new_tokens=num_steps + 64)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()  # prefill (chunked) until every sequence has its first token
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
        engine.scheduler.forget(request_id)
    return statistics.median(times)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="smollm2", show_default=True, help="Target model for the decode-step timing.")
@click.option("--batch-sizes", default="1,32", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps timed per batch size.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
def main(checkpoint, model, batch_sizes, steps, output):
    try:  # a bad output path fails now, not after the timings
        output = output and output_file(output)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    sizes = [int(b) for b in batch_sizes.split(",")]
    predictor = LengthPredictor.load(checkpoint)
    per_prompt = predictor.benchmark_latency(batch_sizes=sizes, num_prompts=max(32, max(sizes)))
    del predictor
    engine = LLMEngine(EngineConfig(model=model, kv_cache_tokens=max(sizes) * 512, max_num_seqs=max(sizes)))
    engine.eos_token_ids = frozenset()  # every sequence decodes for the whole timing
    step = {b: decode_step_seconds(engine, b, steps) for b in sizes}
    rows = [{"batch_size": b, "predictor_ms_per_prompt": 1e3 * per_prompt[b], "decode_step_ms": 1e3 * step[b],
             "predictor_over_step": per_prompt[b] / step[b]} for b in sizes]
    print(f"{'batch':>5}  {'predictor ms/prompt':>19}  {'decode step ms':>14}  {'ratio':>6}")
    for r in rows:
        print(f"{r['batch_size']:>5}  {r['predictor_ms_per_prompt']:>19.1f}  {r['decode_step_ms']:>14.1f}  "
              f"{r['predictor_over_step']:>6.2f}")
    if output:
        Path(output).write_text(json_text(rows, indent=2))


if __name__ == "__main__":
    main()
