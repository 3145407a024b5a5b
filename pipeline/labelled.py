"""The labelled data set: shards -> `datasets` dataset on disk + Parquet + dataset card + length histogram; and
finding it again (`labelled_data`) and the prompts it holds (`labelled_prompts`, which benchmarks never draw)."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import statistics
from typing import Collection

from pipeline.prompts import Skipped, source_name

COLUMNS = ("id", "prompt", "source", "row", "num_prompt_tokens", "num_output_tokens", "finished",
           "sample_output_tokens", "output_text")


def labelled_data(path: str | pathlib.Path) -> tuple[str, dict]:
    """A `generate` output folder (dataset/ + recipe.json) or a dataset path -> (dataset path, recipe)."""
    folder = pathlib.Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"labelled data {folder} does not exist; make it with `s3 generate`")
    recipe_path = folder / "recipe.json"
    if recipe_path.exists() and (folder / "dataset").exists():
        return str(folder / "dataset"), json.loads(recipe_path.read_text())
    if recipe_path.exists():
        raise FileNotFoundError(f"{folder} has no dataset/ yet: its `s3 generate` run has not finished; run it again")
    return str(folder), {}


def labelled_prompts(path: str | pathlib.Path) -> set[str]:
    """Every prompt of a `generate` output folder (or a dataset folder): its dataset's and, when it has shards,
    those labelled since the dataset was last written, which a predictor trained later may have seen."""
    from pipeline.generate import read_shards

    folder = pathlib.Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"labelled data {folder} does not exist")
    dataset = folder / "dataset" if (folder / "recipe.json").exists() else folder
    shards = read_shards(folder / "shards")
    if not (dataset / "state.json").exists() and not shards:
        raise FileNotFoundError(f"{folder} holds no labelled prompts (no dataset, no shards)")
    prompts = {row["prompt"] for row in shards.values()}
    if (dataset / "state.json").exists():
        import datasets

        prompts |= set(datasets.load_from_disk(str(dataset))["prompt"])
    return prompts


def write_dataset(rows: list[dict], skipped: list[Skipped], recipe: dict, output_dir: str | pathlib.Path, *,
                  read_sources: Collection[str] = ()) -> dict:
    """Write dataset/, labelled.parquet, length_histogram.png, skipped.jsonl and README.md; returns the stats.
    ``skipped``: what this run skipped of the ``read_sources`` it read; what earlier runs skipped of other sources
    is kept, so the card describes the whole dataset, not the last command."""
    import datasets

    out = pathlib.Path(output_dir)
    skipped = [*_earlier_skipped(out / "skipped.jsonl", read_sources), *skipped]
    stats = length_stats(rows)
    # Everything is made beside its target first and moved into place at the end, the dataset last but one and
    # the card last: a failure on the way leaves the previous files, never a dataset and a card out of step.
    staged = {name: out / f".{name}.partial" for name in ("length_histogram.png", "labelled.parquet",
                                                          "skipped.jsonl", "README.md", "dataset")}
    plot_histogram(rows, recipe["max_new_tokens"], staged["length_histogram.png"])
    staged["README.md"].write_text(card(stats, recipe, skipped))
    staged["skipped.jsonl"].write_text("".join(json.dumps({"path": s.path, "row": s.row, "reason": s.reason}) + "\n"
                                               for s in skipped))
    dataset = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS})
    shutil.rmtree(staged["dataset"], ignore_errors=True)
    dataset.save_to_disk(str(staged["dataset"]))
    dataset.to_parquet(str(staged["labelled.parquet"]))
    for name in ("length_histogram.png", "labelled.parquet", "skipped.jsonl"):
        os.replace(staged[name], out / name)
    old = out / ".dataset.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "dataset").exists():
        os.replace(out / "dataset", old)
    os.replace(staged["dataset"], out / "dataset")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(staged["README.md"], out / "README.md")
    return stats


def _earlier_skipped(path: pathlib.Path, read_sources: Collection[str]) -> list[Skipped]:
    """The entries of an earlier run's skipped.jsonl whose source this run did not read again."""
    if not path.exists():
        return []
    earlier = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            entry = Skipped(**json.loads(line))
        except (ValueError, TypeError):
            continue
        if source_name(entry.path) not in read_sources:
            earlier.append(entry)
    return earlier


