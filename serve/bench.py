"""`s3 bench`: the engine's offline throughput under each policy, side by side in one run.

Same prompts, same KV budget, one model load. `max` runs first: greedy decoding is deterministic, so its
outputs are every prompt's true length, which the `oracle` policy and the s3 stand-in predictor use. A
plain `transformers` `generate` with static batching runs on the same prompts as a reference.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import time
from typing import Callable

import torch

from core.buckets import BucketSpec
from serve.engine.llm import EngineConfig, LLMEngine, eos_token_ids
from serve.engine.plan import SamplingParams
from serve.policies import PolicyConfig, PolicyName
from core.request import LengthPrediction, Request


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of `s3 bench`; every policy sees the same prompts and KV budget."""

    model: str = "smollm2"
    """`smollm2`, a .gguf file or a Hugging Face folder."""
    prompts: tuple[str, ...] = ("data/prompts/gsm8k_train.json", "data/prompts/gpteacher_toolformer.json",
                                "data/prompts/gpteacher_roleplay.json")  # fmt: skip
    """Prompt files (round-robin over them)."""
    num_prompts: int = 48
    max_new_tokens: int = 512
    policies: tuple[PolicyName, ...] = ("max", "paged", "s3", "oracle")
    """`max` always runs first (it measures the true lengths)."""
    predictor: str = "oracle-buckets"
    """s3's predictor: `oracle-buckets` (the true bucket: a stand-in until a trained one exists), `noisy`
    (true bucket with probability `predictor_accuracy`, else a neighbour), or a predictor checkpoint folder."""
    predictor_accuracy: float = 0.8
    num_buckets: int = 10
    kv_worst_case_seqs: int = 8
    """KV budget: room for this many worst-case (longest prompt + max_new_tokens) sequences."""
    max_num_seqs: int = 64
    block_size: int = 16
    frequency_penalty: float = 0.0
    """OpenAI's frequency penalty of every request (greedy otherwise); data/labelled was made with 0.5."""
    reference_batch: int = 32
    """Batch size of the `transformers` generate reference (0 skips it; skipped with a frequency penalty, which
    `generate` does not have)."""
    seed: int = 0
    output_dir: str = "runs/bench"


