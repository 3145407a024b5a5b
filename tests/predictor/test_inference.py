"""LengthPredictor: loading with checks, batched prediction, latency helper."""

from __future__ import annotations

import json
import shutil

import pytest

from core.buckets import BucketSpec
from predictor_train.checkpoint import PREDICTOR_FILE
from predictor_train.inference import LengthPredictor
from core.request import LengthPrediction

from .conftest import TARGET_MODEL
from .synthetic import MAX_TOKENS, NUM_BUCKETS, STYLES

PROMPTS = [f"{instruction} owls" for instruction, _, _ in STYLES] + ["Hi", "Briefly explain tides and maps"]


@pytest.fixture(scope="module")
def predictor(trained):
    return LengthPredictor.load(trained.checkpoint_dir, expected_target_model=TARGET_MODEL,
                                expected_buckets=BucketSpec.uniform(MAX_TOKENS, NUM_BUCKETS))


def test_predictions_have_buckets_and_probs(predictor):
    out = predictor.predict(PROMPTS)
    assert len(out) == len(PROMPTS)
    for p in out:
        assert 0 <= p.bucket < NUM_BUCKETS and len(p.probs) == NUM_BUCKETS
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-5)
        assert p.num_tokens is None  # only an oracle knows the exact length
    assert isinstance(out[0], LengthPrediction)
    # the trained model tells the three instruction styles apart (buckets 0, 1 and 3)
    assert [p.bucket for p in out[:3]] == [0, 1, 3]


def test_batching_and_sorting_keep_input_order(predictor):
    one_by_one = [predictor.predict([p], batch_size=1)[0] for p in PROMPTS]
    batched = predictor.predict(PROMPTS, batch_size=2)
    assert [p.bucket for p in one_by_one] == [p.bucket for p in batched]
    for a, b in zip(one_by_one, batched):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)
    assert predictor.predict([]) == []


def test_quantile_reserves_at_least_the_argmax_bucket_at_high_quantiles(predictor):
    argmax = predictor.predict(PROMPTS)
    cautious = predictor.predict(PROMPTS, quantile=0.999)
    assert all(c.bucket >= a.bucket for a, c in zip(argmax, cautious))


def test_refuses_another_target_model(trained):
    with pytest.raises(ValueError, match="learned the output lengths of .*SmolLM2.*other/llm"):
        LengthPredictor.load(trained.checkpoint_dir, expected_target_model="other/llm")


def test_refuses_other_buckets(trained):
    with pytest.raises(ValueError, match=r"upper edges \[100, 200, 300, 400, 500\].*\[50, 100"):
        LengthPredictor.load(trained.checkpoint_dir, expected_buckets=BucketSpec.uniform(500, 10))


def test_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a predictor checkpoint"):
        LengthPredictor.load(tmp_path)


