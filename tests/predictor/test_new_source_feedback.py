"""benchmarks/new_source_feedback.py: which served requests become feedback, and one round on a held-out source."""

from __future__ import annotations

import json

import datasets
import pytest
from click.testing import CliRunner

from core.buckets import BucketSpec
from core.predictors import LengthPrediction

from .synthetic import MAX_TOKENS, NUM_BUCKETS


@pytest.fixture
def bench(import_benchmark):
    return import_benchmark("new_source_feedback", "leave_one_source_out")


class _Fixed:
    """A predictor that predicts bucket 1 for every prompt."""

    buckets = BucketSpec.uniform(64, 4)

    def predict(self, prompts):
        return [LengthPrediction(bucket=1) for _ in prompts]


def test_under_feedback_is_what_outran_its_bucket_and_both_adds_what_ended_below_it(bench):
    rows = datasets.Dataset.from_dict({"prompt": ["short", "hit", "long", "longer", "cut"], "source": ["x"] * 5,
                                       "num_output_tokens": [5, 20, 40, 60, 5],  # buckets 0, 1, 2, 3, 0
                                       "finished": [True, True, True, True, False]})  # "cut": at its token limit
    under = bench.served_feedback(_Fixed(), rows, "under")
    both = bench.served_feedback(_Fixed(), rows, "both")
    assert under["prompt"] == ["long", "longer"] and both["prompt"] == ["short", "long", "longer"]
    assert set(both["source"]) == {"feedback"} and set(both["predicted_bucket"]) == {1}
    assert bench.served_feedback(_Fixed(), rows, "all")["prompt"] == rows["prompt"]
    assert set(both["traffic_weight"]) == {0.0}  # mispredictions alone are no sample of the traffic
    sampled = bench.served_feedback(_Fixed(), rows, "sampled", sample_rate=1.0)  # "hit" and "cut" sampled too
    assert sampled["prompt"] == rows["prompt"] and set(sampled["traffic_weight"]) == {1.0}
    assert sampled["sampled"] == [False, True, False, False, True]
    assert bench.served_feedback(_Fixed(), rows, "sampled", sample_rate=1e-9)["prompt"] == both["prompt"]


def test_one_round_per_kind_of_feedback_on_a_held_out_source(bench, records, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({**r, "source": "new" if i % 3 == 0 else "old"}) + "\n"
                            for i, r in enumerate(records)))
    monkeypatch.setattr(bench, "labelled_data", lambda path: (path, {"model": "tiny", "temperature": 0.0}))
    config = tmp_path / "train.yaml"
    config.write_text(f"backbone: tiny-random\nmax_tokens: {MAX_TOKENS}\nnum_buckets: {NUM_BUCKETS}\nepochs: 1\n"
                      "lr: 1.0e-2\nbatch_size: 16\nmax_prompt_tokens: 32\ncalibrate: false\nwandb_mode: disabled\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(bench.main, [
        "--config", str(config), "--data", str(data), "--sources", "new", "--num-served", "20",
        "--loso-dir", str(tmp_path / "loso"), "--output-dir", str(out), "--feedback", "under,both,sampled",
        "--sample-rate", "1.0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "new_source.json").read_text())
    assert [r["feedback"] for r in report["results"]] == ["under", "both", "sampled"]
    under, both, sampled = report["results"]
    assert "traffic_sample" not in both and sampled["traffic_sample"]["num_records"] > 0
    assert "sample / test rows" in result.output
    assert 0 <= under["num_records"] <= both["num_records"] <= 20 and both["num_records"] > 0
    for r in report["results"]:
        assert r["num_served"] == 20
        assert r["new_source"]["before"]["num_examples"] == r["new_source"]["after"]["num_examples"] > 0
        # parent and round keep familiarity banks: the share of the source's test rows each finds unfamiliar
        assert all(0 <= r["new_source"][when]["unfamiliar_share"] <= 1 for when in ("before", "after"))
    assert "| new | under |" in result.output and "| new | both |" in result.output


class _Known(_Fixed):
    """A predictor that predicts each prompt's bucket from a table (bucket 1 for a prompt it does not know)."""

    def __init__(self, buckets: dict[str, int]):
        self.table = buckets

    def predict(self, prompts):
        return [LengthPrediction(bucket=self.table.get(p, 1)) for p in prompts]


def test_served_offset_takes_the_next_rows_in_hash_order(bench):
    rows = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(30)], "source": ["x"] * 30})
    first, second = bench.served_rows(rows, 10), bench.served_rows(rows, 10, 10)
    assert len(first) == len(second) == 10 and not set(first["prompt"]) & set(second["prompt"])
    assert set(first["prompt"]) | set(second["prompt"]) == set(bench.served_rows(rows, 20)["prompt"])


def test_the_traffic_sample_scores_parent_and_round_and_says_where_it_agrees_with_the_test_rows(bench):
    rows = datasets.Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "source": ["x"] * 4,
                                       "num_output_tokens": [5, 20, 40, 60], "finished": [True] * 4})
    parent, right = _Fixed(), _Known({"a": 0, "b": 1, "c": 2, "d": 3})
    feedback = bench.served_feedback(parent, rows, "sampled", sample_rate=1.0)  # "b" sampled, the rest mispredicted
    sample = bench.sample_scores(parent, right, feedback, share=0.999)
    assert sample["num_records"] == 4 and sample["num_sampled"] == 1 and sample["effective_size"] > 1
    assert sample["round"]["accuracy"] == 1.0 > sample["parent"]["accuracy"]
    assert sample["round"]["mae_tokens"] < sample["parent"]["mae_tokens"]
    test = {"accuracy": 0.5, "within_one_accuracy": 0.5, "mae_tokens": 10.0, "mean_wasted_tokens": 10.0}
    worse = {**test, "accuracy": 0.4, "mae_tokens": 12.0}
    record = bench.round_record("x", "sampled", num_served=4, feedback=feedback, kept_parent=False, verdict="",
                                before={"new": test, "old": test}, after={"new": worse, "old": test}, history=[],
                                sample=sample)
    assert record["sample_agrees"] == {"accuracy": False, "within_one_accuracy": True, "mae_tokens": False,
                                       "mean_wasted_tokens": True}
    assert "(disagree)" in bench.judge_markdown([record])
    assert bench.sample_scores(parent, right, feedback.select([]), share=0.2) == {
        "num_records": 0, "num_sampled": 0, "effective_size": 0.0}
