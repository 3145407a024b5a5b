"""The labelled test prompts served as chat requests: does serving reproduce the labels, and does the server's live
score of its predictor (`/metrics` ``s3_prediction_outcomes_total``) agree with `s3 evaluate`'s on the same rows?
And does the server call a predictor stale on a kind of prompt it never saw?

    .venv/bin/python benchmarks/served_labels.py --predictor runs/cpu-default/train/checkpoint --per-source 15
    # a predictor trained without GSM8K (s3 train ... --set "exclude_sources=[gsm8k_train]"), served GSM8K:
    .venv/bin/python benchmarks/served_labels.py --predictor runs/loso_gsm8k --sources gsm8k_train --split train \
        --per-source 250 --output-dir runs/served_labels_gsm8k

Takes the first ``--per-source`` rows of ``--split`` (test by default) of each source of ``--data`` (prompt-hash
order; ``--sources`` to choose), writes them as an
OpenAI batch file of chat requests (the prompt as the one user message, greedy, ``max_tokens`` the predictor's
largest length, the frequency penalty left to the server, which takes the checkpoint's labelling decoding), answers
it with `s3 batch`'s code under ``--config`` (`s3 serve`'s defaults: prefix caching on, the predictor's checkpoint,
no feedback store) and compares, request by request, the served length with the label, and the predictor's score on
the served lengths (what the server counts live) with its score on the labels (what `s3 evaluate` reports). A served
length differs from its label where batching changes a greedy token (fp32 sums in another order): the labels' own
noise, measured. Replays the server's staleness rule (`PredictionOutcomes.stale`) over the answers in the order they
ended: after how many requests it would have warned. Prints the comparison and writes
``<output-dir>/served_labels.json`` (``results``: one record per scoring; ``live``: the server's count and the
staleness verdict; ``rows``: each request). Not collected by pytest; about 5 minutes for 105 requests on a 2-core
CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from core.records import json_text  # noqa: E402
from pipeline.cli import load_predictor_checkpoint  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import load_records, sources_of, split_records  # noqa: E402
from predictor_train.evaluate import bucket_metrics  # noqa: E402
from serve.outcomes import PredictionOutcomes  # noqa: E402
from serve.server.batch import run_batch  # noqa: E402
from serve.server.config import ServeConfig  # noqa: E402
from serve.server.launch import build_stack, configure_process  # noqa: E402

SHOWN = ("accuracy", "within_one_accuracy", "under_prediction_rate", "mae_tokens")


def labelled_rows(data: str, per_source: int, split: str, sources: tuple[str, ...] = ()) -> list[dict]:
    """The first ``per_source`` rows of ``split`` of each source (of ``sources``; all when empty), sources in name
    order."""
    rows = split_records(load_records(labelled_data(data)[0]))[split]
    taken: dict[str, list[dict]] = {}
    for row, source in zip(rows, sources_of(rows)):
        if (not sources or source in sources) and len(taken.setdefault(source, [])) < per_source:
            taken[source].append(row)
    missing = set(sources) - set(taken)
    if missing:
        raise click.BadParameter(f"no {split} rows of {sorted(missing)} in {data}", param_hint="--sources")
    return [row for source in sorted(taken) for row in taken[source]]


def first_stale(records: list[dict], spec, expected: float | None) -> int | None:
    """How many requests, in the order they ended, the live count had scored when `PredictionOutcomes.stale`
    first called the predictor stale (the server's warning); None if it never did."""
    outcomes = PredictionOutcomes(spec, expected)
    for n, record in enumerate(records, start=1):
        outcomes.add(record["served"], record["predicted_bucket"])
        if outcomes.stale() is not None:
            return n
    return None


def batch_line(index: int, prompt: str, max_tokens: int) -> dict:
    return {"custom_id": str(index), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                     "max_tokens": max_tokens}}


