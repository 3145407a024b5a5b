"""Retraining from a checkpoint with serving feedback (mispredicted prompts and their true lengths)."""

from __future__ import annotations

import random

import datasets
import pytest

from predictor_train.data import cap_per_source, split_records
from predictor_train.inference import LengthPredictor
from predictor_train.retrain import (
    effective_size, feedback_for_training, hold_out_feedback, inherit_encoding, is_held_out, replay_sample, retrain_predictor, traffic_sample,
)  # fmt: skip

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
    report = retrain_predictor(tiny_config(tmp_path / "retrained", epochs=3, feedback_holdout=0.25), dataset,
                               feedback, previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert report.num_feedback_dropped == 1
    assert report.num_feedback_used + report.num_feedback_held_out == 48 and report.num_feedback_held_out > 0
    # replay: replay_ratio (4) labelled rows per feedback example seen, capped at the whole train split
    train_rows = len(split_records(dataset)["train"])
    assert report.num_replayed == min(train_rows, 4 * 10 * report.num_feedback_used)
    assert report.parent_checkpoint_id == trained.info.checkpoint_id
    assert report.result.info.parent_checkpoint_id == trained.info.checkpoint_id
    assert report.result.info.buckets == trained.info.buckets
    assert report.result.info.backbone_kind == trained.info.backbone_kind == "tiny-random"
    assert report.result.info.data["feedback"] == report.num_feedback_used and report.result.info.data["test"] == len(test)
    before, after = report.before, report.after
    assert before["test"].metrics["predictor"]["num_examples"] == after["test"].metrics["predictor"]["num_examples"]
    assert before["feedback"].metrics["predictor"]["accuracy"] < 0.5  # they were mispredictions
    assert after["feedback"].metrics["predictor"]["accuracy"] > before["feedback"].metrics["predictor"]["accuracy"]
    assert after["test"].metrics["predictor"]["accuracy"] >= 0.8
    # the held-out feedback was never trained on, yet the new instruction carries over to it
    held_before, held_after = before["feedback_held_out"], after["feedback_held_out"]
    assert held_after.metrics["predictor"]["accuracy"] > held_before.metrics["predictor"]["accuracy"]
    assert "before" in report.table() and "feedback:" in report.table()
    # the new familiarity bank holds all the weights learned from: the train split and the fed-back prompts
    assert report.result.info.familiarity["bank_size"] == train_rows + report.num_feedback_used


@pytest.mark.parametrize("served_as_predicted", [False, True], ids=["like-the-trained-on", "as-predicted"])
def test_a_sample_of_served_traffic_guards_the_round(trained, dataset, tmp_path, served_as_predicted):
    """With a weighted sample of the traffic in the store, each epoch is scored on its held-out records too and must
    do as well there: a round that learns its records but serves the held-out traffic worse is refused."""
    previous = LengthPredictor.load(trained.checkpoint_dir)
    test = split_records(dataset)["test"]
    feedback = _feedback(previous, test[0]["prompt"], test[0]["num_output_tokens"])
    held = [is_held_out(p, 0.6) for p in feedback["prompt"]]
    spec = previous.buckets
    served = [int(spec.midpoint(b)) if served_as_predicted else n
              for b, n in zip(feedback["predicted_bucket"], feedback["num_output_tokens"])]
    lengths = [s if h else n for h, s, n in zip(held, served, feedback["num_output_tokens"])]
    feedback = feedback.remove_columns("num_output_tokens").add_column("num_output_tokens", lengths)
    feedback = feedback.add_column("sampled", held)  # as if sampled among the well-predicted, at rate 0.5
    feedback = feedback.add_column("traffic_weight", [2.0 if h else 1.0 for h in held])
    report = retrain_predictor(tiny_config(tmp_path / "retrained", epochs=2, feedback_holdout=0.6), dataset,
                               feedback, previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert report.num_feedback_held_out >= 20 and "the labelled validation split and" in report.traffic
    history = report.result.history
    assert all("traffic" in record for record in history)
    retrained = [record["traffic"]["loss"] for record in history[1:]]
    if served_as_predicted:  # the trained-on records say long, the held-out traffic what the parent predicted
        assert min(retrained) > history[0]["traffic"]["loss"] and report.kept_parent
        assert "served traffic accuracy" in report.verdict()
    else:
        assert min(retrained) < history[0]["traffic"]["loss"] and not report.kept_parent


def test_a_handful_of_sampled_records_is_no_guard(trained, dataset, tmp_path):
    """Held-out mispredictions alone judge nothing (any round that learns them does better on them): without
    enough sampled well-predicted records the round is judged on the labelled validation split alone, and says so."""
    previous = LengthPredictor.load(trained.checkpoint_dir)
    feedback = _feedback(previous, "a prompt of no split", 450)
    sampled = [i < 5 for i in range(len(feedback))]
    feedback = feedback.add_column("sampled", sampled)
    feedback = feedback.add_column("traffic_weight", [10.0 if s else 1.0 for s in sampled])
    report = retrain_predictor(tiny_config(tmp_path / "retrained", epochs=1, feedback_holdout=0.5), dataset,
                               feedback, previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert "alone" in report.traffic and "(5 of them sampled" in report.traffic and "too few" in report.traffic
    assert not any("traffic" in record for record in report.result.history)


def test_sampled_records_are_held_out_and_weighted_back_into_the_traffic():
    rows = datasets.Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(6)], "finished": [True, False, False, True, True, True],
        "num_output_tokens": [5, 500, 100, 7, 9, 9], "sampled": [False, False, False, False, True, True],
        "traffic_weight": [1.0, 1.0, 1.0, 0.0, 10.0, 10.0]})  # fmt: skip
    trained_on, held = hold_out_feedback(rows, 0.0)
    assert trained_on["prompt"] == ["p0", "p1", "p2", "p3"] and held["prompt"] == ["p4", "p5"]
    # p2 was cut short, p3 is no sample; a mispredicted record stands for 1 / share of them, a sampled one for its own
    served, weights = traffic_sample(rows, max_tokens=500, share=0.5)
    assert served["prompt"] == ["p0", "p1", "p4", "p5"] and weights == [2.0, 2.0, 10.0, 10.0]
    assert traffic_sample(rows, max_tokens=500, share=0.0)[1] == [10.0, 10.0]  # no mispredicted one held out
    none, no_weights = traffic_sample(rows.remove_columns("traffic_weight"), max_tokens=500, share=0.5)
    assert len(none) == 0 and no_weights == []
    assert effective_size([1.0] * 39 + [10.0]) == pytest.approx(49**2 / 139) and effective_size([]) == 0.0