@dataclasses.dataclass
class BenchResult:
    name: str
    wall_s: float
    num_requests: int
    generated_tokens: int
    mean_running_batch: float = 0.0
    kv_utilization: float = 0.0
    kv_reserved: float = 0.0
    num_preemptions: int = 0
    num_mispredictions: int = 0
    num_recomputed_tokens: int = 0
    steps: list[tuple[int, int, float]] = dataclasses.field(default_factory=list, repr=False)
    """(tokens computed, KV entries read, seconds) of every step, for calibrating the simulator."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s


def load_bench_prompts(config: BenchConfig, tokenizer) -> list[tuple[str, list[int]]]:
    from pipeline.generate import format_prompt
    from pipeline.prompts import read_prompt_sets

    rows, _ = read_prompt_sets(list(config.prompts), prompt_field="instruction", input_field="input")
    by_source: dict[str, list] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    rng = random.Random(config.seed)
    picked = []
    for i in range(config.num_prompts):
        source = sorted(by_source)[i % len(by_source)]
        picked.append(rng.choice(by_source[source]))
    return [(row.prompt, format_prompt(tokenizer, row.prompt)) for row in picked]


def _predictions(config: BenchConfig, prompts, true_lengths: list[int], buckets: BucketSpec) -> list[LengthPrediction]:
    if config.predictor in ("oracle-buckets", "noisy"):
        rng = random.Random(config.seed + 1)
        out = []
        for n in true_lengths:
            bucket = buckets.bucket_of(n)
            if config.predictor == "noisy" and rng.random() >= config.predictor_accuracy:
                bucket = min(max(bucket + rng.choice((-1, 1)), 0), buckets.num_buckets - 1)
            out.append(LengthPrediction(bucket, num_tokens=n))
        return out
    from predictor_train.inference import LengthPredictor

    predictor = LengthPredictor.load(config.predictor, expected_buckets=buckets)
    return [dataclasses.replace(p, num_tokens=n) for p, n in zip(predictor.predict([p for p, _ in prompts]), true_lengths)]


def run_policy(
    name: PolicyName,
    engine_config: EngineConfig,
    *,
    model,
    tokenizer,
    prompts: list[tuple[str, list[int]]],
    max_new_tokens: int,
    predictions: list[LengthPrediction] | None,
    buckets: BucketSpec,
    sampling: SamplingParams = SamplingParams(),
    on_finish: Callable[[Request], None] = lambda request: None,
) -> tuple[BenchResult, list[int]]:
    """All prompts through a fresh engine with ``name``; returns the result and each output length.

    ``on_finish`` sees every finished request (e.g. to write its mispredictions to a feedback store)."""
    config = dataclasses.replace(engine_config, policy=PolicyConfig(policy=name))
    engine = LLMEngine(config, model=model, tokenizer=tokenizer, buckets=buckets)
    for i, (text, ids) in enumerate(prompts):
        prediction = predictions[i] if predictions else None
        engine.add_request(str(i), ids, max_new_tokens=max_new_tokens, prediction=prediction, sampling=sampling,
                           prompt=text)  # fmt: skip
    lengths = [0] * len(prompts)
    batch_sum = live_sum = held_sum = 0.0
    steps = []
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        step = engine.core.step()
        for request in step.finished:
            lengths[int(request.request_id)] = request.num_output_tokens
            on_finish(request)
        dt = time.perf_counter() - t0
        out, snap = step.output, engine.snapshot()
        live_tokens = sum(s.start + s.num_new_tokens for s in out.seqs)
        steps.append((out.num_batched_tokens, live_tokens, dt))
        batch_sum += len(out.seqs)
        live_sum += live_tokens / (snap.num_kv_blocks * engine.config.block_size) * dt
        held_sum += snap.num_kv_blocks_held / snap.num_kv_blocks * dt
    wall = time.perf_counter() - start
    stats = engine.snapshot().stats
    result = BenchResult(
        name, wall, len(prompts), sum(lengths), batch_sum / max(1, len(steps)), live_sum / wall, held_sum / wall,
        stats.num_preemptions, stats.num_mispredictions, stats.num_recomputed_tokens, steps,
    )  # fmt: skip
    return result, lengths


@torch.inference_mode()
def run_reference(model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, eos_ids: set[int]) -> BenchResult:
    """`transformers` generate with static batching (left padding), greedy, on the same prompts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    model.set_attn_implementation("sdpa")
    generated, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = [ids for _, ids in prompts[i : i + batch_size]]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)  # fmt: skip
        for row in out[:, width:].tolist():
            stop = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            generated += stop
    return BenchResult(f"hf-generate@{batch_size}", time.perf_counter() - start, len(prompts), generated)


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict:
    from serve.engine.loader import load_model

    model, tokenizer = load_model(None if config.model == "smollm2" else config.model)
    prompts = load_bench_prompts(config, tokenizer)
    longest = max(len(ids) for _, ids in prompts) + config.max_new_tokens
    engine_config = EngineConfig(
        model=config.model, kv_cache_tokens=config.kv_worst_case_seqs * longest + config.block_size,
        block_size=config.block_size, max_num_seqs=config.max_num_seqs,
    )  # fmt: skip
    buckets = BucketSpec.uniform(config.max_new_tokens, config.num_buckets)
    progress(f"{len(prompts)} prompts, KV pool {engine_config.kv_cache_tokens} tokens ({config.kv_worst_case_seqs} x {longest})")
    results, true_lengths, predictions = [], None, None
    sampling = SamplingParams(frequency_penalty=config.frequency_penalty)
    for name in ["max", *[p for p in config.policies if p != "max"]]:
        progress(f"running {name}")
        result, lengths = run_policy(
            name, engine_config, model=model, tokenizer=tokenizer, prompts=prompts,
            max_new_tokens=config.max_new_tokens, predictions=predictions, buckets=buckets, sampling=sampling,
        )  # fmt: skip
        if true_lengths is None:
            true_lengths = lengths
            predictions = _predictions(config, prompts, true_lengths, buckets)
        elif config.max_new_tokens and lengths != true_lengths:
            progress(f"warning: {name} produced different lengths than max (non-deterministic kernels?)")
        results.append(result)
    if config.reference_batch and sampling.has_penalties:
        progress("skipping the transformers generate reference: it has no frequency penalty")
    elif config.reference_batch:
        progress(f"running transformers generate at batch {config.reference_batch}")
        results.append(run_reference(model, tokenizer, prompts, batch_size=config.reference_batch,
                                     max_new_tokens=config.max_new_tokens, eos_ids=eos_token_ids(model, tokenizer)))
    return {"config": config, "results": results, "kv_cache_tokens": engine_config.kv_cache_tokens,
            "true_lengths": true_lengths, "prompt_tokens": [len(ids) for _, ids in prompts],
            "predicted_buckets": [p.bucket for p in predictions]}  # fmt: skip


