"""How familiar a prompt is to a predictor: its similarity to the prompts the predictor was trained on.

A predictor trained on a few kinds of prompt predicts a new kind about as well as a constant guess (docs/predictor.md,
leave-one-source-out), and its probabilities do not say so. What it can tell is that a prompt looks like none of
its training prompts. The checkpoint keeps the embeddings of a sample of its training prompts (its own encoder's
last hidden states, mean-pooled over the prompt and L2-normalised; ``familiarity.safetensors``). A prompt's
*familiarity* is its mean cosine similarity to the ``k`` most similar of them; below ``threshold``, the score
that a share ``quantile`` (5% by default) of the validation prompts fall under, it counts as *unfamiliar*.

Served traffic like the training data is unfamiliar about ``quantile`` of the time; a kind of prompt the
predictor never saw raises that share (measured in docs/predictor.md: 38-95% of the test prompts of five of seven
held-out sources, 3-6% of the other two that resemble the chat sources kept in training). The server counts
unfamiliar prompts in ``/metrics`` and writes the score into feedback records, so `s3 feedback` can say how much
of the traffic served has drifted from what the predictor learned: a reason to feed it back and retrain.

The bank also keeps each of its prompts' length bucket, and the predictor's probabilities are blended with the
bucket frequencies of a prompt's most similar bank prompts (their *vote*): ``weight * probs + (1 - weight) * vote``,
the number of neighbours and the weight chosen on the validation split by negative log-likelihood (weight 1, no
blend, where the vote does not help). The similarities are those the familiarity already computes, so the blend
costs a top-k over the bank per prompt.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from predictor_train.baselines import neighbour_probs
from predictor_train.checkpoint import FAMILIARITY_FILE, CheckpointInfo, update_info

DEFAULT_K = 10
"""Training prompts each prompt is compared with (the mean similarity of its ``k`` nearest)."""


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over each prompt's tokens, ``(batch, hidden_size)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).float()


@dataclasses.dataclass(frozen=True)
class Familiarity:
    """A checkpoint's training-prompt embeddings and the threshold below which a prompt is unfamiliar; with their
    length buckets, the neighbours' vote that the predictor's probabilities are blended with."""

    bank: torch.Tensor
    """``(n, hidden_size)``, L2-normalised rows."""
    k: int = DEFAULT_K
    threshold: float = 0.0
    buckets: torch.Tensor | None = None
    """``(n,)``: the length bucket of each bank prompt's label (None: a bank of prompts alone, from before)."""
    neighbours: int = 0
    """How many of the most similar bank prompts vote (0: no blend)."""
    weight: float = 1.0
    """The predictor's share of the blended probabilities; the neighbours' vote has the rest."""
    validation_within_one: float | None = None
    """With a blend: the blended arg-max's within-one accuracy on the validation split, what serving should see
    (the checkpoint's ``within_one_accuracy`` is the predictor's alone)."""

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity of each embedded prompt to its ``k`` most similar training prompts."""
        k = min(self.k, len(self.bank))
        return (embeddings.float() @ self.bank.T).topk(k, dim=1).values.mean(1)

    def unfamiliar(self, scores: torch.Tensor) -> torch.Tensor:
        return scores < self.threshold

    def vote(self, embeddings: torch.Tensor, num_buckets: int, k: int | None = None) -> torch.Tensor:
        """The bucket frequencies of each embedded prompt's ``k`` (default `neighbours`) most similar bank prompts,
        a little of the bank's own frequencies mixed in (predictor_train/baselines.py), ``(n, num_buckets)``."""
        assert self.buckets is not None, "a bank without length buckets cannot vote"
        return neighbour_probs(self.bank, self.buckets, embeddings.float(), k=k or self.neighbours,
                               num_buckets=num_buckets)

    def blend(self, probs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``probs`` (calibrated) blended with the neighbours' vote as fitted on validation (`fit_blend`)."""
        if not self.neighbours or self.buckets is None or self.weight >= 1.0:
            return probs
        return self.weight * probs + (1.0 - self.weight) * self.vote(embeddings, probs.shape[-1])

    @classmethod
    def load(cls, folder: str | Path, info: CheckpointInfo) -> "Familiarity | None":
        """The checkpoint's familiarity, or None when it keeps none (older checkpoints, or bank size 0)."""
        if not info.familiarity:
            return None
        path = Path(folder) / FAMILIARITY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: predictor.json describes a familiarity bank but {FAMILIARITY_FILE} "
                                    "is missing; copy the whole checkpoint folder")
        tensors = load_file(str(path))
        return cls(tensors["bank"].float(), k=int(info.familiarity["k"]), threshold=float(info.familiarity["threshold"]),
                   buckets=tensors.get("buckets"), neighbours=int(info.familiarity.get("neighbours", 0)),
                   weight=float(info.familiarity.get("neighbour_weight", 1.0)),
                   validation_within_one=info.familiarity.get("validation_within_one"))


