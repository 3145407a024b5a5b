"""A simulator trace of real lengths with a trained predictor's bucket probabilities.

    .venv/bin/python benchmarks/predictor_trace.py runs/predictor --split test --output runs/trace_test.jsonl
    .venv/bin/s3 simulate --trace runs/trace_test.jsonl --set predictor.kind=file --set max_new_tokens=512

Rows of data/labelled's ``split`` (the predictor never trained on the test split): prompt tokens, the target
model's output length, and the predictor's (calibrated) probabilities and arg-max bucket. Not collected by
pytest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.argument("checkpoint")
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--output", default="runs/trace_test.jsonl", show_default=True)
def main(checkpoint, data, split, output):
    from pipeline.labelled import labelled_data
    from predictor_train.data import load_records, split_records
    from predictor_train.inference import LengthPredictor

    predictor = LengthPredictor.load(checkpoint)
    rows = split_records(load_records(labelled_data(data)[0]))[split]
    probs = predictor.predict_probs(rows["prompt"]).tolist()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        for row, p in zip(rows, probs):
            f.write(json.dumps({"num_prompt_tokens": row["num_prompt_tokens"],
                                "num_output_tokens": max(1, row["num_output_tokens"]),
                                "predicted_bucket": max(range(len(p)), key=p.__getitem__), "probs": p}) + "\n")
    print(f"wrote {len(rows)} rows of the {split} split to {output}")


if __name__ == "__main__":
    main()
