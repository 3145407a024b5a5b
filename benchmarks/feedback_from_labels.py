"""A feedback store from freshly labelled prompts: what `s3 serve` would have recorded had it served them.

    .venv/bin/python benchmarks/feedback_from_labels.py --predictor runs/predictor --output-dir runs/feedback_fresh

Takes the rows in `data/labelled/shards` that the built dataset (`data/labelled/dataset`) does not hold yet, i.e.
prompts labelled since the last build, which no predictor has trained on, and writes a feedback record for each
one the server would record (`serve.feedback.mispredicted`): the predictor's arg-max bucket below the true one
(the request passes its predicted bucket's upper edge) or, unless ``--feedback under``, above it (the answer ends
below its predicted bucket; the labels' answers end of themselves or at the token limit, and one cut at the limit
is never an over-prediction). The labelling recipe is the serving decoding, so the lengths are the ones serving
would see. Then measure a retraining round on them:

    .venv/bin/s3 train --config configs/train_cpu.yaml --feedback runs/feedback_fresh --from runs/predictor \
        --output-dir runs/predictor_retrained
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from pipeline.generate import read_shards  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import load_records  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from serve.feedback import FeedbackWriter, over_predicted  # noqa: E402


@click.command()
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--predictor", "predictor_dir", default="runs/predictor", show_default=True)
@click.option("--output-dir", default="runs/feedback_fresh", show_default=True)
@click.option("--feedback", "kind", type=click.Choice(["both", "under"]), default="both", show_default=True,
              help="Record over-predictions too, as `s3 serve` does since 2026-12-06 (both), or only "
                   "under-predictions, as it did before (under).")
def main(data, predictor_dir, output_dir, kind):
    known = set(load_records(labelled_data(data)[0])["prompt"])
    fresh = [r for r in read_shards(Path(data) / "shards").values() if r["prompt"] not in known]
    if not fresh:
        raise click.ClickException(f"every shard row of {data} is already in its dataset: label more prompts first")
    predictor = LengthPredictor.load(predictor_dir)
    spec = predictor.buckets
    predictions = predictor.predict([r["prompt"] for r in fresh])
    written = 0
    with FeedbackWriter(output_dir) as writer:
        for row, prediction in zip(fresh, predictions):
            true_bucket = spec.bucket_of(row["num_output_tokens"])
            over = kind == "both" and over_predicted(prediction.bucket, true_bucket, ended_of_itself=row["finished"])
            if prediction.bucket >= true_bucket and not over:
                continue
            writer.write({
                "request_id": row["id"], "prompt": row["prompt"], "source": "feedback",
                "num_prompt_tokens": row["num_prompt_tokens"], "num_output_tokens": row["num_output_tokens"],
                "finished": row["finished"], "predicted_bucket": prediction.bucket, "true_bucket": true_bucket,
                "probs": list(prediction.probs) if prediction.probs else None, "num_mispredictions": int(not over),
                "num_preemptions": 0, "checkpoint_id": predictor.checkpoint_id, "time": time.time(),
            })  # fmt: skip
            written += 1
    click.echo(f"{len(fresh)} freshly labelled prompts, {written} mispredicted ({kind}) by {predictor.checkpoint_id}: "
               f"feedback records in {output_dir}")


if __name__ == "__main__":
    main()
