"""A simulator trace of real lengths with a trained predictor's bucket probabilities.

    .venv/bin/python benchmarks/predictor_trace.py runs/predictor --split test --output runs/trace_test.jsonl
    .venv/bin/s3 simulate --trace runs/trace_test.jsonl --set predictor.kind=file --set max_new_tokens=512

Rows of data/labelled's ``split`` (the predictor never trained on the test split): prompt tokens, the target
model's output length, the prompt's source, and the predictor's (calibrated) probabilities and arg-max bucket,
with the prompt's familiarity when the checkpoint keeps a familiarity bank.

A new kind of traffic: ``--held-out SOURCE`` adds every row of SOURCE (of all splits; give a checkpoint trained
without it, e.g. benchmarks/leave_one_source_out.py's) ahead of the split's rows of the other sources, and
``--unfamiliar-probs`` replaces the probabilities of the rows the predictor finds unfamiliar: by its training
lengths' bucket frequencies (``prior``, what it knows of lengths in general) or by the unfamiliar rows' own
length histogram (``lengths``, the best a server could learn about the new kind from its answers). Not
collected by pytest.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.files import output_file  # noqa: E402


@click.command()
@click.argument("checkpoint")
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--held-out", default=None, help="A source the checkpoint never saw: all its rows come first.")
@click.option("--unfamiliar-probs", type=click.Choice(["predictor", "prior", "lengths"]), default="predictor",
              show_default=True, help="The probabilities written for the rows the predictor finds unfamiliar.")
@click.option("--output", default="runs/trace_test.jsonl", show_default=True)
def main(checkpoint, data, split, held_out, unfamiliar_probs, output):
    from pipeline.labelled import labelled_data
    from predictor_train.data import load_records, sources_of, split_records
    from predictor_train.inference import LengthPredictor

    try:  # a bad output path fails now, not after every row is predicted
        output = output_file(output)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    predictor = LengthPredictor.load(checkpoint)
    if unfamiliar_probs != "predictor" and predictor.familiarity is None:
        raise click.UsageError(f"{checkpoint} keeps no familiarity bank: no row can be told unfamiliar")
    records = load_records(labelled_data(data)[0])
    rows = split_records(records)[split]
    if held_out is not None:
        if held_out not in set(sources_of(records)):
            raise click.BadParameter(f"no rows of source {held_out!r} in {data}", param_hint="--held-out")
        rows = [r for r in records if r["source"] == held_out] + [r for r in rows if r["source"] != held_out]
    else:
        rows = list(rows)
    predictions = predictor.predict([r["prompt"] for r in rows])
    replaced = _unfamiliar_probs(predictor, rows, predictions, unfamiliar_probs)
    with open(output, "w") as f:
        for row, prediction in zip(rows, predictions):
            probs = replaced if replaced is not None and prediction.unfamiliar else prediction.probs
            f.write(json.dumps({"num_prompt_tokens": row["num_prompt_tokens"],
                                "num_output_tokens": max(1, row["num_output_tokens"]),
                                "predicted_bucket": max(range(len(probs)), key=probs.__getitem__),
                                "probs": list(probs), "source": row["source"],
                                "familiarity": prediction.familiarity, "unfamiliar": prediction.unfamiliar}) + "\n")
    counts = collections.Counter((r["source"], bool(p.unfamiliar)) for r, p in zip(rows, predictions))
    shares = ", ".join(f"{s} {counts[s, True]}/{counts[s, True] + counts[s, False]}"
                       for s in sorted({s for s, _ in counts}))
    print(f"wrote {len(rows)} rows to {output}; unfamiliar by source: {shares}")


def _unfamiliar_probs(predictor, rows, predictions, kind: str) -> tuple[float, ...] | None:
    """One distribution for every unfamiliar row (None: keep the predictor's)."""
    from core.buckets import bucket_frequencies

    if kind == "predictor":
        return None
    if kind == "prior":
        return predictor.length_prior or bucket_frequencies(predictor.buckets, [])
    lengths = [r["num_output_tokens"] for r, p in zip(rows, predictions) if p.unfamiliar]
    return bucket_frequencies(predictor.buckets, lengths)


if __name__ == "__main__":
    main()