@click.command()
@click.option("--predictor", "checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="A checkpoint folder (`s3 train`'s output).")
@click.option("--data", default="data/labelled", show_default=True, help="Labelled records (a test split is taken).")
@click.option("--per-source", default=15, show_default=True, help="Rows served per source.")
@click.option("--split", type=click.Choice(["test", "validation", "train"]), default="test", show_default=True,
              help="Which split's rows (train: for a predictor trained without their source, prompts of a new kind).")
@click.option("--sources", default="", help="Comma-separated sources to serve (default: all).")
@click.option("--config", "config_path", default="configs/serve_cpu.yaml", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a ServeConfig key.")
@click.option("--output-dir", default="runs/served_labels", show_default=True)
def main(checkpoint, data, per_source, split, sources, config_path, overrides, output_dir):
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(ServeConfig, config_path, overrides,
                         values={"predictor": checkpoint, "feedback_dir": None, "served_model_name": "smollm2"})
    configure_process(config)
    stack = build_stack(config, load_checkpoint=load_predictor_checkpoint)
    predictor, spec = stack.admission.predictor, stack.admission.predictor.buckets
    rows = labelled_rows(data, per_source, split, tuple(s for s in sources.split(",") if s))
    source_file, answer_file = out / "requests.jsonl", out / "answers.jsonl"
    source_file.write_text("".join(json.dumps(batch_line(i, r["prompt"], spec.max_tokens)) + "\n"
                                   for i, r in enumerate(rows)))
    answer_file.unlink(missing_ok=True)
    summary = run_batch(stack, source_file, answer_file)
    ended = [json.loads(line) for line in answer_file.read_text().splitlines()]  # in the order they ended
    answers = {a["custom_id"]: a["response"]["body"] for a in ended}
    predicted = [p.bucket for p in predictor.predict([r["prompt"] for r in rows])]
    records = []
    for i, (row, bucket) in enumerate(zip(rows, predicted)):
        choice, usage = answers[str(i)]["choices"][0], answers[str(i)]["usage"]
        records.append({"source": row["source"], "label": int(row["num_output_tokens"]),
                        "served": usage["completion_tokens"], "finish_reason": choice["finish_reason"],
                        "predicted_bucket": bucket})
    labels, served = [r["label"] for r in records], [r["served"] for r in records]
    results = [{"scored_on": "labels", **bucket_metrics(labels, predicted, spec)},
               {"scored_on": "served lengths", **bucket_metrics(served, predicted, spec)}]
    outcomes = stack.engine_loop.outcomes
    live = {"scored_on": "server's live count", "num_examples": outcomes.num_observed, **outcomes.counts,
            "mae_tokens": outcomes.abs_error_tokens / max(1, outcomes.num_observed),
            "expected_within_one": outcomes.expected_within_one, "stale": outcomes.stale(),
            "stale_after_requests": first_stale([records[int(a["custom_id"])] for a in ended], spec,
                                                outcomes.expected_within_one)}
    same = sum(a == b for a, b in zip(labels, served))
    same_bucket = sum(spec.bucket_of(a) == spec.bucket_of(b) for a, b in zip(labels, served))
    agreement = {"num_requests": len(records), "same_length": same, "same_bucket": same_bucket,
                 "mean_abs_length_difference": sum(abs(a - b) for a, b in zip(labels, served)) / len(records),
                 "live_summary": outcomes.summary(), "tokens_per_s": summary.num_completion_tokens / summary.elapsed_s}
    click.echo(f"{len(records)} requests: served length equal to the label for {same}, in the same bucket for "
               f"{same_bucket}; mean |served - label| {agreement['mean_abs_length_difference']:.1f} tokens")
    click.echo(f"live (/metrics): {outcomes.summary()}")
    if live["stale"]:
        click.echo(f"stale warning (first due after {live['stale_after_requests']} requests): {live['stale']}")
    click.echo("| scored on | n | " + " | ".join(SHOWN) + " |")
    click.echo("| --- | ---: |" + " ---: |" * len(SHOWN))
    for result in results:
        click.echo(f"| {result['scored_on']} | {result['num_examples']} | "
                   + " | ".join(f"{result[k]:.3f}" for k in SHOWN) + " |")
    (out / "served_labels.json").write_text(json_text(
        {"predictor": checkpoint, "data": data, "split": split, "sources": sources, "per_source": per_source,
         "agreement": agreement,
         "live": live, "results": results, "rows": records}, indent=2))
    click.echo(f"wrote {out / 'served_labels.json'}", err=True)


if __name__ == "__main__":
    main()
