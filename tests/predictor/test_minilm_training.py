"""The real MiniLM-mapped backbone through DeepSpeed training and back through LengthPredictor (slower)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from predictor_train.backbone import minilm_dir
from predictor_train.inference import LengthPredictor
from predictor_train.train import train_predictor

from .conftest import TARGET_MODEL, tiny_config


@pytest.mark.integration
def test_minilm_trains_and_reloads(tmp_path, dataset):
    config = tiny_config(tmp_path, backbone="minilm", epochs=1, lr=5e-5)
    result = train_predictor(config, dataset.select(range(120)), target_model=TARGET_MODEL, progress=False)
    assert result.info.backbone_kind == "bert-mapped"
    predictor = LengthPredictor.load(result.checkpoint_dir, expected_target_model=TARGET_MODEL)
    assert predictor.model.config.model_type == "distilbert" and predictor.model.config.n_layers == 6
    assert len(predictor.predict(["Write a detailed essay about owls"])[0].probs) == result.info.buckets.num_buckets
    # One epoch at a small lr moves the encoder only a little away from MiniLM.
    bert = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32)
    before = bert.embeddings.word_embeddings.weight
    after = predictor.model.distilbert.embeddings.word_embeddings.weight
    assert (after - before).abs().max() < 1e-2