def test_refuses_an_unknown_format_version(trained, tmp_path):
    copy = shutil.copytree(trained.checkpoint_dir, tmp_path / "ckpt", ignore=shutil.ignore_patterns("wandb"))
    meta = json.loads((copy / PREDICTOR_FILE).read_text())
    (copy / PREDICTOR_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        LengthPredictor.load(copy)


def test_benchmark_latency_returns_seconds_per_prompt(predictor):
    latency = predictor.benchmark_latency(batch_sizes=(1, 4), num_prompts=8, num_repeats=1)
    assert set(latency) == {1, 4} and all(0 < s < 5 for s in latency.values())


def test_serving_samples_as_the_labels_were_made(predictor):
    from serve.engine.plan import SamplingParams

    assert predictor.decoding == {"temperature": 0.0, "max_new_tokens": MAX_TOKENS}
    assert SamplingParams.from_decoding(predictor.decoding) == SamplingParams()  # greedy, no penalty
    penalised = {"temperature": 0.0, "top_p": 1.0, "frequency_penalty": 0.5, "chat_template": "..."}
    assert SamplingParams.from_decoding(penalised) == SamplingParams(frequency_penalty=0.5)


def test_stored_temperature_scales_the_probabilities(trained, tmp_path):
    import dataclasses

    import torch

    from predictor_train.checkpoint import read_info, update_info

    folder = tmp_path / "hot"
    shutil.copytree(trained.checkpoint_dir, folder)
    update_info(folder, dataclasses.replace(read_info(folder), temperature=3.0))
    hot = LengthPredictor.load(folder)
    logits = hot.predict_logits(PROMPTS)
    assert hot.temperature == 3.0
    assert torch.allclose(hot.predict_probs(PROMPTS), (logits / 3.0).softmax(-1), atol=1e-6)
    assert read_info(folder).checkpoint_id != trained.info.checkpoint_id  # the temperature is part of the id


def test_prompts_are_cut_as_the_checkpoint_was_trained(trained):
    """A checkpoint records its truncation; a head_tail one reads the end of a long prompt, a head one does not."""
    import dataclasses

    from predictor_train.checkpoint import read_info

    loaded = LengthPredictor.load(trained.checkpoint_dir)
    info = read_info(trained.checkpoint_dir)
    head_tail_info = dataclasses.replace(info, train_config={**info.train_config, "prompt_truncation": "head_tail"})
    head_tail = LengthPredictor(loaded.model, loaded.tokenizer, head_tail_info)
    assert loaded.prompt_truncation == "head" and head_tail.prompt_truncation == "head_tail"
    start = "Briefly explain " + "owls and maps " * 40
    endings = [start + "in one word", start + "in a long essay with many sections"]
    assert loaded.predict_logits(endings).diff(dim=0).abs().max() == 0  # the ends fall past the cut
    assert head_tail.predict_logits(endings).diff(dim=0).abs().max() > 0


def test_a_checkpoint_published_over_while_it_loads_is_refused(trained, monkeypatch):
    """`predictor.json` was read first and the weights after: a training run publishing into the folder meanwhile
    paired one checkpoint's name (and temperature, familiarity) with another's weights."""
    import dataclasses

    import predictor_train.inference as inference

    read_info, calls = inference.read_info, []

    def published_meanwhile(folder):
        info = read_info(folder)
        calls.append(folder)
        return info if len(calls) == 1 else dataclasses.replace(info, checkpoint_id="published-meanwhile")

    monkeypatch.setattr(inference, "read_info", published_meanwhile)
    with pytest.raises(ValueError, match="changed while it was loaded"):
        LengthPredictor.load(trained.checkpoint_dir)


def test_inputs_a_library_user_may_get_wrong_are_refused(predictor):
    """A lone string was predicted per character (20 predictions for one prompt), a None failed in the tokenizer,
    batch_size 0 in range() and a quantile outside (0, 1] picked an end bucket silently."""
    from core.predictors import ConstantPredictor

    for call in (lambda: predictor.predict("Briefly explain bees"), lambda: predictor.predict(["a", None]),
                 lambda: ConstantPredictor(predictor.buckets).predict("ab")):  # fmt: skip
        with pytest.raises(TypeError, match="single string|not a string"):
            call()
    assert len(ConstantPredictor(predictor.buckets).predict(p for p in ["a", "b"])) == 2  # a generator, read once
    assert len(predictor.predict(p for p in ["a", "b"])) == 2
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predictor.predict(["a"], batch_size=0)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
        predictor.predict(["a"], quantile=1.5)


@pytest.mark.parametrize("damage, words", [
    ("tokenizer", "tokenizer files are missing"),
    ("weights", "has no weights"),
    ("buckets", "predictor.json lacks buckets"),
    ("num_buckets", f"the classifier has {NUM_BUCKETS} outputs but predictor.json names {NUM_BUCKETS + 1} buckets"),
])  # fmt: skip
def test_an_incomplete_or_mixed_checkpoint_is_refused_by_name(trained, tmp_path, damage, words):
    """Without its tokenizer files a checkpoint loaded a stub tokenizer of 5 tokens and predicted near-constant
    buckets (evaluation: the majority baseline's accuracy), with no error; the others were tracebacks."""
    folder = shutil.copytree(trained.checkpoint_dir, tmp_path / "copy")
    info = json.loads((folder / PREDICTOR_FILE).read_text())
    if damage == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "weights":  # familiarity.safetensors, beside it, is no model weights
        (folder / "model.safetensors").unlink()
    elif damage == "buckets":
        del info["buckets"]
    else:
        info["buckets"] = BucketSpec.uniform(MAX_TOKENS, NUM_BUCKETS + 1).to_dict()
    (folder / PREDICTOR_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=words):
        LengthPredictor.load(folder)