def test_a_prompt_served_twice_is_held_out_whole():
    # once mispredicted (not held out by its hash), once sampled (held out): judging the round on the sampled record
    # would score it on a prompt it trained on
    rows = datasets.Dataset.from_dict({
        "prompt": ["twice", "twice", "once"], "finished": [True] * 3, "num_output_tokens": [5, 5, 9],
        "sampled": [False, True, False], "traffic_weight": [1.0, 10.0, 1.0]})  # fmt: skip
    trained_on, held = hold_out_feedback(rows, 0.0)
    assert trained_on["prompt"] == ["once"] and held["prompt"] == ["twice", "twice"]


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


def test_feedback_holdout_is_by_prompt_hash_and_replay_is_stratified(dataset):
    kept, held = hold_out_feedback(dataset, 0.2)
    assert len(kept) + len(held) == len(dataset) and 0 < len(held) < len(dataset) / 2
    assert not set(kept["prompt"]) & set(held["prompt"])
    again, _ = hold_out_feedback(dataset.shuffle(seed=3), 0.2)
    assert set(again["prompt"]) == set(kept["prompt"])
    # independent of the labelled split's hash: of the 20 train rows first in that hash order, some are held out
    first = cap_per_source(split_records(dataset)["train"], 20)
    assert 0 < len(hold_out_feedback(first, 0.2)[1]) < len(first) / 2
    mixed = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(40)], "source": ["a"] * 30 + ["b"] * 10})
    sample = replay_sample(mixed, 8, seed=0)
    assert sample["source"].count("a") == 6 and sample["source"].count("b") == 2
    assert len(replay_sample(mixed, 100, seed=0)) == 40


