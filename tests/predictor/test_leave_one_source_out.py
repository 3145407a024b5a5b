"""benchmarks/leave_one_source_out.py: a predictor per held-out source, scored on rows it never saw; resumable."""

from __future__ import annotations

import dataclasses

import datasets
import pytest

from predictor_train.data import split_records

from .conftest import TARGET_MODEL, tiny_config


@pytest.fixture
def loso(import_benchmark):
    return import_benchmark("leave_one_source_out")


def test_a_held_out_source_is_scored_on_rows_it_never_saw_and_a_rerun_reuses_its_checkpoint(
        loso, tmp_path, records, monkeypatch):
    ds = datasets.Dataset.from_list([{**r, "source": "kept" if i % 3 else "left"} for i, r in enumerate(records)])
    config = tiny_config(tmp_path, epochs=1, calibrate=False)
    recipe = {"model": TARGET_MODEL, "temperature": 0.0}
    predictor = loso.trained(config, ds, recipe, ("left",), tmp_path / "left", reuse=True)
    assert set(predictor.info.data["train_by_source"]) == {"kept"}

    splits = split_records(ds)
    record = loso.held_out_record(predictor, splits, ds, "left", seen={})
    assert record["never_seen_test"]["num_examples"] == list(splits["test"]["source"]).count("left")
    assert record["never_seen_all_rows"]["num_examples"] == len(records) // 3
    assert record["seen_test"] is None and 0 <= record["constant_guess_test"]["within_one_accuracy"] <= 1
    table = loso.markdown([record])
    assert table.count("\n") == 2 and "| left |" in table

    monkeypatch.setattr(loso, "train_predictor", lambda *a, **k: pytest.fail("trained again"))
    again = loso.trained(config, ds, recipe, ("left",), tmp_path / "left", reuse=True)
    assert again.info.checkpoint_id == predictor.info.checkpoint_id
    with pytest.raises(pytest.fail.Exception, match="trained again"):  # other settings: not the same run
        loso.trained(dataclasses.replace(config, lr=1e-3), ds, recipe, ("left",), tmp_path / "left", reuse=True)