def length_stats(rows: list[dict]) -> dict:
    lengths = [r["num_output_tokens"] for r in rows]
    by_source = collections.Counter(r["source"] for r in rows)
    return {
        "num_rows": len(rows),
        "by_source": dict(sorted(by_source.items())),
        "num_capped": sum(not r["finished"] for r in rows),
        "mean_output_tokens": statistics.fmean(lengths) if lengths else 0.0,
        "median_output_tokens": statistics.median(lengths) if lengths else 0,
        "max_output_tokens": max(lengths, default=0),
        "mean_prompt_tokens": statistics.fmean(r["num_prompt_tokens"] for r in rows) if rows else 0.0,
    }


def plot_histogram(rows: list[dict], max_new_tokens: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sources = sorted({r["source"] for r in rows})
    data = [[r["num_output_tokens"] for r in rows if r["source"] == s] for s in sources]
    ax.hist(data, bins=40, range=(0, max_new_tokens), stacked=True, label=sources)
    width = max_new_tokens // 10  # the paper's 10 buckets (no lines under 10 tokens)
    for edge in range(width, max_new_tokens, width) if width else ():
        ax.axvline(edge, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("output tokens (dotted: the 10 length buckets)")
    ax.set_ylabel("prompts")
    ax.set_title(f"output lengths of {len(rows)} prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def card(stats: dict, recipe: dict, skipped: list[Skipped]) -> str:
    sources = "\n".join(f"| {name} | {count:,} |" for name, count in stats["by_source"].items())
    reasons = collections.Counter(s.reason.split(" (")[0] for s in skipped)
    skipped_lines = "\n".join(f"- {n} x {reason}" for reason, n in reasons.most_common()) or "- none"
    template = recipe.get("chat_template") or "(tokenizer default)"
    return f"""# Length-labelled prompts

Made by `s3 generate`: each prompt was formatted with the target model's chat template (the prompt as one
user message, `add_generation_prompt=True`, the model's default system prompt included) and run through the
project's engine; `num_output_tokens` counts the generated tokens, the end-of-sequence token included.

## Recipe (lengths depend on all of it)

- model: `{recipe['model']}`
- decoding: temperature {recipe['temperature']} ({'greedy' if recipe['temperature'] == 0 else 'sampled'}), top_p {recipe['top_p']}, presence_penalty {recipe.get('presence_penalty', 0.0)}, frequency_penalty {recipe.get('frequency_penalty', 0.0)}, max_new_tokens {recipe['max_new_tokens']}, samples per prompt {recipe['num_samples']}, seed {recipe['seed']}
- prompt = `{recipe['prompt_field']}`{f" + blank line + `{recipe['input_field']}` when non-empty" if recipe.get('input_field') else ""}

## Counts

| source | prompts |
| --- | ---: |
{sources}
| **total** | **{stats['num_rows']:,}** |

- hit the max_new_tokens cap (finished = false): {stats['num_capped']:,}
- output tokens: mean {stats['mean_output_tokens']:.1f}, median {stats['median_output_tokens']}, max {stats['max_output_tokens']}
- prompt tokens (templated): mean {stats['mean_prompt_tokens']:.1f}

![length histogram](length_histogram.png)

## Skipped inputs ({len(skipped)}, listed in `skipped.jsonl`)

{skipped_lines}

## Files

`dataset/` (`datasets.load_from_disk`), `labelled.parquet`, `shards/` (the resumable raw rows),
`recipe.json`. Columns: {', '.join(f'`{c}`' for c in COLUMNS)}.

## Chat template

```jinja
{template}
```
"""
