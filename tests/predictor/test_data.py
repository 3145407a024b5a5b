"""Loading, the prompt-hash split and class weights."""

from __future__ import annotations

import json
import random

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.buckets import BucketSpec
from predictor_train.data import (Examples, class_weights, labels_of, load_records, split_indices, split_of,
                                  split_records)


def test_split_is_deterministic_and_order_free(records):
    prompts = [r["prompt"] for r in records]
    first = split_indices(prompts)
    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    by_prompt = {p: split_of(p) for p in shuffled}
    for split, rows in first.items():
        assert all(by_prompt[prompts[i]] == split for i in rows)
    assert sorted(i for rows in first.values() for i in rows) == list(range(len(prompts)))


def test_split_fractions_are_roughly_right():
    prompts = [f"prompt number {i}" for i in range(5000)]
    sizes = {s: len(rows) for s, rows in split_indices(prompts).items()}
    assert abs(sizes["train"] / 5000 - 0.8) < 0.03 and abs(sizes["test"] / 5000 - 0.1) < 0.02


def test_duplicates_never_cross_splits(records):
    ds = datasets.Dataset.from_list(records + records[:50])  # 50 prompts appear twice
    splits = split_records(ds)
    seen = {name: set(rows["prompt"]) for name, rows in splits.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"])
    assert not (seen["validation"] & seen["test"])
    assert sum(len(rows) for rows in splits.values()) == len(ds)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_split_of_is_a_function_of_the_text(prompt):
    rebuilt = "".join(list(prompt))  # an equal string built anew: only the text may matter
    assert split_of(prompt) == split_of(rebuilt) in ("train", "validation", "test")


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum"):
        split_indices(["a"], (0.5, 0.3, 0.1))


def test_class_weights_equal_counts_are_one():
    assert class_weights([0, 1, 2, 0, 1, 2], 3) == pytest.approx([1.0, 1.0, 1.0])


def test_class_weights_favour_rare_buckets_and_stay_finite():
    labels = [0] * 90 + [1] * 9 + [2] * 1  # bucket 3 is empty
    w = class_weights(labels, 4, smoothing=1.0)
    assert w[0] < w[1] < w[2] < w[3]
    # raw weights 1/91, 1/10, 1/2, 1/1 normalised so the average over samples is 1
    mean = (90 / 91 + 9 / 10 + 1 / 2) / 100
    assert w == pytest.approx([1 / 91 / mean, 1 / 10 / mean, 1 / 2 / mean, 1 / mean])
    assert sum(w[b] for b in labels) / len(labels) == pytest.approx(1.0)


@settings(deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.floats(0.1, 10))
def test_class_weights_average_one_over_samples(labels, smoothing):
    w = class_weights(labels, 5, smoothing=smoothing)
    assert all(x > 0 for x in w)
    assert sum(w[b] for b in labels) / len(labels) == pytest.approx(1.0)


def test_more_smoothing_is_flatter():
    labels = [0] * 50 + [1] * 5
    sharp, flat = class_weights(labels, 2, smoothing=0.5), class_weights(labels, 2, smoothing=50)
    assert flat[1] / flat[0] < sharp[1] / sharp[0]


def test_labels_use_the_bucket_spec():
    spec = BucketSpec.uniform(500, 5)
    assert labels_of([0, 1, 100, 101, 500, 9999], spec) == [0, 0, 0, 1, 4, 4]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_load_records_formats(tmp_path, records, fmt):
    ds = datasets.Dataset.from_list(records[:20])
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
    elif fmt == "parquet":
        path = tmp_path / "data.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "data"
        datasets.DatasetDict({"train": ds.select(range(10)), "test": ds.select(range(10, 20))}).save_to_disk(path)
    loaded = load_records(path)
    assert sorted(loaded["prompt"]) == sorted(r["prompt"] for r in records[:20])
    assert Examples.from_rows(loaded).num_output_tokens[0] in {r["num_output_tokens"] for r in records[:20]}


@pytest.mark.parametrize("length", [None, -3, 2.5, "12", True, float("nan")])
def test_a_length_that_is_no_token_count_is_refused_naming_its_prompt(length):
    rows = {"prompt": ["fine", "the odd one"], "num_output_tokens": [4, length]}
    with pytest.raises(ValueError, match="whole number of tokens >= 0, got .* for the prompt 'the odd one'"):
        Examples.from_rows(rows)


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_records(tmp_path / "empty.jsonl")


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_output_tokens"):
        load_records(datasets.Dataset.from_list([{"prompt": "hi", "num_prompt_tokens": 1}]))
    with pytest.raises(FileNotFoundError, match="no data"):
        load_records(tmp_path / "nope.jsonl")


def test_stratified_split_gives_every_source_its_share():
    from predictor_train.data import cap_per_source, drop_sources, sources_of

    prompts = [f"{s} prompt {i}" for s, n in (("a", 500), ("b", 60), ("c", 20)) for i in range(n)]
    sources = [p.split()[0] for p in prompts]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "source": sources, "num_prompt_tokens": [1] * len(prompts),
                                     "num_output_tokens": [1] * len(prompts)})
    splits = split_records(ds)
    for source, n in (("a", 500), ("b", 60), ("c", 20)):
        test = sources_of(splits["test"]).count(source)
        assert test == n - round(0.9 * n)  # the cut is exact per source, not only on average
    again = split_records(ds.shuffle(seed=1))
    assert set(again["test"]["prompt"]) == set(splits["test"]["prompt"])  # order-free
    assert set(sources_of(drop_sources(ds, ["a"]))) == {"b", "c"}
    capped = cap_per_source(ds, 30)
    assert sorted(sources_of(capped).count(s) for s in "abc") == [20, 30, 30]
    assert set(cap_per_source(ds.shuffle(seed=2), 30)["prompt"]) == set(capped["prompt"])


@pytest.mark.parametrize("per_source", [2, 3, 5, 6])
def test_many_small_sources_still_give_every_split(per_source):
    """Each source was cut on its own: 100 sources of 2 prompts gave no validation and no test rows at all (a
    fine-grained `source` column could not train, and the error blamed the dataset's size)."""
    prompts = [f"source {s} prompt {i}" for s in range(100) for i in range(per_source)]
    sources = [p.rsplit(" prompt", 1)[0] for p in prompts]
    splits = split_indices(prompts, sources=sources)
    n = len(prompts)
    assert abs(len(splits["validation"]) - 0.1 * n) <= 1 and abs(len(splits["test"]) - 0.1 * n) <= 1


def test_a_file_of_blank_lines_or_a_prompt_that_is_not_text_is_named(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match="blank.jsonl holds no labelled records"):  # was datasets' own words
        load_records(blank)
    null = tmp_path / "null.jsonl"
    null.write_text('{"prompt": "a", "num_prompt_tokens": 1, "num_output_tokens": 2}\n'
                    '{"prompt": null, "num_prompt_tokens": 1, "num_output_tokens": 2}\n')
    with pytest.raises(ValueError, match="null.jsonl, record 2: prompt must be a string, got None"):  # a traceback
        load_records(null)
