"""`s3 train`, `s3 evaluate` and `s3 train --feedback` through the CLI, on tiny models and synthetic data."""

import json
import re

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from core.buckets import BucketSpec
from serve.feedback import FeedbackWriter
from tests.predictor.synthetic import MAX_TOKENS, NUM_BUCKETS, make_records

TINY = ["--set", "backbone=tiny-random", "--set", f"max_tokens={MAX_TOKENS}", "--set", f"num_buckets={NUM_BUCKETS}",
        "--set", "epochs=2", "--set", "lr=0.01", "--set", "batch_size=32", "--set", "wandb_mode=disabled"]  # fmt: skip


@pytest.mark.slow  # trains twice
def test_train_evaluate_and_retrain_on_feedback(labelled, tmp_path):
    runner = CliRunner()
    first = tmp_path / "first"
    result = runner.invoke(main, ["train", "--data", str(labelled), "--output-dir", str(first), *TINY])
    assert result.exit_code == 0, result.output
    assert "test split:" in result.output and "majority" in result.output and "regression" in result.output
    info = json.loads((first / "predictor.json").read_text())
    assert info["target_model"] == "tiny-target" and (first / "confusion_matrix.png").exists()

    result = runner.invoke(main, ["evaluate", str(first), "--data", str(labelled), "--split", "validation",
                                  "--neighbours", "5"])
    assert result.exit_code == 0, result.output
    assert "validation split" in result.output
    assert "\nneighbours " in result.output and "neighbours, k=5" in result.output  # a bucket row and a probs row
    result = runner.invoke(main, ["evaluate", str(first), "--data", str(labelled), "--exclude-source", "nowhere"])
    assert result.exit_code != 0 and "no rows of source(s) nowhere" in result.output

    feedback_dir = tmp_path / "feedback"
    spec = BucketSpec.uniform(MAX_TOKENS, NUM_BUCKETS)
    with FeedbackWriter(feedback_dir) as writer:
        for i, record in enumerate(make_records(30, seed=7)):
            writer.write(record | {"prompt": record["prompt"] + " [fb]", "predicted_bucket": 0,
                                   "true_bucket": spec.bucket_of(record["num_output_tokens"]), "request_id": str(i)})
    second = tmp_path / "second"
    args = ["train", "--data", str(labelled), "--feedback", str(feedback_dir), "--from", str(first),
            "--output-dir", str(second), *TINY]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "feedback records" in result.output and "before" in result.output and "after" in result.output
    assert re.search(r"the store's records: \d+ under-predicted, 0 over-predicted, \d+ in their predicted bucket "
                     r"\(0 of them sampled well-predicted requests\) \(no over-predictions", result.output)
    assert re.search(r"^kept (epoch \d+|the previous weights) \(validation accuracy", result.output, re.M)
    assert "judged on the labelled validation split alone: no sample of served traffic" in result.output
    used, held = re.search(r"with (\d+) feedback records \((\d+) more held out", result.output).groups()
    assert int(used) + int(held) == 30 and int(held) > 0  # none of the "[fb]" prompts is in the labelled splits
    assert json.loads((second / "predictor.json").read_text())["parent_checkpoint_id"] == info["checkpoint_id"]


def test_train_errors_are_clear(tmp_path, labelled):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nothing"), *TINY])
    assert result.exit_code == 2 and "make it with `s3 generate`" in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(labelled), "--feedback", str(tmp_path), *TINY])
    assert result.exit_code == 2 and "--from" in result.output


def test_from_without_feedback_and_a_bucket_span_other_than_the_labels_cap_are_refused(tmp_path, labelled):
    # --from alone used to be ignored (a fresh model trained); buckets over another span than the labels' cap
    # used to lump every longer answer into the last bucket without a word.
    result = CliRunner().invoke(main, ["train", "--data", str(labelled), "--from", str(tmp_path), *TINY])
    assert result.exit_code == 2 and "needs --feedback" in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(labelled), *TINY, "--set", f"max_tokens={2 * MAX_TOKENS}"])
    assert result.exit_code == 2 and f"labelled with max_new_tokens={MAX_TOKENS}" in result.output
