"""The pipeline's summary table: ratios within one round, and training examples labelled as such."""

from pipeline.summary import format_summary, serve_command, summary_rows


def _outputs(*, held_out: bool) -> dict:
    metrics = lambda acc: {"accuracy": acc, "under_prediction_rate": 0.3}  # noqa: E731
    retrain = {"feedback_used": 8, "feedback_held_out": 2,
               "before": {"test": metrics(0.4), "feedback": metrics(0.0)},
               "after": {"test": metrics(0.39), "feedback": metrics(0.5)}}  # fmt: skip
    if held_out:
        retrain["before"]["feedback_held_out"] = metrics(0.0)
        retrain["after"]["feedback_held_out"] = metrics(0.5)
    serve = lambda max_tps, s3_tps: {"max": {"tokens_per_s": max_tps},  # noqa: E731
                                     "s3": {"tokens_per_s": s3_tps, "mispredictions": 3, "preemptions": 1,
                                            "mean_running_batch": 7.0, "answers_differing": 0}}  # fmt: skip
    return {"train": {"test": {"predictor": metrics(0.4), "majority": metrics(0.2), "regression": metrics(0.15)}},
            "collect": serve(100.0, 120.0), "retrain": retrain, "bench": serve(50.0, 75.0)}  # fmt: skip


def test_every_ratio_divides_figures_of_one_round():
    rows = {row[0]: row[1:] for row in summary_rows(_outputs(held_out=False))}
    # Before: 120 / 100 from collect's own max; after: 75 / 50 from the bench round's own max (not 75 / 100).
    assert rows["s3 / max throughput (same round)"] == ["1.20x", "1.50x"]
    assert rows["max tokens/s (this round's own run)"] == ["100.0", "50.0"]
    assert rows["s3 prompts answered unlike max"] == ["0", "0"]


def test_rows_on_retraining_data_say_they_are_training_examples():
    table = format_summary(_outputs(held_out=True))
    assert "retrained on (training examples, n=8)" in table
    assert "held-out feedback prompts (not trained on, n=2)" in table


def test_a_retrain_round_that_kept_the_previous_weights_says_so():
    outputs = _outputs(held_out=False)
    assert "predictor weights" not in {row[0] for row in summary_rows(outputs)}  # an older run's outputs
    outputs["retrain"]["kept_parent_weights"] = True
    rows = {row[0]: row[1:] for row in summary_rows(outputs)}
    assert rows["predictor weights"] == ["trained", "trained (retrained ones scored lower)"]
    outputs["retrain"]["kept_parent_weights"] = False
    assert {row[0]: row[1:] for row in summary_rows(outputs)}["predictor weights"] == ["trained", "retrained"]


def test_unfamiliar_served_prompts_are_counted_when_the_predictor_can_tell():
    outputs = _outputs(held_out=False)
    assert {row[0]: row[1:] for row in summary_rows(outputs)}["served prompts unfamiliar to the predictor"] == \
        ["-", "-"]  # a predictor without a familiarity bank
    outputs["collect"]["s3"] |= {"unfamiliar_prompts": 3, "num_prompts": 16}
    outputs["bench"]["s3"] |= {"unfamiliar_prompts": 1, "num_prompts": 16}
    rows = {row[0]: row[1:] for row in summary_rows(outputs)}
    assert rows["served prompts unfamiliar to the predictor"] == ["3 of 16", "1 of 16"]


def test_the_serve_command_names_the_last_predictor():
    outputs = _outputs(held_out=False)
    outputs["train"]["checkpoint"] = "runs/r/train/checkpoint"
    assert serve_command(outputs) == ".venv/bin/s3 serve --predictor runs/r/train/checkpoint"
    outputs["retrain"]["checkpoint"] = "runs/r/retrain/checkpoint"
    assert serve_command(outputs) == ".venv/bin/s3 serve --predictor runs/r/retrain/checkpoint"