def sample_prompts(prompts: Sequence[str], size: int, *, seed: int = 0, keep: Sequence[str] = ()) -> list[str]:
    """At most ``size`` distinct prompts (retraining repeats its feedback records): every one of ``keep`` (up to
    ``size``), then a sample of the others, the same for the same input."""
    kept = list(dict.fromkeys(keep))[:size]
    rest = sorted(set(prompts) - set(kept))
    room = size - len(kept)
    return kept + (rest if len(rest) <= room else random.Random(seed).sample(rest, room))


def fit_familiarity(predictor, train_prompts: Sequence[str], validation_prompts: Sequence[str], *,
                    bank_size: int, quantile: float, k: int = DEFAULT_K, seed: int = 0, keep: Sequence[str] = (),
                    batch_size: int = 64, lengths: Mapping[str, int] | None = None,
                    validation_lengths: Sequence[int] = ()) -> tuple[Familiarity, torch.Tensor]:
    """Embed a sample of ``train_prompts`` (``keep``: prompts always in it) with ``predictor`` (a `LengthPredictor`)
    and set the threshold at the ``quantile`` of the validation prompts' scores; with every bank prompt's label in
    ``lengths`` and the validation labels, also fit the neighbours' blend (`fit_blend`). Returns the familiarity and
    the validation prompts' scores."""
    if not validation_prompts:
        raise ValueError("the familiarity threshold needs validation prompts")
    prompts = sample_prompts(train_prompts, bank_size, seed=seed, keep=keep)
    bank = predictor.embed(prompts, batch_size=batch_size)
    logits, embedded = predictor.forward(list(validation_prompts), batch_size=batch_size, embed=True)
    scores = Familiarity(bank, k=k).scores(embedded)
    familiarity = Familiarity(bank, k=k, threshold=float(torch.quantile(scores, quantile)))
    if lengths is not None and all(p in lengths for p in prompts) and len(validation_lengths) == len(embedded):
        spec = predictor.buckets
        buckets = torch.tensor([spec.bucket_of(int(lengths[p])) for p in prompts], dtype=torch.long)
        labels = torch.tensor([spec.bucket_of(int(n)) for n in validation_lengths], dtype=torch.long)
        probs = (logits / predictor.temperature).softmax(-1)
        familiarity = fit_blend(dataclasses.replace(familiarity, buckets=buckets), probs, embedded, labels)
        if familiarity.weight < 1:
            served = familiarity.blend(probs, embedded).argmax(-1)
            within = float(((served - labels).abs() <= 1).float().mean())
            familiarity = dataclasses.replace(familiarity, validation_within_one=within)
    return familiarity, scores


BLEND_NEIGHBOURS = (10, 30, 100)
BLEND_WEIGHTS = (1.0, 0.75, 0.5, 0.25)


def fit_blend(familiarity: Familiarity, probs: torch.Tensor, embeddings: torch.Tensor,
              labels: torch.Tensor) -> Familiarity:
    """The number of neighbours and the predictor's weight (1: no blend) that give the validation prompts'
    calibrated ``probs`` blended with their neighbours' vote the lowest negative log-likelihood of ``labels``."""
    def nll(blended: torch.Tensor) -> float:
        return float(-blended[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())

    best = (nll(probs), 0, 1.0)
    for k in BLEND_NEIGHBOURS:
        vote = familiarity.vote(embeddings, probs.shape[-1], k=k)
        for weight in BLEND_WEIGHTS[1:]:
            best = min(best, (nll(weight * probs + (1 - weight) * vote), k, weight))
    return dataclasses.replace(familiarity, neighbours=best[1], weight=best[2])


def build_familiarity(predictor, folder: str | Path, train_prompts: Sequence[str],
                      validation_prompts: Sequence[str], *, bank_size: int, quantile: float, k: int = DEFAULT_K,
                      seed: int = 0, keep: Sequence[str] = (), batch_size: int = 64,
                      lengths: Mapping[str, int] | None = None, validation_lengths: Sequence[int] = ()) -> CheckpointInfo:
    """`fit_familiarity` for ``predictor``, the checkpoint in ``folder`` as loaded, written into it; returns its
    new info."""
    familiarity, scores = fit_familiarity(predictor, train_prompts, validation_prompts, bank_size=bank_size,
                                          quantile=quantile, k=k, seed=seed, keep=keep, batch_size=batch_size,
                                          lengths=lengths, validation_lengths=validation_lengths)
    tensors = {"bank": familiarity.bank.contiguous()}
    if familiarity.buckets is not None:
        tensors["buckets"] = familiarity.buckets.contiguous()
    save_file(tensors, str(Path(folder) / FAMILIARITY_FILE))
    meta = {"k": k, "threshold": familiarity.threshold, "quantile": quantile, "bank_size": len(familiarity.bank),
            "validation_median": float(scores.median()), "neighbours": familiarity.neighbours,
            "neighbour_weight": familiarity.weight, "validation_within_one": familiarity.validation_within_one}
    return update_info(folder, dataclasses.replace(predictor.info, familiarity=meta))
