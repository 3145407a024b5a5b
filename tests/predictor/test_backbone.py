"""The BERT -> DistilBERT mapping and the backbone loading paths, all from disk."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModel, AutoTokenizer, BertConfig, BertModel, DistilBertForSequenceClassification,
                          RobertaConfig, RobertaModel)

from predictor_train.backbone import (TINY_BACKBONE, bert_to_distilbert, load_classifier, minilm_dir,
                                      model_input_names, resolve_backbone)
from core.buckets import BucketSpec
from predictor_train.data import encode

SENTENCES = ["Hello world, how are you?", "Write a detailed essay about volcanoes and the people who study them.",
             "x", "Explain KV caches in two sentences."]
SPEC = BucketSpec.uniform(500, 5)


def _hidden_states(bert, distil, tokenizer):
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bert(**enc).last_hidden_state  # (B, T, H), BERT gets token_type_ids = 0
        got = distil.distilbert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].bool()  # padded positions carry no meaning in either model
    return want[mask], got[mask]


def test_minilm_maps_onto_distilbert_exactly():
    folder = minilm_dir()
    bert = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    distil = bert_to_distilbert(bert, num_labels=10).eval()
    assert distil.config.n_layers == 6 and distil.config.dim == 384 and distil.config.hidden_dim == 1536
    assert distil.config.activation == bert.config.hidden_act == "gelu"
    want, got = _hidden_states(bert, distil, tokenizer)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_random_bert_maps_exactly(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_act="gelu_new")
    bert = BertModel(config).eval()
    with torch.no_grad():  # a non-zero token-type-0 row checks that it is folded into the positions
        bert.embeddings.token_type_embeddings.weight.normal_()
    distil = bert_to_distilbert(bert, num_labels=3).eval()
    assert distil.config.activation == "gelu_new"
    want, got = _hidden_states(bert, distil, AutoTokenizer.from_pretrained(minilm_dir()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_default_backbone_resolves_to_package_folder():
    assert (minilm_dir() / "model.safetensors").is_file()
    assert resolve_backbone("minilm") == str(minilm_dir())
    assert resolve_backbone("some/folder") == "some/folder"


def test_tiny_backbone_is_small_and_labelled():
    backbone = load_classifier(TINY_BACKBONE, SPEC)
    model = backbone.model
    assert isinstance(model, DistilBertForSequenceClassification)
    assert model.config.n_layers == 1 and model.config.dim == 32 and model.config.num_labels == SPEC.num_buckets
    assert model.config.id2label[0] == "(0, 100]"
    batch = encode(backbone.tokenizer, SENTENCES, max_prompt_tokens=16, input_names=model_input_names(model))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape[1] <= 16
    assert model(**batch).logits.shape == (len(SENTENCES), SPEC.num_buckets)


def _save_with_tokenizer(model, folder):
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return str(folder)


def test_folder_backbones_take_the_right_path(tmp_path):
    small = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    distil_dir = _save_with_tokenizer(load_classifier(TINY_BACKBONE, SPEC).model, tmp_path / "distil")
    bert_dir = _save_with_tokenizer(BertModel(BertConfig(**small)), tmp_path / "bert")
    odd_bert_dir = _save_with_tokenizer(BertModel(BertConfig(**small, layer_norm_eps=1e-5)), tmp_path / "odd")
    roberta_dir = _save_with_tokenizer(RobertaModel(RobertaConfig(**small)), tmp_path / "roberta")
    kinds = {name: load_classifier(path, SPEC).kind
             for name, path in [("distil", distil_dir), ("bert", bert_dir), ("odd", odd_bert_dir),
                                ("roberta", roberta_dir)]}
    # An eps DistilBERT cannot express sends the BERT to the Auto fallback instead of a silently different model.
    assert kinds == {"distil": "distilbert", "bert": "bert-mapped", "odd": "auto", "roberta": "auto"}
    roberta = load_classifier(roberta_dir, SPEC).model
    assert roberta.config.num_labels == SPEC.num_buckets and "token_type_ids" in model_input_names(roberta)


def test_missing_hub_name_fails_without_downloading():
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        load_classifier("no-such-org/no-such-encoder", SPEC)


def test_missing_backbone_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone folder .*none' does not exist"):
        load_classifier(str(tmp_path / "none"), SPEC)


def test_head_tail_truncation_keeps_both_ends_of_a_long_prompt():
    tokenizer = load_classifier(TINY_BACKBONE, SPEC).tokenizer
    long = "first words here " + "filler " * 60 + "the request comes last"
    prompts = [long, "a short one"]
    head = encode(tokenizer, prompts, max_prompt_tokens=16)
    cut = encode(tokenizer, prompts, max_prompt_tokens=16, truncation="head_tail")
    full = tokenizer(long)["input_ids"]
    assert cut["input_ids"].shape == head["input_ids"].shape == (2, 16)
    # a quarter of the budget from the start ([CLS] first), the rest from the end ([SEP] last)
    assert cut["input_ids"][0].tolist() == full[:4] + full[-12:]
    assert head["input_ids"][0].tolist()[:-1] == full[:15]  # head keeps only the start
    # a prompt that fits is encoded the same either way, padding and mask included
    assert cut["input_ids"][1].tolist() == head["input_ids"][1].tolist()
    assert cut["attention_mask"].tolist() == head["attention_mask"].tolist()
    with pytest.raises(ValueError, match="truncation must be one of"):
        encode(tokenizer, prompts, max_prompt_tokens=16, truncation="middle")


def test_encoder_folders_at_their_edges(tmp_path):
    """A BERT classifier with another head size that cannot map onto DistilBERT, a tokenizer without a pad token or
    padding on the left, and an encoder with fewer positions than max_prompt_tokens: each was accepted and failed
    later (the last at the first long prompt a server met)."""
    from transformers import BertForSequenceClassification

    from predictor_train.backbone import check_prompt_tokens, usable_prompt_tokens

    small = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    odd_head = BertForSequenceClassification(BertConfig(**small, num_labels=2, layer_norm_eps=1e-7))
    backbone = load_classifier(_save_with_tokenizer(odd_head, tmp_path / "odd_head"), SPEC)
    assert backbone.kind == "auto" and backbone.model.config.num_labels == SPEC.num_buckets

    folder = _save_with_tokenizer(RobertaModel(RobertaConfig(**small, pad_token_id=1, max_position_embeddings=130)),
                                  tmp_path / "roberta")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token, tokenizer.padding_side = None, "left"
    tokenizer.save_pretrained(folder)
    backbone = load_classifier(folder, SPEC)
    assert backbone.tokenizer.pad_token is not None and backbone.tokenizer.padding_side == "right"
    assert backbone.model.config.pad_token_id == backbone.tokenizer.pad_token_id
    assert usable_prompt_tokens(backbone.tokenizer, backbone.model) == 130 - 2  # RoBERTa's positions start at 2
    for model_type in ("mpnet", "longformer"):  # the same scheme: were read as 130 and failed at the longest prompt
        backbone.model.config.model_type = model_type
        assert usable_prompt_tokens(backbone.tokenizer, backbone.model) == 128, model_type
    backbone.model.config.model_type, backbone.model.config.max_position_embeddings = "xlnet", -1
    assert usable_prompt_tokens(backbone.tokenizer, backbone.model) == 512  # the tokenizer's: -1 is no limit (was -1)
    backbone.model.config.model_type, backbone.model.config.max_position_embeddings = "roberta", 130
    names = model_input_names(backbone.model)
    batch = encode(backbone.tokenizer, SENTENCES, max_prompt_tokens=16, input_names=names)
    one = encode(backbone.tokenizer, SENTENCES[1:2], max_prompt_tokens=16, input_names=names)
    with torch.no_grad():
        together, alone = backbone.model.eval()(**batch).logits[1], backbone.model(**one).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # right padding: a batch changes nothing
    check_prompt_tokens(backbone.tokenizer, backbone.model, 128)
    with pytest.raises(ValueError, match="max_prompt_tokens 256 is more than the backbone reads \\(128 tokens"):
        check_prompt_tokens(backbone.tokenizer, backbone.model, 256)
