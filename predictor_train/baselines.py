"""Free baselines a length predictor has to beat, all fitted on the train split.

- ``majority``: always the most common training bucket.
- ``regression``: least squares of output length on prompt length, the prediction mapped to its bucket.
- ``source_mean``: the bucket of the mean training output length of the prompt's source (which prompt set it came
  from, nothing else); a source unseen in training gets the overall mean.
- ``source_histogram`` (probabilities only, for NLL, ECE and coverage): the training bucket frequencies of the
  prompt's source, add-one smoothed.
- ``neighbours`` (``neighbour_probs``, with ``encoder_embeddings``): the bucket frequencies of the prompt's k
  nearest training prompts in the embedding of the untouched encoder the predictor is fine-tuned from; what the
  encoder knows of similar prompts without any training (``s3 evaluate --neighbours K``,
  benchmarks/knn_baseline.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from core.buckets import BucketSpec
from predictor_train.data import PromptTruncation, encode, sources_of


def majority_bucket(train_lengths: Sequence[int], spec: BucketSpec) -> int:
    """The most common bucket in the training lengths (the lower one on ties)."""
    counts = Counter(spec.bucket_of(int(n)) for n in train_lengths)
    return min(counts, key=lambda b: (-counts[b], b))


def fit_length_regression(prompt_tokens: Sequence[int], output_tokens: Sequence[int]) -> tuple[float, float]:
    """Least squares ``output ≈ slope * prompt + intercept``; a flat line when prompt lengths do not vary."""
    n = len(prompt_tokens)
    if n == 0:
        raise ValueError("cannot fit a regression on no examples")
    mx, my = sum(prompt_tokens) / n, sum(output_tokens) / n
    var = sum((x - mx) ** 2 for x in prompt_tokens)
    if var == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(prompt_tokens, output_tokens)) / var
    return slope, my - slope * mx


def regression_buckets(prompt_tokens: Sequence[int], line: tuple[float, float], spec: BucketSpec) -> list[int]:
    slope, intercept = line
    return [spec.bucket_of(max(0, round(slope * x + intercept))) for x in prompt_tokens]


def source_mean_buckets(train, rows, spec: BucketSpec) -> list[int]:
    """The bucket of each row's source's mean training output length (overall mean for unseen sources)."""
    lengths = [spec.clip(n) for n in train["num_output_tokens"]]
    by_source: dict[str, list[int]] = defaultdict(list)
    for source, n in zip(sources_of(train), lengths):
        by_source[source].append(n)
    overall = sum(lengths) / len(lengths)
    means = {s: sum(v) / len(v) for s, v in by_source.items()}
    return [spec.bucket_of(round(means.get(s, overall))) for s in sources_of(rows)]


def source_histogram_probs(train, rows, spec: BucketSpec) -> list[list[float]]:
    """Each row's source's add-one-smoothed training bucket frequencies (all training rows for unseen sources)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [1] * spec.num_buckets)
    overall = [1] * spec.num_buckets
    for source, n in zip(sources_of(train), train["num_output_tokens"]):
        counts[source][spec.bucket_of(int(n))] += 1
        overall[spec.bucket_of(int(n))] += 1
    out = []
    for source in sources_of(rows):
        c = counts[source] if source in counts else overall
        out.append([x / sum(c) for x in c])
    return out


def baseline_buckets(train, rows, spec: BucketSpec) -> dict[str, list[int]]:
    """Predictions of the arg-max baselines (fitted on ``train``) for ``rows``; datasets or column dicts."""
    train_outputs = [spec.clip(int(n)) for n in train["num_output_tokens"]]  # as the labels are scored: at most the cap
    majority = majority_bucket(train_outputs, spec)
    line = fit_length_regression([int(n) for n in train["num_prompt_tokens"]], train_outputs)
    return {
        "majority": [majority] * len(rows["prompt"]),
        "regression": regression_buckets([int(n) for n in rows["num_prompt_tokens"]], line, spec),
        "source_mean": source_mean_buckets(train, rows, spec),
    }


def neighbour_probs(train_embeddings: torch.Tensor, train_buckets: Sequence[int] | torch.Tensor,
                    embeddings: torch.Tensor, *, k: int, num_buckets: int, prior_weight: float = 0.02,
                    chunk: int = 1024) -> torch.Tensor:
    """Per row of ``embeddings``, the bucket frequencies of its ``k`` most similar rows of ``train_embeddings``
    (dot product: cosine for L2-normalised rows), mixed with ``prior_weight`` of all training rows' frequencies
    so that no bucket has zero probability. ``(len(embeddings), num_buckets)``."""
    if k < 1 or not 0 <= prior_weight <= 1:
        raise ValueError(f"k must be >= 1 and prior_weight in [0, 1], got {k}, {prior_weight}")
    labels = torch.as_tensor(train_buckets if torch.is_tensor(train_buckets) else list(train_buckets),
                             dtype=torch.long)
    if len(labels) != len(train_embeddings) or not len(labels):
        raise ValueError(f"{len(train_embeddings)} training embeddings but {len(labels)} buckets")
    prior = torch.bincount(labels, minlength=num_buckets).float() / len(labels)
    k = min(k, len(labels))
    out = []
    for start in range(0, len(embeddings), chunk):
        nearest = (embeddings[start:start + chunk] @ train_embeddings.T).topk(k, dim=1).indices
        counts = torch.zeros(len(nearest), num_buckets).scatter_add_(1, labels[nearest], torch.ones(nearest.shape))
        out.append((1 - prior_weight) * counts / k + prior_weight * prior)
    return torch.cat(out) if out else torch.empty(0, num_buckets)


@torch.inference_mode()
def encoder_embeddings(backbone, prompts: Sequence[str], *, max_prompt_tokens: int, batch_size: int = 64,
                       truncation: PromptTruncation = "head") -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of a `backbone.Backbone`'s encoder (its classification head
    unused), one row per prompt: for MiniLM-L6 the sentence embedding it was trained to give."""
    from predictor_train.backbone import model_input_names

    encoder, names = backbone.model.base_model.eval(), model_input_names(backbone.model)
    out = torch.empty(len(prompts), encoder.config.hidden_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad little
    for start in tqdm(range(0, len(order), batch_size), desc="embedding", leave=False, disable=len(order) < 1000):
        rows = order[start:start + batch_size]
        batch = encode(backbone.tokenizer, [prompts[i] for i in rows], max_prompt_tokens=max_prompt_tokens,
                       input_names=names, truncation=truncation)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[rows] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float()
    return out