# -- report -----------------------------------------------------------------------------------------------------

BENCH_COLUMNS = [
    ("run", lambda r, base: r.name),
    ("tok/s", lambda r, base: f"{r.tokens_per_s:.1f}"),
    ("vs max", lambda r, base: f"{r.tokens_per_s / base:.2f}x"),
    ("req/s", lambda r, base: f"{r.requests_per_s:.3f}"),
    ("batch", lambda r, base: f"{r.mean_running_batch:.1f}"),
    ("KV used", lambda r, base: f"{r.kv_utilization:.0%}"),
    ("KV held", lambda r, base: f"{r.kv_reserved:.0%}"),
    ("preempt", lambda r, base: str(r.num_preemptions)),
    ("mispred", lambda r, base: str(r.num_mispredictions)),
    ("recomp tok", lambda r, base: str(r.num_recomputed_tokens)),
    ("gen tok", lambda r, base: str(r.generated_tokens)),
    ("wall s", lambda r, base: f"{r.wall_s:.1f}"),
]


def format_bench(report: dict) -> str:
    from serve.sim.report import _table

    results = report["results"]
    base = results[0].tokens_per_s  # max runs first
    config = report["config"]
    head = (f"{results[0].num_requests} prompts, max_new_tokens {config.max_new_tokens}, KV pool "
            f"{report['kv_cache_tokens']} tokens, s3 predictor: {config.predictor}")  # fmt: skip
    rows = [[fn(r, base) for _, fn in BENCH_COLUMNS] for r in results]
    return head + "\n\n" + _table([name for name, _ in BENCH_COLUMNS], rows)


def save_bench(report: dict, output_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    import json

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "png": out / "bench.png"}
    data = {
        "config": dataclasses.asdict(report["config"]),
        "kv_cache_tokens": report["kv_cache_tokens"],
        "true_lengths": report["true_lengths"],
        "prompt_tokens": report["prompt_tokens"],
        "predicted_buckets": report["predicted_buckets"],
        "results": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "steps"}
            | {"tokens_per_s": r.tokens_per_s, "requests_per_s": r.requests_per_s, "steps": r.steps}
            for r in report["results"]
        ],
    }
    paths["json"].write_text(json.dumps(data, indent=1))
    _plot(report["results"], paths["png"])
    return paths


def _plot(results: list[BenchResult], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = results[0].tokens_per_s
    bars = ax1.bar([r.name for r in results], [r.tokens_per_s for r in results], color="#4c72b0")
    for bar, r in zip(bars, results):
        ax1.annotate(f"{r.tokens_per_s / base:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom")  # fmt: skip
    ax1.set_ylabel("generated tokens/s")
    ax1.set_title("engine throughput (ratio to max)")
    ax1.tick_params(axis="x", rotation=20)
    engine_runs = [r for r in results if r.steps]
    ax2.bar([r.name for r in engine_runs], [r.mean_running_batch for r in engine_runs], color="#55a868")
    ax2.set_ylabel("mean running sequences")
    ax2.set_title("batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
