"""benchmarks/label_noise.py: the target model's lengths for prompts the predictor reads as one, and the ceilings
they put on any predictor."""

from __future__ import annotations

import json

import datasets
import pytest
from click.testing import CliRunner

from core.buckets import BucketSpec


@pytest.fixture
def label_noise(import_benchmark):
    return import_benchmark("label_noise")


def test_the_ceilings_count_pairs_no_one_answer_can_serve(label_noise):
    spec = BucketSpec.uniform(100, 10)  # buckets of 10 tokens
    # same bucket; one apart; two apart; three apart (only this pair defeats a within-one guess)
    m = label_noise.pair_metrics([5, 5, 5, 5], [5, 15, 25, 35], spec)
    assert m["same_length"] == 0.25 and m["same_bucket"] == 0.25
    assert m["buckets_within_one"] == 0.5 and m["buckets_over_two_apart"] == 0.25
    assert m["accuracy_ceiling"] == 1 - 0.75 / 2  # three pairs differ: one of each is missed at best
    assert m["within_one_ceiling"] == 1 - 0.25 / 2
    assert m["mean_abs_diff_tokens"] == 15.0 and m["mae_floor_tokens"] == 7.5


def test_the_benchmark_reruns_each_variant_and_writes_every_prompt(label_noise, tmp_path, tiny_chat_model_dir):
    rows = [{"prompt": f"Tell me about topic {i}.", "source": "ab"[i % 2], "num_prompt_tokens": 6,
             "num_output_tokens": 10 + i, "finished": True} for i in range(40)]
    data = tmp_path / "labelled"
    datasets.Dataset.from_list(rows).save_to_disk(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(label_noise.main, ["--data", str(data), "--per-source", "2", "--model",
                                                   str(tiny_chat_model_dir), "--max-new-tokens", "20",
                                                   "--max-num-seqs", "4",
                                                   "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "label_noise.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["rerun", "newline"]
    for record in report["results"]:
        assert record["n"] == 4 and set(record["by_source"]) == {"a", "b"}
        assert len(record["prompts"]) == 4 and record["predictor_input_unchanged"] == 1.0
        assert 0.5 <= record["within_one_ceiling"] <= 1
    assert (out / "label_noise.png").exists()


def test_labels_made_with_other_decoding_are_refused(label_noise, tmp_path):
    folder = tmp_path / "labelled"
    rows = [{"prompt": f"p{i}", "source": "a", "num_prompt_tokens": 3, "num_output_tokens": 5, "finished": True}
            for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(folder / "dataset")
    (folder / "recipe.json").write_text(json.dumps({"max_new_tokens": 512, "frequency_penalty": 0.0}))
    result = CliRunner().invoke(label_noise.main, ["--data", str(folder), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code != 0 and "frequency_penalty=0.0" in result.output
