"""How much of a label is the prompt: the target model's lengths for prompts the predictor cannot tell apart.

    .venv/bin/python benchmarks/label_noise.py --per-source 30 --output-dir runs/label_noise

Takes a sample of the labelled test split (the same number from every source) and runs SmolLM2 again with
the labels' recipe (greedy, frequency penalty 0.5, 512 new tokens) in two ways:

- ``rerun``: the same prompts, batched differently (another order): fp32 greedy decoding can flip a token when
  the batch around a sequence differs, and every later token with it;
- ``newline``: each prompt with one newline appended. The predictor's tokenizer drops whitespace, so it reads the
  two prompts as the same input (the script checks this for every prompt); SmolLM2 reads one token more;
- ``space`` (not run by default): the prompt's first space doubled, the same kind of change inside the prompt.

For each pair (label, new length) a predictor that sees the same input for both can be within one bucket of
both only if the two buckets are at most two apart, and in the right bucket for both only if they are equal. So
over the pairs its within-one accuracy is at most ``1 - P(buckets > 2 apart) / 2``, its accuracy at most
``1 - P(buckets differ) / 2`` and its MAE at least ``mean |difference| / 2``: ceilings that no predictor reading
this tokenizer's view of the prompt can pass on these prompts. Writes label_noise.json (a ``results`` list, one
record per variant, with per-source figures and every prompt's lengths) and label_noise.png (new length against
label). About 10 minutes per variant at 30 prompts per source on the 2-core CPU. Not collected by pytest.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.records import json_text  # noqa: E402

VARIANTS = {
    "rerun": lambda prompt: prompt,
    "newline": lambda prompt: prompt + "\n",
    "space": lambda prompt: prompt.replace(" ", "  ", 1),
}


@click.command()
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--per-source", type=int, default=30, show_default=True, help="Prompts drawn from each source.")
@click.option("--variants", default="rerun,newline", show_default=True)
@click.option("--predictor-tokenizer", default=None,
              help="Folder of the predictor's tokenizer (default: the packaged MiniLM-L6 backbone).")
@click.option("--model", default="smollm2", show_default=True,
              help="The target model: the labels' (see data/labelled/README.md) or a local Hugging Face folder.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True,
              help="The labels' cap (data/labelled/README.md); the buckets are tenths of it.")
@click.option("--max-num-seqs", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output-dir", default="runs/label_noise", show_default=True)
def main(data, split, per_source, variants, predictor_tokenizer, model, max_new_tokens, max_num_seqs, seed,
         output_dir):
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from core.buckets import BucketSpec
    from pipeline.generate import GenerateConfig
    from pipeline.labelled import labelled_data
    from pipeline.prompts import format_prompt
    from predictor_train.backbone import minilm_dir
    from predictor_train.data import load_records, split_records
    from serve.engine.llm import EngineConfig, LLMEngine

    names = [v for v in variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    dataset_path, labels_recipe = labelled_data(data)
    rows = sample_rows(split_records(load_records(dataset_path))[split], per_source, seed)
    recipe = GenerateConfig(model=model, max_new_tokens=max_new_tokens)  # the labels' decoding otherwise
    differs = [k for k in ("max_new_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty")
               if k in labels_recipe and labels_recipe[k] != getattr(recipe, k)]
    if differs:  # a folder with a recipe.json says how its lengths were made; compare like with like
        raise click.ClickException(f"{data} was labelled with other decoding ({', '.join(differs)}): "
                                   + ", ".join(f"{k}={labels_recipe[k]}" for k in differs))
    spec = BucketSpec.uniform(recipe.max_new_tokens, 10)  # the predictor's buckets (configs/train_cpu.yaml)
    reader = AutoTokenizer.from_pretrained(predictor_tokenizer or minilm_dir(), local_files_only=True)
    engine = LLMEngine(EngineConfig(model=recipe.model, max_num_seqs=max_num_seqs,
                                    kv_cache_tokens=max_num_seqs * 1024))  # fmt: skip
    labels = [row["num_output_tokens"] for row in rows]
    # Each labelled prompt as the predictor and as SmolLM2 read it, to tell whether a variant changed it.
    read_as = [reader(row["prompt"])["input_ids"] for row in rows]
    formatted = [format_prompt(engine.tokenizer, row["prompt"]) for row in rows]
    records = []
    for name in names:
        perturb = VARIANTS[name]
        prompts = [perturb(row["prompt"]) for row in rows]
        same_input = [reader(p)["input_ids"] == original for p, original in zip(prompts, read_as)]
        ids = {f"{name}-{i}": format_prompt(engine.tokenizer, p) for i, p in enumerate(prompts)}  # ids are unique
        target_changed = [ids[f"{name}-{i}"] != original for i, original in enumerate(formatted)]
        order = list(ids)
        random.Random(seed + 1).shuffle(order)  # another batch order than the labelling run's
        start = time.perf_counter()
        lengths = {}
        finished = engine.generate_ids({k: ids[k] for k in order}, max_new_tokens=recipe.max_new_tokens,
                                       temperature=recipe.temperature, top_p=recipe.top_p, seed=recipe.seed,
                                       presence_penalty=recipe.presence_penalty,
                                       frequency_penalty=recipe.frequency_penalty)  # fmt: skip
        for done in tqdm(finished, total=len(ids), desc=name, unit="prompt"):
            lengths[int(done.request_id.rsplit("-", 1)[1])] = len(done.output_token_ids)
        new = [lengths[i] for i in range(len(rows))]
        record = {"variant": name, "wall_s": time.perf_counter() - start,
                  "predictor_input_unchanged": sum(same_input) / len(rows),
                  "target_input_changed": sum(target_changed) / len(rows),
                  **pair_metrics(labels, new, spec),
                  "by_source": {s: pair_metrics([labels[i] for i in idx], [new[i] for i in idx], spec)
                                for s, idx in by_source(rows).items()},
                  "prompts": [{"source": row["source"], "label": label, "new": n, "predictor_input_unchanged": same}
                              for row, label, n, same in zip(rows, labels, new, same_input)]}  # fmt: skip
        print(format_record(record))
        records.append(record)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": data, "split": split, "per_source": per_source, "num_prompts": len(rows), "seed": seed,
            "recipe": {k: getattr(recipe, k) for k in ("model", "max_new_tokens", "temperature", "frequency_penalty")}}
    (out / "label_noise.json").write_text(json_text({**meta, "results": records}, indent=2))
    plot(records, spec, out / "label_noise.png")
    print(format_table(records))
    print(f"wrote {out / 'label_noise.json'} and {out / 'label_noise.png'}")


def sample_rows(ds, per_source: int, seed: int) -> list[dict]:
    """``per_source`` rows of each source (all of a smaller one), drawn with ``seed``, in source order."""
    rng = random.Random(seed)
    rows = []
    for source, idx in sorted(by_source(list(ds)).items()):
        rows += [ds[i] for i in sorted(rng.sample(idx, min(per_source, len(idx))))]
    return rows


def by_source(rows) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["source"], []).append(i)
    return groups


def pair_metrics(labels: list[int], new: list[int], spec) -> dict:
    """How far apart two lengths of the same predictor input are, and the ceilings that puts on a predictor."""
    n = len(labels)
    gaps = [abs(spec.bucket_of(a) - spec.bucket_of(b)) for a, b in zip(labels, new)]
    tokens = [abs(a - b) for a, b in zip(labels, new)]
    return {
        "n": n,
        "same_length": sum(a == b for a, b in zip(labels, new)) / n,
        "same_bucket": sum(g == 0 for g in gaps) / n,
        "buckets_within_one": sum(g <= 1 for g in gaps) / n,
        "buckets_over_two_apart": sum(g > 2 for g in gaps) / n,
        "mean_abs_diff_tokens": sum(tokens) / n,
        "accuracy_ceiling": 1 - sum(g > 0 for g in gaps) / n / 2,
        "within_one_ceiling": 1 - sum(g > 2 for g in gaps) / n / 2,
        "mae_floor_tokens": sum(tokens) / n / 2,
    }


def format_record(r: dict) -> str:
    return (f"{r['variant']}: same length {r['same_length']:.1%}, same bucket {r['same_bucket']:.1%}, buckets > 2 "
            f"apart {r['buckets_over_two_apart']:.1%}, mean |diff| {r['mean_abs_diff_tokens']:.1f} tokens "
            f"({r['wall_s']:.0f} s)")


def format_table(records: list[dict]) -> str:
    lines = ["| variant | source | n | same length | same bucket | buckets within one | > 2 apart | mean abs diff "
             "| accuracy ceiling | within-one ceiling | MAE floor |", "| --- | --- | ---: |" + " ---: |" * 8]
    for r in records:
        for source, m in [("all", r), *sorted(r["by_source"].items())]:
            lines.append(f"| {r['variant']} | {source} | {m['n']} | {m['same_length']:.1%} | {m['same_bucket']:.1%} "
                         f"| {m['buckets_within_one']:.1%} | {m['buckets_over_two_apart']:.1%} "
                         f"| {m['mean_abs_diff_tokens']:.1f} | {m['accuracy_ceiling']:.1%} "
                         f"| {m['within_one_ceiling']:.1%} | {m['mae_floor_tokens']:.1f} |")
    return "\n".join(lines)


def plot(records: list[dict], spec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 4.2), squeeze=False)
    for ax, r in zip(axes[0], records):
        ax.scatter([p["label"] for p in r["prompts"]], [p["new"] for p in r["prompts"]], s=8, alpha=0.5)
        top = spec.max_tokens
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        for edge in range(1, spec.num_buckets):
            ax.axvline(spec.upper_edge(edge - 1), color="grey", lw=0.3)
            ax.axhline(spec.upper_edge(edge - 1), color="grey", lw=0.3)
        ax.set(xlim=(0, top + 5), ylim=(0, top + 5), xlabel="label (output tokens)", ylabel="new length",
               title=f"{r['variant']}: same bucket {r['same_bucket']:.0%}, > 2 apart {r['buckets_over_two_apart']:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
