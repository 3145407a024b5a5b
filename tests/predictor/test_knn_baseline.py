"""benchmarks/knn_baseline.py: neighbours' buckets from the frozen encoder, beside a predictor, per held-out source."""

from __future__ import annotations

import json

import datasets
from click.testing import CliRunner


def test_knn_baseline_scores_itself_the_predictor_their_average_and_each_unseen_source(
        import_benchmark, tmp_path, records, trained):
    knn = import_benchmark("knn_baseline")
    data = tmp_path / "labelled"
    rows = [{**r, "source": "a" if i % 2 else "b"} for i, r in enumerate(records)]
    datasets.Dataset.from_list(rows).save_to_disk(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(knn.main, ["--data", str(data), "--backbone", "tiny-random", "--predictor",
                                           str(trained.checkpoint_dir), "--k-values", "3,7", "--max-prompt-tokens",
                                           "16", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "knn.json").read_text())
    test, unseen = report["results"][:3], report["results"][3:]
    assert [r["method"].split(" ")[0] for r in test] == ["knn", "predictor", "average,"]
    assert set(report["validation_within_one_by_k"]) == {"3", "7"}
    for record in test:
        assert 0 <= record["within_one_accuracy"] <= 1 and record["nll"] > 0
        assert set(record["within_one_by_source"]) == {"a", "b"}
    assert [r["held_out_source"] for r in unseen] == ["a", "b"]
    n_test = sum(r["num_examples"] for r in unseen)
    assert n_test == test[0]["num_examples"]  # every test row scored once, by its own source's held-out run
