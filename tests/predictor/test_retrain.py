"""Retraining from a checkpoint with serving feedback (mispredicted prompts and their true lengths)."""

from __future__ import annotations

import random

import datasets
import pytest

from predictor_train.data import split_records
from predictor_train.inference import LengthPredictor
from predictor_train.retrain import retrain_predictor

from .conftest import tiny_config
from .synthetic import TOPICS


def _feedback(predictor: LengthPredictor, test_prompt: str, test_length: int) -> datasets.Dataset:
    """A new instruction the model never saw, whose outputs are long (bucket 4), as serving would log it."""
    rng = random.Random(7)
    prompts = [f"Tell me a long story about {' and '.join(rng.sample(TOPICS, 2))} (!{i})" for i in range(48)]
    lengths = [rng.randint(405, 495) for _ in prompts]
    prompts.append(test_prompt)  # one that sits in the test split: must not be trained on
    lengths.append(test_length)
    predicted = [p.bucket for p in predictor.predict(prompts)]
    return datasets.Dataset.from_dict({
        "prompt": prompts, "source": ["serving"] * len(prompts), "num_prompt_tokens": [len(p.split()) for p in prompts],
        "num_output_tokens": lengths, "finished": [True] * len(prompts), "predicted_bucket": predicted,
    })


def test_retraining_learns_the_feedback_and_keeps_the_test_split(trained, dataset, tmp_path):
    previous = LengthPredictor.load(trained.checkpoint_dir)
    test = split_records(dataset)["test"]
    feedback = _feedback(previous, test[0]["prompt"], test[0]["num_output_tokens"])
    report = retrain_predictor(tiny_config(tmp_path / "retrained", epochs=3), dataset, feedback,
                               previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert report.num_feedback_used == 48 and report.num_feedback_dropped == 1
    assert report.parent_checkpoint_id == trained.info.checkpoint_id
    assert report.result.info.parent_checkpoint_id == trained.info.checkpoint_id
    assert report.result.info.buckets == trained.info.buckets
    assert report.result.info.data["feedback"] == 48 and report.result.info.data["test"] == len(test)
    before, after = report.before, report.after
    assert before["test"].metrics["predictor"]["num_examples"] == after["test"].metrics["predictor"]["num_examples"]
    assert before["feedback"].metrics["predictor"]["accuracy"] < 0.5  # they were mispredictions
    assert after["feedback"].metrics["predictor"]["accuracy"] > before["feedback"].metrics["predictor"]["accuracy"]
    assert after["test"].metrics["predictor"]["accuracy"] >= 0.8
    assert "before" in report.table() and "feedback:" in report.table()


def test_retraining_refuses_other_bucket_settings(trained, dataset, tmp_path):
    feedback = dataset.select(range(5))
    with pytest.raises(ValueError, match="cannot retrain .* num_buckets 10"):
        retrain_predictor(tiny_config(tmp_path, num_buckets=10), dataset, feedback,
                          previous_checkpoint=trained.checkpoint_dir)
    with pytest.raises(ValueError, match="scheme quantile"):
        retrain_predictor(tiny_config(tmp_path, bucket_scheme="quantile"), dataset, feedback,
                          previous_checkpoint=trained.checkpoint_dir)


def test_retraining_refuses_to_overwrite_its_parent(trained, dataset):
    with pytest.raises(ValueError, match="is the previous checkpoint"):
        retrain_predictor(tiny_config(trained.checkpoint_dir), dataset, dataset.select(range(5)),
                          previous_checkpoint=trained.checkpoint_dir)
