"""What prefix caching buys on the engine: chat requests behind one long system prompt, with and without the cache.

A chat service puts the same system prompt (a persona, rules, a tool list) in front of every user message, so every
request's prompt begins with the same few hundred tokens. Here each request is one user question (drawn without
replacement from `--sources`, none of them labelled data) behind one system prompt of about
`--system-prompt-tokens` tokens (role instructions from awesome_chatgpt_prompts, joined until long enough). All
requests arrive at t=0, greedy decoding with the labels' frequency penalty; each policy runs with the cache off,
then on, on the same prompts, KV pool and model, side by side in one run (`paged` without the cache first: its
answers are the reference, and its lengths the `oracle` predictor's for `s3`). One untimed warm-up first.

    .venv/bin/python benchmarks/prefix_cache.py --output runs/prefix_cache.json

Writes JSON with a `results` list (the keys of `s3 bench`'s records, plus `prefix_caching`, `prompt_tokens_computed`
and `prefix_hit_rate`) and prints the table. Not collected by pytest.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from core.buckets import BucketSpec  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.bench import (BenchConfig, answers_unlike, bucket_predictor, common_speed, predictions_for,  # noqa: E402
                            run_policy)
from pipeline.labelled import labelled_prompts  # noqa: E402
from pipeline.prompts import read_prompts, sample_prompts  # noqa: E402
from serve.engine.llm import EngineConfig  # noqa: E402
from serve.engine.plan import SamplingParams  # noqa: E402
from serve.policy_config import PolicyConfig, with_length_profile  # noqa: E402


def system_prompt(tokenizer, num_tokens: int) -> str:
    """Role instructions of awesome_chatgpt_prompts (in file order), joined until about ``num_tokens`` tokens."""
    rows, _ = read_prompts(ROOT / "data/prompts/awesome_chatgpt_prompts.json")
    parts: list[str] = []
    while rows and len(tokenizer("\n\n".join(parts))["input_ids"]) < num_tokens:
        parts.append(rows.pop(0).prompt)
    return "\n\n".join(parts)


def chat_ids(tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@click.command()
@click.option("--num-prompts", default=32, show_default=True)
@click.option("--system-prompt-tokens", default=400, show_default=True)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--kv-cache-tokens", default=8192, show_default=True,
              help="Without the cache, about 14 of these requests fit at once.")
@click.option("--max-num-seqs", default=32, show_default=True)
@click.option("--policies", default="paged,s3", show_default=True)
@click.option("--sources", default="data/prompts/nq_open.json,data/prompts/chat_bench_mix.json", show_default=True)
@click.option("--frequency-penalty", default=0.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
def main(num_prompts, system_prompt_tokens, max_new_tokens, kv_cache_tokens, max_num_seqs, policies, sources,
         frequency_penalty, seed, output):
    from serve.engine.loader import load_model

    model, tokenizer = load_model(None)
    system = system_prompt(tokenizer, system_prompt_tokens)
    rows = sample_prompts(sources.split(","), num_prompts + 4, exclude=labelled_prompts("data/labelled"), seed=seed)
    prompts = [(row.prompt, chat_ids(tokenizer, system, row.prompt)) for row in rows]
    prompts, warmup = prompts[:num_prompts], prompts[num_prompts:]
    shared = len(chat_ids(tokenizer, system, ""))  # about the tokens every prompt begins with
    print(f"{num_prompts} prompts of {min(len(i) for _, i in prompts)}-{max(len(i) for _, i in prompts)} tokens, "
          f"about {shared} of them the system prompt; KV pool {kv_cache_tokens} tokens")
    engine = EngineConfig(kv_cache_tokens=kv_cache_tokens, block_size=16, max_num_seqs=max_num_seqs)
    buckets = BucketSpec.uniform(max_new_tokens, 10)
    sampling = SamplingParams(frequency_penalty=frequency_penalty)
    common = dict(model=model, tokenizer=tokenizer, buckets=buckets, sampling=sampling)
    run_policy("paged", engine, prompts=warmup, max_new_tokens=32, predictions=None, **common)  # warm-up

    results, records, reference, predicted, knobs = [], [], None, None, PolicyConfig()
    for name in policies.split(","):
        for caching in (False, True):
            config = dataclasses.replace(engine, enable_prefix_caching=caching)
            given = None
            if predicted is not None and name != "paged":
                given = predictions_for(name, predicted=predicted, true_lengths=true_lengths, buckets=buckets)
            result, answers = run_policy(name, config, prompts=prompts, max_new_tokens=max_new_tokens,
                                         predictions=given, knobs=knobs, **common)
            if reference is None:
                reference, true_lengths = answers, [len(a) for a in answers]
                predictor = bucket_predictor(BenchConfig(max_new_tokens=max_new_tokens), [t for t, _ in prompts],
                                             true_lengths, buckets)
                predicted = list(predictor.predict([t for t, _ in prompts]))
                knobs = with_length_profile(PolicyConfig(), predictor)
            result.answers_differing = answers_unlike(answers, reference)
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            extra = {"prefix_caching": caching, "prompt_tokens": prompt_tokens,
                     # Every generated token but the last is computed once; the rest is prompts and recomputes.
                     "prompt_tokens_computed": result.num_computed_tokens - result.generated_tokens + len(prompts),
                     "prefix_hit_rate": result.num_prefix_hit_tokens / max(1, result.num_prefix_query_tokens)}
            results.append(result)
            records.append(extra)
            print(f"{name:>6} cache {'on ' if caching else 'off'}: {result.tokens_per_s:6.1f} tokens/s, "
                  f"mean TTFT {_mean(result.ttft_s):6.2f} s, mean latency {_mean(result.latency_s):6.2f} s, "
                  f"{result.num_preemptions} preemptions, hit rate {extra['prefix_hit_rate']:.2f}, "
                  f"{result.answers_differing} answers differing")
    common_speed(results)
    report = [{**r.record(), "policy": f"{r.name}{'+cache' if e['prefix_caching'] else ''}", **e}
              for r, e in zip(results, records)]
    for r in report:
        for key in ("ttft_s", "latency_s", "steps"):
            r.pop(key)
    print(_table(report))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json_text({
            "num_prompts": num_prompts, "system_prompt_tokens": shared, "max_new_tokens": max_new_tokens,
            "kv_cache_tokens": kv_cache_tokens, "max_num_seqs": max_num_seqs, "sources": sources, "seed": seed,
            "results": report}, indent=1))
        print(f"wrote {output}")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / max(1, len(values))


def _table(report: list[dict]) -> str:
    base = {r["policy"]: r for r in report}
    lines = ["| policy | tokens/s | over no cache | mean TTFT (s) | p99 TTFT (s) | mean latency (s) | preemptions | "
             "prompt tokens computed | hit rate |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report:
        off = base[r["policy"].removesuffix("+cache")]
        lines.append(f"| {r['policy']} | {r['generated_tokens_per_s']:.1f} | "
                     f"{r['generated_tokens_per_s'] / off['generated_tokens_per_s']:.2f}x | {r['mean_ttft_s']:.2f} | "
                     f"{r['p99_ttft_s']:.2f} | {r['mean_latency_s']:.2f} | {r['num_preemptions']} | "
                     f"{r['prompt_tokens_computed']} of {r['prompt_tokens']} | {r['prefix_hit_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