def test_replay_only_control_trains_as_many_labelled_rows_and_no_feedback(trained, dataset, tmp_path):
    feedback = _feedback(LengthPredictor.load(trained.checkpoint_dir), "a prompt of no split", 10)
    config = tiny_config(tmp_path / "control", epochs=1, feedback_holdout=0.0, feedback_repeat=1, replay_ratio=1.0,
                         replay_only=True)
    report = retrain_predictor(config, dataset, feedback, previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert report.num_feedback_used == 0 and report.result.info.data["feedback"] == 0
    assert report.num_replayed == min(len(split_records(dataset)["train"]), 2 * len(feedback))
    assert report.after["feedback"].metrics["predictor"]["num_examples"] == len(feedback)  # still measured on


def test_a_round_that_scores_worse_on_validation_keeps_the_previous_weights(trained, dataset, tmp_path):
    """A learning rate that wrecks the model: the guard keeps the parent's weights (epoch 0) and says so; with the
    guard off, the wrecked epoch is what ships."""
    feedback = _feedback(LengthPredictor.load(trained.checkpoint_dir), "a prompt of no split", 10)
    wreck = dict(epochs=1, lr=50.0, feedback_holdout=0.0, feedback_repeat=1, replay_ratio=1.0)
    guarded = retrain_predictor(tiny_config(tmp_path / "guarded", **wreck), dataset, feedback,
                                previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert guarded.kept_parent and guarded.result.best_epoch == 0
    start, epoch = guarded.result.history
    assert start["epoch"] == 0 and start["train_loss"] is None and epoch["loss"] > start["loss"]
    assert "kept the previous weights" in guarded.verdict() and "epoch 1 (validation accuracy" in guarded.verdict()
    test_prompts = split_records(dataset)["test"]["prompt"]
    parent, kept = LengthPredictor.load(trained.checkpoint_dir), LengthPredictor.load(guarded.result.checkpoint_dir)
    assert [p.bucket for p in kept.predict(test_prompts)] == [p.bucket for p in parent.predict(test_prompts)]
    assert guarded.result.info == trained.info  # the parent checkpoint itself, its bank and prior included

    unguarded = retrain_predictor(tiny_config(tmp_path / "unguarded", keep_parent_unless_matched=False, **wreck),
                                  dataset, feedback, previous_checkpoint=trained.checkpoint_dir, progress=False)
    assert unguarded.result.best_epoch == 1 and not unguarded.kept_parent
    assert [r["epoch"] for r in unguarded.result.history] == [1] and unguarded.verdict().startswith("kept epoch 1")
    assert (unguarded.after["test"].metrics["predictor"]["accuracy"]
            < guarded.after["test"].metrics["predictor"]["accuracy"])


def test_retraining_replays_and_validates_on_the_configs_sources_only(trained, dataset, tmp_path):
    """A predictor trained without a source (leave-one-source-out) is retrained on the same selection: the replay
    and the validation rows leave the excluded source out, the test split keeps it."""
    two_sources = dataset.map(lambda row, i: {"source": "b" if i % 2 else "a"}, with_indices=True)
    splits = split_records(two_sources)
    feedback = _feedback(LengthPredictor.load(trained.checkpoint_dir), "a prompt of no split", 10)
    config = tiny_config(tmp_path / "without_b", epochs=1, feedback_holdout=0.0, feedback_repeat=1,
                         replay_ratio=100.0, exclude_sources=("b",))
    report = retrain_predictor(config, two_sources, feedback, previous_checkpoint=trained.checkpoint_dir,
                               progress=False)
    assert report.num_replayed == splits["train"]["source"].count("a")
    assert report.result.info.data["validation"] == splits["validation"]["source"].count("a")
    assert report.after["test"].metrics["predictor"]["num_examples"] == len(splits["test"])


def test_feedback_a_client_cut_short_is_not_trained_on():
    # An answer stopped by the client's own lower max_tokens has no label (only "longer than this"); one that ended
    # of itself, or at the labels' limit, has; a prompt of the validation or test split is never trained on.
    feedback = datasets.Dataset.from_dict({
        "prompt": ["natural", "capped by the client", "at the limit", "in the test split"],
        "num_output_tokens": [300, 100, 512, 40], "finished": [True, False, False, True]})
    rows, in_splits, cut = feedback_for_training(feedback, {"in the test split"}, max_tokens=512)
    assert rows["prompt"] == ["natural", "at the limit"] and (in_splits, cut) == (1, 1)


def test_a_retrained_checkpoint_reads_prompts_as_its_parent_was_trained_to(trained, tmp_path):
    # `s3 train --feedback` without the parent's --config: the defaults' prompt length and backbone must not be
    # recorded (and used at serving) for weights trained another way.
    config = inherit_encoding(tiny_config(tmp_path, backbone="minilm", max_prompt_tokens=256,
                                          prompt_truncation="head_tail"), trained.info)
    parent = trained.info.train_config
    assert (config.backbone, config.max_prompt_tokens, config.prompt_truncation) == (
        parent["backbone"], parent["max_prompt_tokens"], parent["prompt_truncation"]) == ("tiny-random", 32, "head")
