"""Familiarity: the checkpoint keeps its training prompts' embeddings, predictions say how familiar a prompt is."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from predictor_train.checkpoint import FAMILIARITY_FILE, read_info, save_checkpoint
from predictor_train.data import split_records
from predictor_train.familiarity import Familiarity, build_familiarity, sample_prompts
from predictor_train.inference import LengthPredictor
from predictor_train.train import TrainConfig

from .test_inference import PROMPTS


@pytest.fixture(scope="module")
def predictor(trained):
    return LengthPredictor.load(trained.checkpoint_dir)


def test_training_writes_a_bank_and_a_threshold(trained, dataset):
    info = read_info(trained.checkpoint_dir)
    num_train = len(set(split_records(dataset)["train"]["prompt"]))
    assert (trained.checkpoint_dir / FAMILIARITY_FILE).is_file()
    assert info.familiarity["bank_size"] == min(num_train, TrainConfig.familiarity_bank_size)
    assert info.familiarity["k"] == 10 and info.familiarity["quantile"] == TrainConfig.familiarity_quantile
    assert -1 <= info.familiarity["threshold"] <= info.familiarity["validation_median"] <= 1


def test_predictions_carry_familiarity_computed_in_the_same_pass(predictor):
    out = predictor.predict(PROMPTS)
    scores = predictor.familiarity_scores(PROMPTS)
    assert [p.familiarity for p in out] == pytest.approx(scores.tolist(), abs=1e-5)
    assert [p.unfamiliar for p in out] == (scores < predictor.familiarity.threshold).tolist()
    one_by_one = [predictor.predict([p], batch_size=1)[0].familiarity for p in PROMPTS]
    assert one_by_one == pytest.approx([p.familiarity for p in out], abs=1e-5)


def test_a_training_prompt_is_more_familiar_than_an_unrelated_one(predictor, dataset):
    train_prompt = split_records(dataset)["train"]["prompt"][0]
    odd = "Quelle est la capitale de la Mongolie ? Répondez en détail, s'il vous plaît, avec des dates."
    familiar, strange = predictor.familiarity_scores([train_prompt, odd]).tolist()
    assert familiar > strange
    assert predictor.predict([odd])[0].unfamiliar


def test_threshold_flags_the_chosen_share_of_validation(trained, dataset, tmp_path):
    folder = shutil.copytree(trained.checkpoint_dir, tmp_path / "ckpt")
    splits = split_records(dataset)
    validation = list(splits["validation"]["prompt"])
    info = build_familiarity(LengthPredictor.load(folder), folder, list(splits["train"]["prompt"]), validation,
                             bank_size=50, quantile=0.25)
    assert info.familiarity["bank_size"] == 50 and info.checkpoint_id != trained.info.checkpoint_id
    flagged = [p.unfamiliar for p in LengthPredictor.load(folder).predict(validation)]
    assert sum(flagged) / len(flagged) == pytest.approx(0.25, abs=1.5 / len(flagged))


def test_sample_prompts_is_distinct_and_reproducible():
    prompts = [f"p{i % 30}" for i in range(300)]  # retraining repeats its feedback records
    assert sorted(sample_prompts(prompts, 100)) == sorted({f"p{i}" for i in range(30)})
    assert sample_prompts(prompts, 10, seed=1) == sample_prompts(prompts, 10, seed=1)
    assert len(set(sample_prompts(prompts, 10))) == 10
    kept = sample_prompts(prompts, 10, keep=["new", "p3", "new"])  # the fed-back prompts of a retraining round
    assert kept[:2] == ["new", "p3"] and len(set(kept)) == 10
    assert sample_prompts(prompts, 1, keep=["new", "p3"]) == ["new"]


def test_scores_use_at_most_the_bank(predictor):
    bank = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    assert Familiarity(bank, k=10).scores(bank).shape == (3,)  # k larger than the bank


def test_a_checkpoint_without_a_bank_predicts_without_familiarity(trained, tmp_path):
    folder = shutil.copytree(trained.checkpoint_dir, tmp_path / "old")
    info = read_info(folder)
    loaded = LengthPredictor.load(folder)
    # saving over the folder (a new run into the same output dir) drops the old bank with the old weights
    save_checkpoint(folder, loaded.model, loaded.tokenizer, dataclasses.replace(info, familiarity=None))
    assert not (folder / FAMILIARITY_FILE).exists()
    old = LengthPredictor.load(folder)
    assert old.familiarity is None and old.familiarity_scores(PROMPTS) is None
    assert all(p.familiarity is None and p.unfamiliar is None for p in old.predict(PROMPTS))


def test_a_missing_bank_file_is_a_clear_error(trained, tmp_path):
    folder = shutil.copytree(trained.checkpoint_dir, tmp_path / "partial")
    (folder / FAMILIARITY_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="copy the whole checkpoint folder"):
        LengthPredictor.load(folder)


@pytest.mark.parametrize("field, value", [("familiarity_bank_size", -1), ("familiarity_quantile", 0.0),
                                          ("familiarity_quantile", 1.0)])
def test_config_checks_familiarity_fields(field, value):
    with pytest.raises(ValueError, match="familiarity"):
        TrainConfig(**{field: value})


def test_evaluate_scores_familiar_and_unfamiliar_prompts_apart(predictor, dataset):
    from predictor_train.evaluate import evaluate_predictor

    report = evaluate_predictor(predictor, dataset, split="validation")
    groups = report.by_familiarity
    assert sum(m["share"] for m in groups.values()) == pytest.approx(1.0)
    assert sum(m["num_examples"] for m in groups.values()) == report.metrics["predictor"]["num_examples"]
    assert "predictor by familiarity" in report.table


def test_the_neighbours_vote_is_blended_in_only_where_validation_says_it_helps():
    # Two clusters of bank prompts, one labelled bucket 0, the other bucket 2; a predictor that always says bucket 1
    # is beaten by its neighbours, one that is already right is kept alone.
    from predictor_train.familiarity import fit_blend

    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    bank = torch.nn.functional.normalize(centres.repeat_interleave(20, 0) + 0.05 * torch.randn(40, 8), dim=-1)
    familiarity = Familiarity(bank, buckets=torch.tensor([0] * 20 + [2] * 20))
    queries = torch.nn.functional.normalize(centres.repeat_interleave(5, 0) + 0.05 * torch.randn(10, 8), dim=-1)
    labels = torch.tensor([0] * 5 + [2] * 5)
    wrong = torch.tensor([[0.1, 0.8, 0.1]]).repeat(10, 1)
    blended = fit_blend(familiarity, wrong, queries, labels)
    assert blended.neighbours > 0 and blended.weight < 1
    assert blended.blend(wrong, queries).argmax(-1).tolist() == labels.tolist()
    right = torch.nn.functional.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    shuffled = dataclasses.replace(familiarity, buckets=familiarity.buckets[torch.randperm(40)])
    assert fit_blend(shuffled, right, queries, labels).neighbours == 0  # neighbours that know nothing: no blend
    assert torch.equal(Familiarity(bank).blend(wrong, queries), wrong)  # a bank without labels never votes


def test_a_trained_checkpoint_blends_what_it_serves_and_evaluates(trained, predictor, dataset):
    info = read_info(trained.checkpoint_dir)
    assert {"neighbours", "neighbour_weight"} <= set(info.familiarity)
    assert predictor.familiarity.buckets is not None and len(predictor.familiarity.buckets) == len(predictor.familiarity.bank)
    logits, probs, scores = predictor.outputs(PROMPTS)
    calibrated = (logits / predictor.temperature).softmax(-1)
    if info.familiarity["neighbours"]:
        assert not torch.allclose(probs, calibrated)
    assert torch.allclose(probs.sum(-1), torch.ones(len(PROMPTS)))
    assert [p.probs for p in predictor.predict(PROMPTS)] == [pytest.approx(row) for row in probs.tolist()]
    # What the server's live accuracy is held to: the blended answers' validation score where there is a blend
    # (the checkpoint's own within_one_accuracy is the predictor's alone).
    blended = info.familiarity.get("validation_within_one")
    assert (blended is not None) == (info.familiarity["neighbour_weight"] < 1)
    assert predictor.expected_within_one == (blended if blended is not None else info.metrics["within_one_accuracy"])
